"""``weights="gguf"``: GGUF Q4_K / Q6_K blocks decode as gguf-py reads them, the kernel computes what its definition
says and does not depend on how many tokens share a call, speculative decoding on such a target equals its own
greedy decoding on every prompt (no near-tie exception), and a GGUF file is matched to the model it was converted
from or refused."""

from __future__ import annotations

import functools

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from specdec import SpecEngine
from specdec.attention import use_fast_cpu_attention
from specdec.drafters import create_drafter
from specdec.errors import InvalidInputError
from specdec.kernels import W8A8Linear, weights_kind
from specdec.kernels.kquant_linear import NAMES, Q4_K, Q6_K, KQuantLinear, dequantize_fields, unpack_blocks
from specdec.kernels.kquant_linear import quantize_activations
from tiny_kquants import ENCODERS, kquant_layer
from tiny_models import ARCHS, CONFIGS, VOCAB, greedy_reference, tiny_prompt, word_tokenizer

QTYPES = [Q4_K, Q6_K]
TOKENS = (1, 2, 3, 5, 8, 9, 13, 16, 17, 31)


@pytest.mark.parametrize("qtype", QTYPES)
def test_blocks_decode_as_gguf_py_reads_them_and_survive_packing(qtype):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 512)).astype(np.float32) * rng.uniform(0.01, 3, (40, 1)).astype(np.float32)
    blocks = ENCODERS[qtype](w)
    reference = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType(qtype))  # gguf-py's own decoder
    ours = dequantize_fields(unpack_blocks(blocks, qtype), qtype).numpy()
    assert np.array_equal(ours, reference)
    assert np.abs(reference - w).max() < 0.2 * np.abs(w).max()  # the test encoder is a real quantizer
    layer = KQuantLinear.from_blocks(blocks, qtype, 512)  # 40 rows: padded to 48 in the packed layout
    assert layer.format == NAMES[qtype] and layer.d.shape == (3, 2, 16)
    assert np.array_equal(layer.dequantized().numpy(), reference)
    with pytest.raises(ValueError, match="do not hold rows of 768 columns"):
        KQuantLinear.from_blocks(blocks, qtype, 768)


