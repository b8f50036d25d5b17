"""Draft-length policies (specdec.draft_length): each decides as its rule says, the sequential drafters consult
them, and the stop reasons reach the stats (exactness with each policy: tests/test_exactness.py)."""

from __future__ import annotations

import pytest
import torch

from specdec import SpecEngine
from specdec.draft_length import (ConfidenceThreshold, DepthSignal, FixedLength, HFHeuristicSchedule, StopReason,
                                  create_length_policy)
from specdec.drafters import create_drafter
from specdec.errors import InvalidInputError
from tiny_models import greedy_reference, tiny_model, tiny_prompt


def test_fixed_never_stops_and_confidence_stops_below_its_threshold():
    signal = DepthSignal(depth=3, path_prob=0.3, token_prob=0.9)
    assert FixedLength().stop(signal) is None
    assert ConfidenceThreshold(0.4, on="path").stop(signal) == StopReason.LOW_CONFIDENCE
    assert ConfidenceThreshold(0.3, on="path").stop(signal) is None  # not below
    assert ConfidenceThreshold(0.8, on="token").stop(signal) is None
    assert ConfidenceThreshold(0.95, on="token").stop(signal) == StopReason.LOW_CONFIDENCE


def test_hf_heuristic_grows_by_two_after_a_fully_accepted_draft_and_shrinks_by_one_otherwise():
    policy = HFHeuristicSchedule(initial=3)
    assert [policy.stop(DepthSignal(d, 1.0, 1.0)) for d in (1, 2, 3)] == [None, None, StopReason.SCHEDULE]
    policy.observe(drafted=3, accepted=3)
    assert policy.length == 5
    policy.observe(drafted=5, accepted=2)
    assert policy.length == 4
    for _ in range(10):
        policy.observe(drafted=1, accepted=0)
    assert policy.length == 1  # never below one
    policy.observe(drafted=0, accepted=0)  # nothing drafted: nothing learnt
    assert policy.length == 1


@pytest.mark.parametrize("name,kwargs,message", [
    ("sometimes", {}, "unknown draft-length policy 'sometimes'"),
    ("confidence", dict(threshold=1.5), "threshold in \\[0, 1\\]"),
    ("confidence", dict(threshold=0.5, on="leaf"), "on='path' or 'token'"),
])
def test_bad_policies_are_refused(name, kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        create_length_policy(name, **kwargs)
    with pytest.raises(InvalidInputError, match="length_policy must be one of"):
        create_drafter("draft-model", target=tiny_model("qwen2"), model=tiny_model("qwen2", seed=1),
                       length_policy="sometimes")


@pytest.mark.parametrize("drafter_name,options,reasons", [
    # the target drafts for itself with the fixed policy: every draft runs to its depth
    ("draft-model", dict(mode="chain", depth=4, quantize=None, length_policy="fixed"), {"max_depth"}),
    # a path probability can never reach 1.0: every draft stops after its first level (at the end of generation
    # the depth cap may come first)
    ("draft-model", dict(mode="chain", depth=4, min_prob=1.0), {"low_confidence", "max_depth"}),
    ("draft-model", dict(mode="tree", depth=4, budget=8, length_policy="hf-heuristic"), {"max_depth", "schedule"}),
    ("swift", dict(skip_attention=(1,), skip_mlp=(0,), stop_threshold=1.0), {"low_confidence", "max_depth"}),
    ("del", dict(min_draft=3, stop_threshold=0.0, length_policy="fixed"), {"max_depth"}),
])
def test_stop_reasons_reach_the_stats(drafter_name, options, reasons):
    target = tiny_model("llama")
    if drafter_name == "draft-model":
        options = dict(options, model=target if options.get("length_policy") == "fixed" else tiny_model("llama", 1))
    drafter = create_drafter(drafter_name, target=target, **options)
    prompt = tiny_prompt(seed=3)
    result = SpecEngine(target, drafter).generate(prompt, max_new_tokens=20, eos_token_id=None)
    assert torch.equal(result.sequences, greedy_reference(target, prompt, 20))
    stats = result.stats
    assert set(stats.stop_reasons) <= reasons and stats.stop_reasons, stats.stop_reasons
    drafted = sum(1 for depth in stats.draft_depths if depth)
    assert sum(stats.stop_reasons.values()) >= drafted  # every drafted step says why it stopped
    assert stats.as_dict()["stop_reasons"] == stats.stop_reasons
    if "low_confidence" in reasons:
        assert stats.stop_reasons.get("low_confidence", 0) > 0
        assert max(stats.draft_depths) == 1  # stopped after the first token, which is kept
