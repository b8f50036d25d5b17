"""Keep an untied input-embedding table on disk, memory-mapped, instead of in memory.

A decoding step looks up a handful of embedding rows, so only those pages of the table ever need to be resident:
for Qwen2.5-Coder-1.5B in bf16 the table is 467 MB (151,936 x 1536), of which a generation touches a few MB.
:func:`map_input_embedding` writes the loaded table's bytes once to a file beside the cached model, checks the
file against the loaded table on every load (read in blocks, never mapped, so the check leaves nothing resident),
and swaps the parameter for a tensor mapped from that file (copy-on-write, never written back). Values, dtype and
shape are those of the loaded table, so outputs do not change.

Only for untied tables on the CPU: a tied table is also the LM head, whose every row each step reads anyway.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

_BLOCK_ROWS = 4096


def map_input_embedding(model: torch.nn.Module, folder: str | Path) -> bool:
    """Swap ``model``'s input-embedding weight for a memory-mapped copy kept in ``folder``; False when it does not
    apply (tied to the LM head, not on the CPU, or not a plain float tensor)."""
    embedding = model.get_input_embeddings()
    weight = getattr(embedding, "weight", None)
    head = model.get_output_embeddings()
    # a quantized head has no weight parameter (its .weight is a de-quantized copy, slow to make): never tied
    head_weight = None if head is None else head._parameters.get("weight")
    if (weight is None or weight.device.type != "cpu" or not weight.is_floating_point()
            or (head_weight is not None and head_weight.data_ptr() == weight.data_ptr())):
        return False
    table = weight.detach().contiguous()
    path = Path(folder) / f"input_embedding.{str(table.dtype).removeprefix('torch.')}.bin"
    if not _holds(path, table):
        _write(path, table)
    mapped = torch.from_file(str(path), shared=False, size=table.numel(), dtype=table.dtype).view(table.shape)
    embedding.weight = torch.nn.Parameter(mapped, requires_grad=weight.requires_grad)
    return True


def _holds(path: Path, table: torch.Tensor) -> bool:
    """Whether ``path`` holds exactly ``table``'s bytes (a damaged or stale file is rewritten, never trusted)."""
    row_bytes = table.shape[-1] * table.element_size()
    if not path.is_file() or path.stat().st_size != table.numel() * table.element_size():
        return False
    buffer = torch.empty((_BLOCK_ROWS, table.shape[-1]), dtype=table.dtype)
    with path.open("rb") as f:
        for start in range(0, table.shape[0], _BLOCK_ROWS):
            rows = table[start:start + _BLOCK_ROWS]
            view = buffer[:rows.shape[0]]
            if f.readinto(memoryview(view.view(torch.uint8).numpy()).cast("B")) != rows.shape[0] * row_bytes:
                return False
            if not torch.equal(view, rows):
                return False
    return True


def _write(path: Path, table: torch.Tensor) -> None:
    """Write ``table``'s bytes to ``path`` through a temporary file renamed into place when complete."""
    for stale in path.parent.glob(f"{path.name}.partial-*"):  # left by a killed run
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            for start in range(0, table.shape[0], _BLOCK_ROWS):
                f.write(memoryview(table[start:start + _BLOCK_ROWS].contiguous().view(torch.uint8).numpy()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
