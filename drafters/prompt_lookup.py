"""Prompt lookup decoding: copy what followed the latest earlier occurrence of the context's last n-gram.

Training-free baseline (Saxena 2023, "Prompt Lookup Decoding", the method behind HF's ``prompt_lookup_num_tokens``).
Matches are searched for n = max_ngram down to min_ngram with one vectorised comparison over all windows; with
``num_candidates > 1`` the continuations of several recent matches are merged into a tree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.drafters import register_drafter
from specdec.drafters.base import Drafter
from specdec.errors import InvalidInputError
from specdec.state import DecodeState
from specdec.tree import DraftTree


@dataclass(frozen=True)
class PromptLookupConfig:
    num_tokens: int = 10  # continuation length copied per match (HF's prompt_lookup_num_tokens)
    max_ngram: int = 3  # longest n-gram to match
    min_ngram: int = 1  # shortest n-gram to match
    num_candidates: int = 1  # distinct continuations merged into a tree (1 = chain)

    def __post_init__(self) -> None:
        if self.num_tokens < 1 or self.num_candidates < 1 or not 1 <= self.min_ngram <= self.max_ngram:
            raise InvalidInputError(f"invalid prompt-lookup options: {self}")


@register_drafter
class PromptLookupDrafter(Drafter):
    name = "prompt-lookup"

    def __init__(self, target: torch.nn.Module, config: PromptLookupConfig | None = None, **options):
        super().__init__(target)
        self.config = config or PromptLookupConfig(**options)

    def propose(self, state: DecodeState) -> DraftTree:
        seq = state.sequence[0]
        dev = seq.device
        length = min(self.config.num_tokens, state.remaining - 1)
        if length < 1:
            return DraftTree.empty(dev)
        paths = lookup_continuations(seq, self.config.max_ngram, self.config.min_ngram, length,
                                     self.config.num_candidates)[0]
        return DraftTree.from_paths(paths, device=dev) if paths else DraftTree.empty(dev)


def lookup_continuations(seq: torch.Tensor, max_ngram: int, min_ngram: int, length: int,
                         count: int = 1) -> tuple[list[list[int]], int]:
    """Up to ``count`` distinct continuations (latest match first, each at most ``length`` tokens) of the longest
    n-gram (``max_ngram`` down to ``min_ngram``) that ends ``seq`` [L] and also occurs earlier in it, and that n
    (0 and no paths when nothing matches). One vectorised comparison over all windows per n."""
    for n in range(max_ngram, min_ngram - 1, -1):
        if seq.numel() <= n:
            continue
        windows = seq[:-1].unfold(0, n, 1)  # [L-n, n] every n-gram that has a successor
        hits = torch.nonzero((windows == seq[-n:]).all(dim=1)).flatten()  # start of each match
        if hits.numel() == 0:
            continue
        starts = (hits + n).flip(0)[: 4 * count].tolist()  # latest first
        paths: list[list[int]] = []
        for s in starts:
            cont = seq[s: s + length].tolist()
            if cont and cont not in paths:
                paths.append(cont)
            if len(paths) == count:
                break
        return paths, n
    return [], 0
