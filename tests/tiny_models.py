"""Tiny randomly initialised Llama, Qwen2 and Gemma 3 models (fixed seeds) for tests that need no real weights."""

from __future__ import annotations

import functools

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config

VOCAB = 96
GEMMA_WINDOW = 6  # shorter than prompt + draft, so the sliding mask matters


def _common(**extra):
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=1,
                pad_token_id=2, **extra)


CONFIGS = {
    "llama": lambda: LlamaConfig(num_hidden_layers=2, **_common()),
    "qwen2": lambda: Qwen2Config(num_hidden_layers=2, **_common()),
    "gemma3": lambda: Gemma3TextConfig(num_hidden_layers=3, head_dim=16, sliding_window=GEMMA_WINDOW,
                                       layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                       query_pre_attn_scalar=16, **_common()),
}


@functools.lru_cache(maxsize=None)
def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Sharpen the random model's distributions so greedy outputs are not numerical near-ties.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0) if not config.tie_word_embeddings else None
    model.generation_config.pad_token_id = 2
    return model.eval()


def greedy_reference(model, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """The target's own greedy output (the exactness reference)."""
    return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                          do_sample=False, eos_token_id=None, pad_token_id=2)
