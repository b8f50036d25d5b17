"""Medusa heads (Cai et al. 2024, arXiv 2401.10774): K independent heads on the target's last hidden state h.

head_k(h) = LMHead(ResBlock^L(h)), ResBlock(x) = x + SiLU(W x + b), W zero-initialised; head k (0-based) at
position t predicts token t + k + 2 (the target's own LM head predicts t + 1, the draft root). Medusa-1: the
target stays frozen.

Where we differ: the K heads share the target's LM head (restricted to the draft vocabulary) instead of each
owning a d x V head, which keeps a checkpoint for Qwen2.5-1.5B at ~19 MB (Medusa's per-head LM heads would be
~470 MB each); with ``num_layers`` > 1 each block has its own weights (the reference repeats one module object).
"""

from __future__ import annotations

import torch
from torch import nn

from specdec.drafters.heads.base import DraftHeads, ResBlock
from specdec.drafters.heads.config import HeadsConfig


class MedusaHeads(DraftHeads):
    kind = "medusa"

    def __init__(self, config: HeadsConfig):
        super().__init__(config)
        d, layers = config.hidden_size, config.size("num_layers", 1)
        self.blocks = nn.ModuleList(nn.Sequential(*(ResBlock(d) for _ in range(layers)))
                                    for _ in range(config.num_heads))

    def init_weights(self, generator: torch.Generator | None) -> None:
        for head in self.blocks:
            for block in head:
                block.init_weights(generator)

    def training_logits(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        assert hidden.dim() == 3 and tokens.shape == hidden.shape[:2], "hidden [B, T, d], tokens [B, T]"
        h = self.features(hidden)
        return torch.stack([self.logits(head(h)) for head in self.blocks])  # [K, B, T, N]

    def node_states(self, parent: torch.Tensor, tokens: torch.Tensor, depth: int) -> torch.Tensor:
        return parent[:1].expand(tokens.numel(), -1)  # every node sees h alone

    def node_logits(self, states: torch.Tensor, depth: int) -> torch.Tensor:
        return self.logits(self.blocks[depth](states[:1])).expand(states.shape[0], -1)  # the same for every node

    def all_logits(self, context: torch.Tensor) -> torch.Tensor:
        """FloatTensor [K, N]: every head's logits on the context h [d] (Medusa's static tree reads them all)."""
        return torch.cat([self.logits(head(context[None])) for head in self.blocks])
