"""SWIFT: the target drafts for itself with some attention and MLP sub-layers skipped, the set found on the fly.

Xia et al., "SWIFT: On-the-Fly Self-Speculative Decoding for LLM Inference Acceleration" (ICLR 2025,
arXiv 2410.06916; docs/drafters.md#swift). No training and no extra model:

- draft model = the target with k = int(2(L - 2) * skip_ratio) of its attention/MLP sub-layers made residual
  passthroughs, never in the first or last layer (``specdec.drafters.layer_skip.runner``); it reads the target's committed KV and
  keeps its own draft K/V aside, so the target cache is never touched;
- the skipped set starts as the odd layers' sub-layers and is optimised during generation (``swift_search``):
  after a verification step, a candidate set is scored by *matchness*, the fraction of the last ``window`` decided
  tokens the skipped model predicts (argmax) when teacher-forced on them in ONE partial forward over the cached
  prefix before them; random proposals, a GP-UCB proposal every ``bayes_interval`` evaluations; the best set drafts;
- drafting is confidence-aware: the top-1 chain stops after the first token whose top-1 probability is below
  ``stop_threshold``, or at ``max_draft`` tokens;
- the tree is the chain plus, at each depth, the top-c alternatives as leaf siblings of the chain token, c from the
  top-1 probability (greedy: > 0.95 -> 3, > 0.8 -> 5, > 0.5 -> 8, else 10; sampling: 1, 3, 5, 10).
Drafts carry no distribution (POINT_MASS trees), so ``verifier="rejection"`` samples losslessly.

Where we differ from the paper, for this CPU (docs/models.md#what-a-forward-costs-on-a-cpu: a 1.5B bf16 forward
costs ~0.2 s for 1 token, ~0.35 s for 16 and ~0.49 s for 32, and one matchness evaluation costs about as much as a
decoding step):
- the search is budgeted: ``iterations_per_step`` = 1 evaluation after each step (paper: 1), at most
  ``max_iterations`` = 40 in total (paper: 1000), ``patience`` = 20 without improvement (paper: 300), a 16-token
  ``window`` (paper: 32, its scripts 50), a GP proposal every 5th evaluation (paper: every 25th) and local random
  moves instead of uniform sets (see ``swift_search``); it stops at ``target_score`` (paper's max_score, 0.95);
- the search state is kept across generate() calls of one drafter (the paper restarts per prompt): with a budget
  of tens of evaluations, a set found on one prompt is the better start for the next;
- ``max_draft`` = 6 (paper: 25) and ``max_nodes`` = 12 caps the tree (chain first, then siblings from the
  shallowest depth): a draft token costs ~0.6 target forwards here (45% of the sub-layers skipped, the LM head
  kept), so with per-token acceptance a the round's tokens per cost, (1 - a^(g+1)) / (1 - a) / (1 + 0.6 g), peak
  at g = 2-5 for a = 0.9-0.95; and verifying 16 tokens costs 1.6x one token, 32 tokens 2.2x;
- found sets can be saved to / loaded from a JSON file keyed by model and task (the paper's skip_layers.json); a
  loaded set, or one given as ``skip_attention`` / ``skip_mlp``, is used as is with no search.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.draft_length import POLICIES, create_length_policy
from specdec.drafters import register_drafter
from specdec.drafters.base import Drafter
from specdec.drafters.layer_skip.swift_search import (LayerSetSearch, SearchConfig, initial_indicator, load_layer_set,
                                           plan_from_indicator, save_layer_set, skippable_count)
from specdec.errors import InvalidInputError
from specdec.drafters.layer_skip.runner import DraftChain, LayerSkipRunner, SkipPlan, draft_chain
from specdec.runner import text_config
from specdec.state import DecodeState, StepOutcome
from specdec.tree import DraftTree


@dataclass(frozen=True)
class SwiftConfig:
    skip_ratio: float = 0.45  # share of the 2(L - 2) skippable sub-layers skipped (paper: 0.45)
    max_draft: int = 6  # chain tokens per proposal (paper: 25; a draft token costs ~0.6 target forwards here)
    stop_threshold: float = 0.8  # stop drafting after a token whose top-1 probability is below this (paper: 0.8)
    length_policy: str = "confidence"  # specdec.draft_length: "confidence" (stop_threshold on the newest token),
    #                                    "fixed" (always max_draft) or "hf-heuristic" (HF's schedule)
    siblings: bool = True  # add the top-c alternatives at each depth as leaf siblings (paper's dynamic tree)
    sibling_thresholds: tuple[float, ...] = (0.95, 0.8, 0.5)  # top-1 probability buckets choosing c (paper)
    greedy_counts: tuple[int, ...] = (3, 5, 8, 10)  # c per bucket, greedy decoding (chain token included; paper)
    sampling_counts: tuple[int, ...] = (1, 3, 5, 10)  # c per bucket, do_sample=True (paper)
    max_nodes: int = 12  # tree size cap: verifying 8 tokens costs 1.17x one token on this CPU, 16 tokens 1.6x
    optimize: bool = True  # search the layer set during generation (off: keep the initial / given set)
    window: int = 16  # decided tokens scored per matchness evaluation (paper: 32, scripts 50)
    iterations_per_step: int = 1  # evaluations after each verification step (each costs ~ a decoding step)
    max_iterations: int = 40  # evaluations in total (paper: 1000)
    target_score: float = 0.95  # stop searching once the best matchness reaches this (paper: 0.95)
    patience: int = 20  # stop after this many evaluations without improvement (paper: 300)
    bayes_interval: int = 5  # every n-th evaluation is a GP-UCB proposal (paper: 25); 0 = random search only
    mutations: int = 2  # sub-layers swapped per random proposal
    seed: int = 0  # seeds the search's private generator (never the global RNG)
    skip_attention: tuple[int, ...] | None = None  # a fixed set (any layers): no search
    skip_mlp: tuple[int, ...] | None = None  # a fixed set (any layers): no search
    layer_set_file: str | None = None  # JSON of found sets by model and task: loaded if present, else saved
    task: str = "default"  # key of the set in layer_set_file
    model_key: str | None = None  # the model's key in layer_set_file; None: "<model_type>-L<layers>-d<hidden>-V<vocab>"

    def __post_init__(self) -> None:
        if not 0.0 <= self.skip_ratio < 1.0:
            raise InvalidInputError(f"swift skip_ratio must be in [0, 1), got {self.skip_ratio}")
        if not 0.0 <= self.stop_threshold <= 1.0:
            raise InvalidInputError(f"swift stop_threshold must be in [0, 1], got {self.stop_threshold}")
        if self.length_policy not in POLICIES:
            raise InvalidInputError(f"swift length_policy must be one of {', '.join(POLICIES)}, got "
                                    f"{self.length_policy!r}")
        for name in ("max_draft", "max_nodes", "window", "iterations_per_step"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"swift {name} must be >= 1, got {getattr(self, name)}")
        for name in ("greedy_counts", "sampling_counts"):
            counts = getattr(self, name)
            if len(counts) != len(self.sibling_thresholds) + 1 or min(counts) < 1:
                raise InvalidInputError(f"swift {name} needs {len(self.sibling_thresholds) + 1} counts >= 1 (one "
                                        f"per sibling_thresholds bucket), got {counts}")
        _ = self.search_config  # validates the search options

    @property
    def search_config(self) -> SearchConfig:
        return SearchConfig(self.max_iterations, self.target_score, self.patience, self.bayes_interval,
                            self.mutations)


@register_drafter
class SwiftDrafter(Drafter):
    name = "swift"
    can_draft_ahead = False  # drafts on the target's own KV cache, which the target's forward is extending

    def __init__(self, target: torch.nn.Module, config: SwiftConfig | None = None, **options):
        super().__init__(target)
        self.config = config or SwiftConfig(**options)
        self.runner = LayerSkipRunner(target)
        c = self.config
        self.length_policy = create_length_policy(c.length_policy, c.stop_threshold, on="token")
        layers = self.runner.num_layers
        cfg = text_config(target)
        vocab = self.runner.lm_head.out_features
        self.model_key = c.model_key or f"{cfg.model_type}-L{layers}-d{cfg.hidden_size}-V{vocab}"
        self.search: LayerSetSearch | None = None
        self.search_forwards = 0  # matchness evaluations (also counted in forward_count)
        self.loaded = False
        if c.skip_attention is not None or c.skip_mlp is not None:
            self.plan = SkipPlan(frozenset(c.skip_attention or ()), frozenset(c.skip_mlp or ()))
        elif c.layer_set_file and (saved := load_layer_set(c.layer_set_file, self.model_key, c.task)) is not None:
            self.plan, self.loaded = saved, True
        else:
            initial = initial_indicator(layers, int(skippable_count(layers) * c.skip_ratio))
            self.plan = plan_from_indicator(initial)
            if c.optimize and 0 < int(initial.sum()) < initial.numel():
                self.search = LayerSetSearch(initial, c.search_config, c.seed)
        self.plan.check(layers)

    # ------------------------------------------------------------------ drafting
    def propose(self, state: DecodeState) -> DraftTree:
        c = self.config
        depth = min(c.max_draft, c.max_nodes, state.remaining - 1)
        if depth < 1:
            return DraftTree.empty(state.sequence.device)
        counts = c.sampling_counts if state.sampling.do_sample else c.greedy_counts
        top_c = max(counts) if c.siblings else 1
        chain = draft_chain(self.runner, self.plan, state.target, state.sequence[0], state.sampling, depth,
                            self.length_policy, top_c)
        self.forward_count += chain.depth
        tree = self._tree(chain, counts if c.siblings else None).with_stop_reason(chain.stop_reason)
        return tree.to(state.sequence.device)

    def _tree(self, chain: DraftChain, counts: tuple[int, ...] | None) -> DraftTree:
        """The chain, each depth followed by its top-c alternatives as siblings (shallowest first within budget)."""
        depth, dev = chain.depth, chain.tokens.device
        if counts is None:
            return DraftTree.chain(chain.tokens)
        p1 = chain.top_probs[:, 0]  # [D]
        thresholds = torch.tensor(self.config.sibling_thresholds, device=dev)
        bucket = (p1[:, None] <= thresholds[None, :]).sum(1)  # [D] 0 = most confident
        extra = (torch.tensor(counts, device=dev)[bucket] - 1).clamp(max=chain.top_ids.shape[1] - 1)  # [D]
        before = torch.cumsum(extra, 0) - extra
        extra = (self.config.max_nodes - depth - before).clamp(min=0).minimum(extra)  # budget, shallowest first
        extra = extra.tolist()
        rows, cols, parents = [], [], []
        chain_node = -1  # node index of the chain token one depth up (-1: the root)
        for d, e in enumerate(extra):
            parents += [chain_node] * (e + 1)  # the chain token and its e siblings share a parent
            chain_node = len(rows)
            rows += [d] * (e + 1)
            cols += list(range(e + 1))
        tokens = chain.top_ids[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)]
        return DraftTree(tokens, torch.tensor(parents, dtype=torch.long, device=dev))

    # ------------------------------------------------------------------ layer-set search
    def observe(self, state: DecodeState, outcome: StepOutcome) -> None:
        if outcome.tree.size:
            self.length_policy.observe(outcome.tree.max_depth, outcome.result.num_accepted)
        search, w = self.search, self.config.window
        if search is None or search.done or state.num_generated < w + 1:
            return
        for _ in range(self.config.iterations_per_step):
            x = search.propose()
            search.register(x, self.matchness(plan_from_indicator(x), state))
            if search.done:
                break
        self.plan = plan_from_indicator(search.best)
        if search.done and self.config.layer_set_file:
            self.save(self.config.layer_set_file)

    def matchness(self, plan: SkipPlan, state: DecodeState) -> float:
        """Fraction of the last ``window`` tokens of the sequence that ``plan``'s argmax predicts when fed the token
        before each (teacher forcing) in one partial forward over the target's cached prefix before them."""
        w = self.config.window
        seq = state.sequence[0]
        start = seq.numel() - 1 - w  # cache slots [0, start) hold seq[:start]
        kv = self.runner.new_kv(state.target, start)
        positions = torch.arange(start, start + w, device=state.target.device)
        logits = self.runner.forward(plan, seq[start:start + w], positions, kv)  # [w, V]
        self.forward_count += 1
        self.search_forwards += 1
        return float((logits.argmax(dim=-1) == seq[start + 1:].to(logits.device)).float().mean())

    def describe(self) -> dict:
        search = self.search
        return {"skip_attention": sorted(self.plan.skip_attention), "skip_mlp": sorted(self.plan.skip_mlp),
                "search_evaluations": search.iterations if search is not None else 0,
                "best_matchness": search.best_score if search is not None and search.iterations else None,
                "loaded": self.loaded}

    def save(self, path: str) -> None:
        """Write the current layer set under (model_key, task) in the JSON file ``path``."""
        score = self.search.best_score if self.search is not None else None
        save_layer_set(path, self.model_key, self.config.task, self.plan, score)
