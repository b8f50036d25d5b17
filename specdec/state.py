"""What the engine shares with drafters and verifiers: the decoding state before a step, the verification result
and the outcome after it.

Vocabulary of a result (as in vLLM's rejection sampler): *accepted* tokens are draft nodes the target keeps; after
the first rejection the step ends with a *recovered* token (drawn from the target, or its residual); when a whole
root-to-leaf path is accepted the step ends with a *bonus* token drawn from the target at the leaf. Either way a
step emits ``accepted + 1`` tokens, and we call that last token ``next_token``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from specdec.runner import CausalLMRunner
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
    transfer_time: float = 0.0  # seconds drafters spent moving tensors across devices (transfer())
    assumed: int = 0  # overlap mode: the last ``assumed`` tokens of ``sequence`` are a draft not yet verified (the
    #                   proposal drafts ahead on the outcome that they are all accepted); 0 otherwise

    def transfer(self, tensor: torch.Tensor, device: "torch.device | str") -> torch.Tensor:
        """``tensor`` on ``device``, the time of a real move counted in ``transfer_time`` (the stats' transfer_time):
        drafters on another device than the target take tokens and hidden states through here."""
        if tensor.device == torch.device(device):
            return tensor
        t0 = time.perf_counter()
        moved = tensor.to(device)
        if moved.device.type == "cuda":  # a host-to-device copy returns before it is done
            torch.cuda.synchronize(moved.device)
        self.transfer_time += time.perf_counter() - t0
        return moved

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
    scored: torch.Tensor | None = None  # BoolTensor [n+1]: slots whose target_logits row the target computed; None:
    #   all. Overlap mode verifies a proposal drafted ahead in pieces, and a rejected sibling's row is never computed

    def scored_slots(self) -> torch.Tensor:
        """BoolTensor [n+1]: slots of [root, node_0, ...] whose ``target_logits`` row is real."""
        if self.scored is not None:
            return self.scored
        return torch.ones(self.tree.size + 1, dtype=torch.bool, device=self.target_logits.device)
