"""Chimera's lightweight draft model (Zeng et al. 2024, arXiv 2402.15758) on the target's hidden states.

For the node at draft depth j carrying token y_j (y_0 is the root, the target's own next token; y_-1, y_-2 the
committed tokens before it), with H_t the target's last committed hidden state:

    g   = Trigram([E(y_j-2); E(y_j-1); E(y_j)])          short range: the node's last three tokens
    h^  = g + Attn(g -> H_<=t) + MLP                    full context: one decoder layer whose query attends over
                                                        the target's states of every committed position
    logits_j = LMHead(H_t + h^ + U_j V_j [H_t; h^])     residual decoding head j: the children of the node

E is the target's input embedding and LMHead its LM head on the draft vocabulary rows (both frozen, not saved).

Where we differ from the paper and kafkayu/Chimera:

- **Sizes.** The trigram encoder is a low-rank MLP (3d -> ``trigram_rank`` -> d), not a 3d x 3d residual block
  and a 3d x d projection. The full-context layer has a narrow attention (``num_attention_heads`` x ``head_dim``)
  and MLP (``mlp_size``) instead of a full target-sized decoder layer (~47M parameters for Qwen2.5-1.5B).
- **Heads.** Chimera's head j is a 2d x V matrix initialised as [W_lm; W_lm], so it starts as
  LMHead(H_t + h^). Ours is that start plus a learned low-rank residual (``rank``), so the LM head is shared.
  The checkpoint for Qwen2.5-1.5B stays near 21 MB.
- **Deeper nodes.** Chimera feeds its predicted state back as if it were a target state. Each of our nodes
  queries the committed states itself, from its own trigram, at its own position (RoPE). So a tree level costs
  one batched pass over its nodes, and nothing is cached per draft node.
- **No self key.** The query does not attend to itself, only to committed positions. Its own trigram enters
  through the residual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from specdec.drafters.heads.base import DraftHeads, ResidualMLP, normal_
from specdec.drafters.heads.clover_blocks import rotate
from specdec.drafters.heads.config import HeadsConfig

DEFAULTS = {"trigram_rank": 512, "rank": 128, "mlp_size": 512, "num_attention_heads": 8, "head_dim": 64}


@dataclass
class ContextCache:
    """Keys and values of the committed positions' target states, and the last two tokens fed."""

    keys: torch.Tensor | None = None  # [1, H, L, hd]
    values: torch.Tensor | None = None  # [1, H, L, hd]
    recent: torch.Tensor | None = None  # the last two tokens fed (the next root's y_-2, y_-1)

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]


