"""Token Recycling: draft from the candidate tokens the target itself ranked at earlier steps.

Luo et al., ACL 2025, arXiv 2408.08696 (repo Luowaterbi/TokenRecycling). An adjacency matrix A [V, k] keeps, for every
token w, the top-k next tokens the target produced the last time w was in a verified slot. A draft fills a static
tree template (paths of child ranks, default "2.2.2": 80 nodes) breadth first: node token = A[parent token, rank],
one gather per level. After every verification, the row of every verified slot's token (root and all nodes, accepted
or not) is overwritten with the top-k of the target's logits at that slot; a token in several slots keeps the last.

Where we differ from the reference:
  * Tree size: the reference always verifies all 80 nodes. With ``budget="auto"`` the template is pruned every step
    to the node count that maximises expected tokens per second on this hardware (``specdec.budget``, Sequoia-style,
    arXiv 2402.12374), from the target's measured forward costs, the drafting time, and a running acceptance
    estimate per template node: an exponentially decayed rate of "this node's path equals the tokens the step
    emitted", updated for every template node whose outcome the step reveals (pruned ones too), starting from a prior
    that falls with depth and child rank. An integer budget keeps that many nodes, chosen by the same estimates.
  * Nodes below a token whose row was never written (the reference fills them with token 0) and siblings repeating
    an earlier sibling's token (only possible with a loaded or hand-made matrix) are dropped with their subtrees,
    so no verification slot is spent on them. A cold start therefore proposes nothing at its first step.
  * Rows the target never wrote are seeded from the prompt's own bigrams (``context_rows``, ours): at begin(),
    every prompt token whose row is empty gets the token that last followed it in the prompt as its only
    candidate (the reference starts from zeros and never looks at the prompt; drafters do not see prefill logits).
    Without it a cold matrix stays cold on this hardware: a pruned tree verifies few slots, and only verified
    slots write rows, so most roots have no candidates for many steps. Target-written rows always win.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from specdec.budget import ForwardCosts, best_first_order, choose_budget, forward_costs
from specdec.drafters import register_drafter
from specdec.drafters.base import Drafter
from specdec.drafters.tree_templates import TEMPLATE_2_2_2, compile_template
from specdec.errors import IncompatibleModelsError, InvalidInputError
from specdec.state import DecodeState, StepOutcome
from specdec.tree import DraftTree

_FORMAT = "specdec.token-recycling.matrix/1"
PRIOR_ROOT_CHILD = 0.4  # prior acceptance of the best candidate below an accepted node (the paper's tau ~2.5)
PRIOR_RANK_DECAY = 0.5  # each lower-ranked sibling is half as likely; the 8 siblings then sum to ~0.8


@dataclass(frozen=True)
class TokenRecyclingConfig:
    k: int = 8  # candidates kept per token (the reference's --output-id-topk 8; "2.2.2" uses ranks 0..7)
    template: tuple[tuple[int, ...], ...] = TEMPLATE_2_2_2  # static tree: paths of child ranks below the root
    budget: "int | str" = "auto"  # "auto": hardware-aware node count per step; an int: at most that many nodes
    hot_start: bool = True  # keep matrix and estimates across generate() calls (as the reference); False: reset
    decay: float = 0.95  # weight of the past in each node's acceptance estimate: a memory of ~20 steps
    cost_cache: str | None = None  # directory of forward_costs.json for budget="auto"; None: ~/.cache/specdec
    context_rows: bool = True  # seed empty rows from the prompt's bigrams at every begin() (ours, see above)

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise InvalidInputError(f"token-recycling k must be an integer >= 1, got {self.k!r}")
        object.__setattr__(self, "template", tuple(tuple(int(r) for r in p) for p in self.template))
        compiled = compile_template(self.template)
        if compiled.max_rank >= self.k:
            raise InvalidInputError(f"the tree template uses child rank {compiled.max_rank}, but the matrix keeps "
                                    f"only k={self.k} candidates per token")
        if self.budget != "auto" and (isinstance(self.budget, bool) or not isinstance(self.budget, int)
                                      or self.budget < 1):
            raise InvalidInputError(f"token-recycling budget must be 'auto' or an integer >= 1, got {self.budget!r}")
        if not 0.0 <= self.decay < 1.0:
            raise InvalidInputError(f"token-recycling decay must be in [0, 1), got {self.decay}")


@register_drafter
class TokenRecyclingDrafter(Drafter):
    name = "token-recycling"

    def __init__(self, target: torch.nn.Module, config: TokenRecyclingConfig | None = None,
                 costs: "ForwardCosts | Mapping[int, float] | None" = None, **options):
        """``costs``: the target's forward costs for ``budget="auto"`` (or ``{tokens: seconds}``); None measures
        them (once per model, cached on disk under ``config.cost_cache``)."""
        super().__init__(target)
        self.config = config or TokenRecyclingConfig(**options)
        self.template = compile_template(self.config.template)
        weight = target.get_input_embeddings().weight
        self.vocab_size = int(weight.shape[0])
        if self.config.k > self.vocab_size:
            raise InvalidInputError(f"token-recycling k={self.config.k} exceeds the vocabulary ({self.vocab_size})")
        dev = weight.device
        self.costs = ForwardCosts.from_mapping(costs) if isinstance(costs, Mapping) else costs
        if self.costs is None and self.config.budget == "auto":
            self.costs = forward_costs(target, cache_dir=self.config.cost_cache)
        tpl = self.template
        self._parent_slot = (tpl.parents + 1).to(dev)  # [N] slot of each node's parent in [root, nodes]
        self._ranks = tpl.ranks.to(dev)  # [N]
        edge = math.log(PRIOR_ROOT_CHILD) + tpl.ranks.double() * math.log(PRIOR_RANK_DECAY)  # [N] log prior per edge
        on_path = tpl.path_nodes >= 0
        self.prior = torch.where(on_path, edge[tpl.path_nodes.clamp(min=0)], 0.0).sum(1).exp()  # [N] float64, CPU
        self._start = (torch.zeros(self.vocab_size, self.config.k, dtype=torch.long, device=dev),
                       torch.zeros(self.vocab_size, dtype=torch.bool, device=dev))
        self.draft_seconds = 0.0  # running mean of propose + observe time, charged to every tree size
        self._reset()

    # ------------------------------------------------------------------ state
    def _reset(self) -> None:
        self.matrix = self._start[0].clone()  # LongTensor [V, k]: A[w] = candidates after w, best first
        self.written = self._start[1].clone()  # BoolTensor [V]: rows that hold candidates
        self.from_context = torch.zeros_like(self.written)  # BoolTensor [V]: rows seeded from the prompt, not the target
        self.estimates = self.prior.clone()  # FloatTensor [N] (float64, CPU): P(template node on the emitted path)
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # root, filled template, valid
        self._propose_seconds = 0.0

    def begin(self, state: DecodeState) -> None:
        if not self.config.hot_start:
            self._reset()
        self._last = None
        if self.config.context_rows:
            self._seed_from_context(state.sequence[0].to(self.matrix.device))

    def _seed_from_context(self, tokens: torch.Tensor) -> None:
        """Rows not written by the target (empty or seeded before) <- the token that last followed theirs in
        ``tokens`` [L], repeated k times (repeats are not drafted, so it is the row's one candidate)."""
        if tokens.numel() < 2:
            return
        prev, nxt = tokens[:-1], tokens[1:]  # [L-1] bigrams
        order = torch.argsort(prev, stable=True)
        sorted_prev = prev[order]
        last = torch.ones_like(sorted_prev, dtype=torch.bool)
        last[:-1] = sorted_prev[1:] != sorted_prev[:-1]  # the last occurrence of each distinct token
        rows, cand = prev[order[last]], nxt[order[last]]  # distinct rows, no index_put conflicts
        free = ~self.written[rows] | self.from_context[rows]
        rows, cand = rows[free], cand[free]
        self.matrix[rows] = cand[:, None].expand(-1, self.config.k)
        self.written[rows] = True
        self.from_context[rows] = True

    # ------------------------------------------------------------------ drafting
    def propose(self, state: DecodeState) -> DraftTree:
        t0 = time.perf_counter()
        dev = self.matrix.device
        tpl = self.template
        root = state.sequence[0, -1:].to(dev)  # [1]
        filled = torch.empty(tpl.size + 1, dtype=torch.long, device=dev)  # [N+1] tokens of [root, nodes]
        filled[:1] = root
        for lo, hi in tpl.levels:  # one gather per level: token = A[parent token, rank]
            filled[lo + 1:hi + 1] = self.matrix[filled[self._parent_slot[lo:hi]], self._ranks[lo:hi]]
        host = torch.stack([filled, self.written[filled].long()]).cpu()  # [2, N+1]: the step's one host sync
        tokens, row_written = host[0, 1:], host[1].bool()
        valid = self._valid_nodes(tokens, row_written, state.remaining - 1)  # [N]

        order, values = best_first_order(self.estimates, tpl.parents)
        usable = valid[order]
        order, values = order[usable], values[usable]
        if self.config.budget == "auto":
            n = choose_budget(values, self.costs, self.draft_seconds)
        else:
            n = min(int(self.config.budget), order.numel())
        chosen = order[:n].sort().values  # breadth-first template order is topological
        remap = torch.full((tpl.size,), -1, dtype=torch.long)
        remap[chosen] = torch.arange(n)
        parents = tpl.parents[chosen]
        parents = torch.where(parents >= 0, remap[parents.clamp(min=0)], parents)

        self.tree_budget = n
        self._last = (root, tokens, valid)
        self._propose_seconds = time.perf_counter() - t0
        return DraftTree(tokens[chosen].to(dev), parents.to(dev))

    def _valid_nodes(self, tokens: torch.Tensor, row_written: torch.Tensor, max_depth: int) -> torch.Tensor:
        """BoolTensor [N] (CPU): nodes worth verifying: on their whole path, every node's parent row is written, no
        node repeats an earlier sibling's token, and the depth is within what generate() still allows."""
        tpl = self.template
        twin = (tpl.parents[:, None] == tpl.parents[None, :]) & (tokens[:, None] == tokens[None, :])  # [N, N]
        repeat = twin.tril(diagonal=-1).any(dim=1)  # an earlier sibling has this token
        ok = row_written[tpl.parents + 1] & ~repeat & (tpl.depths <= max_depth)  # [N] the node itself
        on_path = tpl.path_nodes >= 0  # [N, D]
        return (ok[tpl.path_nodes.clamp(min=0)] | ~on_path).all(dim=1)

    # ------------------------------------------------------------------ learning
    def observe(self, state: DecodeState, outcome: StepOutcome) -> None:
        t0 = time.perf_counter()
        if self._last is None:
            return
        root, filled, valid = self._last
        n = outcome.tree.size
        assert outcome.target_logits.shape[0] >= n + 1, "target_logits must cover [root, nodes]"
        slot_tokens = torch.cat([root, outcome.tree.tokens.to(root.device)])  # [n+1]
        top = outcome.target_logits[:n + 1].topk(self.config.k, dim=-1).indices.to(root.device)  # [n+1, k]
        # A token in several slots: every one of them writes the candidates of its last slot (last write wins,
        # and index_put never sees conflicting values for one row).
        same = slot_tokens[:, None] == slot_tokens[None, :]  # [n+1, n+1]
        last = (same * torch.arange(n + 1, device=root.device)).amax(dim=1)  # [n+1]
        self.matrix[slot_tokens] = top[last]
        self.written[slot_tokens] = True
        self.from_context[slot_tokens] = False
        self._update_estimates(filled, valid, outcome.result.tokens.cpu())
        self._last = None
        spent = self._propose_seconds + time.perf_counter() - t0
        self.draft_seconds = spent if self.draft_seconds == 0.0 else 0.9 * self.draft_seconds + 0.1 * spent

    def _update_estimates(self, filled: torch.Tensor, valid: torch.Tensor, emitted: torch.Tensor) -> None:
        """Every valid template node whose fate this step reveals: hit if its path equals the first tokens the
        step emitted (it would have been accepted), miss if it differs within them, unknown if it reaches past."""
        tpl = self.template
        m = min(emitted.numel(), tpl.path_nodes.shape[1])
        path_tokens = torch.where(tpl.path_nodes >= 0, filled[tpl.path_nodes.clamp(min=0)], -1)[:, :m]  # [N, m]
        on_path = torch.arange(m)[None, :] < tpl.depths[:, None]  # [N, m]
        mismatch = ((path_tokens != emitted[None, :m]) & on_path).any(dim=1)  # [N]
        hit = ~mismatch & (tpl.depths <= m)
        known = (hit | mismatch) & valid
        d = self.config.decay
        self.estimates[known] = d * self.estimates[known] + (1.0 - d) * hit[known].double()

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """Write the adjacency matrix (and which rows hold candidates) to ``path`` with torch.save."""
        torch.save({"format": _FORMAT, "vocab_size": self.vocab_size, "k": self.config.k,
                    "matrix": self.matrix.cpu(), "written": self.written.cpu()}, path)

    def load(self, path) -> None:
        """Replace the matrix by one written by :meth:`save`; it is also the start state of cold starts."""
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a damaged file
            raise InvalidInputError(f"cannot read a Token Recycling matrix from {path}: {type(e).__name__}: {e}") \
                from e
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise InvalidInputError(f"{path} is not a Token Recycling matrix saved by TokenRecyclingDrafter.save")
        vocab, k = data.get("vocab_size"), data.get("k")
        if vocab != self.vocab_size or k != self.config.k:
            raise IncompatibleModelsError(
                f"the matrix in {path} is for a vocabulary of {vocab} tokens with k={k}; this drafter's target has "
                f"{self.vocab_size} tokens and k={self.config.k}")
        matrix, written = data.get("matrix"), data.get("written")
        if (not isinstance(matrix, torch.Tensor) or matrix.shape != (vocab, k) or matrix.dtype != torch.long
                or not isinstance(written, torch.Tensor) or written.shape != (vocab,) or written.dtype != torch.bool
                or bool((matrix < 0).any()) or bool((matrix >= vocab).any())):
            raise InvalidInputError(f"{path} holds a damaged Token Recycling matrix (wrong shape, type or ids)")
        dev = self.matrix.device
        self._start = (matrix.to(dev), written.to(dev))
        self.matrix, self.written = self._start[0].clone(), self._start[1].clone()
        self.from_context = torch.zeros_like(self.written)
