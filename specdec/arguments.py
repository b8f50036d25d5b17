"""Checks of the arguments a user hands the engine, before any model runs: the drafter object and integer counts
given as numpy or 0-d torch integers (HF generate accepts those too, through ``int()``-like coercion)."""

from __future__ import annotations

import operator

import torch

from specdec.drafters.base import Drafter
from specdec.errors import InvalidInputError


def as_count(value, name: str):
    """``value`` as a Python int when it is an integer of any kind (int, numpy integer, 0-d integer tensor); any other
    value is returned unchanged for the caller's own range check to refuse with its message."""
    if isinstance(value, bool):
        return value
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise InvalidInputError(f"{name} must be an integer, got a tensor of shape {tuple(value.shape)} and "
                                    f"dtype {value.dtype}")
        return int(value)
    try:
        return operator.index(value)  # int, numpy integers, anything that declares itself an integer
    except TypeError:
        return value


def check_drafter(drafter) -> None:
    """Refuse at construction what is not a drafter object (None, a registry name, a model), naming the fix."""
    if isinstance(drafter, Drafter):
        return
    if isinstance(drafter, str):
        raise InvalidInputError(f"SpecEngine needs a drafter object, got the string {drafter!r}; build one with "
                                f"specdec.drafters.create_drafter({drafter!r}, target=target, ...)")
    missing = [m for m in ("begin", "propose", "observe") if not callable(getattr(drafter, m, None))]
    if missing:
        raise InvalidInputError(f"SpecEngine needs a drafter (a specdec.drafters.base.Drafter), got "
                                f"{type(drafter).__name__}: {drafter!r:.80}; build one with "
                                "specdec.drafters.create_drafter(name, target=target, ...)")
