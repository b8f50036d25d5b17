"""Acceptance rules, chosen by name: ``create_verifier("greedy")``.

greedy     argmax verification, for do_sample=False (lossless)
rejection  speculative sampling over chains and trees (lossless)
spectr     SpecTr K-SEQ over i.i.d. drafts (lossless)
typical    Medusa typical acceptance (LOSSY, opt-in)
"""

from __future__ import annotations

from specdec.verifiers.base import (VerificationResult, Verifier, available_verifiers, create_verifier,
                                    register_verifier)
from specdec.verifiers.greedy import GreedyVerifier
from specdec.verifiers.rejection import RejectionVerifier
from specdec.verifiers.spectr import SpecTrVerifier
from specdec.verifiers.typical import TypicalVerifier

for _cls in (GreedyVerifier, RejectionVerifier, SpecTrVerifier, TypicalVerifier):
    register_verifier(_cls)

__all__ = ["Verifier", "VerificationResult", "available_verifiers", "create_verifier", "register_verifier"]
