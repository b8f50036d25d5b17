"""Token Recycling: the adjacency-matrix update, template filling, budget pruning, hot/cold start, persistence,
and sampling with the rejection verifier. Exactness against greedy is in test_exactness.py."""

from __future__ import annotations

import pytest
import torch

from specdec import SpecEngine
from specdec.budget import best_first_order
from specdec.drafters import create_drafter
from specdec.drafters.tree_templates import TEMPLATE_2_2_2, build_template, compile_template
from specdec.errors import IncompatibleModelsError, InvalidInputError
from specdec.sampling import SamplingConfig
from specdec.state import DecodeState, StepOutcome
from specdec.tree import DraftTree
from specdec.verifiers.base import VerificationResult
from tiny_models import VOCAB, tiny_model, tiny_prompt

SMALL = ((0,), (1,), (0, 0), (0, 1), (1, 0))  # root -> a, b; a -> c, d; b -> e


def _drafter(**options):
    options.setdefault("budget", 80)  # fixed budgets measure nothing
    options.setdefault("lookup_depth", 0)  # the matrix alone, unless a test is about the lookup branch
    return create_drafter("token-recycling", target=tiny_model("llama"), **options)


def _state(root: int, max_new_tokens: int = 100) -> DecodeState:
    sequence = torch.tensor([[5, 6, root]])
    return DecodeState(sequence=sequence, prompt_len=2, target=None, sampling=SamplingConfig(),
                       max_new_tokens=max_new_tokens)


def _outcome(tree: DraftTree, logits: torch.Tensor, emitted: list[int]) -> StepOutcome:
    tokens = torch.tensor(emitted)
    result = VerificationResult(torch.zeros(0, dtype=torch.long), tokens, bonus=False)
    return StepOutcome(tree, result, logits, tokens)


def _paths(tree: DraftTree) -> list[list[int]]:
    return [tree.tokens[tree.path_to(i)].tolist() for i in range(tree.size)]


def _set_rows(drafter, rows: dict[int, list[int]]) -> None:
    for token, candidates in rows.items():
        drafter.matrix[token] = torch.tensor(candidates)
        drafter.written[token] = True


# ------------------------------------------------------------------ templates
def test_template_2_2_2_has_the_papers_level_widths():
    tpl = compile_template(TEMPLATE_2_2_2)
    assert tpl.size == 80
    assert [hi - lo for lo, hi in tpl.levels] == [8, 21, 25, 15, 8, 3]
    assert tpl.max_rank == 7
    assert tpl.paths[:8] == tuple((r,) for r in range(8)) and tpl.paths[-1] == (0, 0, 0, 1, 0, 0)


def test_build_template_and_bad_templates():
    assert build_template([2, 1]) == ((0,), (1,), (0, 0), (1, 0))
    assert compile_template(build_template([1] * 4)).parents.tolist() == [-1, 0, 1, 2]
    for bad in ([], [()], [(0,), (0,)], [(0, 1)], [(-1,)]):
        with pytest.raises(InvalidInputError):
            compile_template(bad)
    with pytest.raises(InvalidInputError, match="rank 7.*k=4"):
        _drafter(k=4)  # the default template needs 8 candidates per token


@pytest.mark.parametrize("options", [dict(budget=0), dict(budget="big"), dict(budget=True), dict(k=0),
                                     dict(decay=1.0), dict(k=VOCAB + 1, template=SMALL)])
def test_invalid_options(options):
    with pytest.raises(InvalidInputError):
        _drafter(**options)


