"""Run part of the target: skipped attention/MLP sub-layers or an early exit, on top of its committed KV cache.

Self-speculative drafters draft with the target itself, made cheaper: SWIFT skips individual attention and MLP
sub-layers (Xia et al., arXiv 2410.06916; Draft & Verify, arXiv 2309.08168), LayerSkip and DEL exit after the first
E layers through the final norm and LM head (Elhoushi et al., arXiv 2404.16710; Zarch et al., arXiv 2504.05598).

``LayerSkipRunner`` walks the HF decoder layers and calls their sub-modules itself, in the order HF's own forward
does, so no model file is patched and nothing is attached to the model:

    Llama / Qwen2 (pre-norm)   h += self_attn(input_layernorm(h));  h += mlp(post_attention_layernorm(h))
    Gemma 3 (sandwich norms)   h += post_attention_layernorm(self_attn(input_layernorm(h)))
                               h += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))

with the model's own embedding (Gemma's scaled one), rotary embeddings (per layer type for Gemma), final norm, LM
head and final logit soft-capping where configured. A skipped sub-layer is a residual passthrough.

KV: the engine's target cache (a ``CausalLMRunner``) is only read. A ``DraftKV`` (a ``transformers.Cache`` whose
layers are ``DynamicLayer`` s) serves the attention modules through the library's own ``Cache.update``, returning
the layer's committed prefix K/V followed by the K/V of the draft tokens fed so far, which it keeps itself; it is
dropped after the proposal.
A skipped attention sub-layer writes nothing, so key lengths can differ between layers and every layer gets a
mask for its own keys: the runner's conventions (4D bool, True = may attend; sliding-window layers additionally
limited by slot positions), built from the same tensors, so running every sub-layer gives logits bitwise equal
to ``CausalLMRunner.forward`` on the same tokens (tests/test_layer_skip.py).

Draft tokens kept in a ``DraftKV`` are visible to every later draft token: it holds one chain. Trees whose
branches must not see each other would need an ancestor mask over the overlay, which no drafter here needs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from specdec.draft_length import DepthSignal, DraftLengthPolicy, StopReason
from specdec.errors import IncompatibleModelsError, InvalidInputError
from specdec.runner import CausalLMRunner, cache_argument, text_config, within_window
from specdec.sampling import SamplingConfig, drafter_logits, seen_mask


@dataclass(frozen=True)
class SkipPlan:
    """Which parts of the target a partial forward runs (layer indices are 0-based)."""

    skip_attention: frozenset[int] = frozenset()  # layers whose attention sub-layer is a residual passthrough
    skip_mlp: frozenset[int] = frozenset()  # layers whose MLP sub-layer is a residual passthrough
    exit_layer: int | None = None  # run layers [0, exit_layer) then the final norm and LM head; None = all layers

    def __post_init__(self) -> None:
        object.__setattr__(self, "skip_attention", frozenset(int(i) for i in self.skip_attention))
        object.__setattr__(self, "skip_mlp", frozenset(int(i) for i in self.skip_mlp))

    def check(self, num_layers: int) -> None:
        """Raise InvalidInputError unless every index fits a model with ``num_layers`` layers."""
        for what, layers in (("skip_attention", self.skip_attention), ("skip_mlp", self.skip_mlp)):
            bad = sorted(i for i in layers if not 0 <= i < num_layers)
            if bad:
                raise InvalidInputError(f"{what} names layers {bad} outside [0, {num_layers})")
        if self.exit_layer is not None and not 1 <= self.exit_layer <= num_layers:
            raise InvalidInputError(f"exit_layer must be in [1, {num_layers}], got {self.exit_layer}")

    def layers_run(self, num_layers: int) -> int:
        return num_layers if self.exit_layer is None else self.exit_layer


class _OverlayLayer(DynamicLayer):
    """One layer of a :class:`DraftKV`: the library's own growing layer for the draft tokens, whose ``update``
    returns the target layer's committed prefix followed by them."""

    def __init__(self, prefix: CacheLayerMixin, prefix_len: int):
        super().__init__()
        self.prefix = prefix  # the target cache's layer, only read
        self.prefix_len = prefix_len

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)  # the overlay, [1, h, m, hd]
        return (torch.cat([self.prefix.keys[:, :, :self.prefix_len], keys], dim=-2),
                torch.cat([self.prefix.values[:, :, :self.prefix_len], values], dim=-2))


