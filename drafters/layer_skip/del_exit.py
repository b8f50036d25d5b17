"""DEL: self-speculation by early exit, with the exit layer and draft length chosen every round from shadow tokens.

Zarch, Gao, Jiang, Annavaram, "DEL: Context-Aware Dynamic Exit Layer for Efficient Self-Speculative Decoding"
(COLM 2025, arXiv 2504.05598; docs/drafters.md#del):

- draft = the target's first E layers, then its final norm and LM head (``SkipPlan(exit_layer=E)`` of
  ``specdec.drafters.layer_skip.runner``), a top-1 chain on a draft KV overlay over the target's committed cache;
- shadow tokens: the verification forward yields every layer's hidden states (``needs_target_hidden_states``);
  norm + LM head applied to layer E's states at a verified position is exactly what an exit at E would have
  drafted there, so one step measures, for every candidate exit at once, whether its token would have been
  accepted; per-exit acceptance rates a_E are tracked as exponentially decayed averages (context-aware);
- each round picks (E, gamma) maximising tokens per layer, TPL = N(E, gamma) / cost(E, gamma), with
  N = (1 - a^(gamma+1)) / (1 - a) = sum_{i<=gamma} a^i the expected tokens per round (Leviathan et al.), and
  cost(E, gamma) = gamma (E + h) + (L + h)(1 + g gamma) in layer units (see below); gamma = 0 (no draft) is a
  candidate too, so drafting stops where no exit pays;
- dynamic draft exit: drafting stops early after a token whose top-1 probability is below ``stop_threshold``.
Drafts are POINT_MASS chains, so ``verifier="rejection"`` samples losslessly.

Where we differ from the paper:
- our targets are not LayerSkip-trained (Elhoushi et al., arXiv 2404.16710): their intermediate layers were
  never taught to feed the LM head, so early exits are much weaker than in the paper, and low exits rarely pay;
- verification is the full, unmodified target over [root, draft]: it does not reuse the draft's KV or activations
  of the first E layers (LayerSkip's "cache reuse"), so it costs L layers whatever E is. The cost model says so:
  L + h for verification, growing by a fraction ``verify_growth`` per verified token (a bf16 forward over 8
  tokens costs ~1.17x one token on this CPU, docs/models.md), where h is the LM head in layer units
  (``head_cost``; by default its parameter count over one decoder layer's: ~5 for Qwen2.5-1.5B, whose
  151,936 x 1536 head outweighs five layers) and each draft token costs E + h;
- shadow tokens are costly here: the LM head over every layer's states would cost about a forward on this CPU,
  so they are computed only for the candidate exits (by default every 2nd layer of the upper half) and at most
  ``shadow_positions`` verified positions per step (the root and the accepted nodes, whose next tokens are
  known), and while the choice is not to draft, only every ``probe_interval``-th step (the paper measures every
  round; here, where no exit pays, shadow tokens would be the only cost DEL adds to plain decoding: on Gemma 3
  270M, whose 262,144 x 640 head outweighs all its layers, they made DEL slower than plain decoding);
  ``shadow_seconds`` accumulates the time spent (reported as drafting time by the engine);
- the draft-exit threshold is a fixed option, not derived from the tracked statistics [paper formula unverified].
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from specdec.draft_length import POLICIES, create_length_policy
from specdec.drafters import register_drafter
from specdec.drafters.base import Drafter
from specdec.errors import InvalidInputError
from specdec.drafters.layer_skip.runner import LayerSkipRunner, SkipPlan, draft_chain
from specdec.state import DecodeState, StepOutcome
from specdec.tree import DraftTree


@dataclass(frozen=True)
class DelConfig:
    exits: tuple[int, ...] | None = None  # candidate exit layers E in [1, L-1]; None: every exit_stride-th from L//2
    exit_stride: int = 2  # spacing of the default exits: each one adds an LM head row per shadow position
    max_draft: int = 8  # largest gamma considered (the draft may stop earlier by confidence)
    min_draft: int = 0  # smallest gamma considered (0 lets TPL choose not to draft when no exit pays)
    stop_threshold: float = 0.5  # stop drafting after a token whose top-1 probability is below this
    length_policy: str = "confidence"  # specdec.draft_length: "confidence" (stop_threshold on the newest token),
    #                                    "fixed" (always the chosen gamma) or "hf-heuristic" (HF's schedule)
    decay: float = 0.9  # weight of the past in the per-exit acceptance averages (~10 recent steps)
    prior_acceptance: float = 0.5  # a_E before any observation
    shadow_positions: int = 2  # verified positions per step that get shadow tokens (root first); each adds one
    #   LM-head row per exit: Qwen2.5-1.5B, 7 exits x 2 rows = 6.5 GFLOP + one read of the 467 MB bf16 head,
    #   estimated (not measured) at 15-25% of a one-token forward
    probe_interval: int = 4  # while not drafting (gamma 0), shadow tokens only on every n-th step (1: every step)
    verify_growth: float = 0.02  # verification cost added per verified token, as a fraction of one forward
    head_cost: float | None = None  # LM head cost in layer units; None: its parameters over one layer's

    def __post_init__(self) -> None:
        if self.exit_stride < 1 or self.max_draft < 1 or self.shadow_positions < 1 or self.probe_interval < 1:
            raise InvalidInputError("del exit_stride, max_draft, shadow_positions and probe_interval must be >= 1")
        if not 0 <= self.min_draft <= self.max_draft:
            raise InvalidInputError(f"del min_draft must be in [0, max_draft={self.max_draft}], got {self.min_draft}")
        for name in ("stop_threshold", "prior_acceptance"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InvalidInputError(f"del {name} must be in [0, 1], got {getattr(self, name)}")
        if self.length_policy not in POLICIES:
            raise InvalidInputError(f"del length_policy must be one of {', '.join(POLICIES)}, got "
                                    f"{self.length_policy!r}")
        if not 0.0 <= self.decay < 1.0:
            raise InvalidInputError(f"del decay must be in [0, 1), got {self.decay}")
        if self.verify_growth < 0 or (self.head_cost is not None and self.head_cost < 0):
            raise InvalidInputError("del verify_growth and head_cost must be >= 0")


@dataclass(frozen=True)
class ExitChoice:
    exit_layer: int  # E: layers run per draft token
    gamma: int  # draft tokens to propose at most (0: no draft this round)
    tokens_per_layer: float  # TPL of the choice


def choose_exit(acceptance: torch.Tensor, exits: torch.Tensor, num_layers: int, head_cost: float, max_draft: int,
                verify_growth: float, min_draft: int = 0) -> ExitChoice:
    """argmax over exits E (``exits`` [C], acceptance rates ``acceptance`` [C]) and gamma in [min_draft, max_draft]
    of TPL = N(E, gamma) / (gamma (E + h) + (L + h)(1 + g gamma)), N = sum_{i=0}^{gamma} a_E^i. Ties go to the
    earlier exit, then the shorter draft. One host sync."""
    gammas = torch.arange(max_draft + 1, dtype=torch.float64)  # [G]
    expected = torch.cumsum(acceptance.double()[:, None] ** gammas[None, :], dim=1)[:, min_draft:]  # [C, G]
    gammas = gammas[min_draft:]
    cost = gammas[None, :] * (exits.double()[:, None] + head_cost) \
        + (num_layers + head_cost) * (1.0 + verify_growth * gammas[None, :])  # [C, G]
    tpl = expected / cost
    best = int(tpl.argmax())
    e, g = divmod(best, gammas.numel())
    return ExitChoice(int(exits[e]), int(gammas[g]), float(tpl.flatten()[best]))


@register_drafter
class DelDrafter(Drafter):
    name = "del"
    needs_target_hidden_states = True

    def __init__(self, target: torch.nn.Module, config: DelConfig | None = None, **options):
        super().__init__(target)
        self.config = config or DelConfig(**options)
        c = self.config
        self.runner = LayerSkipRunner(target)
        self.length_policy = create_length_policy(c.length_policy, c.stop_threshold, on="token")
        layers = self.runner.num_layers
        if layers < 2:
            raise InvalidInputError("early exit needs a target with at least 2 layers")
        exits = c.exits if c.exits is not None else tuple(range(max(1, layers // 2), layers, c.exit_stride))
        if not exits or any(not 1 <= e < layers for e in exits) or len(set(exits)) != len(exits):
            raise InvalidInputError(f"del exits must be distinct layers in [1, {layers - 1}], got {exits}")
        self.exits = torch.tensor(sorted(exits))  # [C]
        self.acceptance = torch.full((len(exits),), c.prior_acceptance, dtype=torch.float64)  # [C] a_E
        if c.head_cost is not None:
            self.head_cost = c.head_cost
        else:
            per_layer = sum(p.numel() for p in self.runner.base.layers[0].parameters())
            self.head_cost = self.runner.lm_head.weight.numel() / per_layer
        self.choice: ExitChoice | None = None  # the latest round's (E, gamma)
        self.shadow_seconds = 0.0  # time spent computing shadow tokens
        self.idle_steps = 0  # steps in a row that drafted nothing (shadow tokens on every probe_interval-th)
        self.exit_counts: dict[int, int] = {}  # exit layer -> rounds that drafted with it (since construction)

    def propose(self, state: DecodeState) -> DraftTree:
        c = self.config
        self.choice = choose_exit(self.acceptance, self.exits, self.runner.num_layers, self.head_cost,
                                  c.max_draft, c.verify_growth, c.min_draft)
        gamma = min(self.choice.gamma, state.remaining - 1)
        if gamma < 1:
            return DraftTree.empty(state.sequence.device)
        self.exit_counts[self.choice.exit_layer] = self.exit_counts.get(self.choice.exit_layer, 0) + 1
        chain = draft_chain(self.runner, SkipPlan(exit_layer=self.choice.exit_layer), state.target,
                            state.sequence[0], state.sampling, gamma, self.length_policy)
        self.forward_count += chain.depth
        return DraftTree.chain(chain.tokens.to(state.sequence.device)).with_stop_reason(chain.stop_reason)

    def describe(self) -> dict:
        return {"exits": self.exits.tolist(), "acceptance": [round(float(a), 4) for a in self.acceptance],
                "drafting_rounds_by_exit": dict(sorted(self.exit_counts.items()))}

    def observe(self, state: DecodeState, outcome: StepOutcome) -> None:
        """Shadow tokens: would each candidate exit have drafted the target's token at the verified positions?"""
        if outcome.tree.size:
            self.length_policy.observe(outcome.tree.max_depth, outcome.result.num_accepted)
        hidden = outcome.hidden_states
        if hidden is None:  # e.g. a wrapper replaced the outcome; nothing to learn from this step
            return
        self.idle_steps = self.idle_steps + 1 if outcome.tree.size == 0 else 0
        if self.idle_steps % self.config.probe_interval:  # not drafting: probe the exits now and then only
            return
        t0 = time.perf_counter()
        dev = hidden[0].device
        result = outcome.result
        slots = torch.cat([torch.zeros(1, dtype=torch.long), result.accepted_nodes.cpu() + 1])
        slots = slots[: self.config.shadow_positions].to(dev)  # [k] root, then accepted nodes
        want = result.tokens[: slots.numel()].to(dev)  # [k] the token that followed each slot
        states = torch.stack([hidden[e][slots] for e in self.exits.tolist()])  # [C, k, d] before the final norm
        hits = (self.runner.head(states).argmax(dim=-1) == want[None, :]).double().mean(dim=1)  # [C]
        decay = self.config.decay
        self.acceptance = decay * self.acceptance + (1.0 - decay) * hits.cpu()
        self.shadow_seconds += time.perf_counter() - t0
