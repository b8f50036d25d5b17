"""The quantized form of a cached model, kept beside it so that ``load(name, weights="int8")`` (or ``"w8a8"``,
``"gguf"``) reads ~1-2 GB once instead of reading the dense fp32 shards (7 GB for the 1.5B) and quantizing them on
every load.

The file ``int8.safetensors`` (``w8a8.safetensors``, ``gguf.safetensors``) holds the whole state dict of the
quantized model (the quantized layers' buffers and every other parameter in the load's dtype), so loading builds
the model's modules without initialising them, swaps in empty quantized layers, and assigns the tensors
(``load_state_dict(strict=True, assign=True)``): a key or shape that differs is an error, never a half-loaded
model. The header records the format version, the dtype and the sizes of the dense shards it came from; a file that
does not match, or that cannot be read (cut short by a killed run), is rebuilt from the dense weights with a
message, and written atomically.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from specdec.files import write_atomic
from specdec.kernels.int8_linear import Int8Linear
from specdec.kernels.kquant_linear import KQuantLinear
from specdec.kernels.w8a8_linear import W8A8Linear

FORMAT = "specdec-int8-v1"
KINDS = ("int8", "w8a8", "gguf")


def file_name(kind: str) -> str:
    return f"{kind}.safetensors"


def source_signature(folder: Path) -> str:
    """The dense shards' names and sizes and the config: what the int8 file was made from."""
    parts = [(folder / "config.json").read_text()]
    for path in sorted(folder.glob("*.safetensors")):
        if path.name not in {file_name(kind) for kind in KINDS}:
            parts.append(f"{path.name}:{path.stat().st_size}")
    return json.dumps(parts)


def cached_int8_state(folder: Path, dtype: torch.dtype, kind: str = "int8") -> dict | None:
    """The state dict in ``folder/<kind>.safetensors`` when it matches this folder and dtype, else None."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = folder / file_name(kind)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if (meta.get("format") != FORMAT or meta.get("dtype") != str(dtype)
                or meta.get("source") != source_signature(folder)):
            print(f"specdec: {path} was made from other weights or for another dtype; rebuilding it",
                  file=sys.stderr)
            return None
        return load_file(str(path))
    except Exception as exc:  # a file cut short or damaged: rebuilt below from the dense weights
        print(f"specdec: {path} is unreadable ({type(exc).__name__}: {exc}); rebuilding it", file=sys.stderr)
        return None


def save_int8_state(model: torch.nn.Module, folder: Path, dtype: torch.dtype, kind: str = "int8") -> Path:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "dtype": str(dtype), "source": source_signature(folder)}
    return write_atomic(folder / file_name(kind), lambda tmp: save_file(state, tmp, metadata=meta))


def build_from_state(folder: Path, dtype: torch.dtype, state: dict) -> torch.nn.Module:
    """The quantized model from ``state`` without reading the dense weights: modules built uninitialised, every
    ``nn.Linear`` swapped for an empty :class:`Int8Linear` of the shapes in ``state``, then the tensors assigned."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(folder)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is torch.nn.Linear and f"{full}.qs" in state:
                bias = state[f"{full}.bias"]
                fields = [state[f"{full}.{k}"] for k in ("qs", "sc", "mins", "d", "dmin")]
                setattr(module, child_name, KQuantLinear(int(state[f"{full}.qtype"]), *fields,
                                                         bias if bias.numel() else None, child.in_features,
                                                         child.out_features))
            elif type(child) is torch.nn.Linear and f"{full}.packed" in state:
                bias = state[f"{full}.bias"]
                args = (state[f"{full}.scale"], bias if bias.numel() else None, child.in_features, child.out_features)
                if f"{full}.wsum" in state:
                    layer = W8A8Linear(state[f"{full}.packed"], state[f"{full}.wsum"], *args)
                else:
                    layer = Int8Linear(state[f"{full}.packed"], *args)
                setattr(module, child_name, layer)
    model.load_state_dict(state, strict=True, assign=True)
    model.config.name_or_path = str(folder)  # as from_pretrained sets it (cost tables key on it)
    if (folder / "generation_config.json").is_file():  # EOS ids and sampling defaults, as from_pretrained reads them
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()
