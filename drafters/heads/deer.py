"""DEER's diffusion drafter (Cheng et al., arXiv 2512.15176), as a small block denoiser on the target's states.

Given the target's last committed state H_t and the root y_0 (the target's own next token), a block of K
positions below the root is filled in parallel from one bidirectional pass:

    x   = [C H_t;  P E(y_0);  slot_1; ...; slot_K] + position     slot_i = (P E(y_i) if known, else the mask
                                                                   vector) + C H_t + P E(y_0)
    o   = BlockLayers(x)                                             full (bidirectional) attention in the block
    q_i = softmax(LMHead(ResBlock(H_t) + U norm(o_{i+1})))           the draft distribution of position i

E is the target's input embedding and LMHead its LM head on the draft vocabulary rows (both frozen, not saved).
ResBlock (Medusa's, shared by the slots) and U are zero-initialised, so every slot starts as the target's own
next-token prediction. The shared full-rank ResBlock is ours: through the narrow block alone, the slots learned
about 3x slower per training example than a Medusa head (a 21-step probe on the shipped data: first-slot top-1
0.06 against Medusa's 0.22; 0.12 with the ResBlock). With all slots masked,
one pass drafts the whole block, each position conditioned only on the prefix (DEER's single-step decoding). The
drafter (``deer_drafter.py``) may also denoise in several passes, unmasking left-to-right segments.

Where we differ from the paper, and why:

- **Size.** DEER's drafter is a 0.5B discrete diffusion LM (Open-dCoder / a converted Qwen2.5-0.5B), run over
  prefix + block without a KV cache. Ours is a 10M-parameter block transformer that reads the target's last
  hidden state instead of re-encoding the prefix. On 2 CPU cores a 0.5B drafter costs about a third of the 1.5B
  target per pass, and we have no model hub to fetch a dLLM from. The prefix is summarised by H_t, as in Medusa,
  so a drafting step costs ~11 ms on the Qwen 1.5B (the pass, 8 LM-head rows, the softmax over the vocabulary).
- **Block size.** Ours is K = ``num_heads`` (8 by default) slots, against the paper's 32. Our small drafter's
  accuracy beyond 8 tokens is too low to pay for verifying them.
- **Training.** The two stages are DEER's D2A alignment, adapted to a fixed-size block
  (``specdec/training/diffusion.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from specdec.drafters.heads.base import DraftHeads, ResBlock, ResidualMLP, normal_
from specdec.drafters.heads.config import HeadsConfig

DEFAULTS = {"inner_size": 512, "num_layers": 2, "num_attention_heads": 8, "mlp_size": 1024}


class BlockLayer(ResidualMLP, nn.Module):
    """A pre-norm transformer layer with full attention over the block (no mask) and a SwiGLU MLP."""

    def __init__(self, size: int, heads: int, mlp: int):
        super().__init__()
        assert size % heads == 0, "inner_size must divide into num_attention_heads"
        self.heads = heads
        self.norm1 = nn.RMSNorm(size, eps=1e-6)
        self.qkv = nn.Linear(size, 3 * size, bias=False)
        self.out = nn.Linear(size, size, bias=False)
        self.build_mlp(size, mlp)

    def init_weights(self, generator: torch.Generator | None) -> None:
        size = self.qkv.in_features
        normal_(self.qkv.weight, size ** -0.5, generator)
        normal_(self.gate_up.weight, size ** -0.5, generator)
        normal_(self.out.weight, size ** -0.5 * 0.5, generator)
        normal_(self.down.weight, self.down.in_features ** -0.5 * 0.5, generator)
        for norm in (self.norm1, self.norm2):
            nn.init.ones_(norm.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, size = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = nn.functional.scaled_dot_product_attention(q, k, v)  # [B, H, n, hd], bidirectional
        h = x + self.out(attn.transpose(1, 2).reshape(b, n, size))
        return self.mlp_residual(h)


class DeerHeads(DraftHeads):
    kind = "deer"

    def __init__(self, config: HeadsConfig):
        super().__init__(config)
        d = config.hidden_size
        size = lambda key: config.size(key, DEFAULTS[key])  # noqa: E731
        inner = size("inner_size")
        self.base = ResBlock(d)  # shared by the slots: Medusa's full-rank path from h
        self.context_in = nn.Linear(d, inner)
        self.token_in = nn.Linear(d, inner, bias=False)
        self.mask = nn.Parameter(torch.zeros(inner))
        self.position = nn.Parameter(torch.zeros(config.num_heads + 2, inner))
        self.layers = nn.ModuleList(BlockLayer(inner, size("num_attention_heads"), size("mlp_size"))
                                    for _ in range(size("num_layers")))
        self.norm = nn.RMSNorm(inner, eps=1e-6)
        self.out = nn.Linear(inner, d, bias=False)

    @property
    def block_size(self) -> int:
        return self.config.num_heads

    def init_weights(self, generator: torch.Generator | None) -> None:
        d = self.config.hidden_size
        self.base.init_weights(generator)
        normal_(self.context_in.weight, d ** -0.5, generator)
        nn.init.zeros_(self.context_in.bias)
        normal_(self.token_in.weight, d ** -0.5, generator)
        normal_(self.mask, 1.0, generator)
        normal_(self.position, 0.1, generator)
        for layer in self.layers:
            layer.init_weights(generator)
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.out.weight)  # every slot starts as LMHead(H_t)

    # ------------------------------------------------------------------ the one computation
    def block_logits(self, context: torch.Tensor, root: torch.Tensor, block: torch.Tensor,
                     masked: torch.Tensor) -> torch.Tensor:
        """FloatTensor [M, K, N]: draft logits of the K block slots below each of M roots.

        context [M, d]: the target's state before the root; root [M]: the root token; block [M, K]: the slots'
        tokens where known (anything where masked); masked [M, K] bool: slots still masked.
        """
        h = self.features(context)  # [M, d]
        c, r = self.context_in(h)[:, None], self.token_in(self.embed(root))[:, None]  # [M, 1, D] each
        slots = self.token_in(self.embed(block))  # [M, K, D]
        slots = torch.where(masked[..., None], self.mask.to(slots.dtype), slots) + c + r  # every slot is conditioned
        x = torch.cat([c, r, slots], dim=1) + self.position.to(c.dtype)
        for layer in self.layers:
            x = layer(x)
        return self.logits(self.base(h)[:, None] + self.out(self.norm(x[:, 2:])))

    # ------------------------------------------------------------------ training face of DraftHeads
    def training_logits(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """[K, B, T, N] with every slot masked (one-step drafting); the trainer's own DEER objective samples
        positions and noise instead (``specdec/training/diffusion.py``)."""
        assert hidden.dim() == 3 and tokens.shape == hidden.shape[:2], "hidden [B, T, d], tokens [B, T]"
        b, t, d = hidden.shape
        k = self.block_size
        root = self.shifted(tokens, 1).reshape(-1)
        block = torch.zeros(b * t, k, dtype=torch.long, device=tokens.device)
        masked = torch.ones(b * t, k, dtype=torch.bool, device=tokens.device)
        logits = self.block_logits(hidden.reshape(b * t, d), root, block, masked)  # [B*T, K, N]
        return logits.view(b, t, k, -1).permute(2, 0, 1, 3)

    def node_states(self, parent: torch.Tensor, tokens: torch.Tensor, depth: int) -> torch.Tensor:
        raise RuntimeError("deer drafts a block at once (block_logits), not a tree level by level")

    def node_logits(self, states: torch.Tensor, depth: int) -> torch.Tensor:
        raise RuntimeError("deer drafts a block at once (block_logits), not a tree level by level")
