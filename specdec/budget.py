"""Hardware-aware draft-tree budgets: how many nodes a tree should have on *this* machine.

A verification forward over n tokens costs ``seconds(n)``; a tree whose best-first nodes are accepted with
probabilities v_1 >= v_2 >= ... yields ``1 + v_1 + ... + v_k`` tokens per step with its first k nodes. The budget is
the k that maximises tokens per second, ``(1 + sum v[:k]) / (draft_seconds + seconds(k + 1))``. This is the tree
sizing of Sequoia (Chen et al. 2024, arXiv 2402.12374), which measures the target's forward time per token count on
the hardware and picks the tree size that maximises the speedup. We differ from Sequoia in two ways: the node values
are running acceptance estimates kept by the drafter (Sequoia builds an optimal tree offline from positional
acceptance vectors), and the cost curve is measured once per model, device, dtype and thread count, then cached
(in memory per model object and on disk as JSON) instead of being profiled per experiment.
"""

from __future__ import annotations

import json
import os
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from specdec.errors import InvalidInputError
from specdec.files import default_cache_dir, write_json_atomic
from specdec.kernels import weights_kind
from specdec.runner import CausalLMRunner, text_config

DEFAULT_SIZES = (1, 2, 4, 8, 16, 32, 64)
CACHE_FILE = "forward_costs.json"


@dataclass(frozen=True)
class ForwardCosts:
    """Seconds of one target forward over n new tokens, measured at a few n and interpolated in between."""

    sizes: tuple[int, ...]  # strictly increasing token counts that were measured
    seconds: tuple[float, ...]  # wall time of one forward at each size

    def __post_init__(self) -> None:
        if not self.sizes or len(self.sizes) != len(self.seconds):
            raise InvalidInputError(f"ForwardCosts needs as many sizes as seconds, and at least one; got "
                                    f"{len(self.sizes)} sizes and {len(self.seconds)} seconds")
        if any(b <= a for a, b in zip(self.sizes, self.sizes[1:])) or self.sizes[0] < 1:
            raise InvalidInputError(f"ForwardCosts sizes must be positive and strictly increasing, got {self.sizes}")
        if any(not s > 0 for s in self.seconds):
            raise InvalidInputError(f"ForwardCosts seconds must be positive, got {self.seconds}")

    @staticmethod
    def from_mapping(seconds_by_size: "dict[int, float]") -> "ForwardCosts":
        """``{tokens: seconds}`` as a preset file would write it, in any order."""
        items = sorted((int(n), float(s)) for n, s in seconds_by_size.items())
        return ForwardCosts(tuple(n for n, _ in items), tuple(s for _, s in items))

    def seconds_for(self, n: "int | torch.Tensor") -> "float | torch.Tensor":
        """Piecewise-linear interpolation of the cost at ``n`` tokens (an int or a tensor of them); linear
        extrapolation past either end (from the last two sizes beyond the last one)."""
        x = torch.as_tensor(n, dtype=torch.float64)
        sizes = torch.tensor(self.sizes, dtype=torch.float64)
        secs = torch.tensor(self.seconds, dtype=torch.float64)
        if sizes.numel() == 1:
            out = secs[0].expand_as(x).clone()
        else:
            hi = torch.searchsorted(sizes, x, right=True).clamp(1, sizes.numel() - 1)  # segment [hi-1, hi]
            lo = hi - 1
            t = (x - sizes[lo]) / (sizes[hi] - sizes[lo])
            out = secs[lo] + t * (secs[hi] - secs[lo])
        out = out.clamp_min(min(self.seconds) * 1e-3)  # a downward extrapolation never reaches zero
        return float(out) if not isinstance(n, torch.Tensor) else out


