"""`specdec bench` / `specdec generate` refuse every setting that cannot work before any model loads
(specdec.settings_check), with exit status 2 and a message naming the setting; drafter options are checked by name
and type from each drafter's declarations (specdec.drafters.options)."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

from specdec import SpecEngine
from specdec.cli import main
from specdec.drafters import available_drafters, create_drafter
from specdec.errors import InvalidInputError
from tiny_models import greedy_reference, tiny_model, tiny_prompt


@pytest.fixture(autouse=True)
def _no_model_loads(monkeypatch):
    """Every case here must fail before a model loads: loading one fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    for command in ("bench", "generate"):
        monkeypatch.setattr(f"specdec.commands.{command}.load_models", refuse)


def _preset(tmp_path, text: str) -> str:
    path = tmp_path / "preset.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("argv, phrase", [
    (["bench", "--limit", "0"], "'limit' .* must be an integer >= 1, got 0"),
    (["bench", "--limit", "-1"], "'limit' .* must be an integer >= 1, got -1"),
    (["bench", "--baselines", "plain,bogus"], r"unknown baselines \['bogus'\]; valid: plain, hf-assisted"),
    (["bench", "--max-new-tokens", "0"], "'max_new_tokens' .* must be an integer >= 1"),
    (["bench", "--threads", "-2"], "'threads' .* must be an integer >= 1, got -2"),
    (["bench", "--verifier", "nope"], "unknown verifier 'nope'; available verifiers: "),
    (["bench", "--verifier", "rejection"], "verifier 'rejection' samples: add --do-sample"),
    (["bench", "--do-sample", "--temperature", "0"], "'temperature' .* must be a number > 0"),
    (["bench", "--top-p", "1.5"], "'top_p' .* must be a number in"),
    (["generate", ""], "the prompt is empty"),
    (["generate", "   "], "the prompt is empty"),
    (["generate", "hi", "--max-new-tokens", "-3"], "'max_new_tokens' .* must be an integer >= 1"),
    (["generate", "hi", "--repetition-penalty", "0"], "repetition_penalty must be > 0"),
    (["generate", "hi", "--drafter", "nope"], "registered drafters"),
])
def test_bad_flags_are_refused_before_loading(argv, phrase, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("specdec: error: ") and "Traceback" not in err
    assert re.search(phrase, err), err


def test_output_that_is_a_file_or_unwritable_is_refused_before_the_run(tmp_path, capsys):
    existing = tmp_path / "results.txt"
    existing.write_text("x")
    assert main(["bench", "--output", str(existing)]) == 2
    assert "is an existing file" in capsys.readouterr().err
    assert main(["bench", "--output", str(existing / "sub")]) == 2
    assert "is a file, so the folder cannot be created" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere: the permission case needs a normal user
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main(["bench", "--output", str(locked / "out")]) == 2
        assert "is not writable" in capsys.readouterr().err


@pytest.mark.parametrize("text, phrase", [
    ("threads: many\n", "'threads' .* must be an integer >= 1, got 'many'"),
    ("dtype: __class__\n", "'dtype' .* must be one of auto, float32, bfloat16, float16, got '__class__'"),
    ("weights: fp4\n", "'weights' .* must be one of auto, dense"),
    ("limit: 2.5\n", "'limit' .* must be an integer >= 1, got 2.5"),
    ("do_sample: 'yes'\n", "'do_sample' .* must be true or false"),
    ("baselines: plain\n", "'baselines' .* must be a list of baseline names"),
    ("- target: x\n- draft: y\n", "a preset is a mapping of settings .* got list"),
    ("42\n", "a preset is a mapping of settings .* got int 42"),
    ("drafters: [a, b]\n", "drafters must be a mapping of entry names"),
    ("drafters:\n  x: {drafter: prompt-lookup, options: 3}\n", "options must be a mapping"),
    ("drafters:\n  x: {drafter: prompt-lookup, options: {bogus: 1}}\n", "drafter 'prompt-lookup' has no option 'bogus'"),
    ("drafters:\n  x: {drafter: draft-model, options: {depth: '4'}}\n", "option depth must be an int, got str '4'"),
    ("drafters:\n  x: {drafter: nope}\n", "unknown drafter 'nope'"),
])
def test_bad_presets_are_refused_with_a_message(tmp_path, text, phrase, capsys):
    assert main(["bench", "--config", _preset(tmp_path, "target: qwen2.5-coder-1.5b\n" + text
                                              if not text.startswith(("-", "4")) else text)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and re.search(phrase, err), err


def test_every_shipped_preset_passes_the_checks():
    from specdec.cli import build_parser, settings
    from specdec.presets import available_presets
    from specdec.settings_check import check_settings

    for name in available_presets():
        for command, extra in (("bench", []), ("generate", ["a prompt"])):
            args = build_parser().parse_args([command, "--config", name, *extra])
            check_settings(settings(args), command, getattr(args, "prompt", None))


# ---------------------------------------------------------------------------------------------- Python API
@pytest.mark.parametrize("name, options, phrase", [
    ("draft-model", dict(depth="4"), "option depth must be an int, got str '4'"),
    ("draft-model", dict(depth=2.5), "option depth must be an int, got float 2.5"),
    ("draft-model", dict(min_prob="x"), "option min_prob must be a number or None, got str 'x'"),
    ("draft-model", dict(model="qwen2.5-coder-0.5b"), "option model must be a torch.Module or None, got str"),
    ("prompt-lookup", dict(num_tokens=[3]), "option num_tokens must be an int or a string"),
    ("prompt-lookup", dict(max_ngrams=3), "has no option 'max_ngrams'; its options: costs, max_ngram"),
    ("swift", dict(skip_attention=("1",)), "option skip_attention must be a list or None"),
    ("medusa", dict(static_tree="yes"), "option static_tree must be true/false"),
])
def test_drafter_options_of_the_wrong_type_are_named(name, options, phrase):
    with pytest.raises(InvalidInputError, match=phrase):
        create_drafter(name, target=tiny_model("llama"), **options)


def test_every_drafter_declares_its_options():
    """The generic check knows every registered drafter's options (none takes **options it does not declare)."""
    from specdec.drafters import drafter_class
    from specdec.drafters.options import declared_options

    for name in available_drafters():
        declared, open_ended = declared_options(drafter_class(name))
        assert declared and not open_ended, name


@pytest.mark.parametrize("drafter", [None, "prompt-lookup", tiny_model("qwen2")])
def test_an_engine_needs_a_drafter_object_at_construction(drafter):
    with pytest.raises(InvalidInputError, match="SpecEngine needs a drafter"):
        SpecEngine(tiny_model("llama"), drafter)


def test_a_drafter_name_gets_the_create_drafter_hint():
    with pytest.raises(InvalidInputError, match=r"create_drafter\('prompt-lookup', target=target"):
        SpecEngine(tiny_model("llama"), "prompt-lookup")


@pytest.mark.parametrize("eos", ["t1", ["t1"], 2.5, [1, -3], True])
def test_a_non_integer_eos_token_id_is_refused(eos):
    target = tiny_model("llama")
    engine = SpecEngine(target, create_drafter("prompt-lookup", target=target))
    with pytest.raises(InvalidInputError, match="eos_token_id must be None, a token id"):
        engine.generate(tiny_prompt(), max_new_tokens=4, eos_token_id=eos)


@pytest.mark.parametrize("count", [np.int64(6), np.int32(6), torch.tensor(6), torch.tensor(6, dtype=torch.int32)])
def test_max_new_tokens_as_numpy_or_0d_tensor_integer_is_accepted(count):
    target = tiny_model("llama")
    engine = SpecEngine(target, create_drafter("prompt-lookup", target=target))
    out = engine.generate(tiny_prompt(), max_new_tokens=count, eos_token_id=None)
    assert torch.equal(out.sequences, greedy_reference(target, tiny_prompt(), 6))


@pytest.mark.parametrize("count", [torch.tensor([6]), torch.tensor(6.0), np.float64(6.0), "6", 0])
def test_max_new_tokens_that_is_not_a_positive_integer_is_refused(count):
    target = tiny_model("llama")
    engine = SpecEngine(target, create_drafter("prompt-lookup", target=target))
    with pytest.raises(InvalidInputError, match="max_new_tokens must be an integer"):
        engine.generate(tiny_prompt(), max_new_tokens=count)


def test_eos_token_id_as_numpy_integer_is_accepted():
    target = tiny_model("llama")
    engine = SpecEngine(target, create_drafter("prompt-lookup", target=target))
    ref = greedy_reference(target, tiny_prompt(), 6)
    stop = ref[0, -3]  # a token the greedy continuation emits: generation stops on it
    out = engine.generate(tiny_prompt(), max_new_tokens=6, eos_token_id=np.int64(stop))
    assert out.sequences[0, -1] == stop and out.sequences.shape[1] <= ref.shape[1]
