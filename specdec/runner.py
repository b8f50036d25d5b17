"""A causal LM with its own KV cache, fed tokens under an arbitrary (tree) mask.

The runner owns one ``DynamicCache`` and the position of every slot in it (after a commit, slot ``i`` holds
position ``i``; a drafter may keep tree branches in it, whose slots run ahead of their positions). A forward appends
new tokens with explicit position ids and a 4D boolean mask (True = may attend) passed as call arguments; for
models with sliding-window layers (Gemma 3) the mask is a dict keyed by layer type and the cache is created without
a config, so it keeps full KV in every layer and a rejected draft never evicts anything still needed.
:meth:`commit` keeps a chosen subset of the newest tokens, moved into the slots right after the old prefix, and
drops the rest: rollback is a slice, O(accepted) copies.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass(frozen=True)
class ForwardOutput:
    logits: torch.Tensor  # [n_new, V] float32, one row per fed token (or per kept token)
    hidden_states: tuple[torch.Tensor, ...] | None = None  # per layer (embeddings first), each [n_new, d]


def within_window(full: torch.Tensor, positions: torch.Tensor, key_positions: torch.Tensor,
                  window: int) -> torch.Tensor:
    """``full`` [1, 1, n, keys] further limited to keys less than ``window`` positions behind each query.

    positions: [n] of the queries; key_positions: [keys] of every key slot (tree branches may share positions).
    """
    near = (positions[:, None] - key_positions[None, :]) < window  # [n, keys]
    return full & near[None, None]


def cache_argument(module: torch.nn.Module) -> str:
    """The keyword under which ``module.forward`` takes its KV cache.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name still works there, with a FutureWarning,
    until 5.40); 5.23 knows only ``past_key_values``. Read from the signature, so each version gets its own name.
    """
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def execution_device(model: torch.nn.Module) -> torch.device:
    """The device ``model`` takes its input ids on (see :attr:`CausalLMRunner.device`)."""
    embedding = model.get_input_embeddings()
    hook = getattr(embedding, "_hf_hook", None)  # accelerate's dispatch hook (device_map)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return embedding.weight.device


def text_config(model: torch.nn.Module):
    """The config of the text decoder: ``model.config`` itself, or its text part for multimodal configs."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


class KVRunner:
    """What every runner does on top of its own ``reset``, ``forward`` (new tokens at explicit positions under a
    mask), ``commit`` (keep chosen new slots) and ``device``: :meth:`prefill` and :meth:`crop`. The engine uses
    :class:`CausalLMRunner`; the draft-model drafter may use :class:`specdec.models.lean_runner.LeanRunner`."""

    length: int

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, output_hidden_states: bool = False,
                logits_to_keep: int = 1) -> ForwardOutput:
        """Reset the cache and run the prompt ``input_ids`` [1, L]; logits of the last ``logits_to_keep`` tokens."""
        assert input_ids.dim() == 2 and input_ids.shape[0] == 1, "input_ids must be [1, L]"
        self.reset()
        n = input_ids.shape[1]
        positions = torch.arange(n, device=self.device)
        causal = torch.ones(n, n, dtype=torch.bool, device=self.device).tril_()
        return self.forward(input_ids[0], positions, causal, output_hidden_states, logits_to_keep)

    def crop(self, length: int) -> None:
        """Drop every cache slot from ``length`` on."""
        if length < self.length:
            self.commit(length, torch.zeros(0, dtype=torch.long))


