"""The lean draft forward (specdec.models.lean_runner): the same function as transformers' forward through the
runner interface (prefill, tree forwards, commit of a non-prefix, crop), fused projections that compute exactly
what the separate layers do, transformers' forward kept for other families, and a draft-model drafter on it still
exact (greedy equal to the target's greedy)."""

from __future__ import annotations

import copy

import pytest
import torch

from specdec import SpecEngine
from specdec.drafters import create_drafter
from specdec.errors import InvalidInputError
from specdec.kernels.build import cpu_kernels
from specdec.models.draft_transforms import cheap_draft
from specdec.models.lean_runner import LeanRunner, draft_runner, fuse_linears
from specdec.runner import CausalLMRunner
from test_gguf_weights import gguf_model
from tiny_models import greedy_reference, tiny_model, tiny_prompt

FAMILIES = ("llama", "qwen2")


def _model(arch: str, kind: str) -> torch.nn.Module:
    if kind == "fp32":
        return tiny_model(arch)
    if kind == "bf16":
        return copy.deepcopy(tiny_model(arch)).to(torch.bfloat16)
    if kind == "gguf":  # Q4_K / Q6_K layers alternating (no fusion) and w8a8
        return gguf_model(arch)
    return cheap_draft(copy.deepcopy(tiny_model(arch)).to(torch.bfloat16), quantize="q4_k")  # fused, padded


def _steps(runner):
    """The logits of a prefill, a 4-node tree over the cache, a commit of two non-adjacent nodes, then one token."""
    out = [runner.prefill(tiny_prompt(3, 12), logits_to_keep=0).logits]
    tokens, positions = torch.tensor([5, 7, 9, 11]), torch.tensor([12, 12, 13, 13])
    tree = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    out.append(runner.forward(tokens, positions, tree).logits)
    runner.commit(12, torch.tensor([1, 3]))
    out.append(runner.forward(torch.tensor([20]), torch.tensor([14]), torch.ones(1, 1, dtype=torch.bool)).logits)
    runner.crop(13)
    out.append(runner.forward(torch.tensor([21, 22]), torch.tensor([13, 14]),
                              torch.ones(2, 2, dtype=torch.bool).tril()).logits)
    assert runner.length == 15
    return out


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("kind", ["fp32", "bf16", "gguf", "q4k"])
def test_lean_forward_follows_transformers_forward(arch, kind):
    if kind != "fp32" and cpu_kernels() is None:
        pytest.skip("the native CPU kernels are not built here")
    model = _model(arch, kind)
    lean, reference = _steps(LeanRunner(model)), _steps(CausalLMRunner(model))
    for got, want in zip(lean, reference):
        assert got.shape == want.shape
        if kind == "fp32":
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
        else:  # bf16 rounding in a different op order: within a few bf16 steps of the logits' scale
            assert (got - want).abs().max() <= 0.03 * want.abs().max()
            assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("arch", FAMILIES)
def test_lean_hidden_states_are_transformers_ones(arch):
    model = tiny_model(arch)
    lean = LeanRunner(model).prefill(tiny_prompt(1, 10), output_hidden_states=True, logits_to_keep=0)
    ref = CausalLMRunner(model).prefill(tiny_prompt(1, 10), output_hidden_states=True, logits_to_keep=0)
    assert len(lean.hidden_states) == len(ref.hidden_states) == model.config.num_hidden_layers + 1
    for got, want in zip(lean.hidden_states, ref.hidden_states):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "q4k"])
def test_fused_projection_is_the_concatenation_of_its_layers(kind):
    if kind == "q4k" and cpu_kernels() is None:
        pytest.skip("the native CPU kernels are not built here")
    model = _model("qwen2", "bf16" if kind == "dense" else "q4k")
    attn = model.model.layers[0].self_attn
    layers = [attn.q_proj, attn.k_proj, attn.v_proj]
    fused = fuse_linears(layers)
    assert fused is not None
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    separate = torch.cat([layer(x) for layer in layers], dim=-1)
    if kind == "q4k":  # every output row is computed alone: concatenating rows changes no bit
        assert torch.equal(fused(x), separate)
    else:
        assert torch.allclose(fused(x).float(), separate.float(), atol=1e-2)


def test_mixed_formats_do_not_fuse():
    attn = gguf_model("qwen2").model.layers[0].self_attn  # q, k, v alternate Q4_K / Q6_K
    assert fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj]) is None


def test_other_families_keep_transformers_forward():
    gemma = tiny_model("gemma3")
    assert type(draft_runner(gemma)) is CausalLMRunner
    assert type(draft_runner(tiny_model("qwen2"), lean=False)) is CausalLMRunner
    assert type(draft_runner(tiny_model("qwen2"))) is LeanRunner
    with pytest.raises(InvalidInputError, match="lean forward cannot run"):
        draft_runner(gemma, lean=True)
    with pytest.raises(InvalidInputError, match="lean must be"):
        create_drafter("draft-model", target=tiny_model("qwen2"), model=tiny_model("qwen2", seed=1), lean="yes")


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_draft_model_on_the_lean_forward_is_exact(arch, mode):
    target, draft = tiny_model(arch), tiny_model(arch, seed=1)
    drafter = create_drafter("draft-model", target=target, model=draft, mode=mode, min_prob=0.0, quantize=None)
    assert isinstance(drafter.runner, LeanRunner)
    engine = SpecEngine(target, drafter)
    for seed in range(3):
        prompt = tiny_prompt(seed)
        out = engine.generate(prompt, max_new_tokens=24, eos_token_id=None)
        assert torch.equal(out.sequences, greedy_reference(target, prompt, 24))
