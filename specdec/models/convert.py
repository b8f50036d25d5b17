"""GGUF -> sharded fp32 safetensors, one tensor at a time.

transformers can de-quantize a GGUF while loading it, but that holds the whole model in fp32 (and a model loaded
that way refuses ``save_pretrained``, so saving it meant a second fp32 copy). This module does the same conversion
tensor by tensor with transformers' own pieces, so the result is bitwise what transformers' GGUF loader produces:

* config and tokenizer: ``AutoConfig`` / ``AutoTokenizer.from_pretrained(folder, gguf_file=...)``;
* tensor names: ``get_gguf_hf_weights_map`` on a model built on the meta device (no memory);
* values: ``gguf.dequantize`` (in row chunks, so its temporaries stay small) followed by transformers' per-
  architecture ``TENSOR_PROCESSORS`` entry (Llama's q/k un-permutation, Gemma's norm offset...), cast to fp32.

Each tensor is written straight into a safetensors shard (<= ``shard_bytes`` unless one tensor is larger) whose
header is known up front from the meta model's shapes, so the peak memory is about one tensor plus the mapped pages
of the GGUF, whatever the model size. The folder gets a ``model.safetensors.index.json`` like ``save_pretrained``'s.
"""

from __future__ import annotations

import gc
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np

from specdec.errors import ModelFetchError

SHARD_BYTES = 1 << 30  # largest shard, unless a single tensor is larger
INDEX_NAME = "model.safetensors.index.json"
_CHUNK_ELEMENTS = 1 << 24  # de-quantize this many values at a time (64 MB of fp32 output)


def convert_gguf(gguf: Path, out_dir: Path, shard_bytes: int | None = None, progress: bool = True) -> Path:
    """Write the de-quantized weights (fp32), config, generation config and tokenizer of ``gguf`` into ``out_dir``
    (which must not exist yet; the caller renames it into place once this returns)."""
    import torch
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    shard_bytes = shard_bytes or SHARD_BYTES
    out_dir.mkdir(parents=True)
    folder, name = str(gguf.parent), gguf.name

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.save_pretrained(str(out_dir))
    del tokenizer

    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):  # else reloading would re-pack the weights into GGUF kernels
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    config = model.config
    config.architectures = [type(model).__name__]
    config.save_pretrained(str(out_dir))
    GenerationConfig.from_model_config(config).save_pretrained(str(out_dir))

    reader = GGUFReader(str(gguf))
    gguf_config = load_gguf_checkpoint(str(gguf), return_tensors=False)["config"]
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=gguf_config)
    name_map = get_gguf_hf_weights_map(model, processor)
    saved = _saved_keys(model)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    del model
    gc.collect()

    # What the file holds, in file order, under the model's names.
    plan: list[tuple[object, str, tuple[int, ...]]] = []
    for tensor in reader.tensors:
        hf_name = name_map.get(tensor.name)
        if hf_name is None or hf_name not in saved:
            continue
        plan.append((tensor, hf_name, shapes[hf_name]))
    missing = sorted(saved - {hf for _, hf, _ in plan})
    if missing:
        raise ModelFetchError(f"{gguf.name} has no tensor for {', '.join(missing[:8])}"
                              f"{' ...' if len(missing) > 8 else ''}; this GGUF layout is not supported")

    shards: list[list[tuple[object, str, tuple[int, ...]]]] = [[]]
    size = 0
    for entry in plan:
        nbytes = 4 * int(np.prod(entry[2], dtype=np.int64))
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes

    from tqdm.auto import tqdm

    bar = tqdm(total=len(plan), desc=f"convert {gguf.name}", unit="tensor", disable=not progress, file=sys.stderr)
    weight_map, total = {}, 0
    with bar:
        for i, shard in enumerate(shards, 1):
            file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"

            def values(entries=shard):
                for tensor, hf_name, shape in entries:
                    array = _dequantize(tensor, processor)
                    if tuple(array.shape) != shape:
                        raise ModelFetchError(f"{gguf.name}: tensor {tensor.name} has shape {tuple(array.shape)}, "
                                              f"the model expects {shape} for {hf_name}")
                    yield array
                    bar.update(1)

            total += write_safetensors(out_dir / file_name, [(hf, shape) for _, hf, shape in shard], values())
            weight_map.update({hf: file_name for _, hf, _ in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    del reader
    gc.collect()
    return out_dir


def _dequantize(tensor, processor) -> np.ndarray:
    """fp32 values of one GGUF tensor, as transformers' loader computes them (``dequantize`` then the processor)."""
    from gguf import dequantize

    data = tensor.data
    rows = data.shape[0] if data.ndim >= 2 else 0
    per_row = max(1, int(np.prod(tensor.shape, dtype=np.int64)) // max(rows, 1))
    step = max(1, _CHUNK_ELEMENTS // per_row)
    if rows > step:  # row-independent formats: chunking changes nothing but the size of the temporaries
        first = dequantize(data[:step], tensor.tensor_type)
        weights = np.empty((rows, *first.shape[1:]), dtype=first.dtype)
        weights[:step] = first
        del first
        for start in range(step, rows, step):
            weights[start:start + step] = dequantize(data[start:start + step], tensor.tensor_type)
    else:
        weights = dequantize(data, tensor.tensor_type)
    result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=None, parsed_parameters=None)
    if result.name != tensor.name:
        raise ModelFetchError(f"tensor {tensor.name}: this architecture's GGUF tensors need a conversion specdec "
                              "does not stream (merged or split tensors)")
    return np.ascontiguousarray(result.weights, dtype=np.float32)


def _saved_keys(model) -> set[str]:
    """The keys ``save_pretrained`` writes: the state dict less the keys it ignores on save and tied copies."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    return set(remove_tied_weights_from_state_dict(state, model))


def write_safetensors(path: Path, entries: list[tuple[str, tuple[int, ...]]], arrays) -> int:
    """Stream fp32 ``arrays`` (an iterable, in ``entries`` order) into the safetensors file ``path``; the header is
    written first from ``entries`` ((name, shape) pairs). Returns the number of data bytes."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        nbytes = 4 * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        written = 0
        for (name, shape), array in zip(entries, arrays):
            buf = memoryview(np.ascontiguousarray(array, dtype=np.float32)).cast("B")
            if buf.nbytes != 4 * int(np.prod(shape, dtype=np.int64)):
                raise ModelFetchError(f"{name}: {buf.nbytes} bytes for shape {shape}")
            f.write(buf)
            written += buf.nbytes
            del buf, array
        f.flush()
        os.fsync(f.fileno())
    if written != offset:
        raise ModelFetchError(f"{path.name}: wrote {written} of {offset} bytes")
    return offset
