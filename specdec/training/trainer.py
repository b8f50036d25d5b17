"""Training one kind of draft heads on the cached features, with resumable checkpoints.

What a step minimises comes from the kind's objective (``objective_for``): the heads' loss (``loss.py``) for the
tree heads, DEER's two-stage block objective (``diffusion.py``) for ``deer``; the loop below is shared.

AdamW, linear warm-up then cosine decay to ``min_lr_fraction`` (Medusa-1: cosine, warm-up; lr 1e-3), global
grad-norm clipping, optional bf16 autocast, an evaluation on the held-out split every ``eval_every`` steps
(loss, per-head top-1/top-5 agreement with the target's greedy token) and early stopping when the held-out loss
has not improved for ``patience`` evaluations; the best heads (by held-out loss) are the result.

The number of steps is planned once, before the first step: ``max_epochs`` passes over the training split, or
fewer when a deadline is given (two probe steps are timed and the plan keeps what fits). The plan, the weights,
the optimizer, the scheduler, the step, the generator state and the best weights so far go into
``checkpoint.pt`` (written atomically) at every evaluation; a resumed run continues from it with the same batches
(batch order is a function of the seed and the epoch), so it ends where an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from specdec.files import load_tensors, write_atomic
from specdec.training.batches import collate
from specdec.training.diffusion import DiffusionObjective
from specdec.training.loss import HeadsObjective
from specdec.training.recipe import TrainRecipe

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class Evaluation:
    loss: float  # weighted held-out loss (the early-stopping criterion)
    top1: list  # per head: P(head's best token == target's token)
    top5: list  # per head: P(target's token among head's best 5)
    accuracies: list  # [K][10]: P(head's i-th ranked token == target's token)
    positions: int  # held-out positions scored by head 0


@dataclass(frozen=True)
class TrainResult:
    heads: torch.nn.Module  # the best heads (by held-out loss), in eval mode
    steps: int  # optimizer steps taken in all (resumed runs included)
    planned_steps: int  # the schedule's length
    seconds: float  # training time in all (resumed runs included)
    initial: Evaluation  # held-out metrics of the freshly initialised heads
    final: Evaluation  # held-out metrics of the returned heads
    stopped: str  # "planned", "early-stop", "deadline" or "interrupted"


def lr_factor(step: int, total: int, warmup: int, floor: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_at(train: list, step: int, batch_size: int, seed: int) -> list:
    """The sequences of optimizer step ``step``: epoch e is a permutation drawn from a generator seeded (seed, e)."""
    per_epoch = max(1, len(train) // batch_size)
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return [train[j] for j in order[i * batch_size:(i + 1) * batch_size]]


def objective_for(heads):
    """DEER trains its block with the two-stage diffusion objective; every other kind with the heads' loss."""
    if heads.config.kind == "deer":
        return DiffusionObjective()
    return HeadsObjective()


