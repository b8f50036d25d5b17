"""Drafters, chosen by name: ``create_drafter("draft-model", target=target, model=draft_model)``.

Register a new drafter with ``@register_drafter`` on its class; the exactness test harness then covers it.
"""

from __future__ import annotations

from specdec.drafters.base import Drafter
from specdec.drafters.options import check_options
from specdec.errors import UnknownNameError

_REGISTRY: dict[str, type[Drafter]] = {}


def register_drafter(cls: type[Drafter]) -> type[Drafter]:
    _REGISTRY[cls.name] = cls
    return cls


def available_drafters() -> list[str]:
    return sorted(_REGISTRY)


def drafter_class(name: str) -> type[Drafter]:
    if name not in _REGISTRY:
        raise UnknownNameError(f"unknown drafter {name!r}; available drafters: {', '.join(available_drafters())}")
    return _REGISTRY[name]


def create_drafter(name: str, target, **options) -> Drafter:
    """Build the drafter ``name`` for ``target`` (an HF causal LM); ``options`` go to its constructor, checked by
    name and type first (:mod:`specdec.drafters.options`)."""
    cls = drafter_class(name)
    check_options(name, cls, options)
    return cls(target=target, **options)


# Importing the modules registers their drafters.
from specdec.drafters import draft_model, prompt_lookup  # noqa: E402,F401
from specdec.drafters import token_recycling  # noqa: E402,F401
from specdec.drafters import aded  # noqa: E402,F401  (the package registers its drafter)
from specdec.drafters import layer_skip  # noqa: E402,F401  (swift, del)
from specdec.drafters.heads import drafter as _heads_drafter  # noqa: E402,F401  (medusa, hydra, clover, chimera)
from specdec.drafters.heads import deer_drafter as _deer_drafter  # noqa: E402,F401  (deer)

__all__ = ["Drafter", "available_drafters", "create_drafter", "drafter_class", "register_drafter"]
