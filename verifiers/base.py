"""The verifier interface and the one result type every verifier returns.

Vocabulary (as in vLLM's rejection sampler): *accepted* tokens are draft nodes the target keeps; after the first
rejection the step ends with a *recovered* token (drawn from the target, or its residual); when a whole root-to-leaf
path is accepted the step ends with a *bonus* token drawn from the target at the leaf. Either way a step emits
``accepted + 1`` tokens, and we call that last token ``next_token``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from specdec.sampling import SamplingConfig
from specdec.tree import DraftTree


@dataclass(frozen=True)
class VerificationResult:
    accepted_nodes: torch.Tensor  # LongTensor [a]: draft node indices on the accepted path, depth 1..a
    tokens: torch.Tensor  # LongTensor [a + 1]: accepted tokens followed by next_token (recovered or bonus)
    bonus: bool  # True when next_token is a bonus token (the path ended at a leaf, all accepted)

    @property
    def num_accepted(self) -> int:
        return int(self.accepted_nodes.numel())

    @staticmethod
    def make_dummy(num_accepted: int = 2) -> "VerificationResult":
        nodes = torch.arange(num_accepted)
        return VerificationResult(nodes, torch.arange(num_accepted + 1) + 10, bonus=False)


class Verifier(ABC):
    """Decides which draft nodes to keep from the target's logits over ``[root, node_0, ...]``."""

    name: ClassVar[str]
    lossless: ClassVar[bool] = True  # False only for opt-in rules that change the output distribution
    samples: ClassVar[bool] = False  # True for rules that implement do_sample=True
    needs_draft_probs: ClassVar[bool] = False

    @abstractmethod
    def verify(self, tree: DraftTree, logits: torch.Tensor, sampling: SamplingConfig,
               generator: torch.Generator | None = None) -> VerificationResult:
        """``logits`` [n+1, V]: row 0 predicts the children of the root, row i+1 the children of node i.

        The engine has already applied the processors that need the sequence (the repetition penalty, per slot with
        the slot's draft path); a sampling verifier applies the warpers of ``sampling`` (``warped_probs``) itself,
        and draws every random number from ``generator``.
        """
