"""Trained-head drafters (medusa, hydra, clover) and their checkpoints: round trips, every load error, the reduced
draft vocabulary, teacher-forced training logits (shapes, causality, and that drafting computes the same logits
along a path), Medusa's static tree, the checkpoint size budget and the vLLM export."""

from __future__ import annotations

import copy
import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file

from specdec import SpecEngine
from specdec.budget import ForwardCosts
from specdec.cli import main as cli_main
from specdec.drafters import create_drafter
from specdec.drafters.heads import (HEAD_CLASSES, DraftVocab, HeadsConfig, build_heads, load_heads, save_heads,
                                    target_fingerprint)
from specdec.drafters.heads import drafter as heads_drafter
from specdec.drafters.heads.export import export_vllm
from specdec.drafters.heads.trees import static_tree
from specdec.errors import CorruptHeadsError, HeadsConfigError, HeadsTargetMismatchError, InvalidInputError
from tiny_heads import KINDS, perturbed_heads, reduced_vocab
from tiny_models import VOCAB, greedy_reference, tiny_model, tiny_prompt


def _outputs(heads, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 9, heads.config.hidden_size, generator=g)
    tokens = torch.randint(0, VOCAB, (2, 9), generator=g)
    with torch.no_grad():
        return heads.training_logits(hidden, tokens)


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("reduced", [False, True], ids=["full-vocab", "reduced-vocab"])
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(kind, reduced, tmp_path):
    target = tiny_model("llama")
    heads = perturbed_heads(kind, target, draft_vocab=reduced_vocab(target) if reduced else None)
    heads.with_metadata(recipe={"data": "tiny", "steps": 3}, accuracies=[[0.5, 0.2]] * 4)
    save_heads(heads, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heads.json", "heads.safetensors"]  # no temporary left
    loaded = load_heads(tmp_path, target)
    assert loaded.config == heads.config and loaded.config.recipe == {"data": "tiny", "steps": 3}
    assert torch.equal(loaded.vocab.ids, heads.vocab.ids)
    bf16 = copy.deepcopy(heads)  # saved in bf16: the loaded heads equal the bf16-rounded ones
    with torch.no_grad():
        for p in bf16.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    torch.testing.assert_close(_outputs(loaded), _outputs(bf16), rtol=0, atol=1e-5)
    assert "lm_head" not in load_file(str(tmp_path / "heads.safetensors"))  # the frozen parts are not saved


def test_config_json_round_trip():
    config = HeadsConfig("clover", 4, 64, 96, 48, {"rank": 32}, {"architecture": "X"}, {"lr": 1e-3},
                         [[0.5, 0.25]] * 4)
    assert HeadsConfig.from_json(config.to_json()) == config
    with pytest.raises(HeadsConfigError, match="heads kind must be one of 'medusa', 'hydra', 'clover', 'chimera', "
                                               "'deer', got 'eagle'"):
        HeadsConfig("eagle", 4, 64, 96)
    with pytest.raises(HeadsConfigError, match="accuracies must be 4 lists"):
        HeadsConfig("medusa", 4, 64, 96, accuracies=[[0.5]])


def test_heads_for_another_target_are_refused(tmp_path):
    save_heads(perturbed_heads("medusa", tiny_model("llama")), tmp_path)
    with pytest.raises(HeadsTargetMismatchError, match=re.escape("architecture: heads were built for "
                                                                 "'LlamaForCausalLM', this target has 'Qwen2")):
        load_heads(tmp_path, tiny_model("qwen2"))
    with pytest.raises(HeadsTargetMismatchError, match="weight_sha256: .* retrain them with `specdec train --target"):
        load_heads(tmp_path, tiny_model("llama", seed=5))  # same architecture and sizes, other weights
    with pytest.raises(HeadsTargetMismatchError, match="weight_sha256"):
        create_drafter("medusa", target=tiny_model("llama", seed=5),
                       heads=perturbed_heads("medusa", tiny_model("llama")))


def test_fingerprint_same_for_bf16_and_fp32_loads():
    fp32 = tiny_model("qwen2")
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    assert target_fingerprint(bf16) == target_fingerprint(fp32)
    assert target_fingerprint(tiny_model("qwen2", seed=3)) != target_fingerprint(fp32)


@pytest.mark.parametrize("damage", ["flip-bytes", "truncate", "delete"])
def test_corrupt_tensor_file_is_named(damage, tmp_path):
    target = tiny_model("llama")
    save_heads(perturbed_heads("hydra", target), tmp_path)
    path = tmp_path / "heads.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "flip-bytes":
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 3]))
    else:
        path.unlink()
    phrase = "is missing" if damage == "delete" else "is corrupt or truncated: its sha256 differs"
    with pytest.raises(CorruptHeadsError, match=re.escape(f"{path} {phrase}")):
        load_heads(tmp_path, target)


