"""SpecDec++ (arXiv 2405.19715): the acceptance head, its training data and loss, the threshold policy, and the
draft-model drafter that consults it (exact under greedy: it only changes where drafting stops)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from specdec import SpecEngine
from specdec.budget import ForwardCosts
from specdec.drafters import create_drafter
from specdec.drafters.acceptance import load_acceptance_head
from specdec.draft_length import DepthSignal, SpecDecPP, StopReason, create_length_policy
from specdec.errors import CorruptHeadsError, HeadsTargetMismatchError, InvalidInputError
from specdec.training.acceptance import acceptance_examples, held_out, train_acceptance_head, weighted_bce
from tiny_heads import tiny_acceptance_head as tiny_head_folder
from tiny_models import ARCHS, greedy_reference, tiny_model, tiny_prompt


# ---------------------------------------------------------------------------------------------- policy
def test_fixed_threshold_stops_when_a_rejection_is_likely_enough():
    policy = create_length_policy("specdec++", 0.3)
    assert policy.stop(DepthSignal(3, 0.5, 0.5, accept_prob=0.75)) is None  # P(reject) 0.25 <= 0.3
    assert policy.stop(DepthSignal(3, 0.5, 0.5, accept_prob=0.65)) == StopReason.PREDICTED_REJECTION
    with pytest.raises(InvalidInputError, match="acceptance head"):
        policy.stop(DepthSignal(3, 0.5, 0.5))
    for bad in (1.5, -0.1, "sometimes"):
        with pytest.raises(InvalidInputError, match="threshold"):
            SpecDecPP(bad)


def test_auto_threshold_follows_the_measured_costs():
    """h_k = 1 - r (t_d + dv_k) / a^2 with r = tokens / seconds per step (from observe)."""
    costs = ForwardCosts.from_mapping({1: 0.100, 2: 0.104, 4: 0.112, 8: 0.128, 16: 0.2})
    policy = SpecDecPP("auto")
    assert policy.auto_threshold(2, 0.02) == 1.0  # no costs yet: never stops on the threshold
    policy.costs = costs
    for _ in range(60):  # steps of 4 drafted, 3 accepted, 20 ms per draft forward
        policy.observe(4, 3, 0.02)
    a = policy.acceptance
    assert abs(a - 0.75) < 0.02 and abs(policy.tokens_per_step - 4.0) < 0.05
    step = float(costs.seconds_for(5)) + 4 * 0.02
    expected = 1 - (policy.tokens_per_step / step) * (0.02 + float(costs.seconds_for(4) - costs.seconds_for(3))) / a ** 2
    assert abs(policy.auto_threshold(2, 0.02) - expected) < 1e-9
    assert policy.auto_threshold(2, 0.08) < policy.auto_threshold(2, 0.02)  # a dearer draft stops sooner


# ---------------------------------------------------------------------------------------------- head and files
def test_head_save_load_and_refusals(tmp_path):
    target, draft = tiny_model("llama"), tiny_model("llama", seed=1)
    folder = tiny_head_folder(draft, target, bias=0.5)
    head = load_acceptance_head(folder, draft, target)
    x = torch.randn(5, draft.config.hidden_size)
    p = head.accept_prob(x)
    assert p.shape == (5,) and bool(((p > 0) & (p < 1)).all())
    assert torch.allclose(p, torch.sigmoid(head(x) + math.log(6.0)))  # weighted-BCE odds scaled back
    with pytest.raises(HeadsTargetMismatchError, match="another draft model"):
        load_acceptance_head(folder, tiny_model("qwen2"), target)
    with pytest.raises(HeadsTargetMismatchError, match="another target"):
        load_acceptance_head(folder, draft, tiny_model("qwen2"))
    tensors = f"{folder}/acceptance.safetensors"
    data = open(tensors, "rb").read()
    open(tensors, "wb").write(data[: len(data) // 2])  # half-written
    with pytest.raises(CorruptHeadsError, match="sha256"):
        load_acceptance_head(folder, draft, target)
    with pytest.raises(CorruptHeadsError, match="acceptance.json"):
        load_acceptance_head(tmp_path, draft, target)


def test_no_head_for_the_pair_is_a_clear_error():
    target = tiny_model("llama")
    with pytest.raises(InvalidInputError, match="train-acceptance"):
        create_drafter("draft-model", target=target, model=tiny_model("llama", seed=1), length_policy="specdec++")


# ---------------------------------------------------------------------------------------------- training data
def test_examples_label_greedy_acceptance_with_each_token_in_its_own_context(monkeypatch):
    target = tiny_model("qwen2")
    draft = copy.deepcopy(target)
    with torch.no_grad():  # a draft that agrees with the target on some tokens only
        draft.lm_head.weight.add_(0.02 * torch.randn(draft.lm_head.weight.shape, generator=torch.Generator().manual_seed(1)))
    prompt = tiny_prompt()[0].tolist()
    answer = greedy_reference(target, tiny_prompt(), 16)[0, len(prompt):].tolist()
    monkeypatch.setattr("specdec.training.acceptance.encode_text", lambda tok, text, chat: prompt)
    data = acceptance_examples(draft, None, [{"prompt": "p", "answer_ids": answer}], per_sequence=None,
                               progress=False)
    assert data["hidden"].shape == (16, draft.config.hidden_size)
    # each label: is the draft's greedy token after prompt + answer[:i] the answer's token (the target's)?
    for i in range(16):
        ctx = torch.tensor([prompt + answer[:i]])
        with torch.no_grad():
            out = draft(input_ids=ctx, output_hidden_states=True)
        guess = int(out.logits[0, -1].argmax())
        assert data["label"][i] == float(guess == answer[i])
        with torch.no_grad():  # the example's state: the draft's own guess fed after prompt + answer[:i]
            fed = draft(input_ids=torch.tensor([prompt + answer[:i] + [guess]]), output_hidden_states=True)
        assert torch.allclose(data["hidden"][i], fed.hidden_states[-1][0, -1].float(), atol=1e-4)
    assert 0 < float(data["label"].mean()) < 1  # both kinds occur with this pair
    # the target drafting for itself: every greedy token is accepted
    self_data = acceptance_examples(target, None, [{"prompt": "p", "answer_ids": answer}], per_sequence=5,
                                    progress=False)
    assert self_data["label"].shape == (5,) and bool((self_data["label"] == 1).all())


def test_weighted_bce_matches_the_formula_and_training_learns():
    logits, labels = torch.tensor([0.3, -1.0, 2.0]), torch.tensor([1.0, 0.0, 0.0])
    p = torch.sigmoid(logits)
    expected = -(torch.log(p[0]) + 6 * torch.log(1 - p[1]) + 6 * torch.log(1 - p[2])) / (1 + 6 + 6)
    assert torch.allclose(weighted_bce(logits, labels, 6.0), expected)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 16, generator=g)
    y = (x[:, 0] + 0.3 * torch.randn(3000, generator=g) > -0.8).float()  # learnable from one direction
    data = {"hidden": x, "label": y, "sequence": torch.arange(3000) // 30}
    mask = held_out(data["sequence"], [{"id": str(i)} for i in range(100)], 0.2)
    head, metrics = train_acceptance_head(data, mask, epochs=20, batch_size=128, progress=False)
    assert metrics["after"]["loss"] < metrics["before"]["loss"] - 0.1
    assert metrics["after"]["auc"] > 0.9
    assert abs(metrics["after"]["mean_predicted"] - metrics["after"]["accept_rate"]) < 0.1  # calibrated back


# ---------------------------------------------------------------------------------------------- the drafter
@pytest.mark.parametrize("arch", ARCHS)
def test_specdecpp_drafting_is_exact_and_reports_its_stops(arch):
    target, draft = tiny_model(arch), tiny_model(arch, seed=1)
    prompt = tiny_prompt()
    for threshold, stops in ((0.0, True), (1.0, False)):  # 0: stop at the first fed token; 1: never on the head
        drafter = create_drafter("draft-model", target=target, model=draft, mode="chain", depth=5,
                                 length_policy="specdec++", acceptance_head=tiny_head_folder(draft, target),
                                 acceptance_threshold=threshold)
        result = SpecEngine(target, drafter).generate(prompt, max_new_tokens=24)
        assert torch.equal(result.sequences, greedy_reference(target, prompt, 24))
        reasons = result.stats.stop_reasons
        assert ("predicted_rejection" in reasons) == stops, reasons
        if stops:
            assert max(result.stats.draft_depths) == 2  # y_1, fed -> its prediction and y_2, then stop
    auto = create_drafter("draft-model", target=target, model=draft, mode="chain", depth=5,
                          length_policy="specdec++", acceptance_head=tiny_head_folder(draft, target))
    result = SpecEngine(target, auto).generate(prompt, max_new_tokens=24)
    assert torch.equal(result.sequences, greedy_reference(target, prompt, 24))
    assert auto.length_policy.costs is not None and auto.length_policy.thresholds


def test_shipped_head_config_records_how_it_was_made():
    from specdec.drafters.acceptance.head import SHIPPED

    folders = sorted(SHIPPED.glob("*/acceptance.json"))
    assert folders, "a SpecDec++ head ships for the default pair"
    for index in folders:
        config = json.loads(index.read_text())["config"]
        assert {"draft", "target", "training"} <= set(config)
        assert config["training"]["command"].startswith("specdec train-acceptance")
        assert config["training"]["after"]["auc"] > 0.7