# ------------------------------------------------------------------ the matrix
def test_matrix_update_takes_topk_of_every_slot_last_write_wins():
    drafter = _drafter(k=3, template=SMALL, context_rows=False)
    drafter.begin(_state(9))
    proposed = drafter.propose(_state(9))
    assert proposed.size == 0  # nothing learned yet
    tree = DraftTree(torch.tensor([5, 7, 5]), torch.tensor([-1, 0, -1]),  # slots: [9, 5, 7, 5]
                     memo=proposed.memo)  # the drafter's record of its proposal (root 9), handed back in observe
    logits = torch.zeros(4, VOCAB)
    for slot, candidates in enumerate([[10, 11, 12], [20, 21, 22], [30, 31, 32], [40, 41, 42]]):
        logits[slot, candidates] = torch.tensor([3.0, 2.0, 1.0])
    drafter.observe(_state(9), _outcome(tree, logits, [5]))
    assert drafter.matrix[9].tolist() == [10, 11, 12]
    assert drafter.matrix[5].tolist() == [40, 41, 42]  # token 5 sat in slots 1 and 3: the last one wins
    assert drafter.matrix[7].tolist() == [30, 31, 32]
    assert torch.nonzero(drafter.written).flatten().tolist() == [5, 7, 9]
    assert int(drafter.matrix.sum()) == 10 + 11 + 12 + 40 + 41 + 42 + 30 + 31 + 32  # no other row changed


def test_rows_the_target_never_computed_are_not_learned():
    """Overlap mode observes a proposal whose rejected siblings were never scored (StepOutcome.scored): their
    placeholder rows must not be written into the matrix."""
    drafter = _drafter(k=3, template=SMALL, context_rows=False)
    drafter.begin(_state(9))
    proposed = drafter.propose(_state(9))
    tree = DraftTree(torch.tensor([5, 7]), torch.tensor([-1, -1]), memo=proposed.memo)  # slots: [9, 5, 7]
    logits = torch.zeros(3, VOCAB)
    logits[0, [10, 11, 12]] = logits[1, [20, 21, 22]] = torch.tensor([3.0, 2.0, 1.0])
    outcome = _outcome(tree, logits, [5])
    outcome = StepOutcome(outcome.tree, outcome.result, logits, outcome.emitted,
                          scored=torch.tensor([True, True, False]))  # node 7's row is a placeholder
    drafter.observe(_state(9), outcome)
    assert drafter.matrix[9].tolist() == [10, 11, 12] and drafter.matrix[5].tolist() == [20, 21, 22]
    assert not bool(drafter.written[7])


def test_template_filling_on_a_hand_made_matrix():
    drafter = _drafter(k=2, template=SMALL, budget=5)
    _set_rows(drafter, {9: [3, 4], 3: [11, 12], 4: [13, 14]})
    tree = drafter.propose(_state(9))
    assert tree.tokens.tolist() == [3, 4, 11, 12, 13]
    assert tree.parents.tolist() == [-1, -1, 0, 0, 1]
    assert tree.budget == 5


def test_filling_2_2_2_matches_a_path_by_path_lookup():
    drafter = _drafter()
    base = torch.randint(3, VOCAB, (VOCAB, 1), generator=torch.Generator().manual_seed(0))
    drafter.matrix.copy_((base + torch.arange(8)) % VOCAB)  # random rows without repeated candidates
    drafter.written[:] = True
    tree = drafter.propose(_state(9))

    def lookup(path):
        token = 9
        for rank in path:
            token = int(drafter.matrix[token, rank])
        return token

    tpl = compile_template(TEMPLATE_2_2_2)
    assert tree.tokens.tolist() == [lookup(p) for p in tpl.paths]
    assert torch.equal(tree.parents, tpl.parents)


def test_unwritten_rows_and_repeated_siblings_are_not_drafted():
    drafter = _drafter(k=2, template=SMALL, budget=5)
    _set_rows(drafter, {9: [3, 3]})  # row 3 never written; the root's row repeats a candidate
    tree = drafter.propose(_state(9))
    assert tree.tokens.tolist() == [3] and tree.budget == 1


def test_depth_stays_within_the_tokens_generate_still_allows():
    drafter = _drafter(k=2, template=build_template([1, 1, 1]), budget=3)
    _set_rows(drafter, {9: [3, 4], 3: [5, 6], 5: [7, 8]})
    assert drafter.propose(_state(9)).size == 3
    assert drafter.propose(_state(9, max_new_tokens=3)).tokens.tolist() == [3]  # 1 generated, 2 left: depth 1


