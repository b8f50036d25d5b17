"""CausalLMRunner against plain full-sequence forwards: tree attention, KV commit and crop, for every architecture.

The prompt (10 tokens) and the tree (5 deep) together are longer than Gemma 3's sliding window (6), so the
runner's sliding-window mask and its full-KV cache both matter there.
"""

from __future__ import annotations

import pytest
import torch

from specdec.runner import CausalLMRunner
from specdec.tree import DraftTree
from tiny_models import ARCHS, GEMMA_WINDOW, VOCAB, tiny_model, tiny_prompt

PROMPT_LEN = 10
assert PROMPT_LEN > GEMMA_WINDOW
ROOT = 17
# node: parent          0 ─ 1 ─┬─ 2 ─ 3 ─ 4      depths 1..5
#                              └─ 8              depth 3
#                       5 ─ 6 ─ 7                depths 1..3
PARENTS = [-1, 0, 1, 2, 3, -1, 5, 6, 1]
TOKENS = [40, 41, 42, 43, 44, 50, 51, 52, 60]
NEXT_TOKEN = 23


def _tree() -> DraftTree:
    return DraftTree(torch.tensor(TOKENS), torch.tensor(PARENTS))


def _prompt() -> torch.Tensor:
    return tiny_prompt(seed=3, length=PROMPT_LEN)


@torch.no_grad()
def _last_logits(model, sequence: torch.Tensor) -> torch.Tensor:
    """Plain full forward of ``sequence`` [L] (no cache, the model's own masks): logits [V] after its last token."""
    return model(input_ids=sequence[None]).logits[0, -1].float()


def _feed_tree(model, mask_form: str = "new") -> tuple[CausalLMRunner, DraftTree, torch.Tensor, torch.Tensor]:
    """Prefill the prompt, then feed [root, nodes] under the ancestor mask; returns (runner, tree, slots, logits)."""
    runner = CausalLMRunner(model)
    runner.prefill(_prompt())
    tree = _tree()
    slots = torch.cat([torch.tensor([ROOT]), tree.tokens])
    mask = tree.ancestors
    if mask_form == "cache+new":  # the [n, length + n] form drafters use
        mask = torch.cat([torch.ones(tree.size + 1, PROMPT_LEN, dtype=torch.bool), mask], dim=1)
    out = runner.forward(slots, tree.slot_positions(PROMPT_LEN), mask)
    return runner, tree, slots, out.logits


