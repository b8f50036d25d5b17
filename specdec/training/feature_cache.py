"""The on-disk cache of target features that all head kinds train from.

Layout of a cache folder::

    manifest.json            {"format": 1, "top_k": 8, "hidden_size": d, "target": {...}, "chunks": {...}}
    chunk-00000.safetensors  one chunk: up to ``chunk_size`` sequences, concatenated along the token axis

A chunk file holds ``tokens`` [N] int64, ``hidden`` [N, d] bf16, ``top_ids`` [N, k] int64, ``top_probs`` [N, k]
fp16, ``offsets`` [S + 1] int64 (sequence s is rows offsets[s]:offsets[s+1]) and ``prompt_lens`` [S] int64. A chunk
is written to a temporary file and renamed into place, then recorded in the manifest (also replaced atomically),
so a killed run leaves either a finished chunk or no chunk; a chunk file the manifest does not list is redone.
The manifest records each chunk's sequence ids, so a chunk is only reused for the same sequences.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from specdec.errors import InvalidInputError
from specdec.files import write_atomic, write_json_atomic
from specdec.training.target_forward import SequenceFeatures

FORMAT = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class CachedSequence:
    """One training sequence as read back from the cache (the features plus the id it was stored under)."""

    id: str  # the prompt id (answers.jsonl), used for the held-out split
    features: SequenceFeatures


class FeatureCache:
    """A folder of feature chunks. ``FeatureCache(folder, top_k, hidden_size, target=fingerprint)`` creates or
    opens one; opening a cache that was built for another target, hidden size or k is an error."""

    def __init__(self, folder: "str | os.PathLike", top_k: int, hidden_size: int, target: dict | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.top_k, self.hidden_size, self.target = int(top_k), int(hidden_size), dict(target or {})
        path = self.folder / MANIFEST
        if path.is_file():
            self.manifest = json.loads(path.read_text())
            have = (self.manifest.get("format"), self.manifest.get("top_k"), self.manifest.get("hidden_size"),
                    self.manifest.get("target"))
            want = (FORMAT, self.top_k, self.hidden_size, self.target)
            if have != want:
                raise InvalidInputError(f"the feature cache {self.folder} was built for (format, top_k, hidden size, "
                                        f"target) {have}, not {want}; use another --output folder or delete "
                                        f"{self.folder} to rebuild it")
        else:
            self.manifest = {"format": FORMAT, "top_k": self.top_k, "hidden_size": self.hidden_size,
                             "target": self.target, "chunks": {}}

    @staticmethod
    def chunk_name(index: int) -> str:
        return f"chunk-{index:05d}"

    def is_done(self, index: int, ids: list[str]) -> bool:
        entry = self.manifest["chunks"].get(self.chunk_name(index))
        return bool(entry) and entry["ids"] == list(ids) and (self.folder / entry["file"]).is_file()

    def write_chunk(self, index: int, ids: list[str], features: list[SequenceFeatures]) -> None:
        """Store one chunk atomically and record it in the manifest."""
        from safetensors.torch import save_file

        assert len(ids) == len(features) and features, "one feature record per id"
        lengths = torch.tensor([f.tokens.numel() for f in features])
        tensors = {
            "tokens": torch.cat([f.tokens.long() for f in features]),
            "hidden": torch.cat([f.hidden.to(torch.bfloat16) for f in features]),
            "top_ids": torch.cat([f.top_ids.long() for f in features]),
            "top_probs": torch.cat([f.top_probs.to(torch.float16) for f in features]),
            "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
            "prompt_lens": torch.tensor([f.prompt_len for f in features]),
        }
        assert tensors["hidden"].shape[1] == self.hidden_size and tensors["top_ids"].shape[1] == self.top_k
        name = self.chunk_name(index)
        write_atomic(self.folder / f"{name}.safetensors",
                     lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))
        self.manifest["chunks"][name] = {"file": f"{name}.safetensors", "ids": list(ids),
                                         "tokens": int(lengths.sum())}
        write_json_atomic(self.folder / MANIFEST, self.manifest)

    def read(self) -> list[CachedSequence]:
        """Every finished chunk's sequences, in chunk order."""
        from safetensors.torch import load

        out = []
        for name in sorted(self.manifest["chunks"]):
            entry = self.manifest["chunks"][name]
            t = load((self.folder / entry["file"]).read_bytes())  # read, not mapped: a rewritten chunk cannot pull
            #                                                         pages from under the tensors
            off = t["offsets"].tolist()
            for s, seq_id in enumerate(entry["ids"]):
                a, b = off[s], off[s + 1]
                out.append(CachedSequence(seq_id, SequenceFeatures(
                    t["tokens"][a:b], t["hidden"][a:b], t["top_ids"][a:b], t["top_probs"][a:b].float(),
                    int(t["prompt_lens"][s]))))
        return out

    @property
    def num_tokens(self) -> int:
        return sum(e["tokens"] for e in self.manifest["chunks"].values())
