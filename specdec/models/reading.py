"""Make transformers read safetensors files instead of memory-mapping them while a model loads.

transformers maps every shard for the whole load, and each mapped page it touches counts in the process's resident
memory: loading the 1.5B fp32 checkpoint in bf16 peaked at 10.7 GB that way, 3.9 GB with reads (same bytes).
safetensors offers a ``pread`` backend; transformers does not expose the choice, so :func:`reads_not_maps` swaps
the ``safe_open`` that ``transformers.modeling_utils`` calls for the duration of a ``with`` block, and does nothing
where the installed versions do not fit (an unknown ``safe_open`` there, or no ``pread`` backend).
"""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def reads_not_maps():
    """Make transformers open safetensors files with safetensors' ``pread`` backend while this block runs (a no-op
    where the installed safetensors or transformers does not offer it)."""
    try:
        import transformers.modeling_utils as modeling_utils
        from safetensors import safe_open
    except ImportError:  # pragma: no cover
        yield
        return
    original = getattr(modeling_utils, "safe_open", None)
    if original is not safe_open or not _pread_supported():
        yield
        return

    def pread_open(filename, framework, device="cpu", **kwargs):
        if str(device) == "cpu" and kwargs.get("backend", "mmap") == "mmap":
            kwargs["backend"] = "pread"
        return original(filename, framework=framework, device=device, **kwargs)

    modeling_utils.safe_open = pread_open
    async_load = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"  # one fp32 tensor read at a time, not four (the 0.5B: -1 GB peak)
    try:
        yield
    finally:
        modeling_utils.safe_open = original
        if async_load is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = async_load


_PREAD: list[bool] = []


def _pread_supported() -> bool:
    if not _PREAD:
        import tempfile

        import torch
        from safetensors import safe_open
        from safetensors.torch import save_file

        ok = False
        with contextlib.suppress(Exception), tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/probe.safetensors"
            save_file({"x": torch.arange(4, dtype=torch.float32)}, path)
            with safe_open(path, framework="pt", device="cpu", backend="pread") as f:
                ok = torch.equal(f.get_slice("x")[...], torch.arange(4, dtype=torch.float32))
        _PREAD.append(ok)
    return _PREAD[0]
