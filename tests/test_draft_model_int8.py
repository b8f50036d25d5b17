"""The draft-model drafter's int8 draft is the one int8 quantizer of specdec.kernels: a copy of the draft model
converted as ``weights="w8a8"`` converts a model, the model it came from left untouched; without the kernels the
draft runs in the model's own dtype, and says so once."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from specdec.drafters import create_drafter, draft_model
from specdec.kernels import cpu_kernels, quantize_linears, weights_kind
from tiny_models import tiny_model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tie", [False, True])
def test_the_int8_draft_is_the_weights_w8a8_conversion(tie, dtype):
    """Every parameter in bf16 (buffers as they are), then every Linear (the LM head too) a W8A8Linear (int8 weights
    and activations, as torch's dynamic quantization had them; 2x faster than bf16 activations on the 0.5B draft): the same
    logits and state as that conversion of a copy; bf16 tensors are shared, not copied."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    model = Qwen2ForCausalLM(config).to(dtype).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = copy.deepcopy(model)
    for p in expected.parameters():
        p.data = p.data.to(torch.bfloat16)
    assert quantize_linears(expected, "w8a8") == 15  # 7 per layer and the LM head (tied or not)
    got = create_drafter("draft-model", target=model, model=model, quantize="int8").runner.model
    assert weights_kind(got) == "w8a8" and all(p.dtype == torch.bfloat16 for p in got.parameters())
    assert type(got.get_output_embeddings()).__name__ == "W8A8Linear"
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        assert torch.equal(got(ids).logits, expected.eval()(ids).logits)
    got_state, expected_state = got.state_dict(), expected.state_dict()
    assert set(got_state) == set(expected_state)
    for key, value in got_state.items():  # int8 weights, scales, fp32 biases, bf16 norms and embeddings
        assert value.dtype == expected_state[key].dtype and torch.equal(value, expected_state[key]), key
    if dtype == torch.bfloat16:  # nothing to cast: the embedding table is the model's own
        assert got.get_input_embeddings().weight is model.get_input_embeddings().weight
    assert all(v.dtype == dtype and torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_without_the_kernels_the_draft_runs_in_its_own_dtype_and_says_so_once(monkeypatch):
    monkeypatch.setenv("SPECDEC_KERNELS", "0")
    cpu_kernels.cache_clear()
    draft_model._warn_no_int8_kernels.cache_clear()
    try:
        model = tiny_model("qwen2")
        with pytest.warns(RuntimeWarning, match=r"int8 draft needs the native CPU kernels \(SPECDEC_KERNELS=0\); it "
                                                r"drafts in the draft model's own dtype"):
            auto = create_drafter("draft-model", target=model, model=model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once
            int8 = create_drafter("draft-model", target=model, model=model, quantize="int8")
        for drafter in (auto, int8):
            assert drafter.runner.model is model and weights_kind(drafter.runner.model) == "dense"
    finally:
        cpu_kernels.cache_clear()
        draft_model._warn_no_int8_kernels.cache_clear()
