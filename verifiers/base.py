"""The verifier contract: the interface, the one result type every verifier returns
(:class:`specdec.state.VerificationResult`, where *accepted*, *recovered* and *bonus* are defined) and the registry
that finds a verifier by name. The engine imports this module only; ``verifiers/__init__.py`` registers the rules.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from specdec.errors import UnknownNameError
from specdec.sampling import SamplingConfig
from specdec.state import VerificationResult  # defined with the step outcome drafters observe; re-exported here
from specdec.tree import DraftTree


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


_REGISTRY: dict[str, type[Verifier]] = {}


def register_verifier(cls: type[Verifier]) -> type[Verifier]:
    _REGISTRY[cls.name] = cls
    return cls


def available_verifiers() -> list[str]:
    return sorted(_REGISTRY)


def create_verifier(name_or_verifier: "str | Verifier", **options) -> Verifier:
    if isinstance(name_or_verifier, Verifier):
        return name_or_verifier
    if name_or_verifier not in _REGISTRY:
        raise UnknownNameError(
            f"unknown verifier {name_or_verifier!r}; available verifiers: {', '.join(available_verifiers())}")
    return _REGISTRY[name_or_verifier](**options)
