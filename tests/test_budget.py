"""Hardware-aware tree budgets: cost interpolation, the tokens-per-second choice, best-first orders, and the
measured forward costs with their memory and disk caches."""

from __future__ import annotations

import json

import pytest
import torch

from specdec import budget
from specdec.budget import (ForwardCosts, best_first_order, best_nodes, choose_budget, forward_costs,
                            measure_forward_costs)
from specdec.errors import InvalidInputError
from tiny_models import tiny_model


# ------------------------------------------------------------------ ForwardCosts
def test_seconds_for_interpolates_and_extrapolates():
    costs = ForwardCosts((1, 2, 4, 8), (1.0, 2.0, 2.5, 4.5))
    assert costs.seconds_for(1) == 1.0 and costs.seconds_for(4) == 2.5  # measured points
    assert costs.seconds_for(3) == pytest.approx(2.25)  # halfway between 2 and 4
    assert costs.seconds_for(6) == pytest.approx(3.5)
    assert costs.seconds_for(16) == pytest.approx(8.5)  # past the end: the last segment's slope (0.5 s/token)
    many = costs.seconds_for(torch.tensor([1, 3, 16]))
    torch.testing.assert_close(many, torch.tensor([1.0, 2.25, 8.5], dtype=torch.float64))
    assert ForwardCosts((4,), (0.3,)).seconds_for(70) == 0.3  # one measurement: a flat cost


def test_forward_costs_from_mapping_sorts_sizes():
    assert ForwardCosts.from_mapping({8: 2.0, 1: 1.0}) == ForwardCosts((1, 8), (1.0, 2.0))


@pytest.mark.parametrize("sizes,seconds", [((), ()), ((1, 2), (1.0,)), ((2, 1), (1.0, 1.0)), ((0, 1), (1.0, 1.0)),
                                           ((1, 2), (1.0, 0.0))])
def test_forward_costs_rejects_bad_tables(sizes, seconds):
    with pytest.raises(InvalidInputError):
        ForwardCosts(sizes, seconds)


# ------------------------------------------------------------------ choose_budget
def test_flat_costs_take_every_node_worth_something():
    values = torch.tensor([0.9, 0.6, 0.3, 0.01, 0.0, 0.0])
    assert choose_budget(values, ForwardCosts((1,), (1.0,))) == 4


def test_steep_costs_give_a_small_budget():
    values = torch.tensor([0.9, 0.6, 0.3, 0.2, 0.1])
    steep = ForwardCosts((1, 2), (1.0, 2.0))  # every node costs as much as the whole single-token forward
    assert choose_budget(values, steep) == 0
    moderate = ForwardCosts((1, 2), (1.0, 1.5))  # half a forward per node: only the 0.9 node pays
    assert choose_budget(values, moderate) == 1


def test_choose_budget_literal_example():
    # k = 0: 1 / 1.0 = 1.0;  k = 1: 1.8 / 1.2 = 1.5;  k = 2: 2.3 / 1.5 = 1.533;  k = 3: 2.4 / 2.0 = 1.2
    values = torch.tensor([0.8, 0.5, 0.1])
    costs = ForwardCosts((1, 2, 3, 4), (1.0, 1.2, 1.5, 2.0))
    assert choose_budget(values, costs) == 2
    # drafting time is charged to every size: 1/4, 1.8/4.2, 2.3/4.5 = 0.511, 2.4/5 = 0.48
    assert choose_budget(values, costs, draft_seconds=3.0) == 2
    # ... and with equal forward costs every node pays
    assert choose_budget(values, ForwardCosts((1, 4), (1.0, 1.0)), draft_seconds=3.0) == 3
    assert choose_budget(values, costs, max_nodes=1) == 1
    assert choose_budget(values[:0], costs) == 0


# ------------------------------------------------------------------ best_first_order
def test_best_first_order_caps_children_and_keeps_parents_first():
    #        root
    #      0      1
    #    2  3     4
    #    5
    parents = torch.tensor([-1, -1, 0, 0, 1, 2])
    values = torch.tensor([0.5, 0.2, 0.7, 0.1, 0.3, 0.6])
    order, ordered = best_first_order(values, parents)
    # node 2 (0.7) is capped at its parent's 0.5, node 4 (0.3) at 0.2; node 5 at min(0.6, 0.5, 0.5)
    assert order.tolist() == [0, 2, 5, 1, 4, 3]
    torch.testing.assert_close(ordered, torch.tensor([0.5, 0.5, 0.5, 0.2, 0.2, 0.1]))
    for k in range(len(order) + 1):  # every prefix is ancestor-closed
        taken = set(order[:k].tolist())
        assert all(parents[i] < 0 or int(parents[i]) in taken for i in taken)


# ------------------------------------------------------------------ measuring and caching
def test_best_nodes_keeps_a_best_first_prefix_of_the_usable_nodes():
    parents = torch.tensor([-1, -1, 0, 0, 1, 2])  # the tree above; best-first order 0, 2, 5, 1, 4, 3
    values = torch.tensor([0.5, 0.2, 0.7, 0.1, 0.3, 0.6])
    assert best_nodes(values, parents, budget=3).tolist() == [0, 2, 5]
    assert best_nodes(values, parents, budget=99).tolist() == [0, 1, 2, 3, 4, 5]
    usable = torch.tensor([True, True, False, True, True, False])  # node 2 and its child 5 out
    assert best_nodes(values, parents, budget=3, usable=usable).tolist() == [0, 1, 4]
    # flat costs: every node worth something is taken; steep costs: none
    flat = ForwardCosts((1, 64), (1.0, 1.0))
    assert best_nodes(values, parents, flat).tolist() == [0, 1, 2, 3, 4, 5]
    steep = ForwardCosts((1, 2), (1.0, 10.0))
    assert best_nodes(values, parents, steep).tolist() == []
    with pytest.raises(InvalidInputError, match="forward costs"):
        best_nodes(values, parents)


