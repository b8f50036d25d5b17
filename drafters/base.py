"""The drafter contract: what the engine asks of a drafter, and what a proposal carries back.

Modelled on HF's candidate generator (``get_candidates`` / ``update_candidate_strategy``) with a tree instead of a
chain. Per generate() call the engine calls, in this order:

- ``begin(state)`` once, after the target's prefill (``state.sequence`` ends with the first root);
- ``propose(state) -> DraftTree``, a tree below ``state.root`` (may be empty), on the drafter's device;
- for each proposal, exactly one of ``observe(state, outcome)`` (it was verified: ``outcome.tree`` is the proposal,
  ``outcome.result`` what the verifier accepted over it) or ``discard(proposal)`` (drafted ahead on an outcome that
  did not happen; overlap mode only);
- ``describe()`` after the call, for the report.

**A proposal carries everything about itself** (``specdec.tree.DraftTree``): tokens and parents, the draft
distribution q of sampled nodes (``draft_probs``) and how siblings were chosen (``proposal``), why a sequential
drafter stopped (``stop_reason``), the node budget a tree-sizing drafter chose (``budget``), and the drafter's own
record of how it built the tree (``memo``, handed back in ``observe`` as ``outcome.tree.memo``). The engine records
stats from the proposal alone and reads nothing else of the drafter but what this class declares.

**What may live on ``self``**: state shared across proposals only (a draft model's KV cache, n-gram tables,
running rates and calibrations, the ``forward_count`` counter) and nothing about one proposal: with
``SpecEngine(overlap=True)`` (PEARL) the engine asks for the next proposal, on an assumed outcome (``state.assumed``
trailing tokens not yet verified), before the previous one is observed. Shared state must tolerate that order: the
draft model reconciles its cache with whatever sequence it is given.

Declared here, read by the engine: ``name``, ``needs_target_hidden_states``, ``can_draft_ahead``, ``target``
(the target model it was built for), ``device`` (where it drafts) and ``forward_count``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from specdec.runner import execution_device
from specdec.state import DecodeState, StepOutcome
from specdec.tree import DraftTree


class Drafter(ABC):
    name: ClassVar[str]  # the registry name (``create_drafter(name, ...)``); the class name when not given
    needs_target_hidden_states: ClassVar[bool] = False  # hidden-state heads (Medusa, Hydra, EAGLE-like) set True
    can_draft_ahead: ClassVar[bool] = True  # False: drafting needs the target's output of the step before (hidden
    #                                         states) or runs on the target's own cache (layer skipping), so it
    #                                         cannot overlap the target's forward (SpecEngine overlap=True refuses it)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if not hasattr(cls, "name"):
            cls.name = cls.__name__

    def __init__(self, target: torch.nn.Module):
        self.target_model = target
        self.forward_count = 0  # drafter model forwards over all proposals, for stats (0 for model-free drafters)

    @property
    def target(self) -> torch.nn.Module:
        """The target model this drafter was built for (``SpecEngine`` refuses any other)."""
        return self.target_model

    @property
    def forward_seconds(self) -> float:
        """Wall seconds spent inside the drafter's own model forwards over all proposals (0.0 for drafters without
        a model runner of their own); the engine subtracts it from a step's time to report the per-step overhead."""
        return 0.0

    @property
    def device(self) -> torch.device:
        """Where the drafter drafts: the target's input device for drafters without a model of their own (they
        read the target's tokens or run parts of it); drafters with their own model override this with its device.
        ``SpecEngine(overlap=True)`` splits the CPU threads between target and drafter when this is a CPU."""
        return execution_device(self.target_model)

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
