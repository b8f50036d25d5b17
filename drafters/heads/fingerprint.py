"""target_fingerprint: which target model a set of draft heads belongs to.

Heads read the target's last hidden state and share its LM head, so they are only valid for the exact target
they were trained on. The fingerprint holds the architecture class, vocabulary, hidden size and layer count, and
a sha256 of a fixed sample of weights: 64 evenly strided LM-head rows (all columns) and the final norm. The
values are rounded to bf16 and hashed as fp32 bytes, so a bf16 load and an fp32 load of the same checkpoint give
the same hash (a bf16 checkpoint upcast to fp32 rounds back exactly; an fp32 checkpoint rounds to what a bf16 load
holds). An fp16 load may round differently and then does not match. Reading 64 rows costs microseconds.
"""

from __future__ import annotations

import hashlib

import torch

from specdec.runner import text_config

SAMPLED_ROWS = 64
FIELDS = ("architecture", "vocab_size", "hidden_size", "num_layers", "weight_sha256")


def final_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    """The decoder's final norm (``model.model.norm`` for Llama, Qwen2, Gemma 3), or None."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    return getattr(decoder, "norm", None)


def target_fingerprint(model: torch.nn.Module) -> dict:
    """JSON-able dict with the keys ``FIELDS``; equal for bf16 and fp32 loads of the same checkpoint."""
    head = model.get_output_embeddings().weight.detach()  # [V, d]
    config = text_config(model)
    vocab, hidden = head.shape
    step = max(1, vocab // SAMPLED_ROWS)
    rows = torch.arange(0, vocab, step)[:SAMPLED_ROWS]
    digest = hashlib.sha256()
    digest.update(_bytes(head[rows.to(head.device)]))
    norm = final_norm(model)
    if norm is not None and getattr(norm, "weight", None) is not None:
        digest.update(_bytes(norm.weight.detach()))
    return {"architecture": type(model).__name__, "vocab_size": int(vocab), "hidden_size": int(hidden),
            "num_layers": int(getattr(config, "num_hidden_layers", 0) or 0), "weight_sha256": digest.hexdigest()}


def _bytes(t: torch.Tensor) -> bytes:
    return t.to(torch.bfloat16).to("cpu", torch.float32).contiguous().numpy().tobytes()


def fingerprint_difference(expected: dict, actual: dict) -> str | None:
    """The first fingerprint field that differs, described; None when they match."""
    for key in FIELDS:
        if expected.get(key) != actual.get(key):
            return f"{key}: heads were built for {expected.get(key)!r}, this target has {actual.get(key)!r}"
    return None
