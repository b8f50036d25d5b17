"""HeadsConfig: what a set of trained draft heads is (kind, sizes, target, recipe), stored as ``heads.json``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from specdec.errors import HeadsConfigError

KINDS = ("medusa", "hydra", "clover", "chimera", "deer")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class HeadsConfig:
    kind: str  # one of KINDS
    num_heads: int  # K: draft depth; head k predicts the token k + 2 after the hidden state's position (deer: the
    #                 block's slots, slot k predicting the same token)
    hidden_size: int  # d of the target's last hidden state
    vocab_size: int  # V: the target's LM-head rows
    draft_vocab_size: int | None = None  # N rows the heads predict over (FR-Spec); None: the full vocabulary
    sizes: dict = field(default_factory=dict)  # kind-specific dims (medusa: num_layers; hydra: rank; clover, chimera,
    #                                             deer: see their DEFAULTS); missing keys take the defaults
    target: dict = field(default_factory=dict)  # target_fingerprint() of the model the heads were built for
    recipe: dict = field(default_factory=dict)  # free-form JSON: training data and hyper-parameters
    accuracies: list | None = None  # accuracies[k][i]: held-out P(head k's i-th ranked token is the target's), i < 10

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise HeadsConfigError(f"heads kind must be one of {', '.join(map(repr, KINDS))}, got {self.kind!r}")
        for name in ("num_heads", "hidden_size", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise HeadsConfigError(f"heads {name} must be an integer >= 1, got {value!r}")
        n = self.draft_vocab_size
        if n is not None and (not isinstance(n, int) or not 1 <= n <= self.vocab_size):
            raise HeadsConfigError(f"draft_vocab_size must be None or an integer in [1, {self.vocab_size}], got {n!r}")
        if self.accuracies is not None:
            acc = self.accuracies
            if (not isinstance(acc, (list, tuple)) or len(acc) != self.num_heads
                    or any(not isinstance(row, (list, tuple)) or not row or len(row) > 10 for row in acc)
                    or any(not 0.0 <= float(a) <= 1.0 for row in acc for a in row)):
                raise HeadsConfigError(f"accuracies must be {self.num_heads} lists (one per head) of 1-10 "
                                       f"probabilities in [0, 1] (top-1 first), got {acc!r}")

    @property
    def draft_size(self) -> int:
        """N: rows of the heads' logits."""
        return self.vocab_size if self.draft_vocab_size is None else self.draft_vocab_size

    def size(self, key: str, default: int) -> int:
        return int(self.sizes.get(key, default))

    def replace(self, **changes) -> "HeadsConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["format_version"] = FORMAT_VERSION
        if self.accuracies is not None:
            out["accuracies"] = [[float(a) for a in row] for row in self.accuracies]
        return out

    @staticmethod
    def from_dict(data: dict) -> "HeadsConfig":
        if not isinstance(data, dict):
            raise HeadsConfigError(f"a heads config must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise HeadsConfigError(f"heads format version {version} is not supported (this specdec reads "
                                   f"{FORMAT_VERSION}); retrain or upgrade specdec")
        names = {f.name for f in dataclasses.fields(HeadsConfig)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise HeadsConfigError(f"unknown heads config field(s) {', '.join(unknown)}; known: "
                                   f"{', '.join(sorted(names))}")
        missing = sorted(n for n in ("kind", "num_heads", "hidden_size", "vocab_size") if n not in data)
        if missing:
            raise HeadsConfigError(f"heads config lacks field(s) {', '.join(missing)}")
        return HeadsConfig(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "HeadsConfig":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise HeadsConfigError(f"heads config is not valid JSON: {exc}") from None
        return HeadsConfig.from_dict(data)
