"""Clover-2 heads (Xiao et al. 2024, arXiv 2405.00263 / 2408.00264): an RNN-style drafter on the target's states.

Per committed position t (teacher-forced in training, incrementally while drafting):

    x_t = Gate_1(h_t, E(x_{t+1}))            the attention decoder fuses the root-side token into the state
    g_t = Aug(x_{<=t})                       a causal block over the sequence (own KV cache)
    head 0:   logits = LMHead(g + B_0 A_0 g)                                   predicts x_{t+2}
    head k>0: g <- Gate_2(g, E(x_{t+k+1})),  logits = LMHead(g + B A [g; E(x_{t+k+1})])   predicts x_{t+k+2}

Heads k >= 1 share their weights (a recurrent head), so deeper drafts cost nothing more to store. E is the
target's input embedding and LMHead its LM head on the draft vocabulary rows (both frozen, not saved).

Where we differ from Clover-2's code: the gates and head projections are low-rank (``rank``) instead of d x d and
2d x d; the augmenting block is one narrow causal layer (``mlp_size``, ``num_attention_heads`` x ``head_dim``)
instead of two full decoder layers initialised from the target's last layer; the inputs are the target's states
*after* its final norm (HF ``hidden_states[-1]``; Clover-2 reads them before it) and the blocks are residual with
zero-initialised outputs, so the extra RMSNorms of Clover-2's heads and augmenting block are dropped. For
Qwen2.5-1.5B a checkpoint is ~18 MB in bf16.
"""

from __future__ import annotations

import torch
from torch import nn

from specdec.drafters.heads.base import DraftHeads, normal_
from specdec.drafters.heads.clover_blocks import AugmentingBlock, CosineGate, SequenceCache
from specdec.drafters.heads.config import HeadsConfig

DEFAULTS = {"rank": 256, "mlp_size": 512, "num_attention_heads": 8, "head_dim": 32}


class CloverHeads(DraftHeads):
    kind = "clover"

    def __init__(self, config: HeadsConfig):
        super().__init__(config)
        d = config.hidden_size
        r = config.size("rank", DEFAULTS["rank"])
        heads = config.size("num_attention_heads", DEFAULTS["num_attention_heads"])
        self.gate_in = CosineGate(d, r, heads)
        self.gate_rec = CosineGate(d, r, heads)
        self.aug = AugmentingBlock(d, heads, config.size("head_dim", DEFAULTS["head_dim"]),
                                   config.size("mlp_size", DEFAULTS["mlp_size"]))
        self.first_in, self.first_out = nn.Linear(d, r, bias=False), nn.Linear(r, d, bias=False)
        self.rec_in, self.rec_out = nn.Linear(2 * d, r, bias=False), nn.Linear(r, d, bias=False)

    def init_weights(self, generator: torch.Generator | None) -> None:
        d = self.config.hidden_size
        self.gate_in.init_weights(generator)
        self.gate_rec.init_weights(generator)
        self.aug.init_weights(generator)
        normal_(self.first_in.weight, d ** -0.5, generator)
        normal_(self.rec_in.weight, (2 * d) ** -0.5, generator)
        nn.init.zeros_(self.first_out.weight)  # heads start as g itself (Clover-2: I + U(0, 0.01))
        nn.init.zeros_(self.rec_out.weight)

    def _first(self, g: torch.Tensor) -> torch.Tensor:
        return self.logits(g + self.first_out(self.first_in(g)))

    def _recurrent(self, g: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.logits(g + self.rec_out(self.rec_in(torch.cat([g, e], dim=-1))))

    def training_logits(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        assert hidden.dim() == 3 and tokens.shape == hidden.shape[:2], "hidden [B, T, d], tokens [B, T]"
        emb = self.embed(tokens)  # [B, T, d]
        g = self.aug(self.gate_in(self.features(hidden), self.shifted(emb, 1)))  # [B, T, d], causal over T
        out = [self._first(g)]
        for k in range(1, self.config.num_heads):
            e = self.shifted(emb, k + 1)  # x_{t+k+1}: the depth-k path token
            g = self.gate_rec(g, e)
            out.append(self._recurrent(g, e))
        return torch.stack(out)  # [K, B, T, N]

    # ------------------------------------------------------------------ drafting
    def new_cache(self) -> SequenceCache:
        return SequenceCache()

    def extend(self, cache: SequenceCache, hidden: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        x = self.gate_in(self.features(hidden), self.embed(next_tokens))  # [k, d]
        return self.aug(x[None], cache)[0, -1]  # g of the last committed position

    def initial_state(self, context: torch.Tensor) -> torch.Tensor:
        return torch.cat([context, torch.zeros_like(context)])[None]  # [1, 2d]: [g; E(token) or 0]

    def node_states(self, parent: torch.Tensor, tokens: torch.Tensor, depth: int) -> torch.Tensor:
        if depth == 0:  # the root is already fused into g by gate_in
            return parent
        d = self.config.hidden_size
        e = self.embed(tokens)  # [w, d]
        return torch.cat([self.gate_rec(parent[:, :d], e), e], dim=-1)  # [w, 2d]

    def node_logits(self, states: torch.Tensor, depth: int) -> torch.Tensor:
        d = self.config.hidden_size
        if depth == 0:
            return self._first(states[:, :d])
        return self._recurrent(states[:, :d], states[:, d:])
