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
  * A lookup branch (``lookup_depth``, ours): the continuation of the latest earlier occurrence of the sequence's
    last n-gram (n = ``lookup_ngram`` down to 1; prompt lookup decoding, Saxena 2023) joins the candidate pool as
    a chain below the root, with its own running acceptance estimate per n-gram size and depth, and competes with
    the template nodes for the budget. Where a chain node repeats a chosen template node's path they share a slot.
    The matrix keeps one candidate list per token, so it cannot follow a long copy from the prompt once the target
    has written the rows of common tokens; on the Qwen 1.5B five Spec-Bench summarization prompts measured 1.2-1.7x
    with the matrix alone, HF prompt lookup 1.1-3.8x (3.4x and 3.8x on two). ``lookup_depth=0`` drafts as the
    reference.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from specdec.budget import ForwardCosts
from specdec.drafters import register_drafter
from specdec.drafters.base import Drafter
from specdec.drafters.prompt_lookup import lookup_continuations
from specdec.drafters.tree_budget import TreeBudget
from specdec.drafters.tree_templates import TEMPLATE_2_2_2, compile_template
from specdec.errors import IncompatibleModelsError, InvalidInputError
from specdec.state import DecodeState, StepOutcome
from specdec.tree import DraftTree

_FORMAT = "specdec.token-recycling.matrix/1"
PRIOR_ROOT_CHILD = 0.4  # prior acceptance of the best candidate below an accepted node (the paper's tau ~2.5)
PRIOR_RANK_DECAY = 0.5  # each lower-ranked sibling is half as likely; the 8 siblings then sum to ~0.8
PRIOR_LOOKUP = (0.45, 0.6, 0.75)  # prior acceptance per chain token of a lookup match on a 1-, 2-, 3(+)-gram


