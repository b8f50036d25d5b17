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


def _top_k_of_logits(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs [N, k], ids [N, k]) of softmax(``logits`` [N, V]) without materialising the softmax."""
    top = logits.topk(k, dim=-1)
    return torch.exp(top.values - torch.logsumexp(logits, dim=-1, keepdim=True)), top.indices


@torch.inference_mode()
def greedy_generate(model, prompts: list[list[int]], max_new_tokens: int, pad_id: int, capture: bool = False,
                    top_k: int = 8) -> list[Generation]:
    """Greedy answers of ``model`` to a batch of encoded prompts (left-padded, one KV cache), each stopped at its
    first EOS or after ``max_new_tokens``; with ``capture`` also each sequence's features.

    Captured features cover the prompt and every answer token but the last (which is never fed back: it is the
    label of the last position). The top-k of an answer position comes from the logits the decode step computes
    anyway to pick the next token; only the prompt positions need an extra pass of the output embedding. They match
    a fresh forward up to the rounding of batched, cached arithmetic. The loop holds no per-row Python work: the
    answers and states are cut per row once, at the end.
    """
    from transformers import DynamicCache

    assert prompts and all(prompts), "every prompt needs at least one token"
    device = model.get_input_embeddings().weight.device
    eos = torch.tensor(sorted(eos_ids_of(model)), dtype=torch.long, device=device)
    b, width = len(prompts), max(len(p) for p in prompts)
    lengths = torch.tensor([len(p) for p in prompts])
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width + max_new_tokens), dtype=torch.long)  # grows into its preallocated columns
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):width] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    tokens = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    steps_done = torch.full((b,), max_new_tokens, dtype=torch.long)  # answer length per row (EOS included)
    fed_states, step_probs, step_ids = [], [], []  # per decode step: [B, d], [B, k], [B, k]
    hidden = _decoder_forward(model, ids, mask[:, :width], positions, cache)
    prompt_hidden = hidden
    step = 0
    for step in range(max_new_tokens):
        logits = _logits(model, hidden[:, -1])  # [B, V]
        nxt = logits.argmax(-1)
        if capture:
            probs, top = _top_k_of_logits(logits, top_k)
            step_probs.append(probs)
            step_ids.append(top)
        tokens[:, step] = torch.where(done, pad_id, nxt)
        ended = ~done & torch.isin(nxt, eos)
        steps_done[ended.cpu()] = step + 1
        done |= ended
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask[:, width + step] = (~done).long()  # a finished row's new slots are masked out
        positions = positions[:, -1:] + 1
        hidden = _decoder_forward(model, torch.where(done, pad_id, nxt)[:, None], mask[:, :width + step + 1],
                                  positions, cache)
        if capture:
            fed_states.append(hidden[:, -1].to(torch.bfloat16).cpu())
    tokens = tokens.cpu()
    answers = [tokens[i, : min(int(steps_done[i]), step + 1)].tolist() for i in range(b)]
    if not capture:
        return [Generation(p, a, None) for p, a in zip(prompts, answers)]
    # Prompt positions but the last (its next-token distribution is the first decode step's): one batched pass.
    rows = [prompt_hidden[i, width - len(p): width - 1] for i, p in enumerate(prompts)]
    p_probs, p_ids = top_k_next(model, torch.cat(rows), top_k) if sum(len(p) - 1 for p in prompts) else \
        (torch.zeros(0, top_k), torch.zeros(0, top_k, dtype=torch.long))
    p_probs, p_ids = p_probs.cpu().split((lengths - 1).tolist()), p_ids.cpu().split((lengths - 1).tolist())
    decode_probs = torch.stack(step_probs, 1).cpu()  # [B, S, k]: after the last prompt token, then each fed token
    decode_ids = torch.stack(step_ids, 1).cpu()
    states = torch.stack(fed_states, 1) if fed_states else torch.zeros(b, 0, hidden.shape[-1], dtype=torch.bfloat16)
    out = []
    for i, p in enumerate(prompts):
        n = len(answers[i]) - 1  # answer tokens fed back
        h = torch.cat([prompt_hidden[i, width - len(p):].to(torch.bfloat16).cpu(), states[i, :n]])
        features = SequenceFeatures(torch.tensor(p + answers[i][:n]), h,
                                    torch.cat([p_ids[i], decode_ids[i, : n + 1]]),
                                    torch.cat([p_probs[i], decode_probs[i, : n + 1]]), len(p))
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
