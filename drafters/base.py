"""The drafter interface: propose a draft tree from the current state; observe how verification went.

Modelled on HF's candidate generator (``get_candidates`` / ``update_candidate_strategy``) with a tree instead of a
chain. A drafter may keep any state (its own model's KV cache, n-gram tables, adjacency matrices, layer sets); the
engine guarantees ``begin`` first in every generate() call, then proposals, each of which is observed once
(``observe``) or dropped unverified (``discard``).

What a drafter needs in ``observe`` about one proposal travels with it (``DraftTree.memo``, handed back as
``outcome.tree.memo``), not on ``self``: with ``SpecEngine(overlap=True)`` (PEARL) the engine asks for the next
proposal, on an assumed outcome (``state.assumed`` trailing tokens not yet verified), before the previous one is
observed. State shared across proposals (a draft model's KV cache, n-gram tables, running rates) stays on ``self``
and must tolerate that order: the draft model reconciles its cache with whatever sequence it is given.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from specdec.state import DecodeState, StepOutcome
from specdec.tree import DraftTree


class Drafter(ABC):
    name: ClassVar[str]
    needs_target_hidden_states: ClassVar[bool] = False  # hidden-state heads (Medusa, Hydra, EAGLE-like) set True
    can_draft_ahead: ClassVar[bool] = True  # False: drafting needs the target's output of the step before (hidden
    #                                         states) or runs on the target's own cache (layer skipping), so it
    #                                         cannot overlap the target's forward (SpecEngine overlap=True refuses it)

    def __init__(self, target: torch.nn.Module):
        self.target_model = target
        self.forward_count = 0  # drafter model forwards, for stats (0 for model-free drafters)
        self.tree_budget: int | None = None  # drafters that size their trees to the hardware set the node budget
        #                                      they chose for the current proposal; the engine records it in stats

    def begin(self, state: DecodeState) -> None:
        """Called once per generate() after the target's prefill; ``state.sequence`` ends with the first root."""

    @abstractmethod
    def propose(self, state: DecodeState) -> DraftTree:
        """Return a draft tree below ``state.root`` (may be empty); tokens on the target's device."""

    def observe(self, state: DecodeState, outcome: StepOutcome) -> None:
        """Called once for every verified proposal (``outcome.tree``, memo included); ``state.sequence`` already
        holds the emitted tokens (in overlap mode it may already hold later ones too)."""

    def discard(self, proposal: DraftTree) -> None:
        """Called instead of ``observe`` for a proposal drafted ahead on an outcome that did not happen (overlap
        mode): nothing of it was verified."""

    def describe(self) -> dict:
        """What the drafter chose or learned that a report should show (JSON-able; e.g. a layer set), read by the
        engine after every generate() into ``stats.drafter_info``."""
        return {}
