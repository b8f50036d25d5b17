"""TrainRecipe: every choice of a head-training run, with the presets ``cpu`` and ``gpu``.

The ``cpu`` preset is sized for the Qwen2.5-Coder-1.5B target on 2 CPU cores within 90 minutes, data generation
included (figures in docs/training.md): a bf16 decode step at batch 16 costs ~0.39 s, so ~400 prompts answered
with <= 256 tokens take ~40 minutes; ~100k tokens of features; the rest is split between the head kinds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from specdec.drafters.heads.config import KINDS
from specdec.errors import InvalidInputError, UnknownNameError


@dataclass(frozen=True)
class TrainRecipe:
    # --- what to train
    kinds: tuple = ("medusa", "hydra", "clover")  # head kinds, trained one after the other on one feature cache
    num_heads: int = 4  # draft depth K; Medusa's and Hydra's recipes use 4-5, deeper heads rarely get accepted
    draft_vocab_size: int | None = 16384  # FR-Spec rows; 16k covers most answer tokens and halves the head matmul
    sizes: dict = field(default_factory=dict)  # kind-specific head sizes (build_heads **sizes); empty: defaults
    deer_block: int = 8  # deer: slots per block (its num_heads)
    deer_positions: int = 256  # deer: blocks per sequence per step (positions drawn at random; 256: about all of
    #                            them on the CPU preset's data; 64 learned far less per step, docs/training.md)
    deer_pretrain_fraction: float = 0.3  # deer: share of steps in stage I (diffusion pre-training), then stage II
    # --- data
    seeds: str | None = None  # seed instruction JSONL; None: the shipped data/seed_tasks.jsonl
    grow_requests: int = 400  # self-instruct requests (~8 new instructions each); 0: seeds only. On CPU the growth
    # deadline (15% of the data share) binds first
    grow_per_request: int = 8  # instructions asked for per request
    grow_max_new_tokens: int = 256  # enough for ~8 one-line instructions
    num_prompts: int | None = None  # prompts answered (seeds first); None: all there are (the data deadline binds)
    max_new_tokens: int = 192  # answer length cap: most answers end before it; a batch runs as long as its longest
    chat: bool = True  # send prompts through the tokenizer's chat template when it has one
    generate_batch: int = 16  # decode batch: on 2 cores 16 tokens cost 1.6x one, 64 cost 3.2x
    chunk_size: int = 32  # sequences per feature chunk: the unit of resume (2 batches, ~4 minutes on 2 CPU cores)
    max_seq_len: int = 512  # prompt + answer tokens kept per sequence
    top_k: int = 8  # soft labels per position (the target's k most likely tokens)
    capture: bool = True  # features captured while generating (cheaper than a second forward; docs/training.md)
    # --- optimisation
    batch_size: int = 8  # sequences per step (~2k tokens)
    lr: float = 1e-3  # Medusa-1's head learning rate
    weight_decay: float = 0.0  # Medusa-1 uses none
    warmup_fraction: float = 0.05  # of the planned steps, linear from 0
    min_lr_fraction: float = 0.1  # cosine decays to this fraction of lr
    max_epochs: float = 3.0  # upper bound on passes over the training split (the time budget usually binds first)
    grad_clip: float = 1.0  # max global grad norm
    head_decay: float = 0.8  # loss weight of head k is head_decay**k (Medusa's lambda_k = 0.8^k)
    soft_weight: float = 0.5  # loss = (1 - w) * hard CE + w * soft CE to the target's top-k (restricted, renormed)
    bf16_autocast: bool = True  # bf16 autocast for the heads' matmuls (measured faster on AMX CPUs and GPUs)
    eval_fraction: float = 0.05  # sequences held out (by id hash) for evaluation and early stopping
    eval_every: int = 50  # steps between evaluations / checkpoints
    patience: int = 4  # evaluations without a better held-out loss before stopping early
    seed: int = 0  # the one torch.Generator seed (growth examples, head init, batch order)
    # --- time
    budget_minutes: float | None = 90.0  # whole run, model loading excluded; None: no limit
    data_share: float = 0.6  # of the budget for growth + answers + features; training gets the rest

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise InvalidInputError(f"unknown head kind(s) {bad or '(none)'}; choose from {', '.join(KINDS)}")
        if self.deer_block < 1 or self.deer_positions < 1 or not 0.0 <= self.deer_pretrain_fraction <= 1.0:
            raise InvalidInputError("deer_block and deer_positions must be >= 1 and deer_pretrain_fraction in [0, 1]")
        if self.num_heads < 1 or self.top_k < 1 or self.batch_size < 1 or self.chunk_size < 1:
            raise InvalidInputError("num_heads, top_k, batch_size and chunk_size must be >= 1")
        if not 0.0 <= self.soft_weight <= 1.0 or not 0.0 < self.data_share < 1.0:
            raise InvalidInputError("soft_weight must be in [0, 1] and data_share in (0, 1)")

    def replace(self, **changes) -> "TrainRecipe":
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise InvalidInputError(f"unknown recipe field(s) {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["kinds"] = list(self.kinds)
        return out


PRESETS = {
    "cpu": TrainRecipe(),
    # A GPU answers ~100x faster: more prompts, longer answers, a bigger draft vocabulary, no time pressure.
    "gpu": TrainRecipe(grow_requests=600, num_prompts=6000, max_new_tokens=512, max_seq_len=1024, generate_batch=64,
                       draft_vocab_size=32768, batch_size=16, max_epochs=4.0, eval_every=200, budget_minutes=None),
}


def preset(name: str) -> TrainRecipe:
    if name not in PRESETS:
        raise UnknownNameError(f"unknown training preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]