# ------------------------------------------------------------------ budgets
def test_fixed_budget_keeps_the_best_ancestor_closed_nodes():
    drafter = _drafter(budget=3)
    drafter.matrix.copy_((torch.arange(VOCAB)[:, None] * 8 + torch.arange(8) + 1) % VOCAB)  # distinct siblings
    drafter.written[:] = True
    tpl = drafter.template
    estimates = torch.full((tpl.size,), 0.01, dtype=torch.float64)
    for path, value in {(1,): 0.9, (1, 0): 0.8, (1, 0, 0): 0.7, (1, 0, 0, 0): 0.6}.items():
        estimates[tpl.paths.index(path)] = value
    estimates[tpl.paths.index((0, 0, 0, 0, 0, 0))] = 0.95  # deep and good, but its ancestors are not
    drafter.estimates = estimates
    tree = drafter.propose(_state(9))
    row = drafter.matrix
    assert _paths(tree) == [[int(row[9, 1])], [int(row[9, 1]), int(row[row[9, 1], 0])],
                            [int(row[9, 1]), int(row[row[9, 1], 0]), int(row[row[row[9, 1], 0], 0])]]
    order, _ = best_first_order(estimates, tpl.parents)
    assert sorted(order[:3].tolist()) == [tpl.paths.index(p) for p in [(1,), (1, 0), (1, 0, 0)]]


@pytest.mark.parametrize("costs,expected", [({1: 1.0}, 80), ({1: 1.0, 2: 100.0}, 0)])
def test_auto_budget_follows_the_forward_costs(costs, expected):
    drafter = _drafter(budget="auto", costs=costs)
    drafter.matrix.copy_((torch.arange(VOCAB)[:, None] * 8 + torch.arange(8) + 1) % VOCAB)
    drafter.written[:] = True
    tree = drafter.propose(_state(9))
    assert tree.size == expected == tree.budget


def test_auto_budget_measures_the_target_once(tmp_path):
    target = tiny_model("qwen2", seed=11)  # a model object no other test measures (costs are kept per object)
    drafter = create_drafter("token-recycling", target=target, cost_cache=str(tmp_path))
    assert (tmp_path / "forward_costs.json").exists()
    assert drafter.budget_policy.costs.sizes == (1, 2, 4, 8, 16, 32, 64)
    result = SpecEngine(target, drafter).generate(tiny_prompt(), max_new_tokens=20)
    assert len(result.stats.tree_budgets) == result.stats.target_forwards
    assert result.stats.tree_sizes == result.stats.tree_budgets


def test_estimates_learn_from_what_the_step_emitted():
    drafter = _drafter(k=2, template=SMALL, budget=5)
    _set_rows(drafter, {9: [3, 4], 3: [11, 12], 4: [13, 14]})
    before = drafter.estimates.clone()
    tree = drafter.propose(_state(9))
    drafter.observe(_state(9), _outcome(tree, torch.zeros(6, VOCAB), [3, 12]))  # a, then d
    paths = drafter.template.paths
    up = {paths.index(p) for p in [(0,), (0, 1)]}
    for i in range(5):
        assert (drafter.estimates[i] > before[i]) == (i in up), paths[i]
    # a step that emitted only [3]: a is a hit, b and its child e misses, a's children unknown (nothing emitted
    # that far)
    _set_rows(drafter, {9: [3, 4], 3: [11, 12], 4: [13, 14]})
    before = drafter.estimates.clone()
    tree = drafter.propose(_state(9))
    drafter.observe(_state(9), _outcome(tree, torch.zeros(6, VOCAB), [3]))
    assert torch.sign(drafter.estimates - before).tolist() == [1.0, -1.0, 0.0, 0.0, -1.0]


# ------------------------------------------------------------------ across generate() calls
@pytest.mark.parametrize("hot_start", [True, False])
def test_hot_start_keeps_the_matrix_cold_start_resets_it(hot_start):
    target = tiny_model("llama")
    drafter = create_drafter("token-recycling", target=target, budget=20, hot_start=hot_start, context_rows=False)
    engine = SpecEngine(target, drafter)
    first = engine.generate(tiny_prompt(), max_new_tokens=16).stats
    learned = drafter.matrix.clone()
    assert first.tree_budgets[0] == 0 and bool(drafter.written.any())
    second = engine.generate(tiny_prompt(), max_new_tokens=16).stats
    if hot_start:
        assert second.tree_budgets[0] > 0
    else:
        assert second.tree_budgets == first.tree_budgets and torch.equal(drafter.matrix, learned)