def test_half_written_or_missing_index(tmp_path):
    target = tiny_model("llama")
    with pytest.raises(CorruptHeadsError, match="heads.json does not exist"):
        load_heads(tmp_path, target)
    save_heads(perturbed_heads("medusa", target), tmp_path)
    index = tmp_path / "heads.json"
    index.write_text(index.read_text()[:40])
    with pytest.raises(CorruptHeadsError, match="heads.json is unreadable or half-written"):
        load_heads(tmp_path, target)


@pytest.mark.parametrize("change,phrase", [
    (dict(num_heads=3), "unexpected: blocks.3.0.linear.bias"),
    (dict(sizes={"rank": 8}), "tensor down.weight has shape (16, 64) but the config"),
])
def test_config_that_does_not_match_the_tensors(change, phrase, tmp_path):
    target = tiny_model("llama")
    kind = "medusa" if "num_heads" in change else "hydra"
    save_heads(perturbed_heads(kind, target), tmp_path)
    index = json.loads((tmp_path / "heads.json").read_text())
    index["config"].update(change)
    (tmp_path / "heads.json").write_text(json.dumps(index))
    with pytest.raises(HeadsConfigError, match=re.escape(phrase)):
        load_heads(tmp_path, target)


@pytest.mark.parametrize("kind,limit_mb", [("medusa", 20), ("hydra", 24), ("clover", 19), ("chimera", 23),
                                           ("deer", 21)])
def test_checkpoint_size_for_qwen_1_5b(kind, limit_mb):
    """bf16 bytes of what save_heads writes for Qwen2.5-1.5B (d 1536, V 151936, 32k draft vocabulary): <= 25 MB."""
    config = HeadsConfig(kind, 4, 1536, 151936, 32768)
    with torch.device("meta"):
        heads = HEAD_CLASSES[kind](config)
    size = sum(t.numel() * 2 for t in heads.state_dict().values()) + 32768 * 8  # + the draft vocabulary ids
    assert size <= limit_mb * 10**6 <= 25 * 10**6, size


