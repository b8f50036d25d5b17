"""prompt-lookup with ``num_tokens="auto"``: the running acceptance rates by depth, and the length they choose under
given forward costs (exactness: tests/test_exactness.py, variant "auto-length")."""

from __future__ import annotations

import pytest
import torch

from specdec.drafters import create_drafter
from specdec.drafters.prompt_lookup import DepthAcceptance
from specdec.errors import InvalidInputError
from tiny_models import tiny_model


def test_depth_acceptance_counts_reached_and_accepted_depths():
    rates = DepthAcceptance(4, decay=1.0)  # prior: 1 accepted of 2 reached at every depth
    rates.update(drafted=3, accepted=1)  # depth 1 accepted, depth 2 reached and rejected, depth 3 never reached
    assert rates.reached.tolist() == [3.0, 3.0, 2.0, 2.0]
    assert rates.accepted.tolist() == [2.0, 1.0, 1.0, 1.0]
    rates.update(drafted=2, accepted=2)  # the whole chain
    assert rates.reached.tolist() == [4.0, 4.0, 2.0, 2.0] and rates.accepted.tolist() == [3.0, 2.0, 1.0, 1.0]
    assert torch.allclose(rates.path_values(), torch.tensor([0.75, 0.375, 0.1875, 0.09375], dtype=torch.float64))


def test_the_auto_length_follows_costs_and_rates():
    target = tiny_model("qwen2")
    cheap = create_drafter("prompt-lookup", target=target, num_tokens="auto", costs={1: 1.0, 16: 1.0})
    dear = create_drafter("prompt-lookup", target=target, num_tokens="auto", costs={1: 1.0, 2: 1.1, 11: 3.0})
    for drafter in (cheap, dear):  # first token accepted a third of the time, each later one 70% (as measured)
        drafter.acceptance.reached.fill_(100.0)
        drafter.acceptance.accepted.fill_(70.0)[0] = 100.0 / 3
    assert cheap.auto_length(10) == 10  # extra tokens are free: verify all of them
    assert dear.auto_length(10) == 1  # each extra token costs 20% of a forward and is worth less
    assert dear.auto_length(1) == 1 and cheap.auto_length(4) == 4  # never more than the match holds
    for _ in range(300):  # nothing is ever accepted: still one token, so the rates can recover
        dear.acceptance.update(drafted=1, accepted=0)
    assert dear.auto_length(10) == 1


def test_num_tokens_must_be_positive_or_auto():
    with pytest.raises(InvalidInputError, match="num_tokens: a positive int or 'auto'"):
        create_drafter("prompt-lookup", target=tiny_model("qwen2"), num_tokens="al")
