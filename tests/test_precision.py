"""The default precision: bf16 only where the hardware computes it natively, said once."""

from __future__ import annotations

from pathlib import Path

import torch

from specdec import precision


def _flags(monkeypatch, flags: set[str]) -> None:
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(precision, "_REPORTED", set())


def test_bf16_on_cpus_with_native_bf16_and_fp32_elsewhere(monkeypatch):
    for flags, expected in (({"avx512f", "avx512_bf16"}, torch.bfloat16), ({"amx_tile", "amx_bf16"}, torch.bfloat16),
                            ({"avx512f", "avx2"}, torch.float32), (set(), torch.float32)):
        _flags(monkeypatch, flags)
        assert precision.default_dtype("cpu", report=False) == expected, flags


def test_the_choice_is_said_once(monkeypatch, capsys):
    _flags(monkeypatch, {"avx2"})
    assert precision.default_dtype() == torch.float32
    assert precision.default_dtype() == torch.float32
    err = capsys.readouterr().err
    assert err.count("loading in float32 on cpu (no native bf16") == 1


def test_cpu_flags_read_this_machine():
    info = Path("/proc/cpuinfo")
    text = info.read_text() if info.exists() else ""
    assert precision.native_bf16("cpu") == ("avx512_bf16" in text or "amx_bf16" in text)


def test_loading_without_dtype_follows_the_hardware_and_dtype_overrides(tmp_path, monkeypatch):
    from specdec import models
    from tiny_models import tiny_model, word_tokenizer

    tiny_model("qwen2").save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    for flags, expected in (({"avx512_bf16"}, torch.bfloat16), ({"avx2"}, torch.float32)):
        _flags(monkeypatch, flags)
        model, tokenizer = models.load_folder(tmp_path)
        assert model.dtype == expected and tokenizer is not None
        assert models.load_folder(tmp_path, dtype=torch.float16, tokenizer=False)[0].dtype == torch.float16
    assert models.load_folder(tmp_path, tokenizer=False)[1] is None
