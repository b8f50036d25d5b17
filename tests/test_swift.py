"""SWIFT: sub-layer encoding, GP-UCB, the layer-set search, saved sets, the draft tree, and end-to-end generation on a
6-layer tiny target (the shared tiny models have 2-3 layers, too few to search: layers 0 and L-1 are never skipped).
"""

from __future__ import annotations

import json

import pytest
import torch

from specdec import SpecEngine
from specdec.drafters import create_drafter
from specdec.drafters.layer_skip.swift import SwiftConfig
from specdec.drafters.layer_skip.swift_search import (GaussianProcessUCB, LayerSetSearch, SearchConfig, indicator_from_plan,
                                           initial_indicator, load_layer_set, plan_from_indicator, save_layer_set,
                                           skippable_count)
from specdec.errors import InvalidInputError
from specdec.drafters.layer_skip.runner import DraftChain, SkipPlan
from tiny_models import VOCAB, greedy_reference, tiny_model, tiny_prompt

LAYERS = 6


def deep_llama(layers: int = LAYERS) -> torch.nn.Module:
    """A tiny Llama like tiny_models' but with ``layers`` layers, so that there are sub-layers to search over."""
    return tiny_model("llama", layers=layers)


# ---------------------------------------------------------------------------------------------- encoding
def test_initial_set_is_the_odd_layers_thinned_evenly():
    x = initial_indicator(LAYERS, 3)  # D = 8: (attn, mlp) of layers 1..4; odd layers 1, 3 -> entries 0, 1, 4, 5
    assert x.tolist() == [True, False, False, False, True, True, False, False]
    plan = plan_from_indicator(x)
    assert plan == SkipPlan(frozenset({1, 3}), frozenset({3}))
    assert torch.equal(indicator_from_plan(plan, LAYERS), x)
    more = initial_indicator(LAYERS, 6)  # all 4 odd-layer sub-layers, then 2 of the even layers'
    assert int(more.sum()) == 6 and bool(more[[0, 1, 4, 5]].all())


@pytest.mark.parametrize("layers", [4, 28])
def test_skip_count_and_never_first_or_last_layer(layers):
    k = int(skippable_count(layers) * 0.45)
    plan = plan_from_indicator(initial_indicator(layers, k))
    assert len(plan.skip_attention) + len(plan.skip_mlp) == k
    assert all(1 <= layer <= layers - 2 for layer in plan.skip_attention | plan.skip_mlp)
    with pytest.raises(InvalidInputError, match="not skippable"):
        indicator_from_plan(SkipPlan(frozenset({0})), layers)


# ---------------------------------------------------------------------------------------------- GP-UCB
def test_gp_ranks_seen_points_by_score_and_is_uncertain_far_from_them():
    x = torch.eye(6, dtype=torch.bool)[:3].double()  # three one-hot points
    gp = GaussianProcessUCB(length_scale=1.0, noise=1e-4, kappa=2.5)
    gp.fit(x, torch.tensor([0.2, 0.9, 0.5], dtype=torch.float64))
    mean, std = gp.posterior(x)
    assert mean.argsort().tolist() == [0, 2, 1] and bool((std < 0.05).all())
    far = torch.tensor([[0, 0, 0, 1, 1, 1]], dtype=torch.float64)  # squared distance 4 from each: kernel e^-2
    far_mean, far_std = gp.posterior(far)
    assert float(far_std) > 0.9
    assert torch.allclose(gp.ucb(far), far_mean + 2.5 * far_std)


# ---------------------------------------------------------------------------------------------- the search
def _overlap_objective(bad: torch.Tensor):
    """Score 1 - |x & bad| / |bad|: the initial set (= bad) scores 0, any set avoiding it scores 1."""
    return lambda x: 1.0 - float((x & bad).sum()) / float(bad.sum())


def _run(search: LayerSetSearch, objective, steps: int) -> list[torch.Tensor]:
    proposals = []
    for _ in range(steps):
        if search.done:
            break
        x = search.propose()
        proposals.append(x)
        search.register(x, objective(x))
    return proposals


