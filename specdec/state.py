"""What the engine shares with drafters: the decoding state before a step and the outcome after it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.runner import CausalLMRunner
from specdec.sampling import SamplingConfig
from specdec.tree import DraftTree
from specdec.verifiers.base import VerificationResult


@dataclass
class DecodeState:
    """Mutable state of one generate() call.

    sequence: LongTensor [1, L] prompt + tokens decided so far. The last token is the *root* of the next draft;
              the target's cache holds every token before it (``target.length == L - 1``).
    """

    sequence: torch.Tensor
    prompt_len: int
    target: CausalLMRunner  # layer-skipping drafters may run parts of it; only the engine feeds its cache
    sampling: SamplingConfig  # do_sample=True: drafters that can sample draw from their warped distribution q
    generator: torch.Generator | None = None  # the only source of random numbers (set whenever do_sample=True)
    max_new_tokens: int = 0
    target_hidden: torch.Tensor | None = None  # [k, d] last-layer states of the tokens committed by the last step

    @property
    def root(self) -> int:
        return int(self.sequence[0, -1])

    @property
    def num_generated(self) -> int:
        return self.sequence.shape[1] - self.prompt_len

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - self.num_generated


@dataclass(frozen=True)
class StepOutcome:
    """One verification step as drafters observe it (after the target cache was committed)."""

    tree: DraftTree
    result: VerificationResult
    target_logits: torch.Tensor  # [n+1, V] raw target logits over [root, node_0, ...] (before any processor)
    emitted: torch.Tensor  # LongTensor [e]: tokens appended to the sequence (result.tokens cut by stopping rules)
    hidden_states: tuple[torch.Tensor, ...] | None = None  # drafters with needs_target_hidden_states: the target's
    #   per-layer states over [root, node_0, ...] (embeddings first, each [n+1, d]) from the verification forward
