"""Greedy speculative decoding is lossless: for every registered drafter, architecture and acceptance regime the
output equals the target's own greedy output, token for token.

The regimes (see ``regimes.py``) force the draft right or wrong against the known greedy continuation, so the
all-accepted, none-accepted and rejected-in-the-middle paths of the engine all run for every drafter.
Prompt (12) + drafts reach well past Gemma 3's sliding window (6).
"""

from __future__ import annotations

import functools
from typing import Callable

import pytest
import torch

from regimes import REGIMES, RegimeDrafter
from specdec import SpecEngine
from specdec.drafters import available_drafters, create_drafter
from tiny_models import ARCHS, greedy_reference, tiny_model, tiny_prompt

NEW_TOKENS = 28
REFERENCE_SLACK = 16  # the regime rewriter looks this far past NEW_TOKENS at most (drafts are <= 10 deep)

# drafter name -> variant -> factory(target, arch) returning the drafter's constructor options.
# A newly registered drafter must get an entry here; until then its exactness tests fail.
Factory = Callable[[torch.nn.Module, str], dict]
DRAFTER_FACTORIES: dict[str, dict[str, Factory]] = {
    "draft-model": {
        "chain": lambda target, arch: dict(model=tiny_model(arch, seed=1), mode="chain"),
        "tree": lambda target, arch: dict(model=tiny_model(arch, seed=1), mode="tree"),
        "self-chain": lambda target, arch: dict(model=target, mode="chain"),  # the target drafts for itself
    },
    "prompt-lookup": {
        "chain": lambda target, arch: {},
        "tree": lambda target, arch: dict(num_candidates=3),
    },
}
# Variants whose natural drafts are the target's greedy tokens: every step accepts its whole draft.
FULLY_ACCEPTED_WHEN_NATURAL = {("draft-model", "self-chain")}


def _drafter_variants() -> list:
    params = []
    for name in available_drafters():
        variants = DRAFTER_FACTORIES.get(name)
        if variants is None:
            params.append(pytest.param(name, None, id=f"{name}[NO-FACTORY]"))
            continue
        params += [pytest.param(name, variant, id=f"{name}[{variant}]") for variant in variants]
    return params


@functools.lru_cache(maxsize=None)
def _long_reference(arch: str) -> torch.Tensor:
    """LongTensor [P + NEW_TOKENS + REFERENCE_SLACK]: prompt and greedy continuation, for the regime rewriter."""
    return greedy_reference(tiny_model(arch), tiny_prompt(), NEW_TOKENS + REFERENCE_SLACK)[0]


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("drafter_name,variant", _drafter_variants())
def test_generate_equals_greedy(drafter_name, variant, arch, regime):
    if variant is None:
        pytest.fail(f"drafter {drafter_name!r} is registered but has no entry in DRAFTER_FACTORIES "
                    f"(tests/test_exactness.py): add one mapping (target, arch) to its constructor options for a "
                    f"tiny target so the exactness harness covers it")
    target = tiny_model(arch)
    prompt = tiny_prompt()
    inner = create_drafter(drafter_name, target=target, **DRAFTER_FACTORIES[drafter_name][variant](target, arch))
    drafter = RegimeDrafter(inner, regime, _long_reference(arch))

    result = SpecEngine(target, drafter).generate(prompt, max_new_tokens=NEW_TOKENS)

    assert torch.equal(result.sequences, greedy_reference(target, prompt, NEW_TOKENS))
    stats = result.stats
    assert stats.drafter == drafter_name
    assert stats.draft_forwards == inner.forward_count
    assert stats.new_tokens == NEW_TOKENS
    assert stats.target_forwards == len(stats.accepted_lengths)
    # The prefill emits the first token; no step may emit more than generate() still allows.
    assert sum(stats.accepted_lengths) == NEW_TOKENS - 1
    depths = stats.draft_depths
    if regime != "natural":  # empty proposals are replaced, so every step but a last one-token step has a draft
        assert all(d >= 1 for d in depths[:-1]), depths
        assert max(depths) >= 2, depths

    if regime == "all_right" or (regime == "natural" and (drafter_name, variant) in FULLY_ACCEPTED_WHEN_NATURAL):
        assert stats.accepted_lengths == [d + 1 for d in depths]
        assert stats.mean_accepted_length > 1
    elif regime == "all_wrong":
        assert stats.accepted_lengths == [1] * (NEW_TOKENS - 1)
    elif regime == "wrong_at_depth_2":
        assert stats.accepted_lengths == [min(d, 1) + 1 for d in depths]
        assert all(a <= 2 for a in stats.accepted_lengths) and 2 in stats.accepted_lengths
