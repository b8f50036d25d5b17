"""Batch-invariant verification on the quantized CPU path (docs/cpu-fast-path.md, Exactness): the native
``cached_attention`` computes attention, and gives a query the same bits whatever other queries and masked keys
share its call; a forward over a draft tree gives every token, bit for bit, the logits of one-token forwards over
the same cache, in every weight format, for short and long caches and trees of up to 33 tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from specdec import attention
from specdec.kernels import cpu_kernels
from specdec.runner import CausalLMRunner
from test_gguf_weights import gguf_model
from test_int8_weights import int8_model
from tiny_models import ARCHS, VOCAB

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="needs the native CPU kernels (AVX-512 BF16, VNNI)")


class _Module:  # what transformers passes to an attention function
    num_key_value_groups = 3
    is_causal = True


def _reference(q, k, v, allowed, scale):
    """fp32 sdpa over the same bf16 inputs (heads repeated for the groups)."""
    groups = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(groups, 1),
                                         v.float().repeat_interleave(groups, 1), attn_mask=allowed, scale=scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("queries,keys,dim", [(1, 7, 64), (5, 40, 16), (12, 300, 128), (33, 200, 80)])
@pytest.mark.parametrize("mask_kind", ["bool", "float", "none"])
def test_cached_attention_computes_attention(queries, keys, dim, mask_kind):
    gen = torch.Generator().manual_seed(queries + keys)
    q = torch.randn(1, 6, queries, dim, generator=gen).bfloat16()
    k, v = (torch.randn(1, 2, keys, dim, generator=gen).bfloat16() for _ in range(2))
    allowed = torch.rand(1, 1, queries, keys, generator=gen) > 0.3  # a tree-like pattern
    allowed[..., 0] = True
    if mask_kind == "none":  # causal, the queries last
        allowed = torch.ones(queries, keys, dtype=torch.bool).tril_(keys - queries)[None, None]
    mask = {"bool": allowed, "float": torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf")),
            "none": None}[mask_kind]
    out, weights = attention.grouped_attention(_Module(), q, k, v, mask, scaling=dim ** -0.5)
    assert weights is None and out.shape == (1, queries, 6, dim) and out.dtype == torch.bfloat16
    expected = _reference(q, k, v, allowed, dim ** -0.5)
    assert torch.allclose(out.float(), expected, atol=2e-2, rtol=2e-2)
    assert (out.float() - expected).abs().mean() < 2e-3


def test_a_query_gets_the_same_bits_whatever_shares_its_call():
    """One query over the keys it attends, against the same query among 20 others whose keys are interleaved
    with its own (masked for it), in a longer cache: bit-identical."""
    gen = torch.Generator().manual_seed(0)
    dim, cache = 128, 150
    keys = torch.randn(1, 2, cache + 20, dim, generator=gen).bfloat16()
    values = torch.randn(1, 2, cache + 20, dim, generator=gen).bfloat16()
    queries = torch.randn(1, 12, 20, dim, generator=gen).bfloat16()
    mine = torch.arange(0, 20, 3)  # slots of the query's ancestors among the 20 new ones; it is the last of them
    allowed = torch.zeros(20, cache + 20, dtype=torch.bool)
    allowed[:, :cache] = True
    allowed[mine[-1], cache + mine] = True
    for other in range(20):  # the others see anything of their own
        if other != mine[-1]:
            allowed[other, cache:cache + other + 1] = torch.rand(other + 1, generator=gen) > 0.5
            allowed[other, cache + other] = True
    many = attention.cached_attention(queries, keys, values, allowed[None, None])
    seen = torch.cat([torch.arange(cache), cache + mine])
    alone = attention.cached_attention(queries[:, :, mine[-1]:mine[-1] + 1], keys[:, :, seen].contiguous(),
                                       values[:, :, seen].contiguous(), None)  # causal: every key
    assert torch.equal(many[:, mine[-1]], alone[:, 0])


def _tree(k: int, gen: torch.Generator) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """A random tree of k nodes in slot order: (parents, ancestor mask [k, k], depths [k])."""
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, k)]
    ancestors = torch.eye(k, dtype=torch.bool)
    depths = [0] * k
    for i in range(1, k):
        ancestors[i] |= ancestors[parents[i]]
        depths[i] = depths[parents[i]] + 1
    return parents, ancestors, torch.tensor(depths)


MODELS = {"gguf": lambda arch: gguf_model(arch), "w8a8": lambda arch: int8_model(arch, kind="w8a8"),
          "int8": lambda arch: int8_model(arch, kind="int8")}


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("arch", ARCHS)
def test_a_tree_forward_gives_each_token_its_one_token_logits(arch, kind):
    model = MODELS[kind](arch)
    assert model.config._attn_implementation == "specdec_cpu"
    for prompt_len, k in ((5, 9), (5, 33), (150, 12), (150, 40)):  # short and long caches, small and large trees
        gen = torch.Generator().manual_seed(prompt_len + k)
        prompt = torch.randint(3, VOCAB, (1, prompt_len), generator=gen)
        tokens = torch.randint(3, VOCAB, (k,), generator=gen)
        parents, ancestors, depths = _tree(k, gen)
        tree = CausalLMRunner(model)
        tree.prefill(prompt)
        logits = tree.forward(tokens, prompt_len + depths, ancestors).logits
        path, node = [], k - 1  # the deepest path ending at the last slot
        while node >= 0:
            path.append(node)
            node = parents[node]
        one = CausalLMRunner(model)
        one.prefill(prompt)
        for depth, node in enumerate(reversed(path)):
            alone = one.forward(tokens[node:node + 1], torch.tensor([prompt_len + depth]),
                                torch.ones(1, 1, dtype=torch.bool)).logits
            assert torch.equal(alone[0], logits[node]), (prompt_len, k, depth)
        chain = CausalLMRunner(model)  # a chain of the same path in one forward: the same logits again
        chain.prefill(prompt)
        n = len(path)
        chained = chain.forward(tokens[list(reversed(path))], prompt_len + torch.arange(n),
                                torch.ones(n, n, dtype=torch.bool).tril_()).logits
        assert torch.equal(chained, logits[list(reversed(path))])
