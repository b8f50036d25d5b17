"""SpecDec++'s acceptance-prediction head (Huang, Guo, Wang, arXiv 2405.19715) for a draft model.

From the draft model's last hidden state at the position whose *input* is a draft token, the head predicts the
probability that the target accepts that token (given that the tokens before it were accepted):
``logit = out(ResBlock^L(h))`` with ``ResBlock(x) = x + SiLU(W x + b)``, one block applied ``layers`` times (the
reference applies a list of one block repeated, so its L blocks share weights; we do the same on purpose).

Where we differ: one output logit instead of a 2-way softmax (the same model class); trained with the paper's
weighted BCE (rejections weighted ``reject_weight``), whose optimum scales the odds by 1 / reject_weight, so
:meth:`accept_prob` multiplies the odds back and returns a calibrated probability: the stop threshold is then a
probability derived from measured costs (``specdec.draft_length.SpecDecPP``), not a number tuned per pair.

A head folder holds ``acceptance.json`` ({"config": ..., "files": {name: sha256}}) and ``acceptance.safetensors``
(bf16), written atomically, tensors first; the config names the draft model and the target it was trained for
(fingerprints: another pair's head is refused) and how it was made (command, data sha256, held-out metrics).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from specdec.drafters.heads.fingerprint import fingerprint_difference, target_fingerprint
from specdec.errors import CorruptHeadsError, HeadsTargetMismatchError
from specdec.files import sha256_of, write_atomic

CONFIG_FILE = "acceptance.json"
TENSOR_FILE = "acceptance.safetensors"
SHIPPED = Path(__file__).parent / "weights"


class AcceptanceHead(torch.nn.Module):
    def __init__(self, hidden_size: int, layers: int = 3, reject_weight: float = 6.0, meta: dict | None = None):
        super().__init__()
        self.block = torch.nn.Linear(hidden_size, hidden_size)
        self.out = torch.nn.Linear(hidden_size, 1)
        self.layers = layers
        self.reject_weight = reject_weight
        self.meta = dict(meta or {})  # draft / target fingerprints, training record

    def init_weights(self, generator: torch.Generator) -> "AcceptanceHead":
        """Small random weights: the blocks start near the identity, the output near 0.5 after calibration."""
        with torch.no_grad():
            for linear in (self.block, self.out):
                bound = 1.0 / math.sqrt(linear.in_features)
                linear.weight.copy_((torch.rand(linear.weight.shape, generator=generator) * 2 - 1) * bound * 0.1)
                linear.bias.zero_()
        return self

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """FloatTensor [...]: the raw logit (of the weighted-BCE optimum) per hidden state [..., d]."""
        x = hidden.to(self.block.weight.dtype)
        for _ in range(self.layers):
            x = x + torch.nn.functional.silu(self.block(x))
        return self.out(x).squeeze(-1).float()

    @torch.no_grad()
    def accept_prob(self, hidden: torch.Tensor) -> torch.Tensor:
        """FloatTensor [...]: calibrated P(accepted): the weighted-BCE odds times ``reject_weight``."""
        return torch.sigmoid(self(hidden) + math.log(self.reject_weight))


def save_acceptance_head(head: AcceptanceHead, folder: "str | os.PathLike") -> Path:
    folder = Path(folder)
    tensors = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in head.state_dict().items()}
    write_atomic(folder / TENSOR_FILE, lambda tmp: save_file(tensors, tmp))
    config = {"hidden_size": head.block.in_features, "layers": head.layers, "reject_weight": head.reject_weight,
              **head.meta}
    text = json.dumps({"config": config, "files": {TENSOR_FILE: sha256_of(folder / TENSOR_FILE)}}, indent=1,
                      sort_keys=True)
    write_atomic(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
    return folder


def load_acceptance_head(folder: "str | os.PathLike", draft: torch.nn.Module,
                         target: torch.nn.Module | None = None) -> AcceptanceHead:
    """The head in ``folder`` for ``draft`` (and ``target``: the acceptance it predicts is that target's).

    Raises HeadsTargetMismatchError for a head trained for another draft model or target, CorruptHeadsError for a
    missing, truncated or altered file."""
    folder = Path(folder)
    try:
        index = json.loads((folder / CONFIG_FILE).read_text())
        config = index["config"]
        expected = index["files"][TENSOR_FILE]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptHeadsError(f"{folder / CONFIG_FILE} is missing or unreadable ({type(exc).__name__}): not an "
                                f"acceptance head folder, or a save that did not finish; retrain it") from exc
    path = folder / TENSOR_FILE
    if not path.is_file() or sha256_of(path) != expected:
        raise CorruptHeadsError(f"{path} is missing or fails its sha256 (half-written or altered); retrain the head")
    for role, model in (("draft model", draft), ("target", target)):
        if model is None:
            continue
        difference = fingerprint_difference(config.get(role.split()[0]) or {}, target_fingerprint(model))
        if difference is not None:
            raise HeadsTargetMismatchError(f"the acceptance head in {folder} was trained for another {role} "
                                           f"({difference}); train one for this pair (specdec train-acceptance)")
    try:
        state = load_file(str(path))
    except SafetensorError as exc:
        raise CorruptHeadsError(f"{path} is not a readable safetensors file: {exc}") from exc
    meta = {k: v for k, v in config.items() if k not in ("hidden_size", "layers", "reject_weight")}
    head = AcceptanceHead(int(config["hidden_size"]), int(config["layers"]), float(config["reject_weight"]), meta)
    head.load_state_dict({k: v.float() for k, v in state.items()})
    return head.eval()


def shipped_acceptance_head(draft: torch.nn.Module, target: torch.nn.Module) -> Path | None:
    """The shipped head folder trained for this draft model and target, or None."""
    if not SHIPPED.is_dir():
        return None
    draft_print = target_print = None
    for index in sorted(SHIPPED.glob(f"*/{CONFIG_FILE}")):
        try:
            config = json.loads(index.read_text())["config"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        draft_print = draft_print or target_fingerprint(draft)
        target_print = target_print or target_fingerprint(target)
        if fingerprint_difference(config.get("draft") or {}, draft_print) is None and \
                fingerprint_difference(config.get("target") or {}, target_print) is None:
            return index.parent
    return None
