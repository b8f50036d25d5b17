"""specdec: lossless speculative decoding for Hugging Face causal LMs.

    from specdec import SpecEngine
    from specdec.drafters import create_drafter
    engine = SpecEngine(target, create_drafter("draft-model", target=target, model=draft))
    result = engine.generate(input_ids, max_new_tokens=128)
"""

from specdec.engine import GenerationResult, SpecEngine
from specdec.errors import (ChecksumError, ConcurrentUseError, IncompatibleModelsError, InvalidInputError,
                            ModelFetchError, SpecDecError, UnknownNameError, UnsafeFileError)
from specdec.stats import DecodingStats
from specdec.tree import DraftTree, ProposalKind

__all__ = [
    "ChecksumError", "ConcurrentUseError", "DecodingStats", "DraftTree", "GenerationResult", "IncompatibleModelsError",
    "InvalidInputError", "ModelFetchError", "ProposalKind", "SpecDecError", "SpecEngine", "UnknownNameError",
    "UnsafeFileError",
]
__version__ = "0.1.0"
