"""Greedy verification (T = 0): the longest root-to-node path whose every token is the target's argmax.

Lossless for greedy decoding: the output equals the target's own greedy output (speculative sampling with a
one-hot target distribution; Leviathan et al. 2023, arXiv 2211.17192). Trees as in Medusa/EAGLE
``evaluate_posterior``: ties between equally deep paths go to the first node. With a repetition penalty the engine
hands over penalised logits, so the argmax is HF greedy's with ``repetition_penalty``.
"""

from __future__ import annotations

import torch

from specdec.sampling import SamplingConfig
from specdec.tree import DraftTree
from specdec.verifiers.base import VerificationResult, Verifier


class GreedyVerifier(Verifier):
    name = "greedy"

    def verify(self, tree: DraftTree, logits: torch.Tensor, sampling: SamplingConfig,
               generator: torch.Generator | None = None) -> VerificationResult:
        assert logits.dim() == 2 and logits.shape[0] == tree.size + 1, "logits must be [n+1, V]"
        argmax = logits.argmax(dim=-1)  # [n+1] the target's choice after each slot
        if tree.size == 0:
            return VerificationResult(argmax.new_zeros(0), argmax[:1], bonus=True)
        tree = tree.to(logits.device)
        correct = tree.tokens == argmax[tree.parents + 1]  # [n] node equals the target's choice at its parent
        # A node is accepted iff it and all its ancestors are correct.
        wrong_on_path = tree.ancestors[1:, 1:] & ~correct[None, :]
        good = ~wrong_on_path.any(dim=1)
        depth_if_good = torch.where(good, tree.depths, torch.zeros_like(tree.depths))
        best_depth, best = depth_if_good.max(dim=0)  # first node of the greatest accepted depth
        if int(best_depth) == 0:
            return VerificationResult(argmax.new_zeros(0), argmax[:1], bonus=False)
        best = int(best)
        path = tree.path_to(best)
        is_leaf = not bool((tree.parents == best).any())
        tokens = torch.cat([tree.tokens[path], argmax[best + 1: best + 2]])
        return VerificationResult(path, tokens, bonus=is_leaf)
