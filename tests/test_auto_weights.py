"""The fast path by default: ``weights="auto"`` loads the GGUF file's k-quant tensors where they run natively, dense
elsewhere, and says which once; a draft-model drafter on a gguf draft takes the defaults measured there."""

from __future__ import annotations

import copy

import gguf
import pytest
import torch

from specdec import models
from specdec.drafters import create_drafter
from specdec.drafters.draft_model import DENSE_MIN_PROB, GGUF_DEFAULTS
from specdec.kernels import weights_kind
from specdec.kernels.build import cpu_kernels
from specdec.models import auto_weights
from specdec.models.auto_weights import resolve_weights
from test_gguf_weights import gguf_model, write_converted_model
from tiny_models import tiny_model

needs_kernels = pytest.mark.skipif(cpu_kernels() is None, reason="the native CPU kernels do not run here")


@pytest.fixture(autouse=True)
def _say_again():
    auto_weights._SAID.clear()
    yield
    auto_weights._SAID.clear()


@needs_kernels
def test_auto_loads_the_gguf_tensors_and_says_so_once(tmp_path, capsys):
    gguf_file = write_converted_model("qwen2", tmp_path)
    model, _ = models.load_folder(tmp_path, dtype=torch.bfloat16, gguf_file=gguf_file, tokenizer=False)
    assert weights_kind(model) == "gguf"
    models.load_folder(tmp_path, dtype=torch.bfloat16, gguf_file=gguf_file, tokenizer=False)
    err = capsys.readouterr().err
    assert err.count("weights='auto' -> gguf") == 1
    dense, _ = models.load_folder(tmp_path, dtype=torch.bfloat16, gguf_file=gguf_file, weights="dense",
                                  tokenizer=False)
    assert weights_kind(dense) == "dense"


def test_auto_is_dense_where_gguf_does_not_run(tmp_path, capsys):
    gguf_file = write_converted_model("qwen2", tmp_path)
    cases = [
        (dict(gguf_file=None, device=None, device_map=None, dtype=torch.bfloat16), "no GGUF file"),
        (dict(gguf_file=gguf_file, device="cuda", device_map=None, dtype=torch.bfloat16), "run on the CPU"),
        (dict(gguf_file=gguf_file, device=None, device_map="auto", dtype=torch.bfloat16), "device_map"),
        (dict(gguf_file=gguf_file, device=None, device_map=None, dtype=torch.float32), "compute in bf16"),
    ]
    for kwargs, why in cases:
        assert resolve_weights("auto", **kwargs) == "dense"
        assert why in capsys.readouterr().err
    assert resolve_weights("w8a8", None, None, None, torch.float32) == "w8a8"  # only "auto" is resolved
    model, _ = models.load_folder(tmp_path, tokenizer=False)  # no gguf_file: dense, as before
    assert weights_kind(model) == "dense"


@needs_kernels
def test_auto_is_dense_for_a_gguf_without_k_quants(tmp_path, capsys):
    path = tmp_path / "f16.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_tensor("blk.0.attn_q.weight", torch.zeros(16, 256).half().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert resolve_weights("auto", path, None, None, torch.bfloat16) == "dense"
    assert "holds no Q4_K / Q6_K tensors" in capsys.readouterr().err


@needs_kernels
def test_a_gguf_draft_takes_the_fast_path_defaults_and_explicit_options_win():
    target = gguf_model("qwen2")
    draft = gguf_model("qwen2", seed=1)
    config = create_drafter("draft-model", target=target, model=draft).config
    for field, value in GGUF_DEFAULTS.items():
        assert getattr(config, field) == value, field
    mine = create_drafter("draft-model", target=target, model=draft, quantize=None, width=3, min_prob=0.1).config
    assert (mine.quantize, mine.width, mine.min_prob, mine.topk) == (None, 3, 0.1, GGUF_DEFAULTS["topk"])
    dense = create_drafter("draft-model", target=tiny_model("qwen2"), model=copy.deepcopy(tiny_model("qwen2", seed=1)))
    assert (dense.config.min_prob, dense.config.topk, dense.config.quantize) == (DENSE_MIN_PROB, None, "auto")