def test_search_improves_on_the_initial_set_within_budget():
    initial = initial_indicator(8, 5)  # D = 12, k = 5
    search = LayerSetSearch(initial, SearchConfig(max_iterations=40, target_score=1.0, patience=40), seed=0)
    proposals = _run(search, _overlap_objective(initial), 40)
    assert search.first_score == 0.0 and search.best_score == 1.0 and search.done
    assert not bool((search.best & initial).any())
    assert len(proposals) < 40  # stopped at the target score
    for x in proposals:  # every proposal is a valid set: k of the D sub-layers
        assert x.shape == (12,) and x.dtype == torch.bool and int(x.sum()) == 5


def test_gp_ucb_proposals_are_valid_unseen_and_seeded():
    initial = initial_indicator(10, 7)  # D = 16
    config = SearchConfig(max_iterations=30, target_score=2.0, patience=30, bayes_interval=3)
    runs = []
    for seed in (0, 0, 1):
        search = LayerSetSearch(initial, config, seed=seed)
        objective = _overlap_objective(initial)
        bayes = []
        for it in range(30):
            is_bayes = it > 0 and it % 3 == 0
            x = search.propose()
            if is_bayes:
                assert not bool(search.seen(x[None])[0]), f"iteration {it} re-proposed an evaluated set"
                bayes.append(x)
            assert int(x.sum()) == 7 and x.shape == (16,)
            search.register(x, objective(x))
        assert len(bayes) == 9
        runs.append(torch.stack(search._xs))
    assert torch.equal(runs[0], runs[1])  # same seed, same proposals
    assert not torch.equal(runs[0], runs[2])


def test_search_stops_after_patience_without_improvement():
    search = LayerSetSearch(initial_indicator(8, 5), SearchConfig(max_iterations=100, patience=4), seed=0)
    proposals = _run(search, lambda x: 0.5, 100)
    assert len(proposals) == 5 and search.done  # the first sets the best, four more fail to beat it


# ---------------------------------------------------------------------------------------------- saved sets
def test_layer_set_file_round_trip(tmp_path):
    path = str(tmp_path / "sets" / "skip_layers.json")
    assert load_layer_set(path, "m", "code") is None
    save_layer_set(path, "m", "code", SkipPlan(frozenset({3, 1}), frozenset({2})), 0.9)
    save_layer_set(path, "m", "chat", SkipPlan(frozenset(), frozenset({4})))
    assert load_layer_set(path, "m", "code") == SkipPlan(frozenset({1, 3}), frozenset({2}))
    assert load_layer_set(path, "m", "chat") == SkipPlan(frozenset(), frozenset({4}))
    assert load_layer_set(path, "other", "code") is None
    assert json.load(open(path))["m"]["code"] == {"skip_attention": [1, 3], "skip_mlp": [2], "matchness": 0.9}
    assert [f.name for f in (tmp_path / "sets").iterdir()] == ["skip_layers.json"]  # no temporary file left


def test_a_damaged_layer_set_file_is_a_clear_error(tmp_path):
    path = tmp_path / "skip_layers.json"
    path.write_text("{not json")
    with pytest.raises(InvalidInputError, match="cannot read the layer-set file"):
        load_layer_set(str(path), "m", "code")
    with pytest.raises(InvalidInputError, match="cannot read the layer-set file"):
        save_layer_set(str(path), "m", "code", SkipPlan(frozenset({1}), frozenset()))


def test_found_set_is_saved_and_a_loaded_set_skips_the_search(tmp_path):
    path = str(tmp_path / "skip_layers.json")
    target = deep_llama()
    drafter = create_drafter("swift", target=target, window=4, max_iterations=3, target_score=1.1,
                             layer_set_file=path, task="t")
    assert drafter.search is not None and not drafter.loaded
    SpecEngine(target, drafter).generate(tiny_prompt(), max_new_tokens=20)
    assert drafter.search.done and drafter.search.iterations == 3
    saved = load_layer_set(path, drafter.model_key, "t")
    assert saved == drafter.plan

    again = create_drafter("swift", target=target, window=4, layer_set_file=path, task="t")
    assert again.loaded and again.search is None and again.plan == saved
    fixed = create_drafter("swift", target=target, skip_attention=(0,), skip_mlp=(5,))
    assert fixed.search is None and fixed.plan == SkipPlan(frozenset({0}), frozenset({5}))