def _autocast(enabled: bool, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


@torch.no_grad()
def evaluate(heads, held_out: list, recipe: TrainRecipe, device: torch.device) -> Evaluation:
    heads.eval()
    k_heads = heads.config.num_heads
    hits, counts, loss_sum, batches = torch.zeros(k_heads, 10), torch.zeros(k_heads), 0.0, 0
    for start in range(0, len(held_out), recipe.batch_size):
        batch = collate(held_out[start:start + recipe.batch_size])
        with _autocast(recipe.bf16_autocast, device):
            loss, h, c = objective_for(heads).score(heads, batch, recipe, device)
        loss_sum += loss
        hits, counts, batches = hits + h, counts + c, batches + 1
    acc = hits / counts.clamp_min(1)[:, None]
    heads.train()
    return Evaluation(loss_sum / max(batches, 1), acc[:, 0].tolist(), acc[:, :5].sum(1).tolist(), acc.tolist(),
                      int(counts[0]))


def _save_atomic(state: dict, path: Path) -> None:
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def train_heads_on(heads, train: list, held_out: list, recipe: TrainRecipe, folder: "str | os.PathLike",
                   generator: torch.Generator, deadline: float | None = None, resume: bool = True,
                   progress: bool = True, stop_after: int | None = None) -> TrainResult:
    """Train ``heads`` (built, attached to the target) on ``train``; checkpoints in ``folder``. ``stop_after``
    ends the run after that many steps of this call, as a kill would (tests)."""
    from tqdm.auto import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    device = next(heads.parameters()).device
    objective = objective_for(heads)
    params = [p for p in heads.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    path = folder / CHECKPOINT
    state = load_tensors(path, "training checkpoint") if resume and path.is_file() else None
    if state is not None:
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["rng"])
        total, initial = state["planned_steps"], Evaluation(**state["initial"])
    else:
        initial = evaluate(heads, held_out, recipe, device)
        total = max(1, int(recipe.max_epochs * max(1, len(train) // recipe.batch_size)))
        if deadline is not None:
            total = min(total, _steps_that_fit(heads, train, recipe, device, deadline, len(held_out)))
    warmup = max(1, int(recipe.warmup_fraction * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, recipe.min_lr_fraction))
    if state is not None:  # the constructor set lr for step 0: put back the saved step's
        scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
    step = state["step"] if state else 0
    best_loss = state["best_loss"] if state else initial.loss
    best = state["best"] if state else {k: v.detach().clone() for k, v in heads.state_dict().items()}
    bad_evals = state["bad_evals"] if state else 0
    seconds = state["seconds"] if state else 0.0
    stopped = "planned"
    heads.train()
    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=step, desc=f"train {heads.config.kind}", unit="step", disable=not progress)
    with bar:
        taken = 0
        while step < total:
            if stop_after is not None and taken >= stop_after:
                stopped = "interrupted"
                break
            if deadline is not None and time.monotonic() > deadline:
                stopped = "deadline"
                break
            batch = collate(batch_at(train, step, recipe.batch_size, recipe.seed))
            with _autocast(recipe.bf16_autocast, device):
                loss = objective.loss(heads, batch, recipe, device, step / total, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
            optimizer.step()
            scheduler.step()
            step, taken = step + 1, taken + 1
            bar.update(1)
            bar.set_postfix_str(" ".join(f"h{k}={v:.2f}" for k, v in enumerate(loss.per_head)))
            if step % recipe.eval_every == 0 or step == total:
                ev = evaluate(heads, held_out, recipe, device)
                if ev.loss < best_loss:
                    best_loss, bad_evals = ev.loss, 0
                    best = {k: v.detach().clone() for k, v in heads.state_dict().items()}
                else:
                    bad_evals += 1
                bar.write(f"[{heads.config.kind}] step {step}: held-out loss {ev.loss:.3f}, top-1 "
                          + " ".join(f"{a:.2f}" for a in ev.top1))
                _save_atomic({"heads": heads.state_dict(), "optimizer": optimizer.state_dict(),
                              "scheduler": scheduler.state_dict(), "rng": generator.get_state(), "step": step,
                              "planned_steps": total, "best_loss": best_loss, "best": best, "bad_evals": bad_evals,
                              "seconds": seconds + time.perf_counter() - t0, "initial": initial.__dict__}, path)
                if bad_evals >= recipe.patience:
                    stopped = "early-stop"
                    break
    seconds += time.perf_counter() - t0
    heads.load_state_dict(best)
    heads.eval()
    final = evaluate(heads, held_out, recipe, device)
    heads.eval()
    return TrainResult(heads, step, total, seconds, initial, final, stopped)


def _steps_that_fit(heads, train, recipe, device, deadline: float, held_out: int) -> int:
    """Time two probe steps (gradients discarded) and keep what fits before ``deadline``, evaluations included."""
    times = []
    for s in range(2):
        batch = collate(batch_at(train, s, recipe.batch_size, recipe.seed))
        t = time.perf_counter()
        with _autocast(recipe.bf16_autocast, device):
            loss = objective_for(heads).loss(heads, batch, recipe, device, 0.0, torch.Generator().manual_seed(s))
        loss.total.backward()
        times.append(time.perf_counter() - t)
    heads.zero_grad(set_to_none=True)
    per_step = min(times) * 1.1  # optimizer step and noise
    eval_cost = per_step / 3 * held_out / recipe.batch_size  # forward only
    left = deadline - time.monotonic()
    fit = int(left / (per_step + eval_cost / recipe.eval_every)) - 1
    return max(1, fit)
