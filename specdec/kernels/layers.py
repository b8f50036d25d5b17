"""Which native-kernel layers a model holds, and swapping its ``nn.Linear`` layers for them: one module above the
layer kinds (``int8_linear``, ``w8a8_linear``, ``kquant_linear``), so none of them imports another's user."""

from __future__ import annotations

import copy

import torch

from specdec.kernels.int8_linear import Int8Linear
from specdec.kernels.kquant_linear import KQuantLinear
from specdec.kernels.w8a8_linear import W8A8Linear


def quantize_linears(model: torch.nn.Module, kind: str = "int8", skip: tuple = ()) -> int:
    """Swap every ``nn.Linear`` in ``model`` (the LM head included) for an :class:`Int8Linear` (``kind="int8"``)
    or a :class:`~specdec.kernels.w8a8_linear.W8A8Linear` (``"w8a8"``); return how many. ``skip``: module names to
    leave dense."""
    layer = {"int8": Int8Linear, "w8a8": W8A8Linear}[kind]
    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is torch.nn.Linear and full not in skip:
                setattr(module, child_name, layer.from_linear(child))
                count += 1
    return count


def quantized_copy(model: torch.nn.Module, kind: str = "int8") -> torch.nn.Module:
    """A copy of ``model`` as ``specdec.models.load(..., weights=kind)`` builds it: every floating parameter in bf16
    (the kernels' activations; buffers such as rotary frequencies stay as they are, as a bf16 load keeps them), then
    every ``nn.Linear`` (the LM head included) swapped by :func:`quantize_linears`. The module tree is copied,
    tensors already in bf16 are shared, tied ones stay tied, and ``model`` is left untouched (the ``draft-model``
    drafter's int8 draft)."""
    tensors = [*model.parameters(), *model.buffers()]
    clone = copy.deepcopy(model, memo={id(t): t for t in tensors})  # modules and config copied, tensors shared
    cast: dict[int, torch.nn.Parameter] = {}  # id(original parameter) -> its bf16 copy, so tied ones stay tied
    for module in clone.modules():
        for key, p in list(module._parameters.items()):
            if p is not None and p.is_floating_point() and p.dtype != torch.bfloat16:
                if id(p) not in cast:
                    cast[id(p)] = torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
                module._parameters[key] = cast[id(p)]
    del cast
    quantize_linears(clone, kind)
    return clone.eval()


def weights_kind(model: torch.nn.Module) -> str:
    """``"gguf"``, ``"w8a8"`` or ``"int8"`` when ``model`` holds such quantized layers, else ``"dense"`` (cost-table
    keys, reports)."""
    if any(isinstance(m, KQuantLinear) for m in model.modules()):
        return "gguf"
    for m in model.modules():
        if isinstance(m, W8A8Linear):
            return "w8a8"
        if isinstance(m, Int8Linear):
            return "int8"
    return "dense"
