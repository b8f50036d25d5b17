"""Stopping rules applied to the tokens a verification step emits: max_new_tokens, EOS ids and stop strings.

A step may accept several tokens at once, so each rule says where in the step's tokens to cut: ``max_new_tokens``
is exact, tokens after an EOS are dropped, and a stop string ends generation on the token that completes it (as
HF's ``StopStringCriteria`` does, tokens stay whole).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.arguments import as_count
from specdec.errors import InvalidInputError


def normalize_eos(eos_token_id) -> list[int]:
    """``eos_token_id`` (None, an int, a list of ints or an integer tensor, as HF takes it) as a list of ints."""
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, torch.Tensor):
        if eos_token_id.dtype.is_floating_point or eos_token_id.dtype == torch.bool:
            raise InvalidInputError(f"eos_token_id must hold integer token ids, got a {eos_token_id.dtype} tensor")
        return [int(x) for x in eos_token_id.flatten().tolist()]
    items = [eos_token_id] if isinstance(eos_token_id, (int, str)) or not hasattr(eos_token_id, "__iter__") \
        else list(eos_token_id)
    ids = [as_count(x, "eos_token_id") for x in items]
    bad = [x for x in ids if not isinstance(x, int) or isinstance(x, bool) or x < 0]
    if bad:
        raise InvalidInputError(f"eos_token_id must be None, a token id (an int >= 0) or a list of them, got "
                                f"{eos_token_id!r}; to stop on text use stop_strings=[...]")
    return ids


@dataclass
class StoppingRules:
    max_new_tokens: int
    eos_token_ids: list[int]
    stop_strings: list[str]
    tokenizer: object | None = None

    def __post_init__(self) -> None:
        if self.stop_strings and self.tokenizer is None:
            raise InvalidInputError("stop_strings need tokenizer= to decode the generated tokens")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise InvalidInputError("stop_strings must be non-empty strings")
        self._eos = torch.tensor(self.eos_token_ids, dtype=torch.long) if self.eos_token_ids else None
        self._window = max((len(s) for s in self.stop_strings), default=0) + 8

    def cut(self, sequence: torch.Tensor, prompt_len: int, new: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """``sequence`` [L] prompt + tokens emitted so far, ``new`` [k] this step's tokens -> (tokens to emit, stop?)."""
        room = self.max_new_tokens - (sequence.numel() - prompt_len)
        stop = new.numel() >= room
        new = new[:room]
        if self._eos is not None and new.numel():
            is_eos = torch.isin(new, self._eos.to(new.device))
            if bool(is_eos.any()):
                new = new[: int(is_eos.nonzero()[0, 0]) + 1]
                stop = True
        if self.stop_strings and new.numel():
            end = self._stop_string_end(sequence, new)
            if end is not None:
                return new[:end], True
        return new, stop

    def _stop_string_end(self, sequence: torch.Tensor, new: torch.Tensor) -> int | None:
        """Number of ``new`` tokens up to and including the one that completes a stop string, if any.

        The text before ``new`` (prompt included, as in HF) may hold the start of a stop string; only an occurrence
        that ends inside the new tokens' text counts.
        """
        context = sequence[max(0, sequence.numel() - self._window):].tolist()
        start = len(self.tokenizer.decode(context))
        new_list = new.tolist()
        for j in range(len(new_list)):  # a step emits a handful of tokens
            text = self.tokenizer.decode(context + new_list[: j + 1])
            if any(s in text[max(0, start - len(s) + 1):] for s in self.stop_strings):
                return j + 1
        return None