def choose_budget(node_values: torch.Tensor, costs: ForwardCosts, draft_seconds: float = 0.0,
                  max_nodes: int | None = None) -> int:
    """The number k >= 0 of best-first nodes that maximises expected tokens per second (Sequoia, arXiv 2402.12374).

    node_values: FloatTensor [m] expected acceptance probability of each candidate node, in best-first order (an
                 ancestor-closed order, see :func:`best_first_order`). Tokens with the first k nodes are
                 ``1 + sum(node_values[:k])`` (the +1 is the token the target adds every step); their time is
                 ``draft_seconds + costs.seconds_for(k + 1)`` (one forward over root + k nodes). Ties go to the
                 smaller k.
    """
    assert node_values.dim() == 1, "node_values must be [m]"
    if draft_seconds < 0:
        raise InvalidInputError(f"draft_seconds must be >= 0, got {draft_seconds}")
    m = node_values.numel() if max_nodes is None else min(node_values.numel(), max(int(max_nodes), 0))
    values = node_values[:m].detach().to("cpu", torch.float64)
    tokens = 1.0 + torch.cat([values.new_zeros(1), torch.cumsum(values, 0)])  # [m+1] with k = 0..m nodes
    seconds = draft_seconds + costs.seconds_for(torch.arange(1, m + 2, dtype=torch.float64))  # [m+1]
    return int(torch.argmax(tokens / seconds))  # argmax returns the first maximum


def update_calibration(calibration: float, accepted: int, predicted: float) -> float:
    """The running ratio of accepted to predicted tokens by which auto-sized trees scale their node values.

    After a step whose tree predicted ``predicted`` > 0 tokens: an exponential average over about the last ten
    steps, in [0.05, 4]. After a step without a tree (the budget chose 0 nodes) there is no evidence, so the
    ratio relaxes a tenth of the way back to 1: a low estimate left alone would choose 0 nodes forever and never be
    corrected (measured: medusa stuck at tau 1.00 over 30 prompts)."""
    if predicted > 0:
        ratio = accepted / predicted
        return min(4.0, max(0.05, 0.9 * calibration + 0.1 * ratio * calibration))
    return calibration + 0.1 * (1.0 - calibration)


def best_first_order(values: torch.Tensor, parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order a tree's nodes best first so that every prefix of the order is ancestor-closed.

    values:  FloatTensor [n] running acceptance estimate of each node
    parents: LongTensor [n] parent index (-1 below the root), topological (parents[i] < i)
    Returns (order [n], monotone values in that order [n]). A node's value is capped by its ancestors' (running
    minimum down each path: a node cannot be accepted more often than its parent), then nodes are sorted by value,
    descending; the stable sort keeps a parent before an equally valued child.
    """
    assert values.dim() == 1 and parents.shape == values.shape, "values and parents must be [n]"
    v = values.clone()
    has_parent = parents >= 0
    up = parents.clamp(min=0)
    for _ in range(v.numel()):  # one pass per tree level; stops as soon as nothing changes
        capped = torch.where(has_parent, torch.minimum(v, v[up]), v)
        if torch.equal(capped, v):
            break
        v = capped
    order = torch.sort(v, descending=True, stable=True).indices
    return order, v[order]


def best_nodes(values: torch.Tensor, parents: torch.Tensor, costs: "ForwardCosts | None" = None,
               draft_seconds: float = 0.0, budget: int | None = None,
               usable: torch.Tensor | None = None) -> torch.Tensor:
    """LongTensor [k] (ascending, so topological): the nodes of a candidate tree that a draft keeps.

    The nodes (``values`` [n], ``parents`` [n] as in :func:`best_first_order`) are taken best first, without those
    not ``usable`` [n] (bool; a node may be usable only where its parent is), and the first k are kept: k =
    ``budget`` when given (at most the usable count), else the :func:`choose_budget` count under ``costs``.
    """
    order, ordered = best_first_order(values, parents)
    if usable is not None:
        keep = usable[order]
        order, ordered = order[keep], ordered[keep]
    if budget is not None:
        k = min(int(budget), order.numel())
    elif costs is None:
        raise InvalidInputError("best_nodes needs the target's forward costs when no fixed budget is given")
    else:
        k = choose_budget(ordered, costs, draft_seconds)
    return order[:k].sort().values


# ---------------------------------------------------------------------------------------------- measuring
def measure_forward_costs(model: torch.nn.Module, sizes: tuple[int, ...] = DEFAULT_SIZES, context: int = 256,
                          repeats: int = 3, seconds_per_size: float = 1.5) -> ForwardCosts:
    """Time one forward of ``model`` over n random tokens on top of a ``context``-token cache, for n in ``sizes``.

    Each size runs once to warm up, then up to ``repeats`` times, but no more once the size has taken
    ``seconds_per_size`` (one timed run at least: this keeps slow models, fp32 on a CPU without native bf16 for
    one, to about 25 s in all); the best time counts (the least disturbed by other work on the machine). Runs on
    the model's device and dtype with its own cache; the global RNG is not touched.
    """
    if repeats < 1 or not sizes:
        raise InvalidInputError(f"measure_forward_costs needs repeats >= 1 and some sizes, got {repeats}, {sizes}")
    runner = CausalLMRunner(model)
    dev = runner.device
    if runner.max_positions is not None:  # stay inside the model's positions
        context = max(0, min(context, runner.max_positions - max(sizes)))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, runner.vocab_size, (context + max(sizes),), generator=gen).to(dev)  # [context + max n]
    if context:
        runner.prefill(ids[None, :context])
    else:
        runner.reset()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    seconds = []
    for n in sizes:
        tokens = ids[context:context + n]
        positions = torch.arange(context, context + n, device=dev)
        causal = torch.ones(n, n, dtype=torch.bool, device=dev).tril_()
        best, spent = float("inf"), 0.0
        for r in range(repeats + 1):
            sync()
            t0 = time.perf_counter()
            runner.forward(tokens, positions, causal)
            sync()
            took = time.perf_counter() - t0
            spent += took
            runner.crop(context)
            if r:  # the first run warms up
                best = min(best, took)
                if spent >= seconds_per_size:
                    break
        seconds.append(max(best, 1e-9))
    return ForwardCosts(tuple(int(n) for n in sizes), tuple(seconds))


def cost_key(model: torch.nn.Module, sizes: tuple[int, ...] = DEFAULT_SIZES, context: int = 256) -> str:
    """What the cost of a forward depends on: the model, its device, dtype, weight format and attention
    implementation, torch's threads, the measurement."""
    config = text_config(model)
    weight = model.get_input_embeddings().weight
    device = str(weight.device)
    if weight.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(weight.device)})"
    layers = getattr(config, "num_hidden_layers", None)
    kind = weights_kind(model)
    weights = "" if kind == "dense" else f"|weights={kind}"  # dense keys stay as they were
    attention = getattr(config, "_attn_implementation", None)
    attention = "" if attention in (None, "sdpa") else f"|attn={attention}"  # specdec_cpu: 8x cheaper at 700 keys
    return (f"{getattr(model.config, 'name_or_path', '')}|{type(model).__name__}|hidden={config.hidden_size}|"
            f"layers={layers}|{device}|{weight.dtype}{weights}{attention}|threads={torch.get_num_threads()}|"
            f"sizes={','.join(map(str, sizes))}|context={context}")