class ContextLayer(ResidualMLP, nn.Module):
    """One pre-norm decoder layer whose queries (trigram vectors) attend over the committed target states.

    Query (t, j) sits at position t + 1 + j and sees keys at positions <= t. Its output projection and MLP down
    projection are zero-initialised, so the layer starts as the identity.
    """

    def __init__(self, d: int, heads: int, head_dim: int, mlp: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm_q = nn.RMSNorm(d, eps=1e-6)
        self.norm_kv = nn.RMSNorm(d, eps=1e-6)
        self.q = nn.Linear(d, inner, bias=False)
        self.kv = nn.Linear(d, 2 * inner, bias=False)
        self.out = nn.Linear(inner, d, bias=False)
        self.build_mlp(d, mlp)

    def init_weights(self, generator: torch.Generator | None) -> None:
        d = self.q.in_features
        for lin in (self.q, self.kv, self.gate_up):
            normal_(lin.weight, d ** -0.5, generator)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.down.weight)
        for norm in (self.norm_q, self.norm_kv, self.norm2):
            nn.init.ones_(norm.weight)

    def keys_values(self, states: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H, T, hd] of target states [B, T, d] at positions start + 0..T-1."""
        b, t, _ = states.shape
        k, v = self.kv(self.norm_kv(states)).view(b, t, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return rotate(k, torch.arange(start, start + t, device=states.device)), v

    def forward(self, g: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """g [B, Q, d] at ``positions`` [Q]; keys, values [B, H, L, hd]; mask [Q, L] (True: attend) or None."""
        b, n, _ = g.shape
        q = self.q(self.norm_q(g)).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        attn = nn.functional.scaled_dot_product_attention(rotate(q, positions), keys, values, attn_mask=mask)
        h = g + self.out(attn.transpose(1, 2).reshape(b, n, -1))
        return self.mlp_residual(h)


class ChimeraHeads(DraftHeads):
    kind = "chimera"

    def __init__(self, config: HeadsConfig):
        super().__init__(config)
        d = config.hidden_size
        size = lambda key: config.size(key, DEFAULTS[key])  # noqa: E731
        self.trigram_in = nn.Linear(3 * d, size("trigram_rank"))
        self.trigram_out = nn.Linear(size("trigram_rank"), d, bias=False)
        self.context = ContextLayer(d, size("num_attention_heads"), size("head_dim"), size("mlp_size"))
        self.head_in = nn.ModuleList(nn.Linear(2 * d, size("rank"), bias=False) for _ in range(config.num_heads))
        self.head_out = nn.ModuleList(nn.Linear(size("rank"), d, bias=False) for _ in range(config.num_heads))

    def init_weights(self, generator: torch.Generator | None) -> None:
        d = self.config.hidden_size
        normal_(self.trigram_in.weight, (3 * d) ** -0.5, generator)
        nn.init.zeros_(self.trigram_in.bias)
        normal_(self.trigram_out.weight, self.trigram_in.out_features ** -0.5, generator)
        self.context.init_weights(generator)
        for lin in self.head_in:
            normal_(lin.weight, (2 * d) ** -0.5, generator)
        for lin in self.head_out:
            nn.init.zeros_(lin.weight)  # head j starts as Chimera's [W_lm; W_lm]: LMHead(H_t + h^)

    # ------------------------------------------------------------------ pieces
    def trigram(self, e2: torch.Tensor, e1: torch.Tensor, e0: torch.Tensor) -> torch.Tensor:
        return self.trigram_out(nn.functional.silu(self.trigram_in(torch.cat([e2, e1, e0], dim=-1))))

    def head(self, h: torch.Tensor, draft: torch.Tensor, j: int) -> torch.Tensor:
        return self.logits(h + draft + self.head_out[j](self.head_in[j](torch.cat([h, draft], dim=-1))))

    # ------------------------------------------------------------------ training
    def training_logits(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        assert hidden.dim() == 3 and tokens.shape == hidden.shape[:2], "hidden [B, T, d], tokens [B, T]"
        b, t = tokens.shape
        k_heads = self.config.num_heads
        h = self.features(hidden)
        # the node at depth j below position t carries tokens[t + 1 + j]; its trigram reads tokens[t - 1 + j ..
        # t + 1 + j]. Position 0's token is never fed while drafting (only next tokens are), so indices below 1
        # repeat the earliest token fed, as Chimera pads the sequence start.
        emb = self.embed(tokens)  # [B, T, d]
        index = lambda j: (torch.arange(t, device=emb.device) + j).clamp(1, t - 1)  # noqa: E731
        keys, values = self.context.keys_values(h, 0)
        causal = torch.ones(t, t, dtype=torch.bool, device=emb.device).tril_()
        out = []
        for j in range(k_heads):
            g = self.trigram(emb[:, index(j - 1)], emb[:, index(j)], emb[:, index(j + 1)])  # [B, T, d]
            positions = torch.arange(t, device=emb.device) + 1 + j
            draft = self.context(g, positions, keys, values, causal)
            out.append(self.head(h, draft, j))
        return torch.stack(out)  # [K, B, T, N]; rows past a sequence's end are masked by the loss

    # ------------------------------------------------------------------ drafting
    def new_cache(self) -> ContextCache:
        return ContextCache()

    def extend(self, cache: ContextCache, hidden: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        h = self.features(hidden)  # [k, d]
        k, v = self.context.keys_values(h[None], cache.length)
        cache.keys = k if cache.keys is None else torch.cat([cache.keys, k], dim=2)
        cache.values = v if cache.values is None else torch.cat([cache.values, v], dim=2)
        fed = torch.cat([cache.recent, next_tokens.to(cache.recent.device)]) if cache.recent is not None \
            else next_tokens
        cache.recent = fed[-2:]  # the root and the token before it: the next root's y_-1 and y_-2
        before = torch.cat([fed[:1].expand(2), fed[:-1]])[-2:]  # padded with the earliest token fed
        return torch.cat([h[-1], self.embed(before).flatten()])  # [3d]: [H_t; E(y_-2); E(y_-1)]

    def bind(self, cache: ContextCache) -> "BoundChimera":
        return BoundChimera(self, cache)

    def initial_state(self, context: torch.Tensor) -> torch.Tensor:
        d = self.config.hidden_size
        return torch.cat([context[:d], torch.zeros_like(context[:d]), context[d:]])[None]  # [1, 4d]

    def node_states(self, parent: torch.Tensor, tokens: torch.Tensor, depth: int) -> torch.Tensor:
        # state = [H_t; E(y_j-2); E(y_j-1); E(y_j)]  [w, 4d]
        d = self.config.hidden_size
        return torch.cat([parent[:, :d], parent[:, 2 * d:], self.embed(tokens)], dim=-1)

    def node_logits(self, states: torch.Tensor, depth: int) -> torch.Tensor:
        raise RuntimeError("chimera heads draft through heads.bind(cache), which reads the committed states")


class BoundChimera:
    """Chimera's drafting face for one generation: ``node_logits`` attends over ``cache``'s committed states."""

    def __init__(self, heads: ChimeraHeads, cache: ContextCache):
        self.heads, self.cache = heads, cache
        self.initial_state, self.node_states = heads.initial_state, heads.node_states

    def node_logits(self, states: torch.Tensor, depth: int) -> torch.Tensor:
        d, cache = self.heads.config.hidden_size, self.cache
        g = self.heads.trigram(states[:, d:2 * d], states[:, 2 * d:3 * d], states[:, 3 * d:])[None]  # [1, w, d]
        positions = torch.full((g.shape[1],), cache.length + depth, device=g.device)  # root at cache.length
        draft = self.heads.context(g, positions, cache.keys, cache.values, None)[0]
        return self.heads.head(states[:, :d], draft, depth)
