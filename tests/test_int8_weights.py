"""Weight-only int8 (``weights="int8"``, specdec.kernels): the kernel computes what its definition says, a token's
output does not depend on how many tokens share the call, and speculative decoding on an int8 target equals that
int8 target's own greedy decoding."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from specdec import SpecEngine
from specdec.drafters import create_drafter
from specdec.errors import InvalidInputError
from specdec.kernels import Int8Linear, int8_kernel, kernel_status, quantize_linears, weights_kind
from specdec.kernels.build import REQUIRED_FLAGS
from specdec.precision import cpu_flags
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


def test_the_native_kernel_runs_where_the_cpu_has_the_instructions():
    int8_kernel.cache_clear()
    kernel = int8_kernel()
    if all(flag in cpu_flags() for flag in REQUIRED_FLAGS):
        assert kernel is not None and kernel_status()["int8"] == "native"
    else:
        assert kernel is None and kernel_status()["int8"].startswith("fallback: this CPU lacks")


def test_the_fallback_agrees_with_the_kernel_and_can_be_forced(monkeypatch):
    torch.manual_seed(1)
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 48).to(torch.bfloat16))
    x = torch.randn(7, 64, dtype=torch.bfloat16)
    native = layer(x)
    monkeypatch.setenv("SPECDEC_KERNELS", "0")
    int8_kernel.cache_clear()
    try:
        forced = layer(x)
        assert kernel_status()["int8"] == "fallback: SPECDEC_KERNELS=0"
    finally:
        int8_kernel.cache_clear()
    # the same function summed in another order: equal up to one bf16 rounding step
    assert torch.allclose(forced.float(), native.float(), rtol=2 ** -7, atol=1e-2)
    assert torch.equal(forced, layer._fallback(x))


@functools.lru_cache(maxsize=None)
def int8_model(arch: str, seed: int = 0) -> torch.nn.Module:
    model = copy.deepcopy(tiny_model(arch, seed=seed)).to(torch.bfloat16)
    assert quantize_linears(model) > 0
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("drafter_name,options", [
    ("draft-model", dict(mode="tree", min_prob=0.0, budget=12)),
    ("prompt-lookup", {}),
    ("hydra", dict(budget=16)),
])
def test_speculation_on_an_int8_target_equals_its_own_greedy(arch, drafter_name, options):
    target = int8_model(arch)
    assert weights_kind(target) == "int8" and not any(type(m) is torch.nn.Linear for m in target.modules())
    if drafter_name == "draft-model":
        options = dict(options, model=int8_model(arch, seed=1))  # an int8 draft model drafts as loaded
    prompt = tiny_prompt()
    drafter = create_drafter(drafter_name, target=target, **options)
    if drafter_name == "draft-model":  # drafts on the int8 kernel as loaded, not on a dynamic-quantized fp32 copy
        assert drafter.runner.model is options["model"]
    result = SpecEngine(target, drafter).generate(prompt, max_new_tokens=24)
    assert torch.equal(result.sequences, greedy_reference(target, prompt, 24))
    assert result.stats.draft_depths and max(result.stats.draft_depths) >= 1


def test_load_rejects_unknown_weights_and_int8_off_the_cpu(tmp_path):
    from specdec import models
    from tiny_models import word_tokenizer

    tiny_model("qwen2").save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(InvalidInputError, match="unknown weights='int4'"):
        models.load_folder(tmp_path, weights="int4")
    with pytest.raises(InvalidInputError, match="weights='int8' runs on the CPU kernel"):
        models.load_folder(tmp_path, weights="int8", device="cuda")
    model, _ = models.load_folder(tmp_path, dtype=torch.bfloat16, weights="int8", tokenizer=False)
    assert weights_kind(model) == "int8"
    dense, _ = models.load_folder(tmp_path, dtype=torch.bfloat16, tokenizer=False)
    ids = tiny_prompt()
    # the int8 model is the dense one up to rounding: same shapes, close logits
    a, b = model(ids).logits.float(), dense(ids).logits.float()
    assert a.shape == b.shape and (a - b).abs().max() < 0.1 * b.abs().max()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # untied and tied LM heads
def test_a_cached_model_keeps_its_int8_form_and_rebuilds_a_damaged_one(arch, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    from specdec import models
    from specdec.models.int8_cache import FILE_NAME
    from tiny_models import word_tokenizer

    tiny_model(arch).save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    ids = tiny_prompt()
    first, _ = models.load_folder(tmp_path, dtype=torch.bfloat16, name="tiny", weights="int8", tokenizer=False)
    assert (tmp_path / FILE_NAME).is_file()
    expected = first(ids).logits

    def no_dense_read(*args, **kwargs):
        raise AssertionError("the dense weights were read although the int8 file was there")

    with monkeypatch.context() as m:
        m.setattr(AutoModelForCausalLM, "from_pretrained", no_dense_read)
        again, _ = models.load_folder(tmp_path, dtype=torch.bfloat16, name="tiny", weights="int8", tokenizer=False)
    assert weights_kind(again) == "int8" and again.dtype == torch.bfloat16
    assert torch.equal(again(ids).logits, expected)
    assert again.generation_config.eos_token_id == first.generation_config.eos_token_id
    assert again.config.name_or_path == first.config.name_or_path
    assert torch.equal(greedy_reference(again, ids, 10), greedy_reference(first, ids, 10))

    with open(tmp_path / FILE_NAME, "r+b") as f:  # a run killed while writing (not atomic) or a damaged disk
        f.truncate((tmp_path / FILE_NAME).stat().st_size // 2)
    capsys.readouterr()
    healed, _ = models.load_folder(tmp_path, dtype=torch.bfloat16, name="tiny", weights="int8", tokenizer=False)
    assert "unreadable" in capsys.readouterr().err and torch.equal(healed(ids).logits, expected)
    with monkeypatch.context() as m:  # rewritten whole
        m.setattr(AutoModelForCausalLM, "from_pretrained", no_dense_read)
        models.load_folder(tmp_path, dtype=torch.bfloat16, name="tiny", weights="int8", tokenizer=False)
    with pytest.warns(RuntimeWarning, match="portable fallback"):  # another dtype: its own file
        fp32, _ = models.load_folder(tmp_path, dtype=torch.float32, name="tiny", weights="int8", tokenizer=False)
    assert fp32.dtype == torch.float32 and "made from other weights or for another dtype" in capsys.readouterr().err
