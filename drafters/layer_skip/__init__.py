"""Self-drafting by skipping the target's own layers: ``swift`` (SWIFT, arXiv 2410.06916; its online layer-set
search in ``swift_search.py``) and ``del`` (DEL's dynamic early exit, ``del_exit.py``), both on the partial forwards
of ``runner.py`` over the target's committed KV cache."""

from specdec.drafters.layer_skip.del_exit import DelDrafter
from specdec.drafters.layer_skip.swift import SwiftDrafter

__all__ = ["DelDrafter", "SwiftDrafter"]