class CausalLMRunner(KVRunner):
    """Feeds tokens to ``model`` on top of its cache. Batch size 1 for now; tensors keep the batch dimension."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        config = text_config(model)
        self.config = config
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        self.layer_types: list[str] | None = list(getattr(config, "layer_types", None) or []) or None
        self.sliding_window: int | None = getattr(config, "sliding_window", None)
        self.max_positions: int | None = getattr(config, "max_position_embeddings", None)
        self.cache_kwarg = cache_argument(model)
        self.cache: DynamicCache | None = None
        self.length = 0  # tokens in the cache
        self.slot_positions = torch.zeros(0, dtype=torch.long)  # [length] position of each cache slot
        self.forward_seconds = 0.0  # wall time inside the model's forward calls, summed over this runner's life

    @property
    def device(self) -> torch.device:
        """Where the model takes its inputs: its input embedding's device, or the device accelerate runs it on when
        a ``device_map`` offloaded it (its weights then sit on the meta device between uses)."""
        return execution_device(self.model)

    @property
    def uses_sliding_window(self) -> bool:
        return bool(self.layer_types and "sliding_attention" in self.layer_types and self.sliding_window)

    def reset(self) -> None:
        self.cache = DynamicCache()
        self.length = 0
        self.slot_positions = torch.zeros(0, dtype=torch.long, device=self.device)

    # ------------------------------------------------------------------ forwards
    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                output_hidden_states: bool = False, logits_to_keep: int = 0) -> ForwardOutput:
        """Append ``tokens`` [n] at ``positions`` [n] under ``mask`` (True = may attend).

        ``mask`` is [n, n] over the new tokens, each of which then sees the whole cache, or [n, length + n] over
        cache and new tokens (drafters that keep tree branches in their cache). Sliding-window layers further
        restrict it to keys within the window.
        ``logits_to_keep=0`` returns logits for all new tokens.
        """
        n = tokens.numel()
        assert tokens.dim() == 1 and positions.shape == tokens.shape
        assert mask.shape in ((n, n), (n, self.length + n)), "mask must be [n, n] or [n, length + n]"
        if self.cache is None:
            self.reset()
        dev = self.device
        tokens, positions, mask = tokens.to(dev), positions.to(dev), mask.to(dev)
        attn = self._attention_mask(positions, mask)
        started = time.perf_counter()
        out = self.model(
            input_ids=tokens[None],
            position_ids=positions[None],
            attention_mask=attn,
            use_cache=True,
            output_hidden_states=output_hidden_states,
            logits_to_keep=logits_to_keep,
            **{self.cache_kwarg: self.cache},
        )
        self.forward_seconds += time.perf_counter() - started
        self.length += tokens.numel()
        self.slot_positions = torch.cat([self.slot_positions.to(dev), positions])
        hidden = tuple(h[0].to(dev) for h in out.hidden_states) if output_hidden_states else None
        return ForwardOutput(out.logits[0].float().to(dev), hidden)  # a model split across devices ends elsewhere

    def _attention_mask(self, positions: torch.Tensor, mask: torch.Tensor):
        n = positions.numel()
        if mask.shape[1] == n and self.length:
            mask = torch.cat([torch.ones(n, self.length, dtype=torch.bool, device=mask.device), mask], dim=1)
        full = mask[None, None]  # [1, 1, n, past + n]
        if not self.uses_sliding_window:
            return full
        key_pos = torch.cat([self.slot_positions.to(mask.device), positions])  # slots may hold tree branches
        return {"full_attention": full, "sliding_attention": within_window(full, positions, key_pos,
                                                                          self.sliding_window)}

    def kv_layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the cached ``(keys, values)`` [1, kv_heads, length, head_dim] (what tests compare)."""
        if self.cache is None:
            return []
        return [(layer.keys, layer.values) for layer in self.cache.layers if getattr(layer, "is_initialized", False)]

    # ------------------------------------------------------------------ cache edits
    def commit(self, base: int, keep: torch.Tensor) -> None:
        """Keep cache slots ``base + keep`` (increasing indices, relative to ``base``) right after ``base``; drop
        the rest.

        ``keep`` indexes the tokens fed since the cache held ``base`` tokens.
        """
        assert self.cache is not None and 0 <= base <= self.length
        keep = keep.to(self.device).long()
        n_keep = keep.numel()
        contiguous = n_keep == 0 or bool(keep[-1] == n_keep - 1)  # increasing and ends at n-1 => keep == arange
        for layer in self.cache.layers:
            if not getattr(layer, "is_initialized", False):
                continue
            if not contiguous:
                layer.keys[:, :, base:base + n_keep] = layer.keys[:, :, base + keep]
                layer.values[:, :, base:base + n_keep] = layer.values[:, :, base + keep]
            layer.keys = layer.keys[:, :, :base + n_keep]
            layer.values = layer.values[:, :, :base + n_keep]
        self.slot_positions = torch.cat([self.slot_positions[:base], self.slot_positions[base + keep]])
        self.length = base + n_keep
