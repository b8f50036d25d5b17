"""The target's own greedy answers to the training prompts, with the features the heads train on.

Prompts are processed in fixed chunks (``chunk_size`` prompts, the feature cache's unit of work). For each chunk
not yet in the cache: prompts that already have an answer in ``answers.jsonl`` get their features from one
forward over prompt + answer; the rest are answered in left-padded batches, capturing the features on the way
(the decode steps compute the hidden states anyway; measured cheaper than a second forward, see docs/training.md).
Either way a sequence is the prompt plus every answer token but the last, which is never fed back (it is the
label of the last position). The new answers (prompt, answer text and token ids) are appended to
``answers.jsonl``, then the chunk is written to the cache, so the data can be rebuilt and inspected without the
cache.
"""

from __future__ import annotations

import time
from pathlib import Path

from specdec.training.feature_cache import FeatureCache
from specdec.training.instructions import TrainingPrompt, _pad_id, encode_text
from specdec.training.jsonl import append_rows, read_rows
from specdec.training.target_forward import SequenceFeatures, forward_features, greedy_generate


def _truncate(f: SequenceFeatures, max_len: int) -> SequenceFeatures:
    if f.tokens.numel() <= max_len:
        return f
    return SequenceFeatures(f.tokens[:max_len], f.hidden[:max_len], f.top_ids[:max_len], f.top_probs[:max_len],
                            min(f.prompt_len, max_len))


def answer_and_extract(target, tokenizer, prompts: list[TrainingPrompt], answers_path: "str | Path",
                       cache: FeatureCache, chunk_size: int, batch_size: int, max_new_tokens: int,
                       max_seq_len: int, top_k: int, capture: bool = True, chat: bool = True,
                       progress: bool = True, deadline: float | None = None) -> int:
    """Fill ``cache`` with one chunk per ``chunk_size`` prompts (finished chunks are skipped); return the number of
    finished chunks. Stops between chunks once ``time.monotonic()`` passes ``deadline``."""
    from tqdm.auto import tqdm

    answered = {row["id"]: row for row in read_rows(answers_path)}  # a duplicated id (redone chunk): last wins
    pad = _pad_id(tokenizer)
    chunks = [prompts[i:i + chunk_size] for i in range(0, len(prompts), chunk_size)]
    finished = 0
    with tqdm(total=len(prompts), desc="answers + features", unit="prompt", disable=not progress) as bar:
        for index, chunk in enumerate(chunks):
            ids = [p.id for p in chunk]
            if cache.is_done(index, ids):
                finished += 1
                bar.update(len(chunk))
                continue
            if deadline is not None and time.monotonic() > deadline:
                break
            encoded = {p.id: encode_text(tokenizer, p.text, chat)[: max_seq_len // 2] for p in chunk}
            features: dict[str, SequenceFeatures] = {}
            new_rows = []
            known = [p for p in chunk if p.id in answered]
            for start in range(0, len(known), batch_size):  # answered before (a chunk killed while writing)
                batch = known[start:start + batch_size]
                seqs = [((encoded[p.id] + answered[p.id]["answer_ids"][:-1])[:max_seq_len], len(encoded[p.id]))
                        for p in batch]
                for p, f in zip(batch, forward_features(target, seqs, top_k)):
                    features[p.id] = f
            todo = [p for p in chunk if p.id not in answered]
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                gens = greedy_generate(target, [encoded[p.id] for p in batch], max_new_tokens, pad,
                                       capture=capture, top_k=top_k)
                if not capture:
                    seqs = [((g.prompt_ids + g.answer_ids[:-1])[:max_seq_len], len(g.prompt_ids)) for g in gens]
                    gens = [type(g)(g.prompt_ids, g.answer_ids, f)
                            for g, f in zip(gens, forward_features(target, seqs, top_k))]
                for p, g in zip(batch, gens):
                    features[p.id] = g.features
                    new_rows.append({"id": p.id, "task": p.task, "prompt": p.text, "answer_ids": g.answer_ids,
                                     "answer": tokenizer.decode(g.answer_ids, skip_special_tokens=True)})
                bar.update(len(batch))
            bar.update(len(known))
            append_rows(answers_path, new_rows)  # first: a chunk killed before it is written is redone by a forward
            cache.write_chunk(index, ids, [_truncate(features[i], max_seq_len) for i in ids])
            answered.update({r["id"]: r for r in new_rows})
            finished += 1
    return finished
