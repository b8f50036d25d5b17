"""One engine shared by threads (specdec.concurrency): calls are serialized, so every thread gets exactly its own
prompt's greedy output, for every registered drafter; a same-thread re-entry is a clear error, not a deadlock."""

from __future__ import annotations

import threading

import pytest
import torch

from specdec import SpecEngine
from specdec.drafters import available_drafters, create_drafter
from specdec.errors import ConcurrentUseError
from test_exactness import DRAFTER_FACTORIES
from tiny_models import greedy_reference, tiny_model, tiny_prompt

NEW_TOKENS = 20
THREADS = 3
CALLS_PER_THREAD = 2
JOIN_TIMEOUT_S = 120  # a deadlock fails the test instead of hanging the suite


def _run_threads(work, count: int) -> list:
    """Run ``work(i)`` in ``count`` real threads released together; their results (or exceptions), in order."""
    barrier = threading.Barrier(count)
    results: list = [None] * count

    def body(i):
        barrier.wait()
        try:
            results[i] = work(i)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            results[i] = exc

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "a generate() thread did not finish: deadlock?"
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


@pytest.mark.parametrize("drafter_name", available_drafters())
def test_threads_sharing_one_engine_each_get_their_own_output(drafter_name):
    arch = "llama"
    target = tiny_model(arch)
    variant = next(iter(DRAFTER_FACTORIES[drafter_name].values()))
    engine = SpecEngine(target, create_drafter(drafter_name, target=target, **variant(target, arch)))
    prompts = [tiny_prompt(seed=10 + i, length=8 + 3 * i) for i in range(THREADS)]  # different lengths and texts
    references = [greedy_reference(target, p, NEW_TOKENS) for p in prompts]

    def work(i):
        return [engine.generate(prompts[i], max_new_tokens=NEW_TOKENS, eos_token_id=None).sequences
                for _ in range(CALLS_PER_THREAD)]

    for i, outputs in enumerate(_run_threads(work, THREADS)):
        for out in outputs:
            assert torch.equal(out, references[i]), f"thread {i} got another output than its prompt's greedy one"


def test_engines_sharing_a_target_are_serialized_too():
    """Two engines on one target (two drafters) in two threads: each output is its own prompt's greedy output."""
    target = tiny_model("qwen2")
    engines = [SpecEngine(target, create_drafter("prompt-lookup", target=target)),
               SpecEngine(target, create_drafter("token-recycling", target=target, budget=20))]
    prompts = [tiny_prompt(seed=20), tiny_prompt(seed=21, length=15)]
    references = [greedy_reference(target, p, NEW_TOKENS) for p in prompts]
    outputs = _run_threads(lambda i: [engines[i].generate(prompts[i], max_new_tokens=NEW_TOKENS, eos_token_id=None)
                                      .sequences for _ in range(3)], 2)
    for i in range(2):
        assert all(torch.equal(o, references[i]) for o in outputs[i])


def test_generate_from_inside_generate_is_an_error_not_a_deadlock():
    target = tiny_model("llama")
    engine = SpecEngine(target, create_drafter("prompt-lookup", target=target))

    class Reentrant:
        def put(self, tokens):
            engine.generate(tiny_prompt(seed=3), max_new_tokens=2, eos_token_id=None)

        def end(self):
            pass

    with pytest.raises(ConcurrentUseError, match="inside a running generate"):
        engine.generate(tiny_prompt(), max_new_tokens=4, eos_token_id=None, streamer=Reentrant())
    # the locks were released: the engine still works, from this and another thread
    reference = greedy_reference(target, tiny_prompt(), 6)
    assert torch.equal(engine.generate(tiny_prompt(), max_new_tokens=6, eos_token_id=None).sequences, reference)
    out = _run_threads(lambda i: engine.generate(tiny_prompt(), max_new_tokens=6, eos_token_id=None).sequences, 1)
    assert torch.equal(out[0], reference)