def test_measure_forward_costs_on_a_tiny_model():
    costs = measure_forward_costs(tiny_model("llama"), sizes=(1, 4, 16), context=32, repeats=1)
    assert costs.sizes == (1, 4, 16)
    assert all(s > 0 for s in costs.seconds)


def test_measure_forward_costs_stays_inside_the_models_positions():
    model = tiny_model("gemma3")  # 256 positions: 256 context tokens + 64 new would not fit
    costs = measure_forward_costs(model, sizes=(1, 64), context=256, repeats=1)
    assert costs.sizes == (1, 64)


def test_measure_forward_costs_stops_repeating_a_size_after_its_time(monkeypatch):
    runs = []
    real = budget.CausalLMRunner.forward

    def slow_forward(self, tokens, *args, **kwargs):
        runs.append(tokens.numel())
        return real(self, tokens, *args, **kwargs)

    monkeypatch.setattr(budget.CausalLMRunner, "forward", slow_forward)
    measure_forward_costs(tiny_model("llama"), sizes=(1, 4), context=8, repeats=3, seconds_per_size=1e-9)
    assert runs == [8, 1, 1, 4, 4]  # the context, then warm-up + one timed run per size (each over its time)
    runs.clear()
    measure_forward_costs(tiny_model("llama"), sizes=(1, 4), context=8, repeats=3, seconds_per_size=1e9)
    assert runs == [8] + [1] * 4 + [4] * 4  # the context, then warm-up + `repeats` timed runs per size


def test_forward_costs_say_when_they_measure(tmp_path, capsys):
    model = tiny_model("llama", seed=8)
    forward_costs(model, cache_dir=tmp_path, sizes=(1, 2), context=8)
    err = capsys.readouterr().err
    assert "measuring the target's forward cost at 1,2 tokens" in err and str(tmp_path) in err
    assert err.rstrip().endswith(" s")  # with the time it took
    forward_costs(tiny_model("llama", seed=8), cache_dir=tmp_path, sizes=(1, 2), context=8)  # from the file
    assert capsys.readouterr().err == ""


@pytest.fixture
def counted_measure(monkeypatch):
    calls = []

    def fake(model, sizes, context):
        calls.append(model)
        return ForwardCosts(tuple(sizes), tuple(0.001 * (i + 1) for i in range(len(sizes))))

    monkeypatch.setattr(budget, "measure_forward_costs", fake)
    return calls


def test_forward_costs_disk_round_trip(tmp_path, counted_measure):
    first = forward_costs(tiny_model("qwen2", seed=5), cache_dir=tmp_path)
    assert len(counted_measure) == 1
    table = json.loads((tmp_path / budget.CACHE_FILE).read_text())
    assert len(table) == 1 and next(iter(table.values())) == {"sizes": list(first.sizes),
                                                              "seconds": list(first.seconds)}
    # another model object with the same identity (architecture, size, device, dtype, threads) reads the file
    again = forward_costs(tiny_model("qwen2", seed=6), cache_dir=tmp_path)
    assert again == first and len(counted_measure) == 1
    # a different architecture is a different key
    forward_costs(tiny_model("llama", seed=5), cache_dir=tmp_path)
    assert len(counted_measure) == 2
    assert len(json.loads((tmp_path / budget.CACHE_FILE).read_text())) == 2


def test_forward_costs_are_remembered_per_model_object(tmp_path, counted_measure):
    model = tiny_model("llama", seed=7)
    first = forward_costs(model, cache_dir=tmp_path)
    (tmp_path / budget.CACHE_FILE).unlink()
    assert forward_costs(model, cache_dir=tmp_path) is first  # from memory: no measurement, no file needed
    assert len(counted_measure) == 1


def test_forward_costs_rewrite_an_unreadable_cache(tmp_path, counted_measure):
    (tmp_path / budget.CACHE_FILE).write_text("{not json")
    costs = forward_costs(tiny_model("gemma3", seed=8), cache_dir=tmp_path)
    assert len(counted_measure) == 1
    table = json.loads((tmp_path / budget.CACHE_FILE).read_text())
    assert list(table.values()) == [{"sizes": list(costs.sizes), "seconds": list(costs.seconds)}]


def test_calibration_follows_evidence_and_recovers_without_it():
    from specdec.budget import update_calibration

    c = 1.0
    for _ in range(40):  # trees keep predicting 2 tokens where 0.4 are accepted
        c = update_calibration(c, 0, 2.0) if _ % 5 else update_calibration(c, 2, 2.0)
    assert 0.05 <= c < 0.3
    costs = ForwardCosts((1, 2, 4), (0.10, 0.12, 0.13))
    values = torch.tensor([0.54, 0.19, 0.11])
    assert choose_budget(values * c, costs) == 0  # a low estimate drafts nothing...
    steps = 0
    while choose_budget((values * c).clamp(max=1.0), costs) == 0:  # ...and, without evidence, relaxes toward 1
        c = update_calibration(c, 0, 0.0)
        steps += 1
    assert 1 <= steps <= 20 and choose_budget(values, costs) >= 1
    assert update_calibration(1.0, 8, 2.0) == min(4.0, 0.9 + 0.1 * 4.0)  # more accepted than predicted: up
    assert update_calibration(0.05, 0, 3.0) == 0.05  # the floor