def test_context_rows_seed_empty_rows_from_the_prompt_and_yield_to_the_target():
    drafter = _drafter(k=2, template=build_template([1, 1, 1]), budget=3)
    _set_rows(drafter, {7: [40, 41]})  # written by the target: kept
    prompt = torch.tensor([[5, 6, 7, 8, 5, 9, 7, 5]])  # 5 -> 9 (last), 6 -> 7, 9 -> 7, 8 -> 5
    drafter.begin(DecodeState(sequence=prompt, prompt_len=8, target=None, sampling=SamplingConfig(),
                              max_new_tokens=10))
    assert drafter.matrix[5].tolist() == [9, 9] and drafter.matrix[6].tolist() == [7, 7]
    assert drafter.matrix[7].tolist() == [40, 41] and not bool(drafter.from_context[7])
    tree = drafter.propose(DecodeState(sequence=prompt, prompt_len=8, target=None, sampling=SamplingConfig(),
                                       max_new_tokens=10))
    assert tree.tokens.tolist() == [9, 7, 40] and tree.parents.tolist() == [-1, 0, 1]
    # a verified slot of token 9 replaces its seeded row with the target's top-k
    logits = torch.zeros(4, VOCAB)
    logits[:, 50], logits[:, 51] = 2.0, 1.0
    drafter.observe(None, _outcome(tree, logits, [9]))
    assert drafter.matrix[9].tolist() == [50, 51] and not bool(drafter.from_context[9])
    off = _drafter(k=2, template=build_template([1, 1, 1]), budget=3, context_rows=False)
    off.begin(DecodeState(sequence=prompt, prompt_len=8, target=None, sampling=SamplingConfig(), max_new_tokens=10))
    assert not bool(off.written.any())


# ------------------------------------------------------------------ lookup branch
def _lookup_state(sequence: list[int], max_new_tokens: int = 100) -> DecodeState:
    return DecodeState(sequence=torch.tensor([sequence]), prompt_len=len(sequence), target=None,
                       sampling=SamplingConfig(), max_new_tokens=max_new_tokens)


def test_lookup_branch_joins_the_tree_and_shares_slots_with_template_nodes():
    drafter = _drafter(k=2, template=build_template([2, 1]), budget=7, lookup_depth=3, context_rows=False)
    _set_rows(drafter, {9: [30, 31], 30: [60, 61], 31: [70, 71]})
    # last 2-gram (8, 9) occurred before, followed by 30, 61, 62: the chain shares the slot of template node 30
    tree = drafter.propose(_lookup_state([8, 9, 30, 61, 62, 8, 9]))
    assert sorted(_paths(tree)) == sorted([[30], [31], [30, 60], [31, 70], [30, 61], [30, 61, 62]])
    assert tree.budget == tree.size == 6  # 7 pool nodes chosen, the chain's 30 shares a slot


def test_lookup_estimates_learn_hits_and_misses_per_ngram_and_depth():
    drafter = _drafter(k=2, template=build_template([1]), budget=4, lookup_depth=3, context_rows=False)
    prior = drafter.lookup_estimates.clone()
    state = _lookup_state([8, 9, 30, 61, 62, 8, 9])  # a 2-gram match, chain [30, 61, 62]
    tree = drafter.propose(state)
    logits = torch.zeros(tree.size + 1, VOCAB)
    drafter.observe(state, _outcome(tree, logits, [30, 61, 5]))  # depths 1, 2 hit, 3 missed
    est, d = drafter.lookup_estimates, drafter.config.decay
    assert torch.allclose(est[1], torch.tensor([d * prior[1, 0] + 1 - d, d * prior[1, 1] + 1 - d, d * prior[1, 2]],
                                               dtype=torch.float64))
    assert torch.equal(est[0], prior[0]) and torch.equal(est[2], prior[2])  # other n-gram sizes untouched
    state = _lookup_state([8, 9, 30, 61, 62, 8, 9])
    tree = drafter.propose(state)
    before = drafter.lookup_estimates.clone()
    drafter.observe(state, _outcome(tree, torch.zeros(tree.size + 1, VOCAB), [30]))  # depth 1 hit, rest unknown
    assert est[1, 0] > before[1, 0] and torch.equal(est[1, 1:], before[1, 1:])


