"""Export trained Medusa heads in the layout vLLM's ``medusa`` speculative method loads.

Checked against vLLM at commit 09cddad8f0324594022359cd2b07e962a14b895f (``vllm/model_executor/models/medusa.py``,
``Medusa.load_weights``) and 0531c2226a6a25cd96ccc856f3bda3f0bb4efb5f (``vllm/transformers_utils/configs/
medusa.py``, ``MedusaConfig``): a folder with ``config.json`` and ``model.safetensors`` holding

  blocks.{k}.layers.{j}.weight / .bias   head k's j-th residual block, x + SiLU(W x + b) (``medusa_fc_bias: true``)
  lm_heads.0.weight                      [N, d] the LM head, shared by every head (``original_lm_head: true``)
  token_map                              [N] int64 target ids of the draft vocabulary (only when N < V, with
                                         ``truncated_vocab_size: N``)

config.json: ``model_type "medusa"``, ``architectures ["MedusaModel"]``, ``hidden_size``, ``vocab_size`` (the
target's), ``num_heads``, ``num_hidden_layers`` (blocks per head), ``truncated_vocab_size``. vLLM proposes a
top-1 chain from these heads on the target's last hidden state, as our heads were trained for. Hydra and Clover
have no vLLM method; exporting them is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from specdec import models
from specdec.drafters.heads.base import DraftHeads
from specdec.drafters.heads.checkpoint import _read_index, _write_atomic, load_heads
from specdec.drafters.heads.config import HeadsConfig
from specdec.errors import InvalidInputError

FORMATS = ("vllm",)


def export_vllm(heads: DraftHeads, output: "str | os.PathLike") -> Path:
    """Write ``heads`` (Medusa) to ``output`` for ``vllm serve TARGET --speculative-config '{"method": "medusa",
    "model": "OUTPUT", "num_speculative_tokens": K}'``; returns the folder."""
    if heads.kind != "medusa":
        raise InvalidInputError(f"vLLM has no speculative method for {heads.kind} heads (it loads Medusa heads only); "
                                f"use them with specdec's {heads.kind!r} drafter")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    config, vocab = heads.config, heads.vocab
    tensors: dict[str, torch.Tensor] = {}
    layers = len(heads.blocks[0])
    for k, head in enumerate(heads.blocks):
        for j, block in enumerate(head):
            tensors[f"blocks.{k}.layers.{j}.weight"] = block.linear.weight
            tensors[f"blocks.{k}.layers.{j}.bias"] = block.linear.bias
    tensors["lm_heads.0.weight"] = heads.lm_head
    tensors = {name: t.detach().to("cpu", torch.bfloat16).contiguous() for name, t in tensors.items()}
    if not vocab.is_full:
        tensors["token_map"] = vocab.ids.detach().cpu().long().contiguous()
    hf_config = {"model_type": "medusa", "architectures": ["MedusaModel"], "hidden_size": config.hidden_size,
                 "vocab_size": config.vocab_size, "num_heads": config.num_heads, "num_hidden_layers": layers,
                 "truncated_vocab_size": config.draft_size, "medusa_fc_bias": True, "original_lm_head": True,
                 "torch_dtype": "bfloat16", "specdec_target": config.target}
    _write_atomic(output / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(hf_config, indent=1, sort_keys=True)
    _write_atomic(output / "config.json", lambda tmp: Path(tmp).write_text(text))
    return output


def heads_kind(folder: "str | os.PathLike") -> str:
    """The kind recorded in a heads folder's ``heads.json`` (read without loading the tensors)."""
    return HeadsConfig.from_dict(_read_index(Path(folder)).get("config")).kind


def check_exportable(folder: "str | os.PathLike", fmt: str) -> None:
    if fmt not in FORMATS:
        raise InvalidInputError(f"unknown export format {fmt!r}; available: {', '.join(FORMATS)}")
    kind = heads_kind(folder)
    if kind != "medusa":
        raise InvalidInputError(f"{folder} holds {kind} heads; vLLM has no speculative method for {kind} (it loads "
                                f"Medusa heads only), so they cannot be exported; use specdec's {kind!r} drafter")


# ---------------------------------------------------------------------------------------------- command line
def add_parser(sub) -> None:
    p = sub.add_parser("export-heads", help="export trained draft heads for another engine (vLLM: Medusa only)")
    p.add_argument("--format", choices=FORMATS, default="vllm", help="the engine whose layout to write (vllm)")
    p.add_argument("heads_dir", metavar="HEADS_DIR", help="a folder written by save_heads / specdec train")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="the folder to write")
    p.add_argument("--target", help="target model name (specdec.models) or local HF folder; default: the recipe's "
                                    "'target' in heads.json (the LM head rows come from it)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")


def cmd_export_heads(args) -> int:
    import sys

    check_exportable(args.heads_dir, args.format)
    target_name = args.target or (_read_index(Path(args.heads_dir))["config"].get("recipe") or {}).get("target")
    if not target_name:
        raise InvalidInputError(f"{args.heads_dir}/heads.json names no target in its recipe; pass --target NAME")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    if Path(target_name).is_dir():
        target, _ = models.load_folder(target_name, dtype=dtype, tokenizer=False)
    else:
        target, _ = models.load(target_name, dtype=dtype, tokenizer=False)
    out = export_vllm(load_heads(args.heads_dir, target), args.output_dir)
    print(f"{out}: Medusa heads for vLLM (config.json, model.safetensors)", file=sys.stderr)
    return 0
