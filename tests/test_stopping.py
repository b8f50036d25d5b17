"""Stopping rules cut a step's accepted tokens exactly: max_new_tokens, EOS ids and stop strings.

Both drafters accept long drafts, so every stop falls inside a step: the target drafting for itself (unquantized,
chain of 8, shortened by the drafter near the end) and an oracle that always proposes 8 reference tokens, however few
generate() still allows (the engine must prune it).
"""

from __future__ import annotations

import pytest
import torch

from regimes import OracleChainDrafter
from specdec import InvalidInputError, SpecEngine
from specdec.drafters import create_drafter
from tiny_models import greedy_reference, tiny_model, tiny_prompt, word_tokenizer

NEW_TOKENS = 20
PROMPT = tiny_prompt(seed=2)  # 12 tokens
P = PROMPT.shape[1]
# The llama target's greedy continuation of PROMPT, for reading the cases below:
GENERATED = [39, 72, 55, 79, 20, 41, 50, 79, 20, 41, 41, 41, 41, 41, 41, 41, 41, 41, 41, 41]
ABSENT = 93  # a token the continuation never emits

DRAFTERS = {
    "self-chain": lambda target, ref: create_drafter("draft-model", target=target, model=target, mode="chain",
                                                     depth=8, quantize=None),
    "oracle": lambda target, ref: OracleChainDrafter(target, ref, depth=8),
}


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def reference(target) -> torch.Tensor:
    """LongTensor [1, P + NEW_TOKENS + 8]: prompt and greedy continuation, with room for the oracle's drafts."""
    ref = greedy_reference(target, PROMPT, NEW_TOKENS + 8)
    assert ref[0, P:P + NEW_TOKENS].tolist() == GENERATED
    assert ABSENT not in ref[0, P:].tolist()
    return ref


def _engine(target, reference, drafter: str) -> SpecEngine:
    return SpecEngine(target, DRAFTERS[drafter](target, reference))


@pytest.mark.parametrize("drafter", DRAFTERS)
@pytest.mark.parametrize("max_new_tokens", [1, 2, 5, 7, 9])
def test_max_new_tokens_is_exact(target, reference, drafter, max_new_tokens):
    result = _engine(target, reference, drafter).generate(PROMPT, max_new_tokens=max_new_tokens)
    assert result.sequences.shape == (1, P + max_new_tokens)
    assert torch.equal(result.sequences, reference[:, :P + max_new_tokens])
    assert result.stats.new_tokens == max_new_tokens
    assert torch.equal(result.new_tokens, reference[:, P:P + max_new_tokens])


@pytest.mark.parametrize("drafter", DRAFTERS)
@pytest.mark.parametrize("eos_form", ["int", "list", "list-reversed", "tensor"])
@pytest.mark.parametrize("position", [0, 5])  # index in GENERATED of the EOS token; 0 comes from the prefill
def test_eos_cuts_right_after_the_eos_token(target, reference, drafter, eos_form, position):
    eos = GENERATED[position]
    assert eos not in GENERATED[:position]
    eos_token_id = {"int": eos, "list": [eos, ABSENT], "list-reversed": [ABSENT, eos],
                    "tensor": torch.tensor([eos, ABSENT])}[eos_form]

    result = _engine(target, reference, drafter).generate(PROMPT, max_new_tokens=NEW_TOKENS,
                                                         eos_token_id=eos_token_id)

    assert torch.equal(result.sequences, reference[:, :P + position + 1])
    hf = target.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=NEW_TOKENS, do_sample=False,
                         eos_token_id=[eos, ABSENT], pad_token_id=2)
    assert torch.equal(result.sequences, hf)


@pytest.mark.parametrize("drafter", DRAFTERS)
@pytest.mark.parametrize("stop_strings,new_tokens", [
    ("t39", 1),  # completed by the prefill's token
    ("t55", 3),
    ("t5", 3),  # ends inside the word "t55": the whole token is kept
    ("t20 t41", 6),  # spans two tokens
    ("t79 t20 t41 t50", 7),
    ("t41 t41", 11),
    (["t93", "t50"], 7),
    ("t93", NEW_TOKENS),  # never emitted
    # Begin in the prompt (... t36 t31): HF's StopStringCriteria matches the end of the whole sequence.
    ("t31 t39", 1),
    ("t36 t31 t39 t72", 2),
])
def test_stop_strings_match_hf(target, reference, drafter, stop_strings, new_tokens):
    tokenizer = word_tokenizer()
    result = _engine(target, reference, drafter).generate(PROMPT, max_new_tokens=NEW_TOKENS,
                                                         stop_strings=stop_strings, tokenizer=tokenizer)

    assert torch.equal(result.sequences, reference[:, :P + new_tokens])
    hf = target.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=NEW_TOKENS, do_sample=False,
                         eos_token_id=None, pad_token_id=2, stop_strings=stop_strings, tokenizer=tokenizer)
    assert torch.equal(result.sequences, hf)


def test_default_eos_is_the_generation_configs():
    """As in HF, leaving eos_token_id out stops at the model's generation_config.eos_token_id."""
    target = tiny_model("qwen2")
    prompt = tiny_prompt(seed=1)
    hf = target.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS, do_sample=False,
                         pad_token_id=2)
    assert hf.shape == (1, P + 10) and int(hf[0, -1]) == target.generation_config.eos_token_id == 1
    result = SpecEngine(target, create_drafter("prompt-lookup", target=target)).generate(prompt,
                                                                                         max_new_tokens=NEW_TOKENS)
    assert torch.equal(result.sequences, hf)


@pytest.mark.parametrize("kwargs,phrase", [
    (dict(stop_strings=["t5"]), "need tokenizer="),
    (dict(stop_strings="t5"), "need tokenizer="),
    (dict(stop_strings=[""], tokenizer="unused"), "non-empty strings"),
])
def test_invalid_stop_strings(target, reference, kwargs, phrase):
    with pytest.raises(InvalidInputError, match=phrase):
        _engine(target, reference, "self-chain").generate(PROMPT, max_new_tokens=4, **kwargs)
