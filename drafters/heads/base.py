"""DraftHeads: the common base of trained draft heads (Medusa, Hydra, Clover) that read the target's hidden states.

Every kind ends in the target's own LM head restricted to the draft vocabulary rows (frozen, never saved: it is
taken from the target when heads are built or loaded), and Hydra and Clover embed path tokens with the target's
input embedding (frozen, not copied, not saved). Only the small learned parts are parameters, so a checkpoint for
Qwen2.5-1.5B stays under 25 MB in bf16.

Two faces:

- training: ``training_logits(hidden [B, T, d], tokens [B, T]) -> [K, B, T, N]``, teacher-forced; row k at
  position t scores ``tokens[t + k + 2]`` given the target's last-layer state after ``tokens[t]`` (and, for Hydra
  and Clover, the path tokens ``tokens[t + 1 .. t + k + 1]``);
- drafting, one node level at a time: ``extend`` consumes the target's states of newly committed positions (Clover
  keeps a causal KV cache over them; the others only keep the last) and returns the context feature;
  ``initial_state`` -> ``node_states`` (per tree node, from its parent's state and its token) -> ``node_logits``
  (the children's logits). The same computations as ``training_logits`` along any path (tests check it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from specdec.drafters.heads.config import HeadsConfig
from specdec.drafters.heads.vocab import DraftVocab


class DraftHeads(nn.Module, ABC):
    kind: str

    def __init__(self, config: HeadsConfig):
        super().__init__()
        assert config.kind == self.kind, (config.kind, self.kind)
        self.config = config
        self.vocab: DraftVocab | None = None
        self.register_buffer("lm_head", torch.zeros(0, config.hidden_size), persistent=False)  # [N, d] frozen
        object.__setattr__(self, "_embedding", None)  # the target's input embedding: frozen, outside the module tree

    # ------------------------------------------------------------------ construction
    @abstractmethod
    def init_weights(self, generator: torch.Generator | None) -> None:
        """Random initialisation as the paper does it (zero-initialised output projections: identity at init)."""

    def attach(self, target: torch.nn.Module, vocab: DraftVocab) -> "DraftHeads":
        """Take the frozen parts from ``target``: its LM-head rows ``vocab.ids`` and its input embedding."""
        assert vocab.vocab_size == self.config.vocab_size and vocab.size == self.config.draft_size
        weight = target.get_output_embeddings().weight.detach()
        param = next(iter(self.parameters()))
        rows = weight if vocab.is_full else weight[vocab.ids.to(weight.device)]
        self.lm_head = rows.to(param.device, param.dtype)  # same dtype and device: shares the target's storage
        self.vocab = vocab
        object.__setattr__(self, "_embedding", target.get_input_embeddings())
        return self

    def with_metadata(self, recipe: dict | None = None, accuracies: list | None = None) -> "DraftHeads":
        """These heads (the same object) with the training recipe and/or measured accuracies set in the config."""
        changes = {}
        if recipe is not None:
            changes["recipe"] = dict(recipe)
        if accuracies is not None:
            changes["accuracies"] = [[float(a) for a in row] for row in accuracies]
        self.config = self.config.replace(**changes)
        return self

    # ------------------------------------------------------------------ shared pieces
    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """FloatTensor [..., N]: the target's LM head (draft rows) on features ``z`` [..., d]."""
        if self.lm_head.numel() == 0:
            raise RuntimeError("draft heads have no LM head yet: build them with build_heads or load_heads(target)")
        return nn.functional.linear(z.to(self.lm_head.dtype), self.lm_head)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """FloatTensor [..., d]: the target's (frozen) input embedding of ``tokens`` [...], in the heads' dtype."""
        if self._embedding is None:
            raise RuntimeError("draft heads have no embedding yet: build them with build_heads or load_heads(target)")
        weight = next(iter(self.parameters()))
        with torch.no_grad():
            out = self._embedding(tokens.to(self._embedding.weight.device))
        return out.to(weight.device, weight.dtype)

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = next(iter(self.parameters()))
        return hidden.to(weight.device, weight.dtype)

    @staticmethod
    def shifted(x: torch.Tensor, j: int) -> torch.Tensor:
        """``x`` [B, T, ...] moved j steps left along T (row t holds x[t + j]), zero-padded at the end."""
        out = torch.zeros_like(x)
        if j < x.shape[1]:
            out[:, : x.shape[1] - j] = x[:, j:]
        return out

    # ------------------------------------------------------------------ training
    @abstractmethod
    def training_logits(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """FloatTensor [K, B, T, N] (see the module docstring); ``hidden`` [B, T, d], ``tokens`` [B, T]."""

    # ------------------------------------------------------------------ drafting
    def new_cache(self):
        """Per-generation drafting state over committed positions (None for heads without sequence state)."""
        return None

    def extend(self, cache, hidden: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """Consume the target's states ``hidden`` [k, d] of newly committed positions, whose next tokens are
        ``next_tokens`` [k] (the last one is the draft root); returns the context feature [d] of the last one."""
        return self.features(hidden[-1])

    def bind(self, cache) -> "DraftHeads":
        """The drafting face (``initial_state``, ``node_states``, ``node_logits``) for one generation's ``cache``:
        these heads themselves, unless node logits read the cache (Chimera attends over committed states)."""
        return self

    def initial_state(self, context: torch.Tensor) -> torch.Tensor:
        """FloatTensor [1, S]: the state ``node_states`` turns into the root's (depth 0) state."""
        return context[None]

    @abstractmethod
    def node_states(self, parent: torch.Tensor, tokens: torch.Tensor, depth: int) -> torch.Tensor:
        """FloatTensor [w, S']: states of w nodes at ``depth`` carrying ``tokens`` [w], from their parents' [w, S]."""

    @abstractmethod
    def node_logits(self, states: torch.Tensor, depth: int) -> torch.Tensor:
        """FloatTensor [w, N]: head ``depth``'s logits for the children of w nodes at ``depth`` (states [w, S])."""


class ResBlock(nn.Module):
    """Medusa's residual block, x + SiLU(W x + b), with W zero-initialised (the identity at init)."""

    def __init__(self, size: int):
        super().__init__()
        self.linear = nn.Linear(size, size)

    def init_weights(self, generator: torch.Generator | None) -> None:
        nn.init.zeros_(self.linear.weight)
        bound = 1.0 / self.linear.in_features ** 0.5  # nn.Linear's default bias init, from the passed generator
        with torch.no_grad():
            self.linear.bias.uniform_(-bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


class ResidualMLP:
    """The pre-norm SwiGLU MLP that the sequence and block layers (Clover, Chimera, DEER) end with, as a mixin so
    that its parameters keep their names (``norm2``, ``gate_up``, ``down``) in saved heads."""

    def build_mlp(self, size: int, mlp: int) -> None:
        self.norm2 = nn.RMSNorm(size, eps=1e-6)
        self.gate_up = nn.Linear(size, 2 * mlp, bias=False)
        self.down = nn.Linear(mlp, size, bias=False)

    def mlp_residual(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(self.norm2(h)).chunk(2, dim=-1)
        return h + self.down(nn.functional.silu(gate) * up)


def normal_(t: torch.Tensor, std: float, generator: torch.Generator | None) -> None:
    with torch.no_grad():
        t.normal_(0.0, std, generator=generator)


def uniform_(t: torch.Tensor, low: float, high: float, generator: torch.Generator | None) -> None:
    with torch.no_grad():
        t.uniform_(low, high, generator=generator)
