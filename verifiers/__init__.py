"""Acceptance rules, chosen by name: ``create_verifier("greedy")``.

greedy     argmax verification, for do_sample=False (lossless)
rejection  speculative sampling over chains and trees (lossless)
spectr     SpecTr K-SEQ over i.i.d. drafts (lossless)
typical    Medusa typical acceptance (LOSSY, opt-in)
"""

from __future__ import annotations

from specdec.errors import UnknownNameError
from specdec.verifiers.base import VerificationResult, Verifier
from specdec.verifiers.greedy import GreedyVerifier
from specdec.verifiers.rejection import RejectionVerifier
from specdec.verifiers.spectr import SpecTrVerifier
from specdec.verifiers.typical import TypicalVerifier

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


for _cls in (GreedyVerifier, RejectionVerifier, SpecTrVerifier, TypicalVerifier):
    register_verifier(_cls)

__all__ = ["Verifier", "VerificationResult", "available_verifiers", "create_verifier", "register_verifier"]
