"""Build, save and load draft heads: ``build_heads``, ``save_heads``, ``load_heads``.

A heads folder holds ``heads.json`` ({"config": HeadsConfig, "files": {name: sha256}}) and the learned tensors
as bf16 safetensors (``heads.safetensors``, or ``heads-0000i-of-0000n.safetensors`` shards of at most 25 MB).
The frozen parts (the target's LM-head rows and input embedding) are never saved: ``load_heads`` takes them from
the target, after checking the target's fingerprint. Every file is written under a temporary name and renamed,
tensor files first and ``heads.json`` last, so a killed save leaves either the old heads or files whose sha256
no longer matches ``heads.json``, which ``load_heads`` reports by name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from specdec.drafters.heads.base import DraftHeads
from specdec.drafters.heads.chimera import ChimeraHeads
from specdec.drafters.heads.clover import CloverHeads
from specdec.drafters.heads.config import HeadsConfig
from specdec.drafters.heads.deer import DeerHeads
from specdec.drafters.heads.fingerprint import fingerprint_difference, target_fingerprint
from specdec.drafters.heads.hydra import HydraHeads
from specdec.drafters.heads.medusa import MedusaHeads
from specdec.drafters.heads.vocab import DraftVocab
from specdec.errors import CorruptHeadsError, HeadsConfigError, HeadsTargetMismatchError
from specdec.files import file_in_folder, sha256_of, write_atomic
from specdec.finite import check_finite

HEAD_CLASSES: dict[str, type[DraftHeads]] = {cls.kind: cls for cls in (MedusaHeads, HydraHeads, CloverHeads,
                                                                        ChimeraHeads, DeerHeads)}
CONFIG_FILE = "heads.json"
SHARD_BYTES = 25 * 10**6
VOCAB_KEY = "draft_vocab.ids"  # int64 [N], saved only for a reduced vocabulary


def build_heads(kind: str, target: torch.nn.Module, num_heads: int = 4, draft_vocab: DraftVocab | None = None,
                generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32, **sizes) -> DraftHeads:
    """Randomly initialised heads of ``kind`` for ``target`` (as the papers initialise them: the heads start as
    the target's LM head on its own hidden state); ``sizes`` are the kind's dims (see each class). Random numbers
    come from ``generator`` only (None: a generator seeded with 0); the global RNG is not touched."""
    head = target.get_output_embeddings().weight
    vocab_size, hidden = head.shape
    vocab = draft_vocab or DraftVocab.full(vocab_size)
    if vocab.vocab_size != vocab_size:
        raise HeadsConfigError(f"the draft vocabulary is over {vocab.vocab_size} tokens, the target has "
                               f"{vocab_size}; count it with the target's tokenizer")
    config = HeadsConfig(kind=kind, num_heads=num_heads, hidden_size=int(hidden), vocab_size=int(vocab_size),
                         draft_vocab_size=None if vocab.is_full else vocab.size, sizes=dict(sizes),
                         target=target_fingerprint(target))
    heads = _empty(config)  # on the CPU, so that a CPU generator can initialise it
    heads.init_weights(generator if generator is not None else torch.Generator().manual_seed(0))
    return heads.to(device=head.device, dtype=dtype).attach(target, vocab)


def save_heads(heads: DraftHeads, folder: "str | os.PathLike") -> Path:
    """Write ``heads`` to ``folder`` (created): bf16 safetensors + ``heads.json``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in heads.state_dict().items()}
    if heads.vocab is not None and not heads.vocab.is_full:
        tensors[VOCAB_KEY] = heads.vocab.ids.detach().cpu().long().contiguous()
    shards = _shards(tensors)
    files = {}
    for i, names in enumerate(shards):
        name = "heads.safetensors" if len(shards) == 1 else f"heads-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        files[name] = _write_atomic(folder / name, lambda tmp, ns=names: save_file({k: tensors[k] for k in ns}, tmp))
    text = json.dumps({"config": heads.config.to_dict(), "files": files}, indent=1, sort_keys=True)
    _write_atomic(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
    return folder


def load_heads(folder: "str | os.PathLike", target: torch.nn.Module, dtype: torch.dtype | None = None) -> DraftHeads:
    """The heads saved in ``folder``, for ``target`` (in ``dtype``; default the target's LM-head dtype).

    Raises HeadsTargetMismatchError for heads of another target, CorruptHeadsError for a missing, truncated or
    altered file, HeadsConfigError for a config its tensors do not match.
    """
    folder = Path(folder)
    index = _read_index(folder)
    config = HeadsConfig.from_dict(index.get("config"))
    actual = target_fingerprint(target)
    difference = fingerprint_difference(config.target, actual)
    if difference is not None:
        name = getattr(getattr(target, "config", None), "name_or_path", "") or "<your target>"
        raise HeadsTargetMismatchError(f"the {config.kind} heads in {folder} were trained for another target "
                                       f"({difference}); retrain them with `specdec train --target {name}`")
    tensors: dict[str, torch.Tensor] = {}
    for name, digest in sorted(index.get("files", {}).items()):
        tensors.update(_read_tensors(file_in_folder(folder, name, CONFIG_FILE), digest))
    ids = tensors.pop(VOCAB_KEY, None)
    weight = target.get_output_embeddings().weight
    vocab = DraftVocab.full(config.vocab_size) if ids is None else _vocab(ids, config, folder)
    heads = _empty(config)
    _check_shapes(heads, tensors, folder)
    check_finite(tensors.items(), f"the {config.kind} heads in {folder}", CorruptHeadsError)
    heads.load_state_dict(tensors)
    heads = heads.to(device=weight.device, dtype=dtype or weight.dtype)
    return heads.attach(target, vocab)


# ---------------------------------------------------------------------------------------------- helpers
def _empty(config: HeadsConfig) -> DraftHeads:
    """Uninitialised CPU heads: built on the meta device, so nn.Linear's default init never draws from the global
    RNG (every parameter is then set by ``init_weights`` or ``load_state_dict``)."""
    with torch.device("meta"):
        heads = HEAD_CLASSES[config.kind](config)
    return heads.to_empty(device="cpu")


def _shards(tensors: dict[str, torch.Tensor]) -> list[list[str]]:
    shards, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_atomic(path: Path, write) -> str:
    """Write through ``write(tmp_path)`` then rename onto ``path`` (``specdec.files.write_atomic``); returns the
    file's sha256."""
    return sha256_of(write_atomic(path, write))


def _read_index(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CorruptHeadsError(f"{path} does not exist: {folder} is not a heads folder (save_heads writes it "
                                f"last; a save that was killed before it wrote nothing usable)")
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CorruptHeadsError(f"{path} is unreadable or half-written ({exc}); save the heads again") from None
    if not isinstance(index, dict) or not isinstance(index.get("files"), dict) or not index["files"]:
        raise CorruptHeadsError(f"{path} lists no tensor files; save the heads again")
    return index


def _read_tensors(path: Path, digest: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CorruptHeadsError(f"{path} is missing (listed in {CONFIG_FILE}); copy the whole heads folder again")
    if sha256_of(path) != digest:
        raise CorruptHeadsError(f"{path} is corrupt or truncated: its sha256 differs from the one in {CONFIG_FILE}; "
                                f"copy or save the heads again")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptHeadsError(f"{path} is not a readable safetensors file ({exc}); save the heads again") from None


def _vocab(ids: torch.Tensor, config: HeadsConfig, folder: Path) -> DraftVocab:
    if ids.dim() != 1 or ids.numel() != config.draft_size:
        raise HeadsConfigError(f"{folder}: {VOCAB_KEY} holds {ids.numel()} ids but the config's draft_vocab_size is "
                               f"{config.draft_vocab_size}")
    return DraftVocab(ids.long(), config.vocab_size)


def _check_shapes(heads: DraftHeads, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in heads.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise HeadsConfigError(f"{folder}: the tensors do not match the {heads.kind} config in {CONFIG_FILE} "
                               f"(missing: {', '.join(missing) or '-'}; unexpected: {', '.join(unexpected) or '-'})")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise HeadsConfigError(f"{folder}: tensor {name} has shape {tuple(tensors[name].shape)} but the config in "
                                   f"{CONFIG_FILE} ({_describe(heads.config)}) needs {shape}")


def _describe(config: HeadsConfig) -> str:
    return (f"{config.kind}, num_heads {config.num_heads}, hidden_size {config.hidden_size}, "
            f"sizes {config.sizes or 'default'}")