# ---------------------------------------------------------------------------------------------- vocabulary
def test_draft_vocab_from_counts_and_mapping():
    counts = torch.tensor([5, 0, 7, 5, 1, 7, 0, 2])
    vocab = DraftVocab.from_counts(counts, 4)  # 7 (ids 2, 5), then 5 (ids 0, 3): ties by smaller id
    assert vocab.ids.tolist() == [0, 2, 3, 5] and vocab.size == 4 and not vocab.is_full
    assert vocab.to_draft(torch.tensor([5, 1, 0, 3])).tolist() == [3, -1, 0, 2]
    assert vocab.to_target(torch.tensor([1, 3])).tolist() == [2, 5]
    assert DraftVocab.from_counts(counts, 5).ids.tolist() == [0, 2, 3, 5, 7]
    full = DraftVocab.full(8)
    assert full.is_full and torch.equal(full.to_draft(torch.arange(8)), torch.arange(8))
    scattered = vocab.scatter(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert scattered[0, [0, 2, 3, 5]].tolist() == [1.0, 2.0, 3.0, 4.0] and bool(torch.isinf(scattered[0, 1]))
    with pytest.raises(InvalidInputError, match="draft vocabulary size must be in"):
        DraftVocab.from_counts(counts, 9)


class Recording:
    def __init__(self, inner):
        self.inner, self.trees = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("kind", KINDS)
def test_reduced_vocab_drafts_stay_inside_it(kind, sampled):
    target = tiny_model("qwen2")
    vocab = reduced_vocab(target, 24)
    # a fixed budget: an auto-sized tree may keep no node on a loaded machine, and this test needs drafts
    drafter = create_drafter(kind, target=target, heads=perturbed_heads(kind, target, draft_vocab=vocab), budget=8)
    trees = []
    propose = drafter.propose
    drafter.propose = lambda state: trees.append(propose(state)) or trees[-1]
    prompt = tiny_prompt()
    if sampled:
        result = SpecEngine(target, drafter, "rejection").generate(
            prompt, max_new_tokens=20, do_sample=True, generator=torch.Generator().manual_seed(0), eos_token_id=None)
    else:
        result = SpecEngine(target, drafter).generate(prompt, max_new_tokens=20, eos_token_id=None)
        assert torch.equal(result.sequences, greedy_reference(target, prompt, 20))
    drafted = torch.cat([t.tokens for t in trees])
    assert drafted.numel() and bool((vocab.to_draft(drafted) >= 0).all())
    for tree in trees:
        if sampled and tree.size:  # q over the full vocabulary, zero outside the draft vocabulary
            outside = torch.ones(VOCAB, dtype=torch.bool)
            outside[vocab.ids] = False
            assert tree.draft_probs.shape == (tree.size, VOCAB) and float(tree.draft_probs[:, outside].sum()) == 0
            torch.testing.assert_close(tree.draft_probs.sum(-1), torch.ones(tree.size))


# ---------------------------------------------------------------------------------------------- training logits
@pytest.mark.parametrize("kind", KINDS)
def test_training_logits_shape_and_causality(kind):
    target = tiny_model("gemma3")
    heads = perturbed_heads(kind, target, draft_vocab=reduced_vocab(target, 40))
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 10, 64, generator=g)
    tokens = torch.randint(0, VOCAB, (2, 10), generator=g)
    with torch.no_grad():
        out = heads.training_logits(hidden, tokens)
        assert out.shape == (4, 2, 10, 40)
        t = 5  # change position t's token and state: rows that may not read it must not change
        tokens2, hidden2 = tokens.clone(), hidden.clone()
        tokens2[:, t] = (tokens2[:, t] + 1) % VOCAB
        hidden2[:, t] += 1.0
        out2 = heads.training_logits(hidden2, tokens2)
    for k in range(4):  # row k at position s reads hidden[<= s] and tokens[<= s + k + 1]
        unaffected = t - k - 2  # the last position whose row k reads neither tokens[t] nor hidden[t]
        if unaffected >= 0:
            torch.testing.assert_close(out2[k, :, : unaffected + 1], out[k, :, : unaffected + 1], rtol=0, atol=0)
        assert not torch.equal(out2[k, :, t], out[k, :, t])  # and the heads do read it


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "deer"])
def test_drafting_computes_the_training_logits(kind):
    """Along the true path, the drafting calls (extend -> initial_state -> node_states -> node_logits) give the same
    logits as training_logits at the same position: the trainer trains what the drafter drafts with."""
    target = tiny_model("llama")
    heads = perturbed_heads(kind, target)
    tokens = greedy_reference(target, tiny_prompt(), 10)  # [1, 22]
    with torch.no_grad():
        hidden = target(input_ids=tokens, output_hidden_states=True).hidden_states[-1]  # [1, T, d]
        expected = heads.training_logits(hidden, tokens)  # [K, 1, T, N]
        cache = heads.new_cache()
        t = 14
        heads.extend(cache, hidden[0, :9], tokens[0, 1:10])  # in two chunks, as committed steps arrive
        context = heads.extend(cache, hidden[0, 9:t + 1], tokens[0, 10:t + 2])
        bound = heads.bind(cache)  # Chimera's node logits attend over the cache's committed states
        state = bound.node_states(bound.initial_state(context), tokens[0, t + 1: t + 2], 0)
        for k in range(4):
            torch.testing.assert_close(bound.node_logits(state, k)[0], expected[k, 0, t], rtol=1e-4, atol=1e-4)
            state = bound.node_states(state, tokens[0, t + k + 2: t + k + 3], k + 1)


