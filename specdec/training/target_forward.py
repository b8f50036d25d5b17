"""What the target computes for the training data: batched greedy answers and, per token, its last-layer hidden
state and top-k next-token probabilities.

One module so that the two ways of getting features agree: captured while generating (the decode steps compute
the hidden states anyway) or recomputed with one forward per batch over finished sequences. Both run the
decoder (``model.base_model``) and apply the output embedding ourselves, so a forward never materialises
[B, T, V] logits (151,936 columns for the Qwen target): the top-k is taken in slices of positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.runner import cache_argument, text_config

LOGIT_SLICE = 64  # positions per lm-head slice: 64 x 151,936 fp32 logits = 39 MB


@dataclass(frozen=True)
class SequenceFeatures:
    """Everything the trainer needs about one token sequence (prompt + answer), position by position."""

    tokens: torch.Tensor  # [T] int64: prompt then answer ids
    hidden: torch.Tensor  # [T, d] bf16: target's last-layer state (after the final norm) after reading tokens[t]
    top_ids: torch.Tensor  # [T, k] int64: the target's k most likely next tokens after tokens[t], best first
    top_probs: torch.Tensor  # [T, k] float32: their probabilities (softmax over the whole vocabulary)
    prompt_len: int  # tokens of the prompt; the answer starts at this index


@dataclass(frozen=True)
class Generation:
    prompt_ids: list[int]  # the encoded prompt
    answer_ids: list[int]  # greedy answer, up to and including the first EOS
    features: SequenceFeatures | None  # captured on the way (capture=True), else None


def eos_ids_of(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


def _logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits [..., V] of the output embedding over ``hidden`` [..., d] (Gemma's soft-capping included)."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(text_config(model), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def top_k_next(model, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs [N, k] float32, ids [N, k] int64) of the target's next-token distribution for ``hidden`` [N, d]."""
    probs, ids = [], []
    for start in range(0, hidden.shape[0], LOGIT_SLICE):
        p = torch.softmax(_logits(model, hidden[start:start + LOGIT_SLICE]), dim=-1)
        top = p.topk(k, dim=-1)
        probs.append(top.values)
        ids.append(top.indices)
    return torch.cat(probs), torch.cat(ids)


def _decoder_forward(model, ids, mask, positions, cache=None):
    decoder = model.base_model
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "use_cache": cache is not None}
    if cache is not None:
        kwargs[cache_argument(decoder)] = cache
    return decoder(**kwargs).last_hidden_state  # [B, n, d], after the final norm


@torch.inference_mode()
def greedy_generate(model, prompts: list[list[int]], max_new_tokens: int, pad_id: int, capture: bool = False,
                    top_k: int = 8) -> list[Generation]:
    """Greedy answers of ``model`` to a batch of encoded prompts (left-padded, one KV cache), each stopped at its
    first EOS or after ``max_new_tokens``; with ``capture`` also each sequence's features.

    Captured features cover prompt + answer except the last answer token when it is not an EOS (its state would
    need one more forward); they match a fresh forward up to the rounding of batched, cached arithmetic.
    """
    from transformers import DynamicCache

    assert prompts and all(prompts), "every prompt needs at least one token"
    device = model.get_input_embeddings().weight.device
    eos = eos_ids_of(model)
    b, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    answers: list[list[int]] = [[] for _ in range(b)]
    states: list[list[torch.Tensor]] = [[] for _ in range(b)]  # per row: [n, d] slices of fed tokens' states
    done = torch.zeros(b, dtype=torch.bool, device=device)
    hidden = _decoder_forward(model, ids, mask, positions, cache)
    if capture:
        for i, p in enumerate(prompts):
            states[i].append(hidden[i, width - len(p):].to(torch.bfloat16).cpu())
    for step in range(max_new_tokens):
        nxt = _logits(model, hidden[:, -1]).argmax(-1)  # [B]
        for i in range(b):
            if not done[i]:
                answers[i].append(int(nxt[i]))
                done[i] = int(nxt[i]) in eos
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        fed = torch.where(done, torch.full_like(nxt, pad_id), nxt)[:, None]
        alive = (~done).long()[:, None]
        mask = torch.cat([mask, alive], dim=1)  # a finished row's new slots are masked out
        positions = positions[:, -1:] + 1
        hidden = _decoder_forward(model, fed, mask, positions, cache)
        if capture:
            for i in range(b):
                if alive[i, 0]:
                    states[i].append(hidden[i].to(torch.bfloat16).cpu())
    out = []
    for i, p in enumerate(prompts):
        features = None
        if capture:
            h = torch.cat(states[i])  # states of prompt + every answer token fed back
            tokens = torch.tensor(p + answers[i])[: h.shape[0]]
            probs, top = top_k_next(model, h.to(model.dtype).to(device), top_k)
            features = SequenceFeatures(tokens, h, top.cpu(), probs.cpu(), len(p))
        out.append(Generation(p, answers[i], features))
    return out


@torch.inference_mode()
def forward_features(model, sequences: list[tuple[list[int], int]], top_k: int = 8) -> list[SequenceFeatures]:
    """Features of finished sequences (``(token ids, prompt length)``), one right-padded forward for the batch."""
    device = model.get_input_embeddings().weight.device
    width = max(len(s) for s, _ in sequences)
    ids = torch.zeros((len(sequences), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (s, _) in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    positions = torch.arange(width)[None].expand_as(ids)
    hidden = _decoder_forward(model, ids.to(device), mask.to(device), positions.to(device))
    out = []
    for i, (s, prompt_len) in enumerate(sequences):
        h = hidden[i, : len(s)]
        probs, top = top_k_next(model, h, top_k)
        out.append(SequenceFeatures(torch.tensor(s), h.to(torch.bfloat16).cpu(), top.cpu(), probs.cpu(), prompt_len))
    return out
