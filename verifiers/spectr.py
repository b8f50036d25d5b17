"""SpecTr: optimal-transport draft selection over k i.i.d. drafts (Sun et al., NeurIPS 2023, arXiv 2310.15141).

K-SEQ (docs/verifiers.md#spectr) at a position with target p and k drafts X_1..X_k drawn i.i.d. from q: with
beta(rho) = sum_x min(q(x), p(x)/rho), accept X_i w.p. min(1, p(X_i)/(rho q(X_i))) and emit the first accepted;
if none is accepted (probability (1 - beta)^k) emit a recovered token from

    p_res(x) = [p(x) - min(q(x), p(x)/rho) (1 - (1 - beta)^k) / beta] / (1 - beta)^k.

Any rho in [1, k] with 1 - (1 - beta(rho))^k <= rho beta(rho) makes this lossless; the left side falls and the right
side rises with rho, so the smallest such rho* (the best acceptance, >= (1 - 1/e) of the optimal transport) is found
by bisection, in tensors, without host syncs. k = 1 gives rho* = 1: standard speculative sampling.

Sequence level: the drafts are k i.i.d. sequences, i.e. a tree of IID children whose sibling tokens may repeat
(drafts are never merged). At every position K-SEQ runs over the drafts still consistent with the accepted prefix:
after accepting token x the next candidates are the children of *all* nodes carrying x. Trees drafted otherwise
(without replacement, top-k, no draft distribution) are not i.i.d. drafts; they are verified with the matching
lossless rule of the ``rejection`` verifier.
"""

from __future__ import annotations

import torch

from specdec.sampling import SamplingConfig, sample, warped_probs
from specdec.tree import DraftTree, ProposalKind
from specdec.verifiers.base import VerificationResult
from specdec.verifiers.rejection import (RejectionVerifier, SiblingTrial, children_by_slot, first_accepted, normalize,
                                         result_for)

BISECTION_STEPS = 16  # rho* to (k - 1) / 2^16; any rho above rho* stays lossless, only acceptance shrinks


def kseq_beta(p: torch.Tensor, q: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """beta(rho) = sum_x min(q(x), p(x) / rho) for p, q [V]."""
    return torch.minimum(q, p / rho).sum()


def kseq_rho(p: torch.Tensor, q: torch.Tensor, k: int) -> torch.Tensor:
    """0-d tensor: the smallest rho in [1, k] with 1 - (1 - beta(rho))^k <= rho beta(rho), by bisection."""
    lo = torch.ones((), dtype=p.dtype, device=p.device)
    hi = torch.full((), float(k), dtype=p.dtype, device=p.device)  # valid: 1 - (1 - b)^k <= k b for every b
    if k == 1:
        return lo
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        beta = kseq_beta(p, q, mid)
        valid = 1 - (1 - beta) ** k <= mid * beta
        hi = torch.where(valid, mid, hi)
        lo = torch.where(valid, lo, mid)
    return hi


def kseq_trial(p: torch.Tensor, tokens: torch.Tensor, q: torch.Tensor) -> SiblingTrial:
    """K-SEQ for k = len(tokens) i.i.d. drafts from q [V] against target p [V]."""
    k = tokens.numel()
    rho = kseq_rho(p, q, k)
    kept = torch.minimum(q, p / rho)  # [V] mass of x the drafts may keep
    beta = kept.sum()
    none_accepted = (1 - beta) ** k
    accept = (p[tokens] / (rho * q[tokens]).clamp_min(1e-30)).clamp(max=1.0)
    scale = (1 - none_accepted) / beta.clamp_min(1e-30)
    residual = (p - kept * scale) / none_accepted.clamp_min(1e-30)
    return SiblingTrial(accept, normalize(residual.clamp_min(0.0), p))


class SpecTrVerifier(RejectionVerifier):
    """K-SEQ over the drafts consistent with the accepted prefix (IID trees); other trees as ``rejection``."""

    name = "spectr"

    def trial(self, p: torch.Tensor, tokens: torch.Tensor, q: torch.Tensor | None,
              kind: ProposalKind) -> SiblingTrial:
        if kind is ProposalKind.IID:  # the drafts share their prefix, so every row of q is the same distribution
            return kseq_trial(p, tokens, q[0])
        return super().trial(p, tokens, q, kind)

    def verify(self, tree: DraftTree, logits: torch.Tensor, sampling: SamplingConfig,
               generator: torch.Generator | None = None) -> VerificationResult:
        if tree.draft_probs is None or tree.proposal is not ProposalKind.IID:
            return super().verify(tree, logits, sampling, generator)
        assert logits.dim() == 2 and logits.shape[0] == tree.size + 1, "logits must be [n+1, V]"
        assert tree.draft_probs.shape == (tree.size, logits.shape[1]), "draft_probs must be [n, V]"
        tree = tree.to(logits.device)
        children = children_by_slot(tree)
        tokens = tree.tokens.tolist()
        group = [0]  # slots whose path equals the accepted prefix; group[0] is the one the path goes through
        while True:
            p = warped_probs(logits[group[0]:group[0] + 1], sampling)[0]  # the same context for the whole group
            drafts = [c for slot in group for c in children[slot]]  # the consistent drafts' next tokens
            if not drafts:
                next_token, bonus = sample(p[None], generator)[0], True
                break
            idx = torch.tensor(drafts, device=logits.device)
            trial = self.trial(p, tree.tokens[idx], tree.draft_probs[idx].float(), ProposalKind.IID)
            j = first_accepted(trial.accept_probs, generator)
            if j < 0:
                next_token, bonus = sample(trial.residual[None], generator)[0], False
                break
            x = tokens[drafts[j]]
            group = [drafts[j] + 1] + [c + 1 for c in drafts if tokens[c] == x and c != drafts[j]]
        path = tree.path_to(group[0] - 1).tolist()
        return result_for(tree, path, next_token, bonus)