class DraftKV(Cache):
    """The cache a partial forward hands to the attention modules: committed prefix (read-only) + draft overlay.

    A ``transformers.Cache`` of :class:`_OverlayLayer` s, so the attention modules call the library's own
    ``Cache.update`` with whatever arguments their version passes.
    prefix: the first ``prefix_len`` slots of the target runner's cache, shared with it and never written.
    overlay: per layer, K/V [1, kv_heads, m_i, head_dim] (in ``layers[i]``) and positions [m_i] of the draft tokens
    whose pass ran that layer's attention (m_i differs between layers when a plan skips attention or exits early).
    """

    def __init__(self, target: CausalLMRunner, prefix_len: int | None = None):
        if target.cache is None or target.length == 0:
            raise InvalidInputError("the target has no cache yet: prefill it before drafting from it")
        prefix_len = target.length if prefix_len is None else prefix_len
        if not 0 < prefix_len <= target.length:
            raise InvalidInputError(f"prefix_len must be in [1, {target.length}], got {prefix_len}")
        super().__init__(layers=[_OverlayLayer(layer, prefix_len) for layer in target.cache.layers])
        self.target_cache = target.cache
        self.prefix_len = prefix_len
        self.prefix_positions = target.slot_positions[:prefix_len]  # [prefix_len]
        self.positions: list[torch.Tensor] = [self.prefix_positions[:0]] * len(self.layers)
        self._feeding: torch.Tensor | None = None  # positions [n] of the tokens of the pass in progress

    def overlay_len(self, layer: int) -> int:
        return self.positions[layer].numel()

    def begin_pass(self, positions: torch.Tensor) -> None:
        self._feeding = positions

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Keep the new K/V [1, kv_heads, n, head_dim]; return prefix + overlay K/V of the layer."""
        assert self._feeding is not None and key_states.shape[-2] == self._feeding.numel()
        self.positions[layer_idx] = torch.cat([self.positions[layer_idx], self._feeding])
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


class LayerSkipRunner:
    """Partial forwards of an HF Llama / Qwen2 / Gemma 3 causal LM (module docstring)."""

    def __init__(self, model: torch.nn.Module):
        base = getattr(model, "model", None)
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        if base is None or not all(hasattr(base, a) for a in needed):
            raise IncompatibleModelsError(
                f"layer skipping needs a decoder-only HF model with model.{{{', '.join(needed)}}}; "
                f"{type(model).__name__} does not have them")
        self.model = model
        self.base = base
        self.lm_head = model.get_output_embeddings()
        config = text_config(model)
        self.num_layers = len(base.layers)
        first = base.layers[0]
        self.sandwich = hasattr(first, "pre_feedforward_layernorm")  # Gemma 2/3 norm placement
        if not all(hasattr(first, a) for a in ("input_layernorm", "self_attn", "mlp", "post_attention_layernorm")):
            raise IncompatibleModelsError(f"unsupported decoder layer {type(first).__name__} for layer skipping")
        self.layer_types: list[str] = list(getattr(config, "layer_types", None) or ["full_attention"] * self.num_layers)
        window = getattr(config, "sliding_window", None)
        # the same rule as CausalLMRunner.uses_sliding_window, so both build the same masks
        self.sliding_window: int | None = window if window and "sliding_attention" in self.layer_types else None
        self.rope_per_type = "layer_type" in inspect.signature(base.rotary_emb.forward).parameters
        self.softcap: float | None = getattr(config, "final_logit_softcapping", None)
        self.cache_kwarg = cache_argument(first.self_attn)

    # ------------------------------------------------------------------ forwards
    def new_kv(self, target: CausalLMRunner, prefix_len: int | None = None) -> DraftKV:
        """An empty overlay over the first ``prefix_len`` (default: all) slots of ``target``'s cache."""
        return DraftKV(target, prefix_len)

    @torch.no_grad()
    def forward(self, plan: SkipPlan, tokens: torch.Tensor, positions: torch.Tensor, kv: DraftKV,
                mask: torch.Tensor | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """Feed ``tokens`` [n] at ``positions`` [n] through the layers ``plan`` runs; FloatTensor [k, V] logits.

        ``mask`` [n, n] (True = may attend) among the new tokens, causal by default; every new token sees the whole
        prefix and every draft token already in ``kv``. ``logits_to_keep`` = k last rows (0 = all), as in HF.
        """
        n = tokens.numel()
        assert tokens.dim() == 1 and positions.shape == tokens.shape, "tokens and positions must be [n]"
        dev = kv.target_cache.layers[0].keys.device
        tokens, positions = tokens.to(dev), positions.to(dev)
        if mask is None:
            mask = torch.ones(n, n, dtype=torch.bool, device=dev).tril_()
        assert mask.shape == (n, n), "mask must be [n, n] over the new tokens"
        kv.begin_pass(positions)
        hidden = self._run_layers(plan, tokens, positions, kv, mask.to(dev))  # [1, n, d]
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.head(hidden[0], normed=False)

    @torch.no_grad()
    def head(self, hidden: torch.Tensor, normed: bool = False) -> torch.Tensor:
        """FloatTensor [..., V]: final norm (unless ``normed``), LM head and soft-capping of residual states [..., d].

        ``hidden_states[E]`` of an HF forward (E < L) through this gives the logits of an exit after layer E.
        """
        if not normed:
            hidden = self.base.norm(hidden)
        logits = self.lm_head(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()

    def _run_layers(self, plan: SkipPlan, tokens: torch.Tensor, positions: torch.Tensor, kv: DraftKV,
                    mask: torch.Tensor) -> torch.Tensor:
        hidden = self.base.embed_tokens(tokens[None])  # [1, n, d]
        position_ids = positions[None]  # [1, n]
        rope = {}
        masks: dict[tuple[bool, int], torch.Tensor] = {}  # (sliding, overlay length) -> [1, 1, n, keys]
        for i in range(plan.layers_run(self.num_layers)):
            layer = self.base.layers[i]
            if i not in plan.skip_attention:
                kind = self.layer_types[i]
                if kind not in rope:
                    rope[kind] = (self.base.rotary_emb(hidden, position_ids, kind) if self.rope_per_type
                                  else self.base.rotary_emb(hidden, position_ids))
                sliding = self.sliding_window is not None and kind == "sliding_attention"
                key = (sliding, kv.overlay_len(i))
                if key not in masks:
                    masks[key] = self._mask(kv, i, positions, mask, sliding)
                attn, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden), position_embeddings=rope[kind],
                                          attention_mask=masks[key], position_ids=position_ids,
                                          **{self.cache_kwarg: kv})
                if self.sandwich:
                    attn = layer.post_attention_layernorm(attn)
                hidden = hidden + attn
            if i not in plan.skip_mlp:
                norm = layer.pre_feedforward_layernorm if self.sandwich else layer.post_attention_layernorm
                ffn = layer.mlp(norm(hidden))
                if self.sandwich:
                    ffn = layer.post_feedforward_layernorm(ffn)
                hidden = hidden + ffn
        return hidden

    def _mask(self, kv: DraftKV, layer: int, positions: torch.Tensor, mask: torch.Tensor,
              sliding: bool) -> torch.Tensor:
        """BoolTensor [1, 1, n, prefix + overlay_i + n] for layer ``layer``, as CausalLMRunner builds it."""
        n = positions.numel()
        seen = torch.ones(n, kv.prefix_len + kv.overlay_len(layer), dtype=torch.bool, device=mask.device)
        full = torch.cat([seen, mask], dim=1)[None, None]
        if not sliding:
            return full
        key_pos = torch.cat([kv.prefix_positions.to(mask.device), kv.positions[layer], positions])
        return within_window(full, positions, key_pos, self.sliding_window)