@pytest.mark.parametrize("out_features,in_features,bias", [(40, 256, True), (96, 1024, False)])
@pytest.mark.parametrize("qtype", QTYPES)
def test_kquant_linear_matches_its_definition_and_is_row_invariant(qtype, out_features, in_features, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    layer = kquant_layer(linear, qtype)
    w = layer.dequantized().double()
    for n in TOKENS:
        x = torch.randn(n, in_features, dtype=torch.bfloat16)
        a, s = quantize_activations(x)
        xb = x.float().view(n, -1, 256)
        assert (a.abs() <= 127).all()
        assert ((a.float().view(n, -1, 256) * s[:, :, None] - xb).abs() <= s[:, :, None] / 2 + 1e-6).all()
        y = layer(x)
        assert y.shape == (n, out_features) and y.dtype == torch.bfloat16
        exact = (a.double().view(n, -1, 256) * s.double()[:, :, None]).view(n, -1) @ w.T  # the definition
        if bias:
            exact = exact + linear.bias.detach().double()
        assert torch.allclose(y.double(), exact, rtol=2 ** -7, atol=1e-3 * exact.abs().max()), n
        dense = x.double() @ w.T + (linear.bias.detach().double() if bias else 0)
        assert (y.double() - dense).norm() <= 0.02 * dense.norm(), n  # activation rounding: well under 2%
        one_by_one = torch.cat([layer(x[i:i + 1]) for i in range(n)])
        assert torch.equal(one_by_one, y), f"token outputs changed with the call size ({n} tokens)"
    x3 = torch.randn(2, 3, in_features, dtype=torch.bfloat16)
    assert torch.equal(layer(x3), layer(x3.reshape(6, in_features)).reshape(2, 3, out_features))


def tiny_gguf_config(arch: str):
    """A tiny config whose hidden size (256) is a multiple of the k-quant super-block; gemma3's attention output
    (4 heads x 16 = 64 inputs) is not, so its model mixes k-quant and w8a8 layers as a real file can."""
    config = CONFIGS[arch](VOCAB)
    config.hidden_size, config.intermediate_size = 256, 512
    if arch != "gemma3":
        config.head_dim = 64
    config._attn_implementation = "sdpa"
    return config


@functools.lru_cache(maxsize=None)
def gguf_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny model whose 256-multiple linear layers hold Q4_K / Q6_K blocks (alternating) and the rest w8a8."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_gguf_config(arch), dtype=torch.float32)
    with torch.no_grad():
        if not model.config.tie_word_embeddings:
            model.get_output_embeddings().weight.mul_(4.0)  # sharper distributions: fewer near-ties
    model = model.to(torch.bfloat16)
    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                if child.in_features % 256 == 0:
                    layer = kquant_layer(child, QTYPES[count % 2])  # child.float() would turn a tied embedding fp32 too
                    count += 1
                else:
                    layer = W8A8Linear.from_linear(child)
                setattr(module, child_name, layer)
    assert count > 0
    model.generation_config.pad_token_id = 2
    return use_fast_cpu_attention(model).eval()  # what specdec.models.load installs on the CPU


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("drafter_name,options", [
    ("draft-model", dict(mode="tree", min_prob=0.0, budget=12)),
    ("prompt-lookup", {}),
])
def test_speculation_on_a_gguf_target_equals_its_own_greedy(arch, drafter_name, options):
    target = gguf_model(arch)
    assert weights_kind(target) == "gguf" and not any(type(m) is torch.nn.Linear for m in target.modules())
    if drafter_name == "draft-model":
        options = dict(options, model=gguf_model(arch, seed=1))
    # Every prompt, near-ties included: verification is batch-invariant (test_batch_invariance.py), so a token's
    # logits in a tree forward are bit for bit those of a one-token forward and no tie can flip.
    for seed in range(1, 5):
        prompt = tiny_prompt(seed=seed)
        reference = greedy_reference(target, prompt, 24)
        drafter = create_drafter(drafter_name, target=target, **options)
        result = SpecEngine(target, drafter).generate(prompt, max_new_tokens=24, eos_token_id=None)
        assert torch.equal(result.sequences, reference), seed
        assert result.stats.draft_depths and max(result.stats.draft_depths) >= 1


# --- loading a model from its GGUF file ------------------------------------------------------------------------------

def _interleave_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter order for llama query/key rows (the loader must undo it)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(rows, -1)


def write_converted_model(arch: str, folder, seed: int = 0, other_format: int | None = None):
    """Save a tiny model as a GGUF file and as the HF folder de-quantized from it (what specdec.models caches):
    every 256-multiple matrix in Q4_K or Q6_K (alternating), ``other_format`` for the first such one if given."""
    torch.manual_seed(seed)
    config = tiny_gguf_config(arch)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    writer = gguf.GGUFWriter(str(folder / "model.gguf"), arch)
    count = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if type(module) is not torch.nn.Linear or module.in_features % 256:
                continue
            from specdec.models.gguf_weights import gguf_tensor_name

            tensor_name = gguf_tensor_name(name, {"output.weight": None})
            qtype = QTYPES[count % 2] if other_format is None or count else other_format
            count += 1
            w = module.weight.numpy()
            if qtype in ENCODERS:
                blocks = ENCODERS[qtype](w)
            else:
                blocks = gguf.quants.quantize(w, gguf.GGMLQuantizationType(qtype))
            module.weight.copy_(torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType(qtype))))
            kind = tensor_name.split(".")[-2]
            if arch == "llama" and kind in ("attn_q", "attn_k"):
                heads = config.num_attention_heads if kind == "attn_q" else config.num_key_value_heads
                blocks = _interleave_rows(blocks, heads)
            writer.add_tensor(tensor_name, blocks, raw_dtype=gguf.GGMLQuantizationType(qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder / "model.gguf"


@pytest.mark.parametrize("arch", ARCHS)
def test_load_runs_the_gguf_tensors_of_the_converted_model(arch, tmp_path):
    from specdec import models

    gguf_file = write_converted_model(arch, tmp_path)
    model, _ = models.load_folder(tmp_path, dtype=torch.bfloat16, weights="gguf", gguf_file=gguf_file,
                                  tokenizer=False)
    layers = [m for m in model.modules() if isinstance(m, KQuantLinear)]
    assert weights_kind(model) == "gguf" and {m.format for m in layers} == {"Q4_K", "Q6_K"}
    dense, _ = models.load_folder(tmp_path, dtype=torch.bfloat16, tokenizer=False)
    ids = tiny_prompt()
    a, b = model(ids).logits.float(), dense(ids).logits.float()  # the same weights, int8-rounded activations
    assert a.shape == b.shape and (a - b).norm() < 0.05 * b.norm()


def test_load_refuses_a_gguf_file_of_another_model_a_damaged_one_and_needs_one(tmp_path):
    from specdec import models

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_converted_model("qwen2", tmp_path / "a", seed=0)
    other = write_converted_model("qwen2", tmp_path / "b", seed=1)
    with pytest.raises(InvalidInputError, match="does not hold the weights the model was loaded with"):
        models.load_folder(tmp_path / "a", dtype=torch.bfloat16, weights="gguf", gguf_file=other, tokenizer=False)
    with pytest.raises(InvalidInputError, match="pass gguf_file=<path>"):
        models.load_folder(tmp_path / "a", dtype=torch.bfloat16, weights="gguf", tokenizer=False)
    with pytest.raises(InvalidInputError, match="does not exist"):
        models.load_folder(tmp_path / "a", weights="gguf", gguf_file=tmp_path / "none.gguf", tokenizer=False)
    cut = tmp_path / "cut.gguf"  # a download or copy cut short
    cut.write_bytes((tmp_path / "a" / "model.gguf").read_bytes()[:5000])
    with pytest.raises(InvalidInputError, match="could not read .*cut.gguf as a GGUF file.*is it complete"):
        models.load_folder(tmp_path / "a", weights="gguf", gguf_file=cut, tokenizer=False)


def test_tensors_in_formats_without_a_kernel_run_as_w8a8_and_the_load_says_so(tmp_path, capsys):
    from specdec import models

    gguf_file = write_converted_model("qwen2", tmp_path, other_format=int(gguf.GGMLQuantizationType.Q8_0))
    capsys.readouterr()
    model, _ = models.load_folder(tmp_path, dtype=torch.bfloat16, weights="gguf", gguf_file=gguf_file,
                                  tokenizer=False)
    assert "runs 1 of" in capsys.readouterr().err
    assert isinstance(model.model.layers[0].self_attn.q_proj, W8A8Linear)
    assert isinstance(model.model.layers[0].self_attn.k_proj, KQuantLinear)
