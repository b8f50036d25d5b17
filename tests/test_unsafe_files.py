"""Files that could run code or reach outside their folder: a crafted training checkpoint (a pickle payload) is
refused before it runs; heads.json may only name files inside the heads folder; NaN weights are named."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from specdec import SpecEngine
from specdec.drafters import create_drafter
from specdec.drafters.heads import build_heads
from specdec.drafters.heads.checkpoint import CONFIG_FILE, load_heads, save_heads
from specdec.errors import CorruptHeadsError, InvalidInputError, UnsafeFileError
from specdec.training import TrainRecipe
from specdec.training.trainer import CHECKPOINT, train_heads_on
from tiny_heads import perturbed_heads
from tiny_models import tiny_model, tiny_prompt


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_a_crafted_training_checkpoint_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "train-hydra"
    folder.mkdir()
    torch.save({"heads": {}, "step": 3, "optimizer": _Payload(marker)}, folder / CHECKPOINT)
    target = tiny_model("llama")
    heads = build_heads("hydra", target, 2, generator=torch.Generator().manual_seed(0))

    with pytest.raises(UnsafeFileError, match=r"checkpoint\.pt is not a plain training checkpoint.*could run code"):
        train_heads_on(heads, [], [], TrainRecipe(), folder, torch.Generator().manual_seed(0), progress=False)
    assert not marker.exists(), "the pickle payload ran"

    torch.load(folder / CHECKPOINT, weights_only=False)  # the payload is real: unrestricted unpickling runs it
    assert marker.exists()


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/heads.safetensors", "..", ""])
def test_heads_json_may_only_name_files_in_its_folder(tmp_path, name):
    target = tiny_model("llama")
    folder = save_heads(perturbed_heads("medusa", target), tmp_path / "heads")
    index = json.loads((folder / CONFIG_FILE).read_text())
    (digest,) = index["files"].values()
    index["files"] = {name: digest}
    (folder / CONFIG_FILE).write_text(json.dumps(index))
    with pytest.raises(UnsafeFileError, match="not a plain file name"):
        load_heads(folder, target)


def test_nan_in_saved_heads_is_named(tmp_path):
    target = tiny_model("llama")
    heads = perturbed_heads("hydra", target)
    name, param = next((n, p) for n, p in heads.named_parameters() if not n.startswith("_embedding"))
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    folder = save_heads(heads, tmp_path / "nan-heads")
    with pytest.raises(CorruptHeadsError, match=rf"NaN or infinite weights in {name}"):
        load_heads(folder, target)
    with pytest.raises(InvalidInputError, match=rf"NaN or infinite weights in {name}"):
        create_drafter("hydra", target=target, heads=heads)


def test_nan_in_a_sampling_draft_model_is_named():
    target = tiny_model("llama")
    draft = copy.deepcopy(tiny_model("llama", seed=1))
    with torch.no_grad():
        draft.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    engine = SpecEngine(target, create_drafter("draft-model", target=target, model=draft, quantize=None, budget=8),
                        "rejection")
    with pytest.raises(InvalidInputError, match=r"NaN probabilities.*model\.layers\.0\.mlp\.up_proj\.weight"):
        engine.generate(tiny_prompt(), max_new_tokens=8, do_sample=True, eos_token_id=None,
                        generator=torch.Generator().manual_seed(0))