def test_chimera_first_positions_pad_as_drafting_does():
    """Chimera's trigram before the second token repeats the earliest token fed, in training and in drafting: a
    two-token prompt (one committed position) drafts with the logits training gives position 0."""
    target = tiny_model("qwen2")
    heads = perturbed_heads("chimera", target)
    tokens = greedy_reference(target, tiny_prompt(length=2), 6)  # [1, 8]
    with torch.no_grad():
        hidden = target(input_ids=tokens, output_hidden_states=True).hidden_states[-1]
        expected = heads.training_logits(hidden, tokens)
        for t in (0, 1):
            cache = heads.new_cache()
            context = heads.extend(cache, hidden[0, :t + 1], tokens[0, 1:t + 2])
            bound = heads.bind(cache)
            state = bound.node_states(bound.initial_state(context), tokens[0, t + 1: t + 2], 0)
            torch.testing.assert_close(bound.node_logits(state, 0)[0], expected[0, 0, t], rtol=1e-4, atol=1e-4)


def test_deer_block_computes_the_training_logits():
    """DEER's drafting pass (block_logits with every slot masked) is training_logits at the same position; an
    unmasked slot changes the others (bidirectional), a masked slot's token does not matter."""
    target = tiny_model("llama")
    heads = perturbed_heads("deer", target)
    tokens = greedy_reference(target, tiny_prompt(), 10)
    with torch.no_grad():
        hidden = target(input_ids=tokens, output_hidden_states=True).hidden_states[-1]
        expected = heads.training_logits(hidden, tokens)  # [K, 1, T, N]
        t = 14
        masked = torch.ones(1, 4, dtype=torch.bool)
        block = torch.zeros(1, 4, dtype=torch.long)
        got = heads.block_logits(hidden[:, t], tokens[:, t + 1], block, masked)[0]  # [K, N]
        torch.testing.assert_close(got, expected[:, 0, t], rtol=1e-4, atol=1e-4)
        other = heads.block_logits(hidden[:, t], tokens[:, t + 1], block + 7, masked)[0]
        torch.testing.assert_close(other, got, rtol=0, atol=0)
        masked[0, 0] = False
        unmasked = heads.block_logits(hidden[:, t], tokens[:, t + 1], block + 7, masked)[0]
        assert not torch.allclose(unmasked[1:], got[1:])


# ---------------------------------------------------------------------------------------------- drafters
def test_static_tree_is_built_greedily():
    tree = static_tree([[0.6, 0.25], [0.5, 0.4], [0.9]], max_nodes=5)
    # path products: (0) .6, (0,0) .3, (0,0,0) .27, (1) .25, (0,1) .24, (0,1,0) .216, (1,0) .125: best first
    assert list(zip(tree.depth.tolist(), tree.rank.tolist(), tree.parents.tolist())) == [
        (1, 0, -1), (2, 0, 0), (3, 0, 1), (1, 1, -1), (2, 1, 0)]
    torch.testing.assert_close(tree.values, torch.tensor([0.6, 0.3, 0.27, 0.25, 0.24], dtype=torch.float64))


def test_medusa_with_accuracies_drafts_the_static_tree():
    target = tiny_model("llama")
    heads = perturbed_heads("medusa", target).with_metadata(accuracies=[[0.6, 0.3], [0.5, 0.4], [0.9], [0.8]])
    drafter = create_drafter("medusa", target=target, heads=heads, budget=5)
    result = SpecEngine(target, drafter).generate(tiny_prompt(), max_new_tokens=16, eos_token_id=None)
    assert torch.equal(result.sequences, greedy_reference(target, tiny_prompt(), 16))
    assert result.stats.drafter_info["static_tree"] is True and max(result.stats.tree_sizes) == 5


