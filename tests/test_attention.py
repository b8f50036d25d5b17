"""``specdec_cpu`` attention (specdec.attention): the same function as sdpa for a few queries over a cache, handed
to sdpa otherwise, and speculative decoding on a model that uses it equals that model's own greedy decoding."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from specdec import SpecEngine, attention
from specdec.drafters import create_drafter
from tiny_models import ARCHS, greedy_reference, tiny_model, tiny_prompt


class _Module:  # what transformers passes: the attention layer, read for its GQA group count
    num_key_value_groups = 3
    is_causal = True


def _sdpa(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=mask,
                                          scale=scale).transpose(1, 2)


@pytest.mark.parametrize("queries,keys", [(1, 200), (5, 160), (32, 300)])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_grouped_attention_computes_sdpa(queries, keys, mask_kind):
    gen = torch.Generator().manual_seed(queries)
    q = torch.randn(1, 6, queries, 16, generator=gen)
    k, v = torch.randn(1, 2, keys, 16, generator=gen), torch.randn(1, 2, keys, 16, generator=gen)
    allowed = torch.rand(1, 1, queries, keys, generator=gen) > 0.3  # a tree-like pattern
    allowed[..., 0] = True
    mask = allowed if mask_kind == "bool" else torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))
    out, weights = attention.grouped_attention(_Module(), q, k, v, mask, scaling=0.3)
    assert weights is None and out.shape == (1, queries, 6, 16)
    assert torch.allclose(out, _sdpa(q, k, v, allowed, 0.3), atol=1e-5)


@pytest.mark.parametrize("queries,keys", [(33, 300), (4, 100)])
def test_many_queries_and_short_caches_go_to_sdpa(queries, keys):
    q = torch.randn(1, 6, queries, 16)
    k, v = torch.randn(1, 2, keys, 16), torch.randn(1, 2, keys, 16)
    mask = torch.ones(1, 1, queries, keys, dtype=torch.bool).tril_(keys - queries)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, _ = attention.grouped_attention(_Module(), q, k, v, mask, scaling=0.25)
    assert torch.equal(out, sdpa_attention_forward(_Module(), q, k, v, mask, scaling=0.25)[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_speculation_with_the_cpu_attention_equals_its_own_greedy(arch, monkeypatch):
    monkeypatch.setattr(attention, "MIN_KEYS", 0)  # the tiny prompts are short: take the grouped path anyway
    target = attention.use_fast_cpu_attention(copy.deepcopy(tiny_model(arch)))
    assert target.config._attn_implementation == "specdec_cpu"
    calls = []
    monkeypatch.setattr(attention, "MAX_QUERIES", 32)
    original = attention.grouped_attention

    def counted(*args, **kwargs):
        calls.append(args[1].shape[2])
        return original(*args, **kwargs)

    from transformers import AttentionInterface

    AttentionInterface.register("specdec_cpu", counted)
    try:
        prompt = tiny_prompt(seed=2)
        reference = greedy_reference(target, prompt, 20)
        drafter = create_drafter("draft-model", target=target, model=tiny_model(arch, seed=1), mode="tree",
                                 min_prob=0.0, budget=10)
        result = SpecEngine(target, drafter).generate(prompt, max_new_tokens=20, eos_token_id=None)
    finally:
        attention.register()
    assert torch.equal(result.sequences, reference)
    assert any(1 < n <= 32 for n in calls)  # tree verification went through the grouped path


def test_loading_a_model_on_the_cpu_switches_it_to_the_cpu_attention(tmp_path):
    from specdec import models
    from tiny_models import word_tokenizer

    tiny_model("qwen2").save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    from specdec.budget import cost_key

    model, _ = models.load_folder(tmp_path, dtype=torch.float32, tokenizer=False)
    assert model.config._attn_implementation == "specdec_cpu"
    # forward costs measured under sdpa are not reused for the other attention (they differ 8x at 700 keys)
    assert "attn=specdec_cpu" in cost_key(model) and "attn=" not in cost_key(tiny_model("qwen2"))
    other = copy.deepcopy(model)
    other.set_attn_implementation("eager")  # a user's choice other than sdpa is left alone
    assert attention.use_fast_cpu_attention(other).config._attn_implementation == "eager"