def test_lookup_branch_respects_the_remaining_tokens_and_can_be_switched_off():
    drafter = _drafter(k=2, template=build_template([1]), budget=8, lookup_depth=5, context_rows=False)
    tree = drafter.propose(_lookup_state([8, 9, 30, 61, 62, 63, 8, 9], max_new_tokens=3))  # 2 drafted at most
    assert tree.max_depth <= 2 and _paths(tree) == [[30], [30, 61]]
    off = _drafter(k=2, template=build_template([1]), budget=8, lookup_depth=0, context_rows=False)
    assert off.propose(_lookup_state([8, 9, 30, 61, 62, 63, 8, 9])).size == 0
    with pytest.raises(InvalidInputError, match="lookup_depth"):
        _drafter(lookup_depth=-1)
    with pytest.raises(InvalidInputError, match="lookup_ngram"):
        _drafter(lookup_ngram=0)


# ------------------------------------------------------------------ persistence
def test_save_load_round_trip(tmp_path):
    target = tiny_model("llama")
    drafter = create_drafter("token-recycling", target=target, budget=20)
    SpecEngine(target, drafter).generate(tiny_prompt(), max_new_tokens=16)
    drafter.save(tmp_path / "a.pt")
    other = create_drafter("token-recycling", target=target, budget=20, hot_start=False)
    other.load(tmp_path / "a.pt")
    assert torch.equal(other.matrix, drafter.matrix) and torch.equal(other.written, drafter.written)
    stats = SpecEngine(target, other).generate(tiny_prompt(), max_new_tokens=16).stats
    assert stats.tree_budgets[0] > 0  # a cold start returns to the loaded matrix, not to zeros


def test_load_rejects_other_vocabularies_and_k(tmp_path):
    path = tmp_path / "a.pt"
    _drafter().save(path)
    with pytest.raises(IncompatibleModelsError, match=r"k=8.*k=4"):
        _drafter(k=4, template=SMALL).load(path)
    other_vocab = create_drafter("token-recycling", target=tiny_model("llama", vocab_size=128), budget=80)
    with pytest.raises(IncompatibleModelsError, match=rf"{VOCAB} tokens.*128 tokens"):
        other_vocab.load(path)


def test_load_rejects_damaged_files(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a torch file")
    with pytest.raises(InvalidInputError, match="cannot read"):
        _drafter().load(tmp_path / "garbage.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(InvalidInputError, match="not a Token Recycling matrix"):
        _drafter().load(tmp_path / "other.pt")
    drafter = _drafter()
    drafter.matrix[0, 0] = VOCAB + 5  # an id outside the vocabulary
    drafter.save(tmp_path / "bad-ids.pt")
    with pytest.raises(InvalidInputError, match="damaged"):
        _drafter().load(tmp_path / "bad-ids.pt")


# ------------------------------------------------------------------ sampling
def test_rejection_sampling_runs_and_is_seeded():
    target = tiny_model("qwen2")

    def run(seed: int) -> torch.Tensor:
        drafter = create_drafter("token-recycling", target=target, budget=20)
        engine = SpecEngine(target, drafter, verifier="rejection")
        engine.generate(tiny_prompt(1), max_new_tokens=12, do_sample=True,
                        generator=torch.Generator().manual_seed(seed))  # learn some rows first
        result = engine.generate(tiny_prompt(), max_new_tokens=24, do_sample=True, temperature=0.8, eos_token_id=None,
                                 generator=torch.Generator().manual_seed(seed))
        assert result.stats.new_tokens == 24 and max(result.stats.tree_sizes) > 0
        return result.sequences

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))
