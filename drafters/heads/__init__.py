"""Trained draft heads on the target's hidden states: Medusa, Hydra and Clover (``docs/heads.md``).

The API the training pipeline uses: ``build_heads``, ``DraftHeads.training_logits``, ``save_heads``,
``load_heads``, ``DraftVocab.from_counts``, ``target_fingerprint``, ``HeadsConfig`` and
``DraftHeads.with_metadata(recipe=..., accuracies=...)``. The drafters are in ``drafter.py``.
"""

from specdec.drafters.heads.base import DraftHeads
from specdec.drafters.heads.checkpoint import HEAD_CLASSES, build_heads, load_heads, save_heads
from specdec.drafters.heads.config import KINDS, HeadsConfig
from specdec.drafters.heads.fingerprint import target_fingerprint
from specdec.drafters.heads.vocab import DraftVocab

__all__ = ["DraftHeads", "DraftVocab", "HEAD_CLASSES", "HeadsConfig", "KINDS", "build_heads", "load_heads",
           "save_heads", "target_fingerprint"]