@dataclass(frozen=True)
class TokenRecyclingConfig:
    k: int = 8  # candidates kept per token (the reference's --output-id-topk 8; "2.2.2" uses ranks 0..7)
    template: tuple[tuple[int, ...], ...] = TEMPLATE_2_2_2  # static tree: paths of child ranks below the root
    budget: "int | str" = "auto"  # "auto": hardware-aware node count per step; an int: at most that many nodes
    hot_start: bool = True  # keep matrix and estimates across generate() calls (as the reference); False: reset
    decay: float = 0.95  # weight of the past in each node's acceptance estimate: a memory of ~20 steps
    cost_cache: str | None = None  # directory of forward_costs.json for budget="auto"; None: ~/.cache/specdec
    context_rows: bool = True  # seed empty rows from the prompt's bigrams at every begin() (ours, see above)
    lookup_depth: int = 8  # longest lookup-branch chain (ours, see above); 0: no lookup branch
    lookup_ngram: int = 3  # longest n-gram matched for the lookup branch (down to 1)

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
        for name in ("lookup_depth", "lookup_ngram"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "lookup_depth" else 1):
                raise InvalidInputError(f"token-recycling {name} must be an integer >= "
                                        f"{0 if name == 'lookup_depth' else 1}, got {value!r}")
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
        self.budget_policy = TreeBudget(target, self.config.budget, costs=costs, cache_dir=self.config.cost_cache)
        if self.budget_policy.auto:
            self.budget_policy.measured_costs()
        tpl = self.template
        self._parent_slot = (tpl.parents + 1).to(dev)  # [N] slot of each node's parent in [root, nodes]
        self._ranks = tpl.ranks.to(dev)  # [N]
        edge = math.log(PRIOR_ROOT_CHILD) + tpl.ranks.double() * math.log(PRIOR_RANK_DECAY)  # [N] log prior per edge
        on_path = tpl.path_nodes >= 0
        self.prior = torch.where(on_path, edge[tpl.path_nodes.clamp(min=0)], 0.0).sum(1).exp()  # [N] float64, CPU
        depth = self.config.lookup_depth
        per_token = torch.tensor([PRIOR_LOOKUP[min(n, len(PRIOR_LOOKUP)) - 1]
                                  for n in range(1, self.config.lookup_ngram + 1)], dtype=torch.float64)
        self.lookup_prior = per_token[:, None] ** torch.arange(1, depth + 1, dtype=torch.float64)  # [G, D]
        # The candidate pool: the template's N nodes, then the lookup chain's D nodes (node N + j at depth j + 1).
        n_tpl, width = tpl.size, max(tpl.path_nodes.shape[1], depth)
        chain = torch.arange(n_tpl, n_tpl + depth)  # [D]
        self._pool_parents = torch.cat([tpl.parents, chain - 1])  # [N+D]
        self._pool_parents[n_tpl:n_tpl + 1] = -1  # the chain hangs below the root
        self._pool_depths = torch.cat([tpl.depths, chain - n_tpl + 1])  # [N+D]
        chain_paths = torch.where(chain[None, :] <= chain[:, None], chain[None, :], -1)  # [D, D]
        self._pool_path_nodes = torch.cat([  # [N+D, W] pool node at depth 1..W on each node's path, -1 past it
            torch.nn.functional.pad(tpl.path_nodes, (0, width - tpl.path_nodes.shape[1]), value=-1),
            torch.nn.functional.pad(chain_paths, (0, width - depth), value=-1)])
        self._start = (torch.zeros(self.vocab_size, self.config.k, dtype=torch.long, device=dev),
                       torch.zeros(self.vocab_size, dtype=torch.bool, device=dev))
        self.draft_seconds = 0.0  # running mean of propose + observe time, charged to every tree size
        self._reset()

    # ------------------------------------------------------------------ state
    def _reset(self) -> None:
        self.matrix = self._start[0].clone()  # LongTensor [V, k]: A[w] = candidates after w, best first
        self.written = self._start[1].clone()  # BoolTensor [V]: rows that hold candidates
        self.from_context = torch.zeros_like(self.written)  # BoolTensor [V]: rows seeded from the prompt
        self.estimates = self.prior.clone()  # FloatTensor [N] (float64, CPU): P(template node on the emitted path)
        self.lookup_estimates = self.lookup_prior.clone()  # [G, D]: P(chain prefix of depth d emitted | n-gram n)

    def begin(self, state: DecodeState) -> None:
        if not self.config.hot_start:
            self._reset()
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

        chain, ngram = self._lookup(state)  # [c] CPU (c <= D), n-gram size (0: no chain)
        depth = self.config.lookup_depth
        pool_tokens = torch.cat([tokens, torch.nn.functional.pad(chain, (0, depth - chain.numel()))])  # [N+D]
        pool_valid = torch.cat([valid, torch.arange(depth) < chain.numel()])  # [N+D]
        chain_values = self.lookup_estimates[ngram - 1] if ngram else torch.zeros(depth, dtype=torch.float64)
        keep = self.budget_policy.select(torch.cat([self.estimates, chain_values]), self._pool_parents,
                                         self.draft_seconds, pool_valid)  # [n]
        # token paths of the kept nodes; from_paths merges a chain node into a kept template node with its path
        paths = self._path_tokens(pool_tokens)[keep].tolist()
        tree = DraftTree.from_paths([p[:d] for p, d in zip(paths, self._pool_depths[keep].tolist())], device=dev)

        # budget: the kept nodes, less chain nodes that share a template node's slot; memo for observe: root, pool
        # tokens, usable pool nodes, n-gram size of the lookup chain, seconds spent
        return tree.with_budget(tree.size).with_memo((root, pool_tokens, pool_valid, ngram, time.perf_counter() - t0))

    def _path_tokens(self, pool_tokens: torch.Tensor) -> torch.Tensor:
        """LongTensor [N+D, W]: the tokens on the path to each pool node (depth 1 first), -1 past its depth."""
        nodes = self._pool_path_nodes
        return torch.where(nodes >= 0, pool_tokens[nodes.clamp(min=0)], -1)

    def _lookup(self, state: DecodeState) -> tuple[torch.Tensor, int]:
        """The lookup branch: LongTensor [c] (CPU) continuing the latest earlier match of the last n-gram, and n."""
        length = min(self.config.lookup_depth, state.remaining - 1)
        if length < 1:
            return torch.zeros(0, dtype=torch.long), 0
        paths, n = lookup_continuations(state.sequence[0], self.config.lookup_ngram, 1, length)
        if not paths:
            return torch.zeros(0, dtype=torch.long), 0
        return torch.tensor(paths[0], dtype=torch.long), n

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
        if outcome.tree.memo is None:
            return
        root, pool_tokens, pool_valid, ngram, propose_seconds = outcome.tree.memo
        n = outcome.tree.size
        assert outcome.target_logits.shape[0] >= n + 1, "target_logits must cover [root, nodes]"
        slot_tokens = torch.cat([root, outcome.tree.tokens.to(root.device)])  # [n+1]
        top = outcome.target_logits[:n + 1].topk(self.config.k, dim=-1).indices.to(root.device)  # [n+1, k]
        scored = outcome.scored_slots().to(root.device)  # overlap mode: a rejected sibling's row was never computed
        # A token in several slots: every one of them writes the candidates of its last scored slot (last write
        # wins, and index_put never sees conflicting values for one row).
        same = (slot_tokens[:, None] == slot_tokens[None, :]) & scored[None, :]  # [n+1, n+1]
        last = (same * torch.arange(n + 1, device=root.device)).amax(dim=1)  # [n+1]
        rows = slot_tokens[scored]
        self.matrix[rows] = top[last[scored]]
        self.written[rows] = True
        self.from_context[rows] = False
        self._update_estimates(pool_tokens, pool_valid, ngram, outcome.result.tokens.cpu())
        spent = propose_seconds + time.perf_counter() - t0
        self.draft_seconds = spent if self.draft_seconds == 0.0 else 0.9 * self.draft_seconds + 0.1 * spent

    def _update_estimates(self, pool_tokens: torch.Tensor, usable: torch.Tensor, ngram: int,
                          emitted: torch.Tensor) -> None:
        """Every usable pool node whose fate this step reveals: hit if its path equals the first tokens the step
        emitted (it would have been accepted), miss if it differs within them, unknown if it reaches past them.
        Template nodes update their own estimates, lookup-chain nodes those of their n-gram size and depth."""
        m = min(emitted.numel(), self._pool_path_nodes.shape[1])
        depths = self._pool_depths
        on_path = torch.arange(m)[None, :] < depths[:, None]  # [P, m]
        mismatch = ((self._path_tokens(pool_tokens)[:, :m] != emitted[None, :m]) & on_path).any(dim=1)  # [P]
        hit = ~mismatch & (depths <= m)
        known = (hit | mismatch) & usable
        n_tpl, d = self.template.size, self.config.decay
        for est, k, h in ((self.estimates, known[:n_tpl], hit[:n_tpl]),
                          (self.lookup_estimates[max(ngram, 1) - 1], known[n_tpl:], hit[n_tpl:])):
            est[k] = d * est[k] + (1.0 - d) * h[k].double()

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
