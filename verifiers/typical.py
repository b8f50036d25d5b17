"""Medusa's typical acceptance (Cai et al. 2024, arXiv 2401.10774): LOSSY, an opt-in speed/quality trade.

A draft token x is accepted iff p(x) > min(eps, delta * exp(-H(p))) with eps = 0.09, delta = 0.3 and
H(p) = -sum p log(p + 1e-5), where p is the target's warped distribution after the node's parent (Medusa uses the
temperature-scaled distribution; here top-k/top-p/min-p apply too, so a filtered-out token is never accepted).
The decision is deterministic: among the nodes whose whole path passes, the deepest wins, ties broken by the
larger sum of log p over the path (Medusa ``evaluate_posterior``). The step then ends with a token drawn from p
after the last accepted node. The output distribution is NOT the target's (docs/verifiers.md#typical): the stats
of a generate() with this verifier say ``lossless = False``.
"""

from __future__ import annotations

import torch

from specdec.sampling import SamplingConfig, sample, warped_probs
from specdec.tree import DraftTree
from specdec.verifiers.base import VerificationResult, Verifier


def typical_threshold(probs: torch.Tensor, epsilon: float, delta: float) -> torch.Tensor:
    """FloatTensor [m]: Medusa's acceptance threshold min(eps, delta exp(-H)) for each row of ``probs`` [m, V]."""
    entropy = -(probs * torch.log(probs + 1e-5)).sum(dim=-1)
    return torch.minimum(torch.full_like(entropy, epsilon), delta * torch.exp(-entropy))


class TypicalVerifier(Verifier):
    """Lossy typical acceptance over chains and trees (module docstring)."""

    name = "typical"
    lossless = False
    samples = True

    def __init__(self, epsilon: float = 0.09, delta: float = 0.3):
        self.epsilon = epsilon  # posterior_threshold in Medusa
        self.delta = delta  # posterior_alpha in Medusa

    def verify(self, tree: DraftTree, logits: torch.Tensor, sampling: SamplingConfig,
               generator: torch.Generator | None = None) -> VerificationResult:
        assert logits.dim() == 2 and logits.shape[0] == tree.size + 1, "logits must be [n+1, V]"
        tree = tree.to(logits.device)
        if tree.size == 0:
            return VerificationResult(tree.tokens, sample(warped_probs(logits, sampling), generator)[0], bonus=True)
        probs = warped_probs(logits, sampling)  # [n+1, V]
        threshold = typical_threshold(probs, self.epsilon, self.delta)  # [n+1]
        p_node = probs[tree.parents + 1, tree.tokens]  # [n] p(node token | its parent's path)
        passes = p_node > threshold[tree.parents + 1]
        on_path = tree.ancestors[1:, 1:]  # [n, n] ancestors-or-self among nodes
        good = ~(on_path & ~passes[None, :]).any(dim=1)  # the node and all its ancestors pass
        log_p = torch.where(on_path, torch.log(p_node)[None, :], p_node.new_zeros(()))  # [n, n]
        path_log_p = log_p.sum(dim=1)
        depth = torch.where(good, tree.depths, torch.zeros_like(tree.depths))
        best_depth = int(depth.max())
        if best_depth == 0:
            return VerificationResult(tree.tokens[:0], sample(probs[:1], generator)[0], bonus=False)
        candidates = torch.where(depth == best_depth, path_log_p, torch.full_like(path_log_p, -torch.inf))
        best = int(candidates.argmax())
        path = tree.path_to(best)
        is_leaf = not bool((tree.parents == best).any())
        tokens = torch.cat([tree.tokens[path], sample(probs[best + 1: best + 2], generator)[0]])
        return VerificationResult(path, tokens, bonus=is_leaf)
