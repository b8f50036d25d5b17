"""Heterogeneous placement: a target placed with accelerate's device_map (modules offloaded to disk) runs unchanged;
what a drafter takes from the target crosses devices through ``DecodeState.transfer`` and the engine's move of each
proposal, timed in ``stats.transfer_time``; the CLI and presets carry --draft-device, --device-map and --overlap."""

from __future__ import annotations

import pytest
import torch

from specdec import SpecEngine
from specdec import engine as engine_module, overlap as overlap_module, step as step_module
from specdec.cli import build_parser, settings
from specdec.drafters import create_drafter
from specdec.errors import InvalidInputError
from specdec.loading import device_map_of
from specdec.models import load_folder
from specdec.state import DecodeState
from tiny_models import greedy_reference, tiny_model, tiny_prompt

# qwen2 tiny model: 2 layers; layer 1 lives on disk and is loaded for each forward
OFFLOADED = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
             "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def saved_target(tmp_path_factory):
    model = tiny_model("qwen2")
    folder = tmp_path_factory.mktemp("target")
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("drafter", ["draft-model", "prompt-lookup"])
def test_an_offloaded_target_decodes_exactly(saved_target, tmp_path, drafter, overlap):
    reference_model, folder = saved_target
    target, _ = load_folder(folder, dtype=torch.float32, tokenizer=False, device_map=OFFLOADED,
                            offload_folder=tmp_path)
    assert target.hf_device_map["model.layers.1"] == "disk"
    assert target.model.layers[1].mlp.up_proj.weight.device.type == "meta"  # really offloaded
    options = dict(model=tiny_model("qwen2", seed=1), mode="chain", min_prob=0.0) if drafter == "draft-model" else {}
    engine = SpecEngine(target, create_drafter(drafter, target=target, **options), overlap=overlap)
    prompt = tiny_prompt()
    result = engine.generate(prompt, max_new_tokens=20)
    assert torch.equal(result.sequences, greedy_reference(reference_model, prompt, 20))


def test_bad_device_maps_are_refused(saved_target, tmp_path):
    _, folder = saved_target
    with pytest.raises(InvalidInputError, match="not both"):
        load_folder(folder, device="cpu", device_map="auto", tokenizer=False)
    with pytest.raises(InvalidInputError, match="weights='dense'"):
        load_folder(folder, weights="int8", device_map="auto", tokenizer=False)
    with pytest.raises(InvalidInputError, match="offload_folder"):
        load_folder(folder, device_map=OFFLOADED, tokenizer=False)
    with pytest.raises(InvalidInputError, match="'auto' or a dict"):
        load_folder(folder, device_map=["cpu"], tokenizer=False)
    with pytest.raises(InvalidInputError, match="JSON object"):
        device_map_of("{layers: disk")
    assert device_map_of('{"model.layers.1": "disk"}') == {"model.layers.1": "disk"}


@pytest.mark.parametrize("overlap", [False, True])
def test_drafter_inputs_and_drafts_cross_devices_explicitly(monkeypatch, overlap):
    """On this CPU-only machine both sides are 'cpu', so a crossing is a no-op, but it takes the same path as with
    a GPU draft: the draft model asks for the sequence on the host and its new tokens on its own device, and the
    engine moves every proposal to the target's device."""
    crossings: list[tuple[str, str]] = []
    real_transfer = DecodeState.transfer

    def spy(self, tensor, device):
        crossings.append((str(tensor.device), str(torch.device(device))))
        return real_transfer(self, tensor, device)

    moved: list[int] = []
    real_on_device = step_module.on_device

    def spy_on_device(tree, device, stats):
        moved.append(tree.size)
        return real_on_device(tree, device, stats)

    monkeypatch.setattr(DecodeState, "transfer", spy)
    for module in (engine_module, overlap_module):  # the serial step's and the overlap round's move (specdec.step.on_device)
        monkeypatch.setattr(module, "on_device", spy_on_device)
    target = tiny_model("llama")
    drafter = create_drafter("draft-model", target=target, model=tiny_model("llama", seed=1), mode="chain",
                             min_prob=0.0)
    result = SpecEngine(target, drafter, overlap=overlap).generate(tiny_prompt(), max_new_tokens=16)
    assert ("cpu", "cpu") in crossings and len(crossings) >= result.stats.target_forwards
    assert len(moved) >= result.stats.target_forwards  # every proposal went through the engine's move
    assert result.stats.transfer_time >= 0.0 and "transfer_time" in result.stats.as_dict()


def test_transfer_times_a_real_move():
    state = DecodeState(torch.zeros(1, 3, dtype=torch.long), 3, None, None)
    x = torch.arange(4)
    assert state.transfer(x, "cpu") is x and state.transfer_time == 0.0  # no move, no time
    y = state.transfer(x.float(), torch.device("meta"))  # a real move to another device
    assert y.device.type == "meta" and state.transfer_time > 0.0


def test_cli_placement_flags_reach_the_settings():
    args = build_parser().parse_args(["bench", "--draft-device", "cuda", "--device-map", "auto", "--overlap",
                                      "--drafter", "draft-model", "--offload-folder", "/tmp/x"])
    cfg = settings(args)
    assert cfg["draft_device"] == "cuda" and cfg["device_map"] == "auto" and cfg["offload_folder"] == "/tmp/x"
    assert cfg["drafter_entries"] == [{"name": "draft-model", "drafter": "draft-model", "overlap": True}]


def test_a_device_this_machine_lacks_is_a_clear_error(saved_target, monkeypatch):
    _, folder = saved_target
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InvalidInputError, match="no CUDA GPU"):
        load_folder(folder, device="cuda", tokenizer=False)
    with pytest.raises(InvalidInputError, match="unknown device"):
        load_folder(folder, device="gpu0", tokenizer=False)
