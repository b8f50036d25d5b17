"""ADED's adaptive tri-gram matrix: (a, b) -> the most frequent successors c with normalised scores.

ADED (Liu, Lei, Zhang, Xu; AAAI 2025; arXiv 2407.12021) represents the LLM by a tri-gram table counted on a corpus
tokenised with the target's tokenizer (counts normalised per bigram context, each context pruned to its top-12
successors on load) and adapts it online: at every drafting step each tri-gram among the last 16 tokens of the
sequence gains +0.04, capped at 3.0, without renormalising, so recent context n-grams outrank the corpus.

Storage. ``TrigramTable`` is an immutable packed (CSR) layout: sorted context keys ``a << 32 | b``, row offsets,
successor ids and scores, each row sorted by score (ties by token id). A lookup is one ``np.searchsorted`` and two
slices; a 60M-token corpus stays a few hundred MB of flat arrays instead of a dict of dicts.
``AdaptiveTrigrams`` layers the online boosts over a shared table: a boosted context's row is copied into a small
overlay dict, so several drafters can share one loaded table and forgetting the adaptation is clearing a dict.

Where we differ from the reference (PyPI ``draftretriever`` 0.1.1, src/lib.rs): the table is a CSR array set saved
with ``np.savez`` (the reference serialises a Rust HashMap with bincode); rows are pruned when the table is built as
well as when it is loaded (``top``); ties among successors are broken by token id instead of hash order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from specdec.errors import IncompatibleModelsError, InvalidInputError

FORMAT = "specdec-trigrams/1"  # stored in every file; load() refuses anything else
DEFAULT_TOP = 12  # successors kept per context (the reference's Reader keeps 12)
_COMPACT_AT = 1 << 23  # pending tri-grams (~130 MB of int64 pairs) before the counter folds them into its counts
_ARRAYS = {"keys": np.int64, "offsets": np.int64, "tokens": np.int64, "scores": np.float32}


def context_key(a: int, b: int) -> int:
    """The int64 key of the bigram context (a, b); token ids are < 2**31."""
    return (a << 32) | b


@dataclass(frozen=True, eq=False)
class TrigramTable:
    """Successors of each bigram context, best first.

    keys:    int64 [C]     sorted context keys ``a << 32 | b``
    offsets: int64 [C+1]   row c holds entries offsets[c]:offsets[c+1]
    tokens:  int64 [E]     successor ids, each row sorted by score, descending
    scores:  float32 [E]   count of (a, b, c) / count of (a, b, *) in the corpus
    vocab_size: size of the tokenizer's vocabulary the table was built with (0: unknown)
    """

    keys: np.ndarray
    offsets: np.ndarray
    tokens: np.ndarray
    scores: np.ndarray
    vocab_size: int = 0

    # ------------------------------------------------------------------ construction
    @staticmethod
    def empty(vocab_size: int = 0) -> "TrigramTable":
        z = np.zeros(0, dtype=np.int64)
        return TrigramTable(z, np.zeros(1, dtype=np.int64), z.copy(), np.zeros(0, dtype=np.float32), vocab_size)

    @staticmethod
    def from_sequences(sequences: Iterable[Sequence[int]], top: int = DEFAULT_TOP,
                       vocab_size: int = 0) -> "TrigramTable":
        """Count the tri-grams of each token sequence (none across sequences) and keep the ``top`` per context."""
        counter = TrigramCounter()
        for seq in sequences:
            counter.add(seq)
        return counter.table(top, vocab_size)

    # ------------------------------------------------------------------ queries
    @property
    def num_contexts(self) -> int:
        return int(self.keys.size)

    @property
    def num_entries(self) -> int:
        return int(self.tokens.size)

    @property
    def max_token_id(self) -> int:
        """Largest token id anywhere in the table (contexts and successors); -1 for an empty table."""
        if not self.keys.size:
            return -1
        return int(max(self.tokens.max(), (self.keys >> 32).max(), (self.keys & 0xFFFFFFFF).max()))

    def row(self, key: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(tokens int64 [m], scores float32 [m]) of the context ``key`` (see :func:`context_key`), or None."""
        i = int(np.searchsorted(self.keys, key))
        if i == self.keys.size or self.keys[i] != key:
            return None
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.tokens[lo:hi], self.scores[lo:hi]

    def prune(self, top: int) -> "TrigramTable":
        """The table with at most ``top`` successors per context (rows are sorted, so the best ``top``)."""
        _check_top(top)
        lengths = np.diff(self.offsets)  # [C]
        if not lengths.size or lengths.max() <= top:
            return self
        rank = np.arange(self.tokens.size) - np.repeat(self.offsets[:-1], lengths)  # [E] position in its row
        keep = rank < top
        offsets = np.concatenate([[0], np.cumsum(np.minimum(lengths, top))]).astype(np.int64)
        return TrigramTable(self.keys, offsets, self.tokens[keep], self.scores[keep], self.vocab_size)

    def check_vocabulary(self, vocab_size: int, source: str = "the trigram table") -> None:
        """Refuse a table built for another tokenizer: ids at or past the target's ``vocab_size``.

        The tokenizer size recorded in ``self.vocab_size`` is not compared: tokenizers and embedding matrices often
        differ in size (Qwen2.5: 151,665 tokens, 151,936 rows; added tokens), so only the ids decide."""
        if self.max_token_id >= vocab_size:
            raise IncompatibleModelsError(
                f"{source} holds token id {self.max_token_id}, but the target's vocabulary has {vocab_size} tokens: "
                f"it was built with another tokenizer; rebuild it with `specdec trigrams --tokenizer <target>`")

    # ------------------------------------------------------------------ files
    def save(self, path: "str | os.PathLike") -> Path:
        """Write an uncompressed ``.npz``; returns the path written (numpy appends ``.npz`` when ``path`` lacks it)."""
        path = Path(path)
        np.savez(path, format=np.array(FORMAT), vocab_size=np.array(self.vocab_size, dtype=np.int64),
                 keys=self.keys, offsets=self.offsets, tokens=self.tokens, scores=self.scores)
        return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")

    @staticmethod
    def load(path: "str | os.PathLike", top: int = DEFAULT_TOP) -> "TrigramTable":
        """Read a table written by :meth:`save`, pruned to ``top`` successors per context.

        Raises InvalidInputError naming ``path`` when the file is missing, unreadable or not a consistent table.
        """
        _check_top(top)
        path = Path(path).expanduser()
        if not path.is_file():
            raise InvalidInputError(f"trigram table {path}: no such file")
        try:
            with np.load(path, allow_pickle=False) as data:
                fmt = str(data["format"]) if "format" in data.files else None
                if fmt != FORMAT:
                    raise InvalidInputError(f"trigram table {path}: not a specdec trigram table "
                                            f"(format {fmt!r}, expected {FORMAT!r})")
                missing = [k for k in (*_ARRAYS, "vocab_size") if k not in data.files]
                if missing:
                    raise InvalidInputError(f"trigram table {path}: missing arrays {', '.join(missing)}")
                arrays = {k: data[k] for k in _ARRAYS}
                vocab_size = int(data["vocab_size"])
        except InvalidInputError:
            raise
        except Exception as exc:  # zip/npy errors come in many types; all mean the same thing here
            raise InvalidInputError(f"trigram table {path}: unreadable ({type(exc).__name__}: {exc})") from exc
        problem = _inconsistency(arrays)
        if problem:
            raise InvalidInputError(f"trigram table {path}: corrupt ({problem})")
        return TrigramTable(vocab_size=vocab_size, **arrays).prune(top)


