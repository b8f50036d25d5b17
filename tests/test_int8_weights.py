"""Quantized weights (``weights="int8"`` and ``"w8a8"``, specdec.kernels; the fallback test covers gguf's layers
too): the kernels compute what their definitions say, a token's output does not depend on how many tokens share
the call, and speculative decoding on a quantized target equals that target's own greedy decoding on every prompt."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from specdec import SpecEngine
from specdec.attention import use_fast_cpu_attention
from specdec.drafters import create_drafter
from specdec.errors import InvalidInputError
from specdec.kernels import Int8Linear, W8A8Linear, cpu_kernels, kernel_status, quantize_linears, weights_kind
from specdec.kernels.build import REQUIRED_FLAGS
from specdec.kernels.kquant_linear import Q4_K, Q6_K
from specdec.kernels.w8a8_linear import quantize_activations
from specdec.precision import cpu_flags
from tiny_kquants import kquant_layer
from tiny_models import ARCHS, greedy_reference, tiny_model, tiny_prompt

SHAPES = [(37, 19, True), (96, 64, False), (256, 1536, True)]  # odd sizes exercise the padding
TOKENS = (1, 2, 3, 5, 8, 12, 13, 16, 17, 24, 31, 60)


def _reference(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """The definition in fp64: x @ (q * scale).T + bias, rounded to bf16 once."""
    w = layer.int8_weight().double() * layer.scale[:layer.out_features, None].double()
    y = x.double() @ w.T
    if layer.bias.numel():
        y = y + layer.bias[:layer.out_features].double()
    return y


@pytest.mark.parametrize("out_features,in_features,bias", SHAPES)
def test_int8_linear_matches_its_definition_and_is_row_invariant(out_features, in_features, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=bias).to(torch.bfloat16)
    layer = Int8Linear.from_linear(linear)
    q, w = layer.int8_weight().float(), linear.weight.float()
    assert layer.int8_weight().dtype == torch.int8 and q.abs().max() <= 127
    # per-row symmetric rounding: off by at most half a step of the row's scale
    assert ((q * layer.scale[:out_features, None] - w).abs() <= layer.scale[:out_features, None] / 2 + 1e-6).all()
    for n in TOKENS:
        x = torch.randn(n, in_features, dtype=torch.bfloat16)
        y = layer(x)
        assert y.shape == (n, out_features) and y.dtype == torch.bfloat16
        ref = _reference(layer, x)
        scale = ref.abs().max()
        assert ((y.double() - ref).abs() <= 2 ** -7 * ref.abs() + 1e-3 * scale).all(), n  # bf16 rounding of y
        one_by_one = torch.cat([layer(x[i:i + 1]) for i in range(n)])
        assert torch.equal(one_by_one, y), f"token outputs changed with the call size ({n} tokens)"
    x3 = torch.randn(2, 3, in_features, dtype=torch.bfloat16)
    assert torch.equal(layer(x3), layer(x3.reshape(6, in_features)).reshape(2, 3, out_features))


@pytest.mark.parametrize("out_features,in_features,bias", SHAPES)
def test_w8a8_linear_matches_its_definition_and_is_row_invariant(out_features, in_features, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=bias).to(torch.bfloat16)
    layer, weight_only = W8A8Linear.from_linear(linear), Int8Linear.from_linear(linear)
    assert torch.equal(layer.int8_weight(), weight_only.int8_weight())  # the same int8 weights
    for n in TOKENS:
        x = torch.randn(n, in_features, dtype=torch.bfloat16)
        a, s = quantize_activations(x)
        xp = torch.nn.functional.pad(x.float(), (0, a.shape[1] - in_features)).view(n, -1, 128)
        assert (a.abs() <= 127).all() and ((a.float().view(n, -1, 128) * s[:, :, None] - xp).abs()
                                            <= s[:, :, None] / 2 + 1e-6).all()
        y = layer(x)
        exact = layer._fallback(x)  # integer products, per-block scales: the definition
        assert y.shape == (n, out_features) and y.dtype == torch.bfloat16
        assert torch.allclose(y.float(), exact.float(), rtol=2 ** -7, atol=1e-3 * exact.float().abs().max()), n
        # activation rounding: a few per mille from the bf16-activation layer's output, never more than 2%
        ref = weight_only(x).float()
        assert (y.float() - ref).norm() <= 0.02 * ref.norm(), n
        one_by_one = torch.cat([layer(x[i:i + 1]) for i in range(n)])
        assert torch.equal(one_by_one, y), f"token outputs changed with the call size ({n} tokens)"


def test_the_native_kernel_runs_where_the_cpu_has_the_instructions():
    cpu_kernels.cache_clear()
    kernel = cpu_kernels()
    if all(flag in cpu_flags() for flag in REQUIRED_FLAGS):
        assert kernel is not None and kernel_status()["cpu"] == "native"
    else:
        assert kernel is None and kernel_status()["cpu"].startswith("fallback: this CPU lacks")


QUANTIZED_LAYERS = {  # name -> (make a quantized layer from a float linear, its input size)
    "int8": (lambda linear: Int8Linear.from_linear(linear.to(torch.bfloat16)), 64),
    "w8a8": (lambda linear: W8A8Linear.from_linear(linear.to(torch.bfloat16)), 64),
    "q4_k": (lambda linear: kquant_layer(linear, Q4_K), 512),
    "q6_k": (lambda linear: kquant_layer(linear, Q6_K), 512),
}


@pytest.mark.parametrize("kind", QUANTIZED_LAYERS)
def test_the_fallback_agrees_with_the_kernel_and_can_be_forced(kind, monkeypatch):
    torch.manual_seed(1)
    make, in_features = QUANTIZED_LAYERS[kind]
    layer = make(torch.nn.Linear(in_features, 48))
    x = torch.randn(7, in_features, dtype=torch.bfloat16)
    native = layer(x)
    monkeypatch.setenv("SPECDEC_KERNELS", "0")
    cpu_kernels.cache_clear()
    try:
        forced = layer(x)
        assert kernel_status()["cpu"] == "fallback: SPECDEC_KERNELS=0"
    finally:
        cpu_kernels.cache_clear()
    # the same function summed in another order: equal up to one bf16 rounding step
    assert torch.allclose(forced.float(), native.float(), rtol=2 ** -7, atol=1e-2)
    assert torch.equal(forced, layer._fallback(x))


@functools.lru_cache(maxsize=None)
def int8_model(arch: str, seed: int = 0, kind: str = "int8") -> torch.nn.Module:
    model = copy.deepcopy(tiny_model(arch, seed=seed)).to(torch.bfloat16)
    assert quantize_linears(model, kind) > 0
    return use_fast_cpu_attention(model).eval()  # what specdec.models.load installs on the CPU


@pytest.mark.parametrize("kind", ["int8", "w8a8"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("drafter_name,options", [
    ("draft-model", dict(mode="tree", min_prob=0.0, budget=12)),
    ("prompt-lookup", {}),
    ("hydra", dict(budget=16)),
])
def test_speculation_on_a_quantized_target_equals_its_own_greedy(arch, drafter_name, options, kind):
    target = int8_model(arch, kind=kind)
    assert weights_kind(target) == kind and not any(type(m) is torch.nn.Linear for m in target.modules())
    if drafter_name == "draft-model":
        options = dict(options, model=int8_model(arch, seed=1, kind=kind))  # a quantized draft drafts as loaded
    # Every prompt, near-ties included: the verify forward is batch-invariant (test_batch_invariance.py).
    for seed in range(1, 4):
        prompt = tiny_prompt(seed=seed)
        reference = greedy_reference(target, prompt, 24)
        drafter = create_drafter(drafter_name, target=target, **options)
        if drafter_name == "draft-model":  # drafts on the int8 kernel as loaded, not on a dynamic-quantized copy
            assert drafter.runner.model is options["model"]
        result = SpecEngine(target, drafter).generate(prompt, max_new_tokens=24, eos_token_id=None)
        assert torch.equal(result.sequences, reference), seed
        assert result.stats.draft_depths and max(result.stats.draft_depths) >= 1


def test_load_rejects_unknown_weights_and_int8_off_the_cpu(tmp_path):
    from specdec import models
    from tiny_models import word_tokenizer

    tiny_model("qwen2").save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(InvalidInputError, match="unknown weights='int4'"):
        models.load_folder(tmp_path, weights="int4")
    with pytest.raises(InvalidInputError, match="weights='int8' runs on the CPU kernels"):
        models.load_folder(tmp_path, weights="int8", device="cuda")
    model, _ = models.load_folder(tmp_path, dtype=torch.bfloat16, weights="int8", tokenizer=False)
    assert weights_kind(model) == "int8"
    dense, _ = models.load_folder(tmp_path, dtype=torch.bfloat16, tokenizer=False)
    ids = tiny_prompt()
    # the int8 model is the dense one up to rounding: same shapes, close logits
    a, b = model(ids).logits.float(), dense(ids).logits.float()
    assert a.shape == b.shape and (a - b).abs().max() < 0.1 * b.abs().max()


@pytest.mark.parametrize("arch,kind", [("llama", "int8"), ("gemma3", "int8"), ("gemma3", "w8a8")])  # untied, tied
def test_a_cached_model_keeps_its_quantized_form_and_rebuilds_a_damaged_one(arch, kind, tmp_path, monkeypatch,
                                                                           capsys):
    from transformers import AutoModelForCausalLM

    from specdec import models
    from specdec.models.int8_cache import file_name
    from tiny_models import word_tokenizer

    tiny_model(arch).save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    ids = tiny_prompt()
    first, _ = models.load_folder(tmp_path, dtype=torch.bfloat16, name="tiny", weights=kind, tokenizer=False)
    assert (tmp_path / file_name(kind)).is_file()
    expected = first(ids).logits

    def no_dense_read(*args, **kwargs):
        raise AssertionError("the dense weights were read although the int8 file was there")

    with monkeypatch.context() as m:
        m.setattr(AutoModelForCausalLM, "from_pretrained", no_dense_read)
        again, _ = models.load_folder(tmp_path, dtype=torch.bfloat16, name="tiny", weights=kind, tokenizer=False)
    assert weights_kind(again) == kind and again.dtype == torch.bfloat16
    assert torch.equal(again(ids).logits, expected)
    assert again.generation_config.eos_token_id == first.generation_config.eos_token_id
    assert again.config.name_or_path == first.config.name_or_path
    assert torch.equal(greedy_reference(again, ids, 10), greedy_reference(first, ids, 10))

    with open(tmp_path / file_name(kind), "r+b") as f:  # a killed run (the write is atomic) or a damaged disk
        f.truncate((tmp_path / file_name(kind)).stat().st_size // 2)
    capsys.readouterr()
    healed, _ = models.load_folder(tmp_path, dtype=torch.bfloat16, name="tiny", weights=kind, tokenizer=False)
    assert "unreadable" in capsys.readouterr().err and torch.equal(healed(ids).logits, expected)
    with monkeypatch.context() as m:  # rewritten whole
        m.setattr(AutoModelForCausalLM, "from_pretrained", no_dense_read)
        models.load_folder(tmp_path, dtype=torch.bfloat16, name="tiny", weights=kind, tokenizer=False)
    with pytest.warns(RuntimeWarning, match="portable fallback"):  # another dtype: its own file
        fp32, _ = models.load_folder(tmp_path, dtype=torch.float32, name="tiny", weights=kind, tokenizer=False)
    assert fp32.dtype == torch.float32 and "made from other weights or for another dtype" in capsys.readouterr().err


def test_a_quantized_file_that_does_not_fit_the_modules_is_rebuilt(tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from specdec import models
    from specdec.models.int8_cache import file_name
    from tiny_models import word_tokenizer

    tiny_model("qwen2").save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    ids = tiny_prompt()
    first, _ = models.load_folder(tmp_path, dtype=torch.bfloat16, name="tiny", weights="int8", tokenizer=False)
    path = tmp_path / file_name("int8")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(path))
    state["model.extra.weight"] = torch.zeros(1)  # a key the modules do not have (strict load fails)
    save_file(state, str(path), metadata=meta)
    capsys.readouterr()
    again, _ = models.load_folder(tmp_path, dtype=torch.bfloat16, name="tiny", weights="int8", tokenizer=False)
    assert "does not fit this model's modules" in capsys.readouterr().err
    assert torch.equal(again(ids).logits, first(ids).logits)
