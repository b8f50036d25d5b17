"""ADED (Liu et al. 2024, arXiv 2406.08016): the ``aded`` drafter (``drafter.py``), its adaptive tri-gram table
(``trigram_table.py``, built by ``specdec trigrams``) and the MCTS that drafts candidate paths from it
(``mcts.py``)."""

from specdec.drafters.aded.drafter import AdedConfig, AdedDrafter

__all__ = ["AdedConfig", "AdedDrafter"]