def _check_top(top: int) -> None:
    if not isinstance(top, int) or isinstance(top, bool) or top < 1:
        raise InvalidInputError(f"top (successors kept per context) must be an integer >= 1, got {top!r}")


def _inconsistency(a: dict[str, np.ndarray]) -> str | None:
    """What is wrong with the arrays of a table, or None."""
    for name, dtype in _ARRAYS.items():
        if a[name].dtype != dtype or a[name].ndim != 1:
            return f"{name} must be a 1-D {np.dtype(dtype).name} array, got {a[name].ndim}-D {a[name].dtype}"
    keys, offsets, tokens, scores = a["keys"], a["offsets"], a["tokens"], a["scores"]
    if offsets.size != keys.size + 1 or offsets[0] != 0 or offsets[-1] != tokens.size:
        return "offsets do not match keys and tokens"
    if tokens.size != scores.size:
        return "tokens and scores differ in length"
    if np.any(np.diff(keys) <= 0) or np.any(np.diff(offsets) <= 0):
        return "keys not strictly increasing or an empty row"
    if keys.size and (keys.min() < 0 or tokens.min() < 0 or tokens.max() >= 1 << 31):
        return "negative or out-of-range token ids"
    if not np.all(np.isfinite(scores)) or np.any(scores < 0):
        return "scores must be finite and >= 0"
    return None


