"""DraftVocab: the reduced vocabulary the heads predict over (FR-Spec, Zhao et al. 2025, arXiv 2502.14856).

FR-Spec restricts the drafter's LM head to the most frequent tokens of a corpus, which cuts the cost of the head's
matmul (for Qwen2.5 the 151,936-row LM head dominates a small drafter) and, here, the size of nothing saved: the
heads share the target's LM head rows ``ids``. Drafting maps draft indices back to target ids; the target still
verifies over its full vocabulary. Greedy decoding stays exact (the target decides every token); sampling stays
lossless because the draft distribution q, scattered into a full-V tensor with zeros outside ``ids``, is what the
drafter really drew from: rejection sampling only needs q to be the drafting distribution, not to cover p's
support. As in FR-Spec the ranking is by frequency; ties go to the smaller token id (ours).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specdec.errors import InvalidInputError


@dataclass(frozen=True)
class DraftVocab:
    ids: torch.Tensor  # LongTensor [N] sorted, distinct target token ids the heads predict over
    vocab_size: int  # V of the target
    _inverse: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        ids = self.ids
        assert ids.dim() == 1, "ids must be [N]"
        if ids.numel() == 0 or ids.dtype != torch.long:
            raise InvalidInputError(f"a draft vocabulary needs a non-empty LongTensor of ids, got {ids.dtype} "
                                    f"[{ids.numel()}]")
        if bool((ids[1:] <= ids[:-1]).any()) or int(ids[0]) < 0 or int(ids[-1]) >= self.vocab_size:
            raise InvalidInputError(f"draft vocabulary ids must be sorted, distinct and in [0, {self.vocab_size})")

    @staticmethod
    def full(vocab_size: int) -> "DraftVocab":
        return DraftVocab(torch.arange(vocab_size), vocab_size)

    @staticmethod
    def from_counts(counts: torch.Tensor, size: int) -> "DraftVocab":
        """The ``size`` most frequent tokens of ``counts`` [V] (token frequencies in a corpus); ties by smaller id."""
        assert counts.dim() == 1, "counts must be [V]"
        if not 1 <= size <= counts.numel():
            raise InvalidInputError(f"draft vocabulary size must be in [1, {counts.numel()}], got {size}")
        order = torch.sort(counts.double(), descending=True, stable=True).indices  # stable: smaller id first
        return DraftVocab(order[:size].sort().values.long(), counts.numel())

    @property
    def size(self) -> int:
        return int(self.ids.numel())

    @property
    def is_full(self) -> bool:
        return self.size == self.vocab_size

    def to_draft(self, token_ids: torch.Tensor) -> torch.Tensor:
        """LongTensor like ``token_ids``: each id's index in the draft vocabulary, -1 where it is not in it."""
        if "table" not in self._inverse:
            table = torch.full((self.vocab_size,), -1, dtype=torch.long)
            table[self.ids.cpu()] = torch.arange(self.size)
            self._inverse["table"] = table
        table = self._inverse["table"].to(token_ids.device)
        return table[token_ids.long()]

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """LongTensor like ``draft_ids``: target token ids of draft indices."""
        return self.ids.to(draft_ids.device)[draft_ids]

    def scatter(self, draft_logits: torch.Tensor) -> torch.Tensor:
        """FloatTensor [..., V]: ``draft_logits`` [..., N] in target columns, -inf outside the draft vocabulary."""
        if self.is_full:
            return draft_logits
        out = draft_logits.new_full((*draft_logits.shape[:-1], self.vocab_size), float("-inf"))
        out[..., self.ids.to(draft_logits.device)] = draft_logits
        return out