def _assert_same_cache(runner: CausalLMRunner, fresh: CausalLMRunner) -> None:
    assert runner.length == fresh.length
    assert len(runner.cache.layers) == len(fresh.cache.layers) == runner.config.num_hidden_layers
    for i, (got, want) in enumerate(zip(runner.cache.layers, fresh.cache.layers)):
        assert got.keys.shape == want.keys.shape, f"layer {i}"
        torch.testing.assert_close(got.keys, want.keys, atol=1e-5, rtol=0, msg=f"keys of layer {i}")
        torch.testing.assert_close(got.values, want.values, atol=1e-5, rtol=0, msg=f"values of layer {i}")


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_logits_match_full_forward(arch):
    model = tiny_model(arch)
    runner = CausalLMRunner(model)
    out = runner.prefill(_prompt(), logits_to_keep=3)
    assert out.logits.shape == (3, VOCAB) and runner.length == PROMPT_LEN
    expected = model(input_ids=_prompt()).logits[0, -3:].float()
    torch.testing.assert_close(out.logits, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mask_form", ["new", "cache+new"])
@pytest.mark.parametrize("arch", ARCHS)
def test_tree_forward_matches_sequential_paths(arch, mask_form):
    model = tiny_model(arch)
    runner, tree, slots, logits = _feed_tree(model, mask_form)
    assert logits.shape == (tree.size + 1, VOCAB)
    assert runner.length == PROMPT_LEN + tree.size + 1
    for slot in range(tree.size + 1):
        path = slots[torch.cat([torch.zeros(1, dtype=torch.long), tree.path_to(slot - 1) + 1])]
        expected = _last_logits(model, torch.cat([_prompt()[0], path]))
        torch.testing.assert_close(logits[slot], expected, atol=1e-4, rtol=0, msg=f"slot {slot}")


@pytest.mark.parametrize("node", [-1, 4, 7, 8], ids=["root-only", "contiguous-5", "second-branch", "gap"])
@pytest.mark.parametrize("arch", ARCHS)
def test_commit_matches_fresh_prefill(arch, node):
    model = tiny_model(arch)
    runner, tree, slots, _ = _feed_tree(model)
    keep = torch.cat([torch.zeros(1, dtype=torch.long), tree.path_to(node) + 1])  # root + path, as slots
    runner.commit(PROMPT_LEN, keep)
    assert runner.length == PROMPT_LEN + keep.numel()

    kept = torch.cat([_prompt()[0], slots[keep]])
    fresh = CausalLMRunner(model)
    fresh.prefill(kept[None])
    _assert_same_cache(runner, fresh)

    nxt, pos, mask = torch.tensor([NEXT_TOKEN]), torch.tensor([kept.numel()]), torch.ones(1, 1, dtype=torch.bool)
    got = runner.forward(nxt, pos, mask).logits[0]
    torch.testing.assert_close(got, fresh.forward(nxt, pos, mask).logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got, _last_logits(model, torch.cat([kept, nxt])), atol=1e-4, rtol=0)


@pytest.mark.parametrize("length", [0, 4, 9, 10, 13])
@pytest.mark.parametrize("arch", ARCHS)
def test_crop(arch, length):
    model = tiny_model(arch)
    runner = CausalLMRunner(model)
    runner.prefill(_prompt())
    runner.crop(length)
    kept = min(length, PROMPT_LEN)  # cropping at or past the end changes nothing
    assert runner.length == kept
    for layer in runner.cache.layers:
        assert layer.keys.shape[2] == layer.values.shape[2] == kept
    if kept:
        fresh = CausalLMRunner(model)
        fresh.prefill(_prompt()[:, :kept])
        _assert_same_cache(runner, fresh)

    # Re-feeding the dropped tokens and one more gives the full forward's logits.
    sequence = torch.cat([_prompt()[0], torch.tensor([NEXT_TOKEN])])
    tail = sequence[kept:]
    causal = torch.ones(tail.numel(), tail.numel(), dtype=torch.bool).tril()
    got = runner.forward(tail, torch.arange(kept, sequence.numel()), causal).logits
    expected = model(input_ids=sequence[None]).logits[0, kept:].float()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_tree_branches_kept_in_cache_match_sequential(arch):
    """The layout the draft-model drafter uses: two chains below the prompt's last token, fed one level per forward
    with [n, length + n] masks, earlier levels staying in the cache. Cache slots then no longer equal positions
    (level k sits at slots L + 2(k - 1) and L + 2k - 1, both at position L - 1 + k); 8 levels reach past the
    sliding window."""
    model = tiny_model(arch)
    prompt = _prompt()[0]
    chains = torch.tensor([[40, 41, 42, 43, 44, 45, 46, 47], [60, 61, 62, 63, 64, 65, 66, 67]])  # [2, levels]
    runner = CausalLMRunner(model)
    runner.prefill(prompt[None])
    for k in range(1, chains.shape[1] + 1):
        tree_cols = torch.eye(2, dtype=torch.bool).repeat(1, k - 1)  # chain c owns every other tree slot
        mask = torch.cat([torch.ones(2, PROMPT_LEN, dtype=torch.bool), tree_cols, torch.eye(2, dtype=torch.bool)], 1)
        logits = runner.forward(chains[:, k - 1], torch.full((2,), PROMPT_LEN - 1 + k), mask).logits
        for c in range(2):
            expected = _last_logits(model, torch.cat([prompt, chains[c, :k]]))
            torch.testing.assert_close(logits[c], expected, atol=1e-4, rtol=0, msg=f"level {k}, chain {c}")


def test_crop_before_any_forward_is_a_no_op():
    runner = CausalLMRunner(tiny_model("llama"))
    runner.crop(0)
    assert runner.cache is None and runner.length == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_goes_in_under_the_keyword_the_installed_transformers_takes(arch):
    """transformers 5.24 renamed the forward's ``past_key_values`` to ``cache`` (5.23 has only the old name): the
    runner reads the name from the signature, so no version warns (every warning is an error here) or drops the cache.
    """
    import inspect
    import warnings

    model = tiny_model(arch)
    runner = CausalLMRunner(model)
    assert runner.cache_kwarg in inspect.signature(model.forward).parameters
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runner.prefill(_prompt())
        runner.forward(torch.tensor([5]), torch.tensor([PROMPT_LEN]), torch.ones(1, 1, dtype=torch.bool))
    assert runner.cache.get_seq_length() == PROMPT_LEN + 1  # the model wrote into our cache, not a new one
