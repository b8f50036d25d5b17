"""SpecDec++ acceptance-prediction heads for draft models (``head.py``) and the shipped trained ones (``weights/``)."""

from specdec.drafters.acceptance.head import (AcceptanceHead, load_acceptance_head, save_acceptance_head,
                                              shipped_acceptance_head)

__all__ = ["AcceptanceHead", "load_acceptance_head", "save_acceptance_head", "shipped_acceptance_head"]
