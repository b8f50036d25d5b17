"""NaN and infinity in weights: found once, when weights are loaded or a drafter is built, and named, instead of the
cryptic error they cause later (``torch.multinomial``: "probability tensor contains either inf, nan or element < 0",
or silently useless drafts)."""

from __future__ import annotations

import torch

from specdec.errors import InvalidInputError


def nonfinite_tensors(named) -> list[str]:
    """Names of the floating-point tensors in ``named`` ((name, tensor) pairs) that hold a NaN or an infinity."""
    bad = []
    for name, tensor in named:
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.device.type != "meta" \
                and not bool(torch.isfinite(tensor).all()):
            bad.append(name)
    return bad


def check_finite(named, what: str, error: type[Exception] = InvalidInputError) -> None:
    """Raise ``error`` naming the tensors of ``what`` that hold NaN or infinite values."""
    bad = nonfinite_tensors(named)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise error(f"{what} holds NaN or infinite weights in {shown}: the weights are damaged (a diverged training "
                    "run or a corrupt file); retrain or re-fetch them")


def check_draft_distribution(log_q: torch.Tensor, model: torch.nn.Module, what: str = "the draft model") -> None:
    """Refuse a draft distribution ``log_q`` [..., V] holding NaN (one host sync per proposal), naming the draft
    model's NaN weights when it has any (that scan runs only on this error path)."""
    if not bool(torch.isnan(log_q).any()):
        return
    bad = nonfinite_tensors(model.named_parameters()) + nonfinite_tensors(model.named_buffers())
    where = (f"NaN or infinite weights in {', '.join(bad[:5])}" + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
             if bad else "no NaN weights, so the NaNs come from its computation (an overflow in its dtype?)")
    raise InvalidInputError(f"{what} gives NaN probabilities, which cannot be sampled from; it has {where}: "
                            "re-fetch or fix the draft model (or load it in float32)")
