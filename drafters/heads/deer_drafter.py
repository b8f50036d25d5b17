"""The ``deer`` drafter: a block of positions below the root, denoised in parallel by DEER heads (``deer.py``).

``create_drafter("deer", target=target, heads=PATH | DeerHeads | None, block_size=None, steps=1, confidence=0.0,
budget="auto")``. Heads are found as for the other trained drafters (given, shipped for this target, or randomly
initialised with a warning).

A proposal is one chain:

1. All ``block_size`` slots start masked.
2. ``steps`` passes fill them. The block is cut into ``steps`` contiguous segments, and pass s fills segment s
   from q conditioned on the prefix and the segments before it. With ``steps=1`` (DEER's single-step decoding)
   every position is conditioned on the prefix only.
3. Greedy takes each slot's argmax; sampling draws from its warped q.
4. The chain is cut before the first position whose confidence (max q) is below ``confidence``.
5. With ``budget="auto"``, the chain is cut again to the length that maximises expected tokens per second under
   the target's measured forward costs. The expected acceptance of a length is the product of the confidences,
   scaled by a running accepted/predicted ratio, as the other drafters size their trees.

Verification is any chain's: greedy, or rejection sampling with the recorded per-position q
(``DraftTree.draft_probs``). It stays lossless because each position's q depends only on the prefix and on earlier
positions, and the cut-offs read q, never the drawn token.

Where we differ from DEER: the paper denoises a 32-token block in one step and verifies all of it; ours has the
left-to-right segments, the confidence cut and the hardware-aware length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from specdec.drafters import register_drafter
from specdec.drafters.heads.drafter import HeadsDrafter
from specdec.errors import InvalidInputError
from specdec.state import DecodeState
from specdec.tree import DraftTree, ProposalKind


@dataclass(frozen=True)
class DeerDrafterConfig:
    block_size: int | None = None  # slots drafted per proposal; None: the heads' trained block (num_heads)
    steps: int = 1  # denoising passes (left-to-right segments); 1 is DEER's single-step decoding
    confidence: float = 0.0  # cut the chain before the first slot whose max q is below this
    budget: "int | str" = "auto"  # max chain length (an int), or "auto": sized to the target's forward costs
    max_budget: int = 32  # cap of an "auto" length
    seed: int = 0  # seeds the generator of randomly initialised heads (when none are given or shipped)
    static_tree: bool = False  # (the heads drafters' field; DEER has no static tree)
    min_prob: float = 0.0  # (the heads drafters' field; DEER cuts its block by ``confidence`` instead)

    def __post_init__(self) -> None:
        if isinstance(self.budget, str) and self.budget != "auto":
            raise InvalidInputError(f"deer budget must be an int >= 1 or 'auto', got {self.budget!r}")
        for name in ("block_size", "steps", "max_budget") + (() if self.budget == "auto" else ("budget",)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise InvalidInputError(f"deer {name} must be an integer >= 1, got {value!r}")
        if not 0.0 <= self.confidence <= 1.0:
            raise InvalidInputError(f"deer confidence must be in [0, 1], got {self.confidence}")


@register_drafter
class DeerDrafter(HeadsDrafter):
    """DEER (arXiv 2512.15176): one-step block drafting by a small diffusion drafter; see this module."""

    name = "deer"
    kind = "deer"

    def __init__(self, target: torch.nn.Module, heads=None, config: DeerDrafterConfig | None = None, **options):
        super().__init__(target, heads, config or DeerDrafterConfig(**options))
        trained = self.heads.block_size
        if self.config.block_size is not None and self.config.block_size > trained:
            raise InvalidInputError(f"deer block_size {self.config.block_size} exceeds the {trained} slots these "
                                    f"heads were trained with; use block_size <= {trained} or train a larger block")

    def propose(self, state: DecodeState) -> DraftTree:
        trained = self.heads.block_size
        n = min(self.config.block_size or trained, state.remaining - 1)
        if n < 1:
            return DraftTree.empty(state.sequence.device)
        t_start = time.perf_counter()
        with torch.no_grad():
            context = self._sync(state)
            dev = context.device
            root = state.sequence[0, -1:].to(dev)
            log_q = self._log_q_fn(state)
            block = torch.zeros(1, trained, dtype=torch.long, device=dev)
            masked = torch.ones(1, trained, dtype=torch.bool, device=dev)
            rows = []
            for segment in torch.arange(n).tensor_split(min(self.config.steps, n)):
                lo, hi = int(segment[0]), int(segment[-1]) + 1  # host ints: the segments are fixed by (n, steps)
                logits = self.heads.block_logits(context[None], root, block, masked)[0, lo:hi]  # [s, N]
                done = block[:, :lo]  # earlier segments: the repetition penalty sees them
                lq = log_q(logits, done.expand(hi - lo, -1) if lo else None)  # [s, V]
                if state.sampling.do_sample:
                    tokens = torch.multinomial(lq.exp(), 1, generator=state.generator).view(-1)
                else:
                    tokens = lq.argmax(-1)
                block[0, lo:hi], masked[0, lo:hi] = tokens, False
                rows.append(lq)
                self.forward_count += 1
            lq = torch.cat(rows)  # [n, V]
            confidence = lq.max(-1).values.exp()  # [n]: reads q only, never the drawn token
            keep = int(torch.cumprod(confidence >= self.config.confidence, 0).sum())  # the one host sync
            length, predicted = self.budget_policy.choose(torch.cumsum(confidence[:keep].log(), 0),
                                                          time.perf_counter() - t_start)
            tokens = block[0, :length]
            probs = lq[:length].exp() if state.sampling.do_sample else None
            kind = ProposalKind.IID if state.sampling.do_sample else ProposalKind.POINT_MASS
            parents = torch.arange(-1, length - 1, device=dev)
            return self._tree(state, tokens, parents, kind, predicted, probs)

    def describe(self) -> dict:
        out = super().describe()
        out.update(block_size=self.config.block_size or self.heads.block_size, steps=self.config.steps,
                   confidence=self.config.confidence)
        return out