# ---------------------------------------------------------------------------------------------- counting
class TrigramCounter:
    """Counts tri-grams of token sequences in numpy, folding pending ones into sorted unique counts as it goes."""

    def __init__(self) -> None:
        z = np.zeros(0, dtype=np.int64)
        self._ctx, self._next, self._count = z, z.copy(), z.copy()  # unique (context key, successor) counts
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_size = 0
        self.num_tokens = 0

    def add(self, sequence: Sequence[int]) -> None:
        t = np.asarray(sequence, dtype=np.int64).reshape(-1)  # [L]
        self.num_tokens += int(t.size)
        if t.size < 3:
            return
        if t.min() < 0 or t.max() >= 1 << 31:
            raise InvalidInputError("token ids must lie in [0, 2**31)")
        self._pending.append(((t[:-2] << 32) | t[1:-1], t[2:]))  # [L-2] context keys and successors
        self._pending_size += t.size - 2
        if self._pending_size >= _COMPACT_AT:
            self._compact()

    def _compact(self) -> None:
        if not self._pending:
            return
        ctx = np.concatenate([self._ctx, *(p[0] for p in self._pending)])
        nxt = np.concatenate([self._next, *(p[1] for p in self._pending)])
        cnt = np.concatenate([self._count, np.ones(self._pending_size, dtype=np.int64)])
        self._pending, self._pending_size = [], 0
        order = np.lexsort((nxt, ctx))
        ctx, nxt, cnt = ctx[order], nxt[order], cnt[order]
        if not ctx.size:
            return
        first = np.ones(ctx.size, dtype=bool)
        first[1:] = (ctx[1:] != ctx[:-1]) | (nxt[1:] != nxt[:-1])
        starts = np.flatnonzero(first)
        self._ctx, self._next, self._count = ctx[starts], nxt[starts], np.add.reduceat(cnt, starts)

    def table(self, top: int = DEFAULT_TOP, vocab_size: int = 0) -> TrigramTable:
        """Scores = counts normalised over ALL successors of a context; then the ``top`` best are kept."""
        _check_top(top)
        self._compact()
        ctx, nxt, cnt = self._ctx, self._next, self._count  # [U] sorted by (ctx, nxt)
        if not ctx.size:
            return TrigramTable.empty(vocab_size)
        new_row = np.ones(ctx.size, dtype=bool)
        new_row[1:] = ctx[1:] != ctx[:-1]
        row_start = np.flatnonzero(new_row)  # [C]
        row = np.cumsum(new_row) - 1  # [U] row of each entry
        totals = np.add.reduceat(cnt, row_start)  # [C]
        order = np.lexsort((nxt, -cnt, row))  # rows stay contiguous; inside a row: count desc, token asc
        rank = np.arange(ctx.size) - row_start[row[order]]
        kept = order[rank < top]
        lengths = np.minimum(np.diff(np.append(row_start, ctx.size)), top)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        scores = (cnt[kept] / totals[row[kept]]).astype(np.float32)
        return TrigramTable(ctx[row_start], offsets, nxt[kept], scores, int(vocab_size))


def build_from_files(paths: Sequence["str | os.PathLike"], tokenizer, top: int = DEFAULT_TOP,
                     progress: bool = True, chunk_chars: int = 1 << 20) -> TrigramTable:
    """Tokenise text files with ``tokenizer`` (an HF tokenizer; no special tokens) and count their tri-grams.

    Each file is read as UTF-8 (undecodable bytes replaced) and cut at line ends into pieces of about
    ``chunk_chars`` characters, tokenised in one batch call per file; tri-grams across piece boundaries are lost.
    """
    from tqdm import tqdm

    counter = TrigramCounter()
    for path in tqdm(list(paths), desc="trigrams", unit="file", disable=not progress):
        try:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise InvalidInputError(f"cannot read corpus file {path}: {exc}") from exc
        pieces = _pieces(text, chunk_chars)
        if pieces:
            for ids in tokenizer(pieces, add_special_tokens=False)["input_ids"]:
                counter.add(ids)
    return counter.table(top, vocab_size=len(tokenizer))


def _pieces(text: str, size: int) -> list[str]:
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


# ---------------------------------------------------------------------------------------------- adaptation
class AdaptiveTrigrams:
    """A table plus the online boosts of one drafter: ``lookup`` sees the boosted rows, ``base`` is never written.

    Boosted rows live in ``overlay`` (context key -> (tokens int64 [m], scores float32 [m]), sorted by score) and may
    grow past ``top``: a successor seen in the context is added even when the corpus never had it.
    """

    def __init__(self, base: TrigramTable, boost: float = 0.04, cap: float = 3.0):
        self.base = base
        self.boost = np.float32(boost)
        self.cap = np.float32(cap)
        self.overlay: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def lookup(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Successors of (a, b), best first, or None."""
        key = (a << 32) | b
        row = self.overlay.get(key)
        return row if row is not None else self.base.row(key)

    def adapt(self, tokens: Sequence[int]) -> None:
        """Boost every tri-gram of ``tokens`` (a list of ids): score += boost, capped; missing entries created."""
        for a, b, c in zip(tokens, tokens[1:], tokens[2:]):
            key = (a << 32) | b
            row = self.overlay.get(key)
            if row is None:
                base = self.base.row(key)
                row = (base[0].copy(), base[1].copy()) if base is not None else \
                    (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))
            toks, scores = row
            hit = np.flatnonzero(toks == c)
            if hit.size:
                scores[hit[0]] = min(scores[hit[0]] + self.boost, self.cap)
            else:
                toks = np.append(toks, np.int64(c))
                scores = np.append(scores, min(self.boost, self.cap))
            order = np.argsort(-scores, kind="stable")  # keep the row best first
            self.overlay[key] = (toks[order], scores[order])

    def reset(self) -> None:
        """Forget every boost."""
        self.overlay.clear()