# ---------------------------------------------------------------------------------------------- chain drafting
@dataclass(frozen=True)
class DraftChain:
    """A chain drafted by a partial target, with the top-c candidates it saw at each depth."""

    tokens: torch.Tensor  # LongTensor [D] the top-1 token at each depth (the chain)
    top_probs: torch.Tensor  # FloatTensor [D, c] probabilities of the c most likely tokens at each depth, descending
    top_ids: torch.Tensor  # LongTensor [D, c] their ids (column 0 == tokens)
    stop_reason: StopReason = StopReason.MAX_DEPTH  # why drafting stopped at depth D

    @property
    def depth(self) -> int:
        return int(self.tokens.numel())


def draft_chain(runner: LayerSkipRunner, plan: SkipPlan, target: CausalLMRunner, sequence: torch.Tensor,
                sampling: SamplingConfig, max_depth: int, policy: DraftLengthPolicy, top_c: int = 1) -> DraftChain:
    """Draft up to ``max_depth`` top-1 tokens below the root ``sequence[-1]`` with the partial target, one pass per
    token on a fresh ``DraftKV`` over the whole target cache; stop after the first token at which the length
    ``policy`` says so (SWIFT's and DEL's ``stop_threshold``: a top-1 probability below it; that token is kept: it
    is still the best guess). One host sync per depth."""
    dev = target.device
    sequence = sequence.to(dev)
    kv = runner.new_kv(target)
    assert target.length == sequence.numel() - 1, "the target cache must hold every token before the root"
    seen = seen_mask(sequence, runner.lm_head.out_features) if sampling.penalizes_repetition else None  # [1, V]
    token = sequence[-1:]
    probs_rows, id_rows = [], []
    path_prob, reason = 1.0, StopReason.MAX_DEPTH
    for d in range(max_depth):
        logits = runner.forward(plan, token, torch.tensor([target.length + d], device=dev), kv)  # [1, V]
        probs = drafter_logits(logits, sampling, seen).softmax(dim=-1)  # [1, V]
        top_p, top_i = probs.topk(min(top_c, logits.shape[-1]), dim=-1)  # [1, c]
        probs_rows.append(top_p)
        id_rows.append(top_i)
        token = top_i[:, 0]
        if seen is not None:
            seen[0, token] = True  # the next depth's logits follow this token too, as the target's per-slot penalty
        token_prob = float(top_p[0, 0])
        path_prob *= token_prob
        stop = policy.stop(DepthSignal(d + 1, path_prob, token_prob)) if d + 1 < max_depth else None
        if stop is not None:
            reason = stop
            break
    top_probs, top_ids = torch.cat(probs_rows), torch.cat(id_rows)  # [D, c]
    return DraftChain(top_ids[:, 0], top_probs, top_ids, reason)
