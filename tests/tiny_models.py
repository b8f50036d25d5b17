"""Tiny randomly initialised Llama, Qwen2 and Gemma 3 models (fixed seeds) for tests that need no real weights."""

from __future__ import annotations

import functools

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

VOCAB = 96
ARCHS = ("llama", "qwen2", "gemma3")
GEMMA_WINDOW = 6  # shorter than prompt + draft, so the sliding mask matters


def _common(vocab_size: int, **extra):
    return dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=1,
                pad_token_id=2, **extra)


CONFIGS = {
    "llama": lambda vocab, layers=2: LlamaConfig(num_hidden_layers=layers, **_common(vocab)),
    "qwen2": lambda vocab, layers=2: Qwen2Config(num_hidden_layers=layers, **_common(vocab)),
    "gemma3": lambda vocab: Gemma3TextConfig(num_hidden_layers=3, head_dim=16, sliding_window=GEMMA_WINDOW,
                                             layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                             query_pre_attn_scalar=16, **_common(vocab)),
}


@functools.lru_cache(maxsize=None)
def tiny_model(arch: str, seed: int = 0, vocab_size: int = VOCAB, layers: int | None = None) -> torch.nn.Module:
    """``layers``: a deeper llama/qwen2 (layer-skipping drafters need layers to skip); default 2."""
    torch.manual_seed(seed)
    config = CONFIGS[arch](vocab_size) if layers is None else CONFIGS[arch](vocab_size, layers)
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


def tiny_prompt(seed: int = 0, length: int = 12) -> torch.Tensor:
    """LongTensor [1, length] of random ids in [3, VOCAB) (no bos/eos/pad)."""
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=None)
def word_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer for the tiny vocabulary: token i is the word "t<i>", decoded texts join words with spaces.

    One extra token, "abcdef", is not a model token: HF's StopStringCriteria probes every tokenizer with that literal
    string and needs it to survive a round trip.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t2"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t2", pad_token="t2")
    tokenizer.add_tokens(["abcdef"])
    return tokenizer
