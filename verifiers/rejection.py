"""Speculative sampling (rejection sampling against the draft distribution): lossless for do_sample=True.

Chain (Leviathan, Kalman, Matias 2023, arXiv 2211.17192; Chen et al. 2023, arXiv 2302.01318): a draft token x drawn
from q is *accepted* with probability min(1, p(x)/q(x)); at the first rejection the step ends with a *recovered*
token drawn from norm(max(0, p - q)); when the whole path is accepted it ends with a *bonus* token drawn from p at
the leaf. The emitted tokens are distributed exactly as sampling from p token by token.

Trees (docs/verifiers.md#rejection): at an accepted node the children are tried in turn, the first accepted one
becomes the next node, and after every rejection the target distribution is replaced by the residual. The update
depends on how the drafter chose the children (``tree.proposal``):

  IID                  SpecInfer's multi-step speculative sampling (Miao et al. 2024, arXiv 2305.09781): accept
                       x_j w.p. min(1, r(x_j)/q(x_j)); on reject r <- norm(max(0, r - q)).
  WITHOUT_REPLACEMENT  EAGLE-1 (Li et al. 2024, arXiv 2401.15077): the j-th child was drawn from q_j = q with the
                       siblings before it zeroed and renormalised; use q_j in place of q.
  POINT_MASS           EAGLE-2 (Li et al. 2024, arXiv 2406.16858), for deterministic children (top-k, lookup):
                       accept x_j w.p. r(x_j); on reject r(x_j) <- 0 and renormalise. A repeated sibling token then
                       has r(x) = 0 and is skipped. Lossless for any candidates chosen independently of the target,
                       so a tree without ``draft_probs`` is verified this way.

Here r starts as the warped target distribution p at the node. All residuals of a node's children are computed as
tensors first (``trial``); one vector of uniforms then picks the first accepted child, so a step costs one host
sync per tree level and never loops over the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.sampling import SamplingConfig, sample, uniform, warped_probs
from specdec.tree import DraftTree, ProposalKind
from specdec.verifiers.base import VerificationResult, Verifier

_TINY = 1e-30


@dataclass(frozen=True)
class SiblingTrial:
    """What trying the children of one node in turn amounts to, before any random number is drawn."""

    accept_probs: torch.Tensor  # FloatTensor [k]: P(accept child j | children before j were rejected)
    residual: torch.Tensor  # FloatTensor [V]: distribution of the recovered token once all k are rejected

    def output_distribution(self, tokens: torch.Tensor) -> torch.Tensor:
        """FloatTensor [V]: distribution of the token this node emits (accepted child or recovered token)."""
        out = torch.zeros_like(self.residual)
        reach = torch.ones((), dtype=out.dtype, device=out.device)  # P(children before j all rejected)
        for j in range(tokens.numel()):
            out[tokens[j]] += reach * self.accept_probs[j]
            reach = reach * (1 - self.accept_probs[j])
        return out + reach * self.residual


def normalize(weights: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """weights / sum(weights), or ``fallback`` when the weights are all zero (p == q up to rounding)."""
    total = weights.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, weights / total.clamp_min(_TINY), fallback)


def point_mass_trial(p: torch.Tensor, tokens: torch.Tensor) -> SiblingTrial:
    """EAGLE-2: p [V] the target distribution, tokens [k] deterministic candidates."""
    residual, accept = p, []
    for j in range(tokens.numel()):
        x = tokens[j:j + 1]
        accept.append(residual[x[0]])
        residual = normalize(residual.index_fill(0, x, 0.0), residual)
    return SiblingTrial(torch.stack(accept) if accept else p.new_zeros(0), residual)


def iid_trial(p: torch.Tensor, tokens: torch.Tensor, q: torch.Tensor) -> SiblingTrial:
    """SpecInfer MSS: q [k, V] the distribution each child was drawn from (the same row k times for one drafter)."""
    residual, accept = p, []
    for j in range(tokens.numel()):
        x = tokens[j]
        accept.append((residual[x] / q[j, x].clamp_min(_TINY)).clamp(max=1.0))
        residual = normalize((residual - q[j]).clamp_min(0.0), residual)
    return SiblingTrial(torch.stack(accept) if accept else p.new_zeros(0), residual)


def without_replacement_trial(p: torch.Tensor, tokens: torch.Tensor, q: torch.Tensor) -> SiblingTrial:
    """EAGLE-1: children drawn from q [k, V] (one row per child, all equal) without replacement, in draw order."""
    residual, accept = p, []
    for j in range(tokens.numel()):
        x = tokens[j]
        q_j = normalize(q[j].index_fill(0, tokens[:j], 0.0), q[j])  # q with the siblings drawn before zeroed
        accept.append((residual[x] / q_j[x].clamp_min(_TINY)).clamp(max=1.0))
        residual = normalize((residual - q_j).clamp_min(0.0), residual)
    return SiblingTrial(torch.stack(accept) if accept else p.new_zeros(0), residual)


def proposal_kind(tree: DraftTree) -> ProposalKind:
    """The rule a tree is verified with: its proposal, or POINT_MASS when it carries no draft distribution."""
    return tree.proposal if tree.draft_probs is not None else ProposalKind.POINT_MASS


def children_by_slot(tree: DraftTree) -> list[list[int]]:
    """For slot s (0 = root, i + 1 = node i): the node indices of its children, in node order."""
    children: list[list[int]] = [[] for _ in range(tree.size + 1)]
    for node, parent in enumerate(tree.parents.tolist()):
        children[parent + 1].append(node)
    return children


def first_accepted(accept_probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """Index of the first child whose uniform falls below its acceptance probability, or -1 (one host sync)."""
    hit = uniform(accept_probs.numel(), generator, accept_probs.device) < accept_probs
    return int(torch.where(hit.any(), hit.int().argmax(), -1))


def result_for(tree: DraftTree, path: list[int], next_token: torch.Tensor, bonus: bool) -> VerificationResult:
    nodes = torch.tensor(path, dtype=torch.long, device=tree.tokens.device)
    tokens = torch.cat([tree.tokens[nodes], next_token.reshape(1).to(tree.tokens.device)])
    return VerificationResult(nodes, tokens, bonus)


class RejectionVerifier(Verifier):
    """Speculative sampling over chains and trees; the tree rule follows ``tree.proposal`` (module docstring)."""

    name = "rejection"
    samples = True

    def trial(self, p: torch.Tensor, tokens: torch.Tensor, q: torch.Tensor | None,
              kind: ProposalKind) -> SiblingTrial:
        """Acceptance probabilities and final residual for trying children ``tokens`` [k] at a node with target
        distribution ``p`` [V]; ``q`` [k, V] the draft distribution each child came from (None for POINT_MASS)."""
        if kind is ProposalKind.POINT_MASS:
            return point_mass_trial(p, tokens)
        if kind is ProposalKind.IID:
            return iid_trial(p, tokens, q)
        return without_replacement_trial(p, tokens, q)

    def verify(self, tree: DraftTree, logits: torch.Tensor, sampling: SamplingConfig,
               generator: torch.Generator | None = None) -> VerificationResult:
        assert logits.dim() == 2 and logits.shape[0] == tree.size + 1, "logits must be [n+1, V]"
        assert tree.draft_probs is None or tree.draft_probs.shape == (tree.size, logits.shape[1]), \
            "draft_probs must be [n, V]"
        tree = tree.to(logits.device)
        kind = proposal_kind(tree)
        children = children_by_slot(tree)
        path: list[int] = []
        slot = 0
        while True:
            p = warped_probs(logits[slot:slot + 1], sampling)[0]  # [V] target distribution after this slot
            kids = children[slot]
            if not kids:  # a leaf (or the root of an empty tree): bonus token from p
                return result_for(tree, path, sample(p[None], generator)[0], bonus=True)
            idx = torch.tensor(kids, device=logits.device)
            q = None if kind is ProposalKind.POINT_MASS else tree.draft_probs[idx].float()
            trial = self.trial(p, tree.tokens[idx], q, kind)
            j = first_accepted(trial.accept_probs, generator)
            if j < 0:  # every child rejected: recovered token from the residual
                return result_for(tree, path, sample(trial.residual[None], generator)[0], bonus=False)
            path.append(kids[j])
            slot = kids[j] + 1
