"""The per-step overhead in DecodingStats (issue 28, point 3): a step's wall time splits into the target's forward,
the draft model's forwards and the rest (drafting logic, masks, verification, cache commits, Python)."""

from __future__ import annotations

import pytest
import torch

from specdec import SpecEngine
from specdec.drafters import create_drafter
from specdec.stats import DecodingStats
from tiny_models import greedy_reference, tiny_model, tiny_prompt


@pytest.mark.parametrize("drafter_name", ["draft-model", "prompt-lookup"])
def test_a_step_splits_into_forwards_and_overhead(drafter_name):
    target = tiny_model("qwen2")
    options = {"model": tiny_model("qwen2", seed=1)} if drafter_name == "draft-model" else {}
    drafter = create_drafter(drafter_name, target=target, **options)
    prompt = tiny_prompt(seed=3)
    result = SpecEngine(target, drafter).generate(prompt, max_new_tokens=16, eos_token_id=None)
    assert torch.equal(result.sequences, greedy_reference(target, prompt, 16))
    s = result.stats
    assert s.target_forward_time > 0 and s.step_time > s.target_forward_time + s.draft_forward_time
    assert (s.draft_forward_time > 0) == (drafter_name == "draft-model")  # prompt lookup runs no model
    assert s.step_time >= s.draft_time + s.verify_time  # a step: drafting, verification, emitting the tokens
    assert s.overhead_time == pytest.approx(s.step_time - s.target_forward_time - s.draft_forward_time)
    assert 0 < s.overhead_fraction < 1
    d = s.as_dict()
    assert d["overhead_time"] == s.overhead_time and d["target_forward_time"] == s.target_forward_time


def test_overhead_is_what_the_forwards_leave():
    s = DecodingStats()
    assert s.overhead_time == 0 and s.overhead_fraction == 0
    s.record_step_time(0.10, target_forward=0.06, draft_forward=0.03)
    s.record_step_time(0.10, target_forward=0.07, draft_forward=0.02)
    assert s.overhead_time == pytest.approx(0.02) and s.overhead_fraction == pytest.approx(0.1)