_MEMORY: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, ForwardCosts]]" = weakref.WeakKeyDictionary()


def forward_costs(model: torch.nn.Module, cache_dir: "str | os.PathLike | None" = None,
                  sizes: tuple[int, ...] = DEFAULT_SIZES, context: int = 256, progress: bool = True) -> ForwardCosts:
    """The forward costs of ``model``, measured once: reused from memory (per model object) or from
    ``<cache_dir>/forward_costs.json`` (default ``~/.cache/specdec``) when the same key was measured before.

    A measurement says so on stderr (``progress``), with the time it took (about 10 s for a 1.5B model in bf16 on
    two CPU cores, see docs/drafters.md). An unreadable cache file is ignored and rewritten.
    """
    key = cost_key(model, sizes, context)
    remembered = _MEMORY.setdefault(model, {})
    if key in remembered:
        return remembered[key]
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / CACHE_FILE
    table = _read_table(path)
    entry = table.get(key)
    costs = None
    if isinstance(entry, dict):
        try:
            costs = ForwardCosts(tuple(int(n) for n in entry["sizes"]), tuple(float(s) for s in entry["seconds"]))
        except (KeyError, TypeError, ValueError):
            costs = None
    if costs is None:
        if progress:
            print(f"specdec: measuring the target's forward cost at {','.join(map(str, sizes))} tokens (once per "
                  f"model, device, dtype and thread count; cached in {path})...", file=sys.stderr, end="", flush=True)
        t0 = time.perf_counter()
        costs = measure_forward_costs(model, sizes, context)
        if progress:
            print(f" {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        table[key] = {"sizes": list(costs.sizes), "seconds": list(costs.seconds)}
        write_json_atomic(path, table)
    remembered[key] = costs
    return costs


def _read_table(path: Path) -> dict:
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}

