"""``weights="gguf"``: run a model's linear layers on the GGUF file's own quantized tensors (the model llama.cpp
runs), not on de-quantized copies.

Each ``nn.Linear`` of a decoder layer, and the LM head, is matched to its GGUF tensor by name (``blk.{i}.attn_q``,
``ffn_down``, ``output``, ...). Q4_K and Q6_K tensors become :class:`~specdec.kernels.kquant_linear.KQuantLinear`
layers that execute the stored blocks. A tensor in another format (the 0.5B Qwen file stores its 896-column
matrices as Q5_0 and Q8_0, which have no kernel here yet) runs as ``w8a8`` from its de-quantized values, and the
load says so. Embedding tables and norms stay as loaded (a lookup reads one row). Before swapping a layer, the
first rows of the GGUF tensor are de-quantized and compared with the loaded dense weights (which were
de-quantized from the same file), so a mismatched file or a wrong name or row order is an error, never a silently
different model.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from specdec.errors import InvalidInputError
from specdec.kernels.kquant_linear import NAMES, KQuantLinear, dequantize_fields, unpack_blocks
from specdec.kernels.w8a8_linear import W8A8Linear

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)$")
_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
          "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
_PERMUTED = {"llama": ("attn_q", "attn_k")}  # llama.cpp's converter interleaves these rows for its rope layout
CHECK_ROWS = 16


def gguf_tensor_name(module_name: str, tensors: dict) -> str | None:
    """The GGUF tensor of an HF linear layer (``model.layers.3.mlp.down_proj`` -> ``blk.3.ffn_down.weight``)."""
    if module_name == "lm_head":
        return "output.weight" if "output.weight" in tensors else "token_embd.weight"  # tied: the embedding
    match = _LAYER.match(module_name)
    if match is None or match.group(3) not in _NAMES:
        return None
    return f"blk.{match.group(1)}.{_NAMES[match.group(3)]}.weight"


def apply_gguf_weights(model: torch.nn.Module, gguf_file: str | Path) -> Counter:
    """Swap ``model``'s linear layers for the GGUF file's tensors; return how many layers run in each format."""
    reader, arch = _read(gguf_file)
    tensors = {t.name: t for t in reader.tensors}
    counts: Counter = Counter()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is not torch.nn.Linear:
                continue
            tensor_name = gguf_tensor_name(full, tensors)
            tensor = tensors.get(tensor_name) if tensor_name else None
            if tensor is None or int(tensor.tensor_type) not in NAMES:
                kind = "unmatched" if tensor is None else tensor.tensor_type.name
                setattr(module, child_name, W8A8Linear.from_linear(child))
                counts[f"w8a8 (GGUF {kind})"] += 1
                continue
            blocks = np.asarray(tensor.data)
            if tuple(blocks.shape)[0] != child.out_features:
                raise InvalidInputError(f"{gguf_file}: tensor {tensor_name} has {blocks.shape[0]} rows, the model's "
                                        f"{full} has {child.out_features} outputs; is this GGUF file for this model?")
            blocks = _hf_row_order(blocks, tensor_name, arch, model.config)
            _check_rows(blocks, int(tensor.tensor_type), child, full, gguf_file)
            setattr(module, child_name, KQuantLinear.from_blocks(blocks, int(tensor.tensor_type), child.in_features,
                                                                  child.bias))
            counts[tensor.tensor_type.name] += 1
    others = {k: v for k, v in counts.items() if k.startswith("w8a8")}
    if others:
        print(f"specdec: weights='gguf' runs {sum(others.values())} of {sum(counts.values())} linear layers as w8a8 "
              f"(no kernel for their GGUF format): {dict(others)}", file=sys.stderr)
    return counts


def holds_kquants(gguf_file: str | Path) -> bool:
    """Whether the GGUF file holds any Q4_K / Q6_K tensor (what ``weights="gguf"`` runs natively); reads the
    header only."""
    reader, _ = _read(gguf_file)
    return any(int(t.tensor_type) in NAMES for t in reader.tensors)


def _read(gguf_file: str | Path):
    """``(GGUFReader, architecture)``, or an error naming the file and what is wrong with it."""
    import gguf

    path = Path(gguf_file)
    if not path.is_file():
        raise InvalidInputError(f"weights='gguf': the GGUF file {path} does not exist")
    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return reader, bytes(field.parts[field.data[0]]).decode()
    except Exception as exc:  # a file cut short, not a GGUF file, or one without an architecture
        raise InvalidInputError(f"weights='gguf': could not read {path} as a GGUF file ({type(exc).__name__}: "
                                f"{exc}); is it complete? For a registered model, `specdec models --refetch <name>` "
                                "fetches it again") from exc


def _hf_row_order(blocks: np.ndarray, tensor_name: str, arch: str, config) -> np.ndarray:
    """Undo llama.cpp's row interleaving of the query and key projections for llama-architecture files."""
    kind = tensor_name.split(".")[-2]
    if kind not in _PERMUTED.get(arch, ()):
        return blocks
    heads = config.num_attention_heads if kind == "attn_q" else config.num_key_value_heads
    rows = blocks.shape[0]
    # the converter wrote gguf[r] = hf[perm[r]], perm = arange.reshape(heads, 2, half).swapaxes(1, 2)
    perm = np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)
    return blocks[np.argsort(perm)]


def _check_rows(blocks: np.ndarray, qtype: int, linear: torch.nn.Linear, name: str, gguf_file) -> None:
    rows = min(CHECK_ROWS, blocks.shape[0])
    stored = dequantize_fields(unpack_blocks(blocks[:rows], qtype), qtype)
    loaded = linear.weight.detach()[:rows].float()
    if stored.shape != loaded.shape or not torch.allclose(stored, loaded, rtol=2 ** -7, atol=1e-6):
        raise InvalidInputError(f"{gguf_file}: the quantized tensor for {name} does not hold the weights the model "
                                "was loaded with; load the GGUF file this model was converted from (for a cached "
                                "model: `specdec models --refetch <name>`)")