def test_heads_from_a_folder_shipped_or_random(tmp_path, monkeypatch):
    target = tiny_model("llama")
    save_heads(perturbed_heads("clover", target), tmp_path / "clover-tiny")
    drafter = create_drafter("clover", target=target, heads=tmp_path / "clover-tiny")
    assert drafter.describe()["heads"] == str(tmp_path / "clover-tiny")
    with pytest.raises(InvalidInputError, match="holds clover heads; the 'hydra' drafter needs hydra heads"):
        create_drafter("hydra", target=target, heads=tmp_path / "clover-tiny")
    monkeypatch.setattr(heads_drafter, "SHIPPED", tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shipped heads: no warning
        assert create_drafter("clover", target=target).describe()["heads"] == "shipped:clover-tiny"
    with pytest.warns(UserWarning, match="no trained medusa heads for this target .* untrained heads"):
        assert create_drafter("medusa", target=target).describe()["heads"] == "random-init"


def test_initialisation_uses_only_the_passed_generator():
    target = tiny_model("qwen2")
    rng_before = torch.get_rng_state()
    a = build_heads("clover", target, generator=torch.Generator().manual_seed(4), rank=32)
    b = build_heads("clover", target, generator=torch.Generator().manual_seed(4), rank=32)
    with pytest.warns(UserWarning, match="untrained heads"):
        create_drafter("hydra", target=target)
    assert torch.equal(torch.get_rng_state(), rng_before), "building heads drew from the global RNG"
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_auto_budget_and_bad_options():
    target = tiny_model("llama")
    drafter = create_drafter("hydra", target=target, heads=perturbed_heads("hydra", target), budget="auto")
    drafter.budget_policy.costs = ForwardCosts.from_mapping({1: 1.0, 16: 1.5, 64: 4.0})  # hand-made: no measuring in tests
    result = SpecEngine(target, drafter).generate(tiny_prompt(), max_new_tokens=16, eos_token_id=None)
    assert result.stats.tree_budgets and torch.equal(result.sequences, greedy_reference(target, tiny_prompt(), 16))
    with pytest.raises(InvalidInputError, match="heads drafter sample_tree must be one of"):
        create_drafter("medusa", target=target, heads=perturbed_heads("medusa", target), sample_tree="beam")


# ---------------------------------------------------------------------------------------------- export
def test_export_vllm_layout(tmp_path):
    target = tiny_model("llama")
    vocab = reduced_vocab(target)
    heads = perturbed_heads("medusa", target, draft_vocab=vocab)
    save_heads(heads.with_metadata(recipe={"target": "unused"}), tmp_path / "heads")
    out = export_vllm(load_heads(tmp_path / "heads", target, dtype=torch.float32), tmp_path / "vllm")
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in ("model_type", "architectures", "hidden_size", "vocab_size", "num_heads",
                                   "num_hidden_layers", "truncated_vocab_size", "medusa_fc_bias",
                                   "original_lm_head")} == {
        "model_type": "medusa", "architectures": ["MedusaModel"], "hidden_size": 64, "vocab_size": VOCAB,
        "num_heads": 4, "num_hidden_layers": 1, "truncated_vocab_size": vocab.size, "medusa_fc_bias": True,
        "original_lm_head": True}
    tensors = load_file(str(out / "model.safetensors"))
    assert torch.equal(tensors["token_map"], vocab.ids)
    assert tensors["lm_heads.0.weight"].shape == (vocab.size, 64)
    h = torch.randn(3, 64)  # vLLM's forward: x + SiLU(W x + b) per layer, then the LM head, scattered by token_map
    with torch.no_grad():
        x = h + torch.nn.functional.silu(h @ tensors["blocks.2.layers.0.weight"].float().T
                                         + tensors["blocks.2.layers.0.bias"].float())
        ours = heads.logits(heads.blocks[2](h))  # head 2 on each row
    torch.testing.assert_close(x @ tensors["lm_heads.0.weight"].float().T, ours, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kind", ["hydra", "clover"])
def test_export_refuses_hydra_and_clover(kind, tmp_path, capsys):
    save_heads(perturbed_heads(kind, tiny_model("llama")), tmp_path / "heads")
    assert cli_main(["export-heads", "--format", "vllm", str(tmp_path / "heads"), str(tmp_path / "out")]) == 2
    assert f"vLLM has no speculative method for {kind}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
