"""Hydra heads (Ankner et al. 2024, arXiv 2402.05109): sequentially dependent draft heads.

Head k sees the target's last hidden state h and the tokens of the draft path below it: the root (the target's
own next token) and the k draft tokens above the node, so a head's guess depends on what was drafted before it
(Medusa's heads see h alone). Here head k computes

    x = h + A_k [D E(x_{t+1}); ...; D E(x_{t+k+1})],   logits = LMHead(ResBlock^L(x))

with E the target's input embedding (frozen), D: d -> r a learned down-projection shared by all heads, and A_k:
(k+1) r -> d zero-initialised. Where we differ: Hydra feeds concat(h, E(x_1), ..., E(x_{k+1})) in R^{(k+2)d}
through a full (k+2)d x d input layer and gives every head its own LM head; the low-rank path projection and the
shared target LM head keep a checkpoint for Qwen2.5-1.5B at ~23 MB (the reference's would be ~2 GB). Hydra++'s
extra decoder layer over the sequence ("prefix attention") and its teacher-distillation loss are not here (the
loss is the trainer's business; Clover in this package has a sequence-level block).
"""

from __future__ import annotations

import torch
from torch import nn

from specdec.drafters.heads.base import DraftHeads, ResBlock, normal_
from specdec.drafters.heads.config import HeadsConfig

DEFAULT_RANK = 128


class HydraHeads(DraftHeads):
    kind = "hydra"

    def __init__(self, config: HeadsConfig):
        super().__init__(config)
        d, r, layers = config.hidden_size, config.size("rank", DEFAULT_RANK), config.size("num_layers", 1)
        self.rank = r
        self.down = nn.Linear(d, r, bias=False)  # D, shared
        self.mix = nn.ModuleList(nn.Linear((k + 1) * r, d, bias=False) for k in range(config.num_heads))  # A_k
        self.blocks = nn.ModuleList(nn.Sequential(*(ResBlock(d) for _ in range(layers)))
                                    for _ in range(config.num_heads))

    def init_weights(self, generator: torch.Generator | None) -> None:
        normal_(self.down.weight, self.config.hidden_size ** -0.5, generator)
        for mix in self.mix:
            nn.init.zeros_(mix.weight)  # Hydra zero-initialises its input layer
        for head in self.blocks:
            for block in head:
                block.init_weights(generator)

    def _head(self, h: torch.Tensor, path: torch.Tensor, k: int) -> torch.Tensor:
        return self.logits(self.blocks[k](h + self.mix[k](path)))

    def training_logits(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        assert hidden.dim() == 3 and tokens.shape == hidden.shape[:2], "hidden [B, T, d], tokens [B, T]"
        h = self.features(hidden)
        projected = self.down(self.embed(tokens))  # [B, T, r]
        path = [self.shifted(projected, j) for j in range(1, self.config.num_heads + 1)]  # path[j-1][t] = x_{t+j}
        return torch.stack([self._head(h, torch.cat(path[: k + 1], dim=-1), k)
                            for k in range(self.config.num_heads)])  # [K, B, T, N]

    def node_states(self, parent: torch.Tensor, tokens: torch.Tensor, depth: int) -> torch.Tensor:
        # state = [h; D E(root); D E(x_1); ...; D E(x_depth)]  [w, d + (depth + 1) r]
        return torch.cat([parent, self.down(self.embed(tokens))], dim=-1)

    def node_logits(self, states: torch.Tensor, depth: int) -> torch.Tensor:
        d = self.config.hidden_size
        assert states.shape[1] == d + (depth + 1) * self.rank, "hydra state must hold h and the path's projections"
        return self._head(states[:, :d], states[:, d:], depth)
