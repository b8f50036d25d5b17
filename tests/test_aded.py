"""ADED: tri-gram counting and adaptation, the PUCT search, candidate extraction, table files, the drafter."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from specdec import SpecEngine
from specdec.drafters import create_drafter
from specdec.drafters.aded.drafter import AdedConfig, AdedDrafter
from specdec.drafters.aded.mcts import MCTSConfig, SuccessorCache, draft_candidates, extract, search
from specdec.drafters.aded.trigram_table import AdaptiveTrigrams, TrigramTable, context_key
from specdec.errors import IncompatibleModelsError, InvalidInputError
from specdec.sampling import SamplingConfig
from specdec.state import DecodeState
from tiny_models import VOCAB, tiny_model, tiny_prompt

REFERENCE = dict(budget=24, adapt_prompt=False)  # the reference implementation's behaviour (not our defaults)


def successors(table: TrigramTable, a: int, b: int) -> dict[int, float]:
    row = table.row(context_key(a, b))
    return {} if row is None else dict(zip(row[0].tolist(), row[1].tolist()))


def dict_lookup(rows: dict[tuple[int, int], dict[int, float]]):
    """A lookup over a hand-made table, rows best first: the search never sees a TrigramTable."""
    def lookup(a: int, b: int):
        row = rows.get((a, b))
        if not row:
            return None
        items = sorted(row.items(), key=lambda kv: (-kv[1], kv[0]))
        return np.array([k for k, _ in items], dtype=np.int64), np.array([v for _, v in items], dtype=np.float32)
    return lookup


def state_of(tokens: list[int], max_new_tokens: int = 100) -> DecodeState:
    seq = torch.tensor([tokens])
    return DecodeState(sequence=seq, prompt_len=seq.shape[1], target=None, sampling=SamplingConfig(),
                       max_new_tokens=max_new_tokens)


# ---------------------------------------------------------------------------------------------- the table
def test_counts_normalise_per_context_and_keep_the_top_successors():
    corpus = [[1, 2, 3, 1, 2, 3, 1, 2, 4, 1, 2, 5], [1, 2, 3]]  # (1,2) -> 3 x3, 4 x1, 5 x1; none across sequences
    table = TrigramTable.from_sequences(corpus, top=2)
    assert successors(table, 1, 2) == pytest.approx({3: 3 / 5, 4: 1 / 5})  # normalised over all 5, then pruned
    assert successors(table, 2, 3) == {1: 1.0}
    assert successors(table, 3, 1) == {2: 1.0}
    assert successors(table, 2, 4) == {1: 1.0}
    assert successors(table, 2, 5) == {} and successors(table, 3, 2) == {}
    assert table.num_contexts == 5 and table.max_token_id == 4  # 5 was pruned and ends the corpus
    full = TrigramTable.from_sequences(corpus, top=12)
    assert full.max_token_id == 5
    assert successors(full, 1, 2) == pytest.approx({3: 0.6, 4: 0.2, 5: 0.2})
    assert list(full.row(context_key(1, 2))[0]) == [3, 4, 5]  # best first, ties by token id
    assert successors(full.prune(2), 1, 2) == successors(table, 1, 2)


def test_counter_folds_pending_counts(monkeypatch):
    import specdec.drafters.aded.trigram_table as tt

    monkeypatch.setattr(tt, "_COMPACT_AT", 4)  # fold after every sequence
    corpus = [[7, 8, 9, 7, 8, 9], [7, 8, 6], [7, 8, 9]]
    folded = TrigramTable.from_sequences(corpus)
    monkeypatch.setattr(tt, "_COMPACT_AT", 1 << 30)
    assert successors(folded, 7, 8) == pytest.approx({9: 0.75, 6: 0.25}) == successors(
        TrigramTable.from_sequences(corpus), 7, 8)


def test_boosts_add_up_to_the_cap_and_create_missing_entries():
    base = TrigramTable.from_sequences([[1, 2, 3]])
    table = AdaptiveTrigrams(base, boost=0.04, cap=3.0)
    table.adapt([1, 2, 3, 1, 2, 4])  # (1,2,3) (2,3,1) (3,1,2) (1,2,4)
    toks, scores = table.lookup(1, 2)
    assert toks.tolist() == [3, 4] and scores.tolist() == pytest.approx([1.04, 0.04])
    assert successors(base, 1, 2) == {3: 1.0}  # the shared table is never written
    assert table.lookup(3, 1)[1].tolist() == pytest.approx([0.04])
    for _ in range(100):
        table.adapt([1, 2, 4])
    toks, scores = table.lookup(1, 2)
    assert toks.tolist() == [4, 3] and scores.tolist() == pytest.approx([3.0, 1.04])  # capped, re-sorted
    table.reset()
    assert table.lookup(1, 2)[1].tolist() == [1.0] and table.lookup(3, 1) is None

    empty = AdaptiveTrigrams(TrigramTable.empty())
    empty.adapt([5, 6, 7, 5, 6, 7])
    assert empty.lookup(5, 6)[0].tolist() == [7] and empty.lookup(5, 6)[1].tolist() == pytest.approx([0.08])


# ---------------------------------------------------------------------------------------------- the search
HAND_TABLE = {  # root (1, 2); the likeliest sentence is 3 5 7, then 8
    (1, 2): {3: 0.6, 4: 0.3, 9: 0.1},
    (2, 3): {5: 0.8, 6: 0.2},
    (2, 4): {5: 0.5, 6: 0.5},
    (3, 5): {7: 0.9, 6: 0.1},
    (3, 6): {7: 1.0},
    (5, 7): {8: 1.0},
    (4, 5): {7: 1.0},
    (4, 6): {7: 1.0},
}


def test_the_most_visited_path_is_the_best_sentence_and_the_search_is_seeded():
    cache = SuccessorCache(dict_lookup(HAND_TABLE))
    tree = search(1, 2, cache, MCTSConfig(), np.random.default_rng(0))
    assert tree.most_visited_path() == [3, 5, 7]
    assert tree.visits[0] == 150 and max(tree.depth(i) for i in range(len(tree.tokens))) == 3  # 4 states
    again = search(1, 2, SuccessorCache(dict_lookup(HAND_TABLE)), MCTSConfig(), np.random.default_rng(0))
    assert again.visits == tree.visits and again.totals == tree.totals


def test_rollouts_sample_successors_in_proportion_and_reward_their_scores():
    # One iteration: expand the root into 3, then roll out (2,3) -> 4 or 5, then one more certain step.
    rows = {(1, 2): {3: 1.0}, (2, 3): {4: 0.75, 5: 0.25}, (3, 4): {6: 1.0}, (3, 5): {7: 1.0}}
    rng = np.random.default_rng(0)
    rewards = [search(1, 2, SuccessorCache(dict_lookup(rows)), MCTSConfig(iterations=1), rng).totals[0]
               for _ in range(800)]
    assert set(np.round(rewards, 5)) == {3.75, 3.25}  # 1 + 1.0 + score of the sampled word + 1.0
    assert np.mean(np.isclose(rewards, 3.75)) == pytest.approx(0.75, abs=0.05)


def test_candidates_are_best_first_ancestor_closed_and_extended():
    lookup = dict_lookup(HAND_TABLE)
    cache = SuccessorCache(lookup)
    cands = extract(search(1, 2, cache, MCTSConfig(), np.random.default_rng(0)), cache, top_k=24)
    assert all(p < i for i, p in enumerate(cands.parents))  # every prefix is ancestor-closed
    assert cands.values == sorted(cands.values, reverse=True)
    assert all(cands.values[i] <= cands.values[p] for i, p in enumerate(cands.parents) if p >= 0)
    paths = set()
    for i in range(len(cands)):
        path, node = [], i
        while node >= 0:
            path.insert(0, cands.tokens[node])
            node = cands.parents[node]
        assert len(path) == cands.depths[i]
        paths.add(tuple(path))
    assert len(paths) == len(cands)  # deduplicated: no two nodes share a path
    assert (3, 5, 7, 8) in paths  # the best sentence plus its greedy extension (below the search's 3 levels)
    assert max(cands.depths) == 4
    few = extract(search(1, 2, cache, MCTSConfig(), np.random.default_rng(0)), cache, top_k=2)
    # the 2 most visited nodes are 3 and 3-5; the extension of 3 is 5 again (deduplicated), that of 3-5 is 7
    assert few.tokens == [3, 5, 7] and few.parents == [-1, 0, 1]


def test_an_unknown_root_gives_no_candidates():
    assert len(draft_candidates(40, 41, dict_lookup(HAND_TABLE), MCTSConfig(), np.random.default_rng(0))) == 0


# ---------------------------------------------------------------------------------------------- files
def test_save_load_round_trip_prunes_on_load(tmp_path):
    corpus = [[1, 2, 3, 1, 2, 4, 1, 2, 5, 1, 2, 3]]
    table = TrigramTable.from_sequences(corpus, top=12, vocab_size=50)
    table.save(tmp_path / "t.npz")
    loaded = TrigramTable.load(tmp_path / "t.npz")
    assert loaded.vocab_size == 50
    for name in ("keys", "offsets", "tokens", "scores"):
        assert np.array_equal(getattr(loaded, name), getattr(table, name))
    top1 = TrigramTable.load(tmp_path / "t.npz", top=1)
    assert successors(top1, 1, 2) == pytest.approx({3: 0.5})
    assert TrigramTable.load(_saved(tmp_path, TrigramTable.empty())).num_contexts == 0


def _saved(tmp_path, table: TrigramTable, name: str = "x.npz"):
    table.save(tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("damage,message", [
    ("missing", "no such file"),
    ("garbage", "unreadable"),
    ("format", "not a specdec trigram table"),
    ("arrays", "missing arrays"),
    ("offsets", "corrupt"),
    ("dtype", "corrupt"),
])
def test_bad_table_files_are_refused_naming_the_path(tmp_path, damage, message):
    path = tmp_path / "bad.npz"
    good = TrigramTable.from_sequences([[1, 2, 3, 4]])
    fields = dict(format=np.array("specdec-trigrams/1"), vocab_size=np.array(0), keys=good.keys,
                  offsets=good.offsets, tokens=good.tokens, scores=good.scores)
    if damage == "garbage":
        path.write_bytes(b"PK\x03\x04 definitely not a zip file")
    elif damage == "format":
        np.savez(path, **{**fields, "format": np.array("other/1")})
    elif damage == "arrays":
        np.savez(path, **{k: v for k, v in fields.items() if k != "scores"})
    elif damage == "offsets":
        np.savez(path, **{**fields, "offsets": good.offsets + 1})
    elif damage == "dtype":
        np.savez(path, **{**fields, "tokens": good.tokens.astype(np.float64)})
    with pytest.raises(InvalidInputError, match=message) as info:
        TrigramTable.load(path)
    assert str(path) in str(info.value)


def test_a_table_from_another_tokenizer_is_refused(tmp_path):
    target = tiny_model("llama")
    wide = TrigramTable.from_sequences([[1, 2, VOCAB + 5]])
    path = _saved(tmp_path, wide, "wide.npz")
    with pytest.raises(IncompatibleModelsError, match=f"{path}.*token id {VOCAB + 5}"):
        AdedDrafter(target, table=str(path))
    with pytest.raises(IncompatibleModelsError, match="vocabulary has 96"):
        AdedDrafter(target, table=wide)
    AdedDrafter(target, table=str(_saved(tmp_path, TrigramTable.from_sequences([[1, 2, 3]], vocab_size=VOCAB))))


# ---------------------------------------------------------------------------------------------- the drafter
def test_an_empty_table_drafts_the_repeated_context():
    drafter = create_drafter("aded", target=tiny_model("llama"), **REFERENCE)
    state = state_of([10, 11, 12, 13, 14, 10, 11])
    drafter.begin(state)
    tree = drafter.propose(state)
    # (10,11)->12, (11,12)->13, (12,13)->14 from the search, then the greedy extension (13,14)->10
    assert tree.tokens.tolist() == [12, 13, 14, 10] and tree.parents.tolist() == [-1, 0, 1, 2]
    assert tree.budget == 24
    fresh = create_drafter("aded", target=tiny_model("llama"), **REFERENCE)
    assert fresh.propose(state_of([10, 11, 12, 13])).size == 0  # nothing repeats: no draft
    assert drafter.propose(state_of([10, 11, 12, 13])).tokens.tolist() == [14, 10, 11, 12]  # boosts persist
    drafter.begin(state_of([10, 11, 12, 13]))
    assert drafter.propose(state_of([10, 11, 12, 13])).size == 4  # ... across generate() calls by default
    reader = create_drafter("aded", target=tiny_model("llama"), budget=24, adapt_prompt=True)
    reader.begin(state_of([7, 8, 9] + list(range(20, 40)) + [7, 8]))  # 7 8 9 lies beyond the 16-token window
    assert reader.propose(state_of([7, 8, 9] + list(range(20, 40)) + [7, 8])).tokens.tolist()[:2] == [9, 20]
    forgetful = create_drafter("aded", target=tiny_model("llama"), keep_adaptation=False, **REFERENCE)
    forgetful.propose(state)
    forgetful.begin(state_of([10, 11, 12, 13]))
    assert forgetful.propose(state_of([10, 11, 12, 13])).size == 0


def test_budget_and_options():
    target = tiny_model("llama")
    table = TrigramTable.from_sequences([list(range(3, 40)) * 2, [3, 4, 7, 8, 9], [3, 4, 10, 11, 12]])
    state = state_of([20, 3, 4])
    sizes = {}
    for budget in (1, 3, 200):
        drafter = AdedDrafter(target, table=table, budget=budget)
        drafter.begin(state)
        tree = drafter.propose(state)
        sizes[budget] = tree.size
        assert tree.size <= budget and bool((tree.parents < torch.arange(tree.size)).all())
    assert sizes[1] == 1 and sizes[3] == 3 and sizes[200] > 3
    assert AdedDrafter(target, table=table).propose(state_of([20, 3, 4], max_new_tokens=1)).size == 0
    for bad in (dict(budget=0), dict(budget="big"), dict(window=2), dict(iterations=0), dict(sentence_length=1),
                dict(c2=0.0)):
        with pytest.raises(InvalidInputError):
            AdedConfig(**bad)


@functools.lru_cache(maxsize=None)
def dense_table() -> TrigramTable:
    """Tri-grams of 30k random tokens: nearly every bigram of the tiny vocabulary has successors."""
    return TrigramTable.from_sequences([torch.randint(3, VOCAB, (30000,), generator=torch.Generator().manual_seed(0))
                                        .tolist()])


def test_auto_budget_follows_forward_costs_and_calibrates():
    target = tiny_model("llama")
    table = dense_table()
    state = state_of([20, 3, 4])
    flat = AdedDrafter(target, table=table, budget="auto", costs={1: 1.0, 64: 1.0})  # nodes are free
    steep = AdedDrafter(target, table=table, budget="auto", costs={1: 1.0, 2: 100.0})  # any node costs 100x
    for drafter in (flat, steep):
        drafter.begin(state)
    flat_tree, steep_tree = flat.propose(state), steep.propose(state)
    assert flat_tree.size == flat_tree.budget > 1
    assert steep_tree.size == steep_tree.budget == 0

    result = SpecEngine(target, flat).generate(tiny_prompt(), max_new_tokens=12)
    assert result.stats.tree_budgets and max(result.stats.tree_budgets) >= 1
    assert flat._predicted[1] > 0  # observe() fed the per-depth calibration


def test_sampling_with_the_rejection_verifier_is_seeded():
    target = tiny_model("qwen2")
    prompt = tiny_prompt()

    def run(seed: int) -> tuple[torch.Tensor, list[int]]:
        drafter = create_drafter("aded", target=target, table=dense_table(), seed=3)
        out = SpecEngine(target, drafter, verifier="rejection").generate(
            prompt, max_new_tokens=16, eos_token_id=None, do_sample=True,
            generator=torch.Generator().manual_seed(seed))
        return out.sequences, out.stats.tree_sizes

    first, sizes = run(0)
    assert first.shape[1] == prompt.shape[1] + 16 and max(sizes) > 0
    assert torch.equal(run(0)[0], first)


# ---------------------------------------------------------------------------------------------- the command line
def test_cli_counts_a_text_corpus_with_the_target_tokenizer(tmp_path, capsys):
    from specdec.cli import main
    from tiny_models import word_tokenizer

    word_tokenizer().save_pretrained(tmp_path / "tok")
    (tmp_path / "a.txt").write_text("t3 t4 t5 t3 t4 t6\nt3 t4 t5\n")
    (tmp_path / "b.txt").write_text("t7 t8 t9")
    out = tmp_path / "table.npz"
    argv = ["trigrams", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--tokenizer", str(tmp_path / "tok"),
            "--output", str(out), "--no-progress"]
    assert main(argv) == 0
    assert str(out) in capsys.readouterr().err
    table = TrigramTable.load(out)
    assert successors(table, 3, 4) == pytest.approx({5: 2 / 3, 6: 1 / 3}) and successors(table, 7, 8) == {9: 1.0}
    assert table.vocab_size == len(word_tokenizer())
    assert main(argv[:-3] + ["--output", str(out), "--top", "1", "--no-progress"]) == 0
    assert successors(TrigramTable.load(out), 3, 4) == pytest.approx({5: 2 / 3})
    drafter = AdedDrafter(tiny_model("llama"), table=str(out), **REFERENCE)
    assert drafter.propose(state_of([20, 3, 4])).tokens.tolist()[:2] == [5, 3]

    assert main(["trigrams", str(tmp_path / "missing.txt"), "--tokenizer", str(tmp_path / "tok"),
                 "--output", str(out), "--no-progress"]) == 2
    assert "missing.txt" in capsys.readouterr().err
