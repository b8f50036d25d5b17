"""Padded training batches from cached sequences, the held-out split, and the labels each head is scored on.

Labels are the target's own next-token predictions (self-distillation): head k at position t scores the token
after position t + k + 1, i.e. ``top_ids[t + k + 1, 0]`` (the target's greedy choice; on its own greedy answers
that is ``tokens[t + k + 2]``), with the top-k probabilities there as soft labels. Position t counts for head k
when the heads' inputs and the label exist (t + k + 2 < length) and t is at or after the last prompt token (the
heads draft from the prompt's end on; states inside the prompt still feed sequence-level heads as context).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from specdec.training.feature_cache import CachedSequence


@dataclass(frozen=True)
class Batch:
    hidden: torch.Tensor  # [B, T, d] bf16, zero past each sequence's end
    tokens: torch.Tensor  # [B, T] int64, 0 past the end
    top_ids: torch.Tensor  # [B, T, k] int64: the target's top-k next tokens after each position
    top_probs: torch.Tensor  # [B, T, k] float32: their probabilities
    lengths: torch.Tensor  # [B] int64
    prompt_lens: torch.Tensor  # [B] int64

    def head_mask(self, k: int) -> torch.Tensor:
        """BoolTensor [B, T]: positions where head k is trained and scored."""
        t = torch.arange(self.tokens.shape[1])[None]
        return (t + k + 2 < self.lengths[:, None]) & (t >= self.prompt_lens[:, None] - 1)

    def head_labels(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(label ids [B, T], soft ids [B, T, k'], soft probs [B, T, k']) for head k, shifted by k + 1."""
        ids = _shift(self.top_ids, k + 1)
        probs = _shift(self.top_probs, k + 1)
        return ids[..., 0], ids, probs


def _shift(x: torch.Tensor, j: int) -> torch.Tensor:
    out = torch.zeros_like(x)
    if j < x.shape[1]:
        out[:, : x.shape[1] - j] = x[:, j:]
    return out


def collate(seqs: list[CachedSequence]) -> Batch:
    feats = [s.features for s in seqs]
    b, width = len(feats), max(f.tokens.numel() for f in feats)
    d, k = feats[0].hidden.shape[1], feats[0].top_ids.shape[1]
    hidden = torch.zeros(b, width, d, dtype=torch.bfloat16)
    tokens = torch.zeros(b, width, dtype=torch.long)
    top_ids = torch.zeros(b, width, k, dtype=torch.long)
    top_probs = torch.zeros(b, width, k)
    for i, f in enumerate(feats):
        n = f.tokens.numel()
        hidden[i, :n], tokens[i, :n], top_ids[i, :n], top_probs[i, :n] = f.hidden, f.tokens, f.top_ids, f.top_probs
    lengths = torch.tensor([f.tokens.numel() for f in feats])
    return Batch(hidden, tokens, top_ids, top_probs, lengths, torch.tensor([f.prompt_len for f in feats]))


def is_held_out(seq_id: str, fraction: float) -> bool:
    """Held out by a hash of the id: stable when data is added, independent of order."""
    h = int.from_bytes(hashlib.sha256(seq_id.encode()).digest()[:8], "big") / 2 ** 64
    return h < fraction


def split(seqs: list[CachedSequence], fraction: float) -> tuple[list[CachedSequence], list[CachedSequence]]:
    """(train, held out); at least one sequence is held out when there are two or more."""
    held = [s for s in seqs if is_held_out(s.id, fraction)]
    if not held and len(seqs) >= 2:
        held = [min(seqs, key=lambda s: hashlib.sha256(s.id.encode()).hexdigest())]
    held_ids = {s.id for s in held}
    return [s for s in seqs if s.id not in held_ids], held


def label_counts(seqs: list[CachedSequence], vocab_size: int) -> torch.Tensor:
    """LongTensor [V]: how often each token is the target's next token at a trained position (FR-Spec counts)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for s in seqs:
        f = s.features
        labels = f.top_ids[max(f.prompt_len - 1, 0):, 0]
        counts += torch.bincount(labels, minlength=vocab_size)
    return counts