# ---------------------------------------------------------------------------------------------- draft tree
def test_tree_is_the_chain_with_top_c_siblings_cut_shallowest_first():
    drafter = create_drafter("swift", target=tiny_model("llama"), max_nodes=10)
    top_ids = torch.arange(30).reshape(3, 10)  # depth d's candidates are 10d .. 10d+9, best first
    top_probs = torch.tensor([0.97, 0.85, 0.3])[:, None].expand(3, 10)  # c = 3, 5, 10 (greedy)
    tree = drafter._tree(DraftChain(top_ids[:, 0], top_probs, top_ids), SwiftConfig().greedy_counts)
    # 3 chain nodes + 7 siblings: depth 1 gets 2, depth 2 gets 4, depth 3 the 1 left
    assert tree.tokens.tolist() == [0, 1, 2, 10, 11, 12, 13, 14, 20, 21]
    assert tree.parents.tolist() == [-1, -1, -1, 0, 0, 0, 0, 0, 3, 3]
    chain = drafter._tree(DraftChain(top_ids[:, 0], top_probs, top_ids), None)
    assert chain.tokens.tolist() == [0, 10, 20] and chain.parents.tolist() == [-1, 0, 1]


# ---------------------------------------------------------------------------------------------- end to end
def test_generation_with_the_search_running_equals_greedy():
    target = deep_llama()
    drafter = create_drafter("swift", target=target, window=8, max_iterations=6, patience=6, target_score=1.1,
                             stop_threshold=0.0)
    k = int(skippable_count(LAYERS) * 0.45)
    result = SpecEngine(target, drafter).generate(tiny_prompt(), max_new_tokens=40)
    assert torch.equal(result.sequences, greedy_reference(target, tiny_prompt(), 40))
    steps_after_window = sum(1 for n in torch.cumsum(torch.tensor(result.stats.accepted_lengths), 0) if n + 1 >= 9)
    assert steps_after_window >= 6
    search = drafter.search
    assert search.iterations == 6 == drafter.search_forwards
    assert search.best_score >= search.first_score
    assert drafter.plan == plan_from_indicator(search.best)
    assert len(drafter.plan.skip_attention) + len(drafter.plan.skip_mlp) == k
    assert all(1 <= layer <= LAYERS - 2 for layer in drafter.plan.skip_attention | drafter.plan.skip_mlp)
    assert result.stats.draft_forwards == drafter.forward_count == sum(result.stats.draft_depths) + 6
    info = result.stats.as_dict()["drafter_info"]  # what a benchmark report shows: the set in use
    assert info["skip_attention"] == sorted(drafter.plan.skip_attention)
    assert info["skip_mlp"] == sorted(drafter.plan.skip_mlp)
    assert info["search_evaluations"] == 6 and info["best_matchness"] == search.best_score


def test_sampling_with_rejection_is_seeded_deterministic():
    target = deep_llama()
    outputs = []
    for seed in (5, 5):
        drafter = create_drafter("swift", target=target, window=4, max_iterations=4)
        engine = SpecEngine(target, drafter, verifier="rejection")
        result = engine.generate(tiny_prompt(), max_new_tokens=16, do_sample=True,
                                 generator=torch.Generator().manual_seed(seed))
        assert result.stats.new_tokens == 16
        outputs.append(result.sequences)
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("options,message", [
    (dict(skip_ratio=1.0), "skip_ratio must be in \\[0, 1\\)"),
    (dict(max_draft=0), "max_draft must be >= 1"),
    (dict(greedy_counts=(3, 5)), "greedy_counts needs 4 counts"),
    (dict(max_iterations=0), "max_iterations must be >= 1"),
    (dict(skip_attention=(7,)), "skip_attention names layers \\[7\\]"),
])
def test_bad_options_name_the_problem(options, message):
    with pytest.raises(InvalidInputError, match=message):
        create_drafter("swift", target=tiny_model("llama"), **options)
