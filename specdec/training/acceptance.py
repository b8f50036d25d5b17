"""Train SpecDec++'s acceptance-prediction head (arXiv 2405.19715) for a draft model and its target.

Data: the pipeline's ``answers.jsonl`` (the target's own greedy answers to the training prompts; never benchmark
prompts). For each prompt + answer X, the draft model (as the ``draft-model`` drafter runs it: int8 on the CPU by
default) reads X teacher-forced and proposes its greedy token Y_i at every answer position i. The example for
position i is the draft's last hidden state when Y_i is fed after X_<i (what the head sees when drafting),
labelled 1 when Y_i == X_i: the target's greedy choice after X_<i is X_i, so greedy verification would accept Y_i
exactly then. Every example, accepted or not, is computed the way drafting computes it: Y_i alone in a 1-token
forward on the cache of X_<i. (Reusing the teacher-forced states where Y_i == X_i and computing only the others
separately leaked the label: the int8 draft of the time (torch dynamic quantization) quantized activations per
forward, so a head learned which forward a state came from; held-out AUC 0.999 that way, on nothing real.) One
prefill plus ``per_sequence`` one-token forwards per sequence, no target forward.

Where we differ from the paper: it samples Y from the draft and labels with min(1, p/q) (sampling acceptance),
and mixes target and draft tokens in the input (token mixing, r = 0.15) to get many positions from one forward;
we train for greedy acceptance, and the tree mask gives every position its exact context instead of mixing.
The loss is the paper's weighted BCE (rejections weighted ``reject_weight`` = 6).
"""

from __future__ import annotations

import hashlib
import math
import time

import torch

from specdec.drafters.acceptance import AcceptanceHead
from specdec.runner import CausalLMRunner
from specdec.training.instructions import encode_text


def acceptance_examples(draft_model: torch.nn.Module, tokenizer, rows: list[dict], chat: bool = True,
                        max_seq_len: int = 512, per_sequence: int | None = 48, progress: bool = True) -> dict:
    """{"hidden": [N, d] float32, "label": [N] float32, "sequence": [N] long (row index)} over the answer positions
    of ``rows`` (dicts with "prompt" and "answer_ids"): up to ``per_sequence`` of them per row, evenly spaced
    (None: all)."""
    from tqdm.auto import tqdm

    runner = CausalLMRunner(draft_model)
    hidden, labels, owner = [], [], []
    for index, row in enumerate(tqdm(rows, desc="draft forwards", unit="seq", disable=not progress)):
        prompt = encode_text(tokenizer, row["prompt"], chat)[: max_seq_len // 2]
        seq = torch.tensor((prompt + list(row["answer_ids"]))[:max_seq_len], dtype=torch.long)
        p, n = len(prompt), seq.numel()
        if n - p < 1:
            continue
        out = runner.prefill(seq[None], logits_to_keep=0)  # the cache holds X; logits give every Y_i
        guess = out.logits[p - 1:n - 1].argmax(-1).cpu()  # [n - p]: Y_i for answer positions i = p..n-1
        chosen = torch.arange(n - p)
        if per_sequence is not None and chosen.numel() > per_sequence:
            chosen = torch.linspace(0, n - p - 1, per_sequence).round().long().unique()
        for j in chosen.tolist():  # Y_i fed alone after X_<i, as drafting feeds it (1-token forward, same kernels)
            i = p + j
            mask = torch.cat([torch.arange(n) < i, torch.ones(1, dtype=torch.bool)])[None]  # [1, n + 1]
            fed = runner.forward(guess[j:j + 1], torch.tensor([i]), mask, output_hidden_states=True,
                                 logits_to_keep=1)
            hidden.append(fed.hidden_states[-1][0].float().cpu())
            runner.crop(n)
        labels.append((guess[chosen] == seq[p:][chosen]).float())
        owner.append(torch.full((chosen.numel(),), index, dtype=torch.long))
    return {"hidden": torch.stack(hidden), "label": torch.cat(labels), "sequence": torch.cat(owner)}


def held_out(sequence: torch.Tensor, rows: list[dict], fraction: float) -> torch.Tensor:
    """BoolTensor [N]: examples of the sequences held out for evaluation (by a hash of the row id, stable)."""
    chosen = [int(hashlib.sha256(str(r.get("id", i)).encode()).hexdigest(), 16) % 1000 < fraction * 1000
              for i, r in enumerate(rows)]
    return torch.tensor(chosen, dtype=torch.bool)[sequence]


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor, reject_weight: float) -> torch.Tensor:
    """SpecDec++'s loss: sum of w (1 - y) (-log P_reject) + y (-log P_accept) over w sum(1 - y) + sum(y)."""
    log_acc = torch.nn.functional.logsigmoid(logits)
    log_rej = torch.nn.functional.logsigmoid(-logits)
    weights = reject_weight * (1 - labels) + labels
    return -(reject_weight * (1 - labels) * log_rej + labels * log_acc).sum() / weights.sum()


def train_acceptance_head(data: dict, eval_mask: torch.Tensor, layers: int = 3, reject_weight: float = 6.0,
                          epochs: int = 4, batch_size: int = 512, lr: float = 1e-3, seed: int = 0,
                          progress: bool = True) -> tuple[AcceptanceHead, dict]:
    """A head trained on the examples outside ``eval_mask`` (AdamW, cosine schedule); and its held-out metrics
    before and after (loss, accuracy at calibrated 0.5, AUC, mean predicted vs actual acceptance)."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    x, y = data["hidden"], data["label"]
    train_x, train_y = x[~eval_mask], y[~eval_mask]
    head = AcceptanceHead(x.shape[1], layers, reject_weight).init_weights(generator)
    before = evaluate(head, x[eval_mask], y[eval_mask])
    steps = epochs * math.ceil(train_x.shape[0] / batch_size)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    t0 = time.perf_counter()
    with tqdm(total=steps, desc="acceptance head", unit="step", disable=not progress) as bar:
        for _ in range(epochs):
            order = torch.randperm(train_x.shape[0], generator=generator)
            for start in range(0, order.numel(), batch_size):
                batch = order[start:start + batch_size]
                loss = weighted_bce(head(train_x[batch]), train_y[batch], reject_weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    after = evaluate(head, x[eval_mask], y[eval_mask])
    return head.eval(), {"before": before, "after": after, "steps": steps, "seconds": time.perf_counter() - t0,
                         "train_examples": int(train_x.shape[0]), "eval_examples": int(eval_mask.sum()),
                         "train_accept_rate": float(train_y.mean())}


@torch.no_grad()
def evaluate(head: AcceptanceHead, x: torch.Tensor, y: torch.Tensor) -> dict:
    if x.shape[0] == 0:
        return {}
    logits = head(x)
    prob = torch.sigmoid(logits + math.log(head.reject_weight))
    return {"loss": float(weighted_bce(logits, y, head.reject_weight)),
            "accuracy": float(((prob > 0.5).float() == y).float().mean()), "auc": _auc(prob, y),
            "mean_predicted": float(prob.mean()), "accept_rate": float(y.mean())}


def _auc(score: torch.Tensor, label: torch.Tensor) -> float:
    """Area under the ROC curve (the rank statistic; tied scores are ranked in input order, not averaged)."""
    pos, neg = score[label > 0.5], score[label <= 0.5]
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    ranks = torch.cat([pos, neg]).argsort().argsort().double() + 1
    return float((ranks[:pos.numel()].sum() - pos.numel() * (pos.numel() + 1) / 2) / (pos.numel() * neg.numel()))
