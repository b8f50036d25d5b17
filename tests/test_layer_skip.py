"""LayerSkipRunner against the target's own forwards: skipping nothing is bitwise the target, early exits are the
target's intermediate states through norm + head, skipped sub-layers are passthroughs, and the target's cache is
never touched.

The prompt (12) is longer than Gemma 3's sliding window (6), so the per-layer sliding masks matter.
"""

from __future__ import annotations

import pytest
import torch

from specdec.draft_length import ConfidenceThreshold, FixedLength, StopReason
from specdec.errors import InvalidInputError
from specdec.drafters.layer_skip.runner import LayerSkipRunner, SkipPlan, draft_chain
from specdec.runner import CausalLMRunner
from specdec.sampling import SamplingConfig
from tiny_models import ARCHS, greedy_reference, tiny_model, tiny_prompt

NEW = torch.tensor([5, 9, 33, 40])  # tokens fed after the prompt
P = 12  # prompt length


def _prefilled(arch: str) -> tuple[torch.nn.Module, CausalLMRunner]:
    model = tiny_model(arch)
    runner = CausalLMRunner(model)
    runner.prefill(tiny_prompt())
    return model, runner


def _causal(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril_()


@pytest.mark.parametrize("arch", ARCHS)
def test_skipping_nothing_is_bitwise_the_target(arch):
    """Same ops in HF's order on the same K/V and masks: torch.equal, one pass over 4 tokens and 4 one-token passes."""
    model, target = _prefilled(arch)
    skip = LayerSkipRunner(model)
    positions = torch.arange(P, P + NEW.numel())
    together = skip.forward(SkipPlan(), NEW, positions, skip.new_kv(target))
    kv = skip.new_kv(target)
    one_by_one = torch.cat([skip.forward(SkipPlan(), NEW[i:i + 1], positions[i:i + 1], kv) for i in range(4)])

    expected = target.forward(NEW, positions, _causal(4)).logits
    assert torch.equal(together, expected)
    target.crop(P)
    expected_seq = torch.cat([target.forward(NEW[i:i + 1], positions[i:i + 1], _causal(1)).logits for i in range(4)])
    assert torch.equal(one_by_one, expected_seq)
    assert [kv.overlay_len(i) for i in range(skip.num_layers)] == [4] * skip.num_layers


@pytest.mark.parametrize("arch", ARCHS)
def test_exit_after_every_layer_is_the_full_model_and_early_exits_are_its_hidden_states(arch):
    model, target = _prefilled(arch)
    skip = LayerSkipRunner(model)
    positions = torch.arange(P, P + NEW.numel())
    exits = {e: skip.forward(SkipPlan(exit_layer=e), NEW, positions, skip.new_kv(target))
             for e in range(1, skip.num_layers + 1)}
    out = target.forward(NEW, positions, _causal(4), output_hidden_states=True)
    assert torch.equal(exits[skip.num_layers], out.logits)
    for e in range(1, skip.num_layers):  # hidden_states[E] is the residual stream after E layers, before the norm
        expected = model.lm_head(model.model.norm(out.hidden_states[e])).float()
        assert torch.equal(exits[e], expected), f"exit {e}"


@pytest.mark.parametrize("arch", ARCHS)
def test_skipped_sublayers_are_residual_passthroughs(arch):
    """Skipping everything leaves the embeddings: logits = head(norm(embed(tokens)))."""
    model, target = _prefilled(arch)
    skip = LayerSkipRunner(model)
    every = frozenset(range(skip.num_layers))
    logits = skip.forward(SkipPlan(every, every), NEW, torch.arange(P, P + 4), skip.new_kv(target))
    expected = model.lm_head(model.model.norm(model.model.embed_tokens(NEW[None])))[0].float()
    assert torch.equal(logits, expected)
    assert not torch.equal(logits, target.forward(NEW, torch.arange(P, P + 4), _causal(4)).logits)


@pytest.mark.parametrize("plan", [SkipPlan(frozenset({1})), SkipPlan(frozenset({0}), frozenset({1})),
                                  SkipPlan(exit_layer=1)], ids=["attn1", "attn0-mlp1", "exit1"])
@pytest.mark.parametrize("arch", ARCHS)
def test_draft_overlay_keeps_per_layer_key_lengths(arch, plan):
    """One-token passes on a growing overlay give what one causal pass over the same tokens gives, although
    skipped attention sub-layers keep no draft K/V (key lengths differ between layers)."""
    model, target = _prefilled(arch)
    skip = LayerSkipRunner(model)
    positions = torch.arange(P, P + 4)
    together = skip.forward(plan, NEW, positions, skip.new_kv(target))
    kv = skip.new_kv(target)
    one_by_one = torch.cat([skip.forward(plan, NEW[i:i + 1], positions[i:i + 1], kv) for i in range(4)])
    torch.testing.assert_close(one_by_one, together, atol=1e-5, rtol=0)
    ran = [i for i in range(plan.layers_run(skip.num_layers)) if i not in plan.skip_attention]
    assert [kv.overlay_len(i) for i in range(skip.num_layers)] == [4 if i in ran else 0 for i in range(skip.num_layers)]


@pytest.mark.parametrize("arch", ARCHS)
def test_teacher_forcing_on_a_shorter_prefix(arch):
    """prefix_len < cache length: feeding the prompt's last 5 tokens on its first 7 gives the prompt's logits."""
    model, target = _prefilled(arch)
    skip = LayerSkipRunner(model)
    prompt = tiny_prompt()[0]
    logits = skip.forward(SkipPlan(), prompt[7:], torch.arange(7, P), skip.new_kv(target, prefix_len=7))
    expected = model(input_ids=prompt[None]).logits[0, 7:].float()
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_target_cache_is_unchanged_by_draft_passes(arch):
    model, target = _prefilled(arch)
    keys = [layer.keys for layer in target.cache.layers]
    copies = [(layer.keys.clone(), layer.values.clone()) for layer in target.cache.layers]
    positions = target.slot_positions.clone()
    skip = LayerSkipRunner(model)
    kv = skip.new_kv(target)
    for i, plan in enumerate([SkipPlan(), SkipPlan(frozenset({1}), frozenset({0})), SkipPlan(exit_layer=1)]):
        skip.forward(plan, NEW[i:i + 1], torch.tensor([P + i]), kv)
    skip.forward(SkipPlan(), NEW, torch.arange(5, 9), skip.new_kv(target, prefix_len=5))
    assert target.length == P and torch.equal(target.slot_positions, positions)
    for layer, k, (key_copy, value_copy) in zip(target.cache.layers, keys, copies):
        assert layer.keys is k and layer.keys.shape[2] == P
        assert torch.equal(layer.keys, key_copy) and torch.equal(layer.values, value_copy)


@pytest.mark.parametrize("arch", ARCHS)
def test_draft_chain_without_skips_is_the_greedy_continuation(arch):
    model, target = _prefilled(arch)
    prompt = tiny_prompt()[0]
    first = target.model(input_ids=prompt[None]).logits[0, -1].argmax()[None]
    chain = draft_chain(LayerSkipRunner(model), SkipPlan(), target, torch.cat([prompt, first]), SamplingConfig(),
                        max_depth=6, policy=FixedLength(), top_c=3)
    expected = greedy_reference(model, prompt[None], 7)[0, P + 1:]
    assert torch.equal(chain.tokens, expected)
    assert chain.top_ids.shape == (6, 3) and torch.equal(chain.top_ids[:, 0], chain.tokens)
    assert bool((chain.top_probs[:, :-1] >= chain.top_probs[:, 1:]).all())


def test_draft_chain_stops_after_the_first_unconfident_token():
    model, target = _prefilled("llama")
    prompt = tiny_prompt()[0]
    seq = torch.cat([prompt, torch.tensor([7])])
    full = draft_chain(LayerSkipRunner(model), SkipPlan(), target, seq, SamplingConfig(), 6, FixedLength())
    assert full.depth == 6 and full.stop_reason == StopReason.MAX_DEPTH
    p1 = full.top_probs[:, 0]
    threshold = float(p1.max())  # only the most confident depth passes it
    first_below = int(torch.nonzero(p1 < threshold)[0])
    cut = draft_chain(LayerSkipRunner(model), SkipPlan(), target, seq, SamplingConfig(), 6,
                      ConfidenceThreshold(threshold, on="token"))
    assert torch.equal(cut.tokens, full.tokens[:first_below + 1])
    assert cut.stop_reason == (StopReason.LOW_CONFIDENCE if first_below < 5 else StopReason.MAX_DEPTH)


@pytest.mark.parametrize("plan,message", [
    (SkipPlan(frozenset({2})), "skip_attention names layers \\[2\\]"),
    (SkipPlan(skip_mlp=frozenset({-1})), "skip_mlp names layers \\[-1\\]"),
    (SkipPlan(exit_layer=0), "exit_layer must be in \\[1, 2\\]"),
    (SkipPlan(exit_layer=3), "exit_layer must be in \\[1, 2\\]"),
])
def test_plan_check_names_the_problem(plan, message):
    with pytest.raises(InvalidInputError, match=message):
        plan.check(2)


def test_drafting_needs_a_filled_cache():
    model = tiny_model("llama")
    with pytest.raises(InvalidInputError, match="prefill"):
        LayerSkipRunner(model).new_kv(CausalLMRunner(model))


@pytest.mark.parametrize("arch", ARCHS)
def test_draft_overlay_is_a_library_cache_fed_through_each_familys_attention(arch):
    """The overlay is a ``transformers.Cache`` of ``DynamicLayer`` s: each family's attention calls the library's own
    ``update`` with whatever arguments its version passes (5.24 added ``kwargs=``), under the keyword its signature
    names; any warning (a deprecated keyword) fails here."""
    import inspect
    import warnings

    from transformers.cache_utils import Cache, DynamicLayer

    model, target = _prefilled(arch)
    skip = LayerSkipRunner(model)
    kv = skip.new_kv(target)
    assert isinstance(kv, Cache) and all(isinstance(layer, DynamicLayer) for layer in kv.layers)
    assert skip.cache_kwarg in inspect.signature(model.model.layers[0].self_attn.forward).parameters
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        skip.forward(SkipPlan(), NEW[:2], torch.arange(P, P + 2), kv)
    assert [layer.get_seq_length() for layer in kv.layers] == [2] * skip.num_layers  # the overlay holds only drafts
    assert target.length == P and all(layer.keys.shape[-2] == P for layer in target.cache.layers)
