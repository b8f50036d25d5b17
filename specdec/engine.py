"""SpecEngine: draft -> verify -> commit -> stop-check, the whole speculative decoding loop.

One loop for every drafter and acceptance rule (Leviathan et al. 2023, arXiv 2211.17192; tree verification as in
SpecInfer, arXiv 2305.09781): the drafter proposes a tree below the newest token, the target scores the root and
every node in one forward under an ancestor mask, the verifier picks the accepted path and the next token, the
target's cache keeps only that path, and the stopping rules cut the emitted tokens. With ``overlap=True`` the
drafter drafts the next proposal while the target verifies (PEARL, :mod:`specdec.overlap`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from specdec.arguments import as_count, check_drafter
from specdec.concurrency import one_generation_at_a_time
from specdec.drafters.base import Drafter
from specdec.errors import IncompatibleModelsError, InvalidInputError
from specdec.overlap import OverlapRounds, check_can_overlap, split_threads
from specdec.runner import CausalLMRunner
from specdec.sampling import SamplingConfig, apply_repetition_penalty, next_token, seen_mask
from specdec.state import DecodeState, StepOutcome, VerificationResult
from specdec.stats import DecodingStats
from specdec.step import emit, fit, on_device, verify_and_commit
from specdec.stopping import StoppingRules, normalize_eos
from specdec.verifiers.base import Verifier, create_verifier


_FROM_CONFIG = object()  # sentinel: take eos_token_id from the target's generation config


@dataclass
class GenerationResult:
    sequences: torch.Tensor  # LongTensor [1, prompt_len + new], like HF generate
    stats: DecodingStats

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.sequences[:, self.sequences.shape[1] - self.stats.new_tokens:]


class SpecEngine:
    """Lossless speculative decoding of ``target`` (an HF causal LM) with ``drafter``."""

    def __init__(self, target: torch.nn.Module, drafter: Drafter, verifier: "str | Verifier" = "greedy",
                 overlap: bool = False, threads: "tuple[int, int] | None" = None):
        """``overlap=True``: the drafter drafts the next proposal in a worker thread while the target verifies the
        current one (PEARL; :mod:`specdec.overlap`). ``threads``: (target, draft) torch threads in that mode; by
        default this process's threads are split between the two (the target keeps them all when the drafter
        runs on an accelerator)."""
        check_drafter(drafter)
        self.target = target
        self.runner = CausalLMRunner(target)
        self.drafter = drafter
        self.verifier = create_verifier(verifier)
        if drafter.target is not target:
            raise IncompatibleModelsError("the drafter was created for a different target model")
        self.overlap = bool(overlap)
        if threads is not None and not self.overlap:
            raise InvalidInputError("threads=(target, draft) applies to overlap=True only")
        if self.overlap:
            check_can_overlap(drafter)
        if threads is not None:
            split_threads(threads, draft_on_cpu=True)  # refuses a malformed pair now, not at generate()
        self.threads = threads

    # ------------------------------------------------------------------ public API
    @one_generation_at_a_time
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 128, eos_token_id=_FROM_CONFIG,
                 stop_strings: "str | list[str] | None" = None, tokenizer=None, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None, repetition_penalty: float = 1.0,
                 generator: torch.Generator | None = None, streamer=None, attention_mask=None) -> "GenerationResult":
        """Generate up to ``max_new_tokens`` after ``input_ids`` [1, L] (or [L]); arguments mean what they mean in HF.

        ``eos_token_id`` defaults to the target's ``generation_config.eos_token_id``; pass None for no EOS.
        Sampling (``do_sample=True``, with a sampling verifier such as "rejection") applies, in HF's order, the
        repetition penalty, temperature, top-k, top-p and min-p to the target and the drafter alike; None/1.0
        switch a processor off (unlike HF generate, no value is taken from the model's generation config: HF
        falls back to ``generation_config.top_k``, 50 unless set). Random numbers come only from ``generator``
        (a fresh, randomly seeded one when None), so a seeded generator gives a reproducible output.

        Thread safety: calls from several threads are safe and run one at a time: a call waits for the running one
        on the same target model or drafter to finish (:mod:`specdec.concurrency`). Engines on different models run
        concurrently. A call from inside a running call on the same thread (e.g. from a streamer) raises
        ``ConcurrentUseError``.
        """
        max_new_tokens = as_count(max_new_tokens, "max_new_tokens")
        if eos_token_id is _FROM_CONFIG:
            config = getattr(self.target, "generation_config", None)
            eos_token_id = getattr(config, "eos_token_id", None)
        input_ids = self._check_prompt(input_ids, attention_mask)
        sampling = SamplingConfig(do_sample, temperature, top_k, top_p, min_p, repetition_penalty)
        self._check_sampling(sampling)
        self._check_length(input_ids, max_new_tokens)
        if sampling.do_sample and generator is None:  # never draw from (or reseed) the global RNG
            generator = torch.Generator(device=self.runner.device)
            generator.seed()
        stops = StoppingRules(max_new_tokens, normalize_eos(eos_token_id),
                              [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or []),
                              tokenizer)
        stats = DecodingStats(lossless=self.verifier.lossless, verifier=self.verifier.name,
                              drafter=self.drafter.name)
        draft_forwards_before = self.drafter.forward_count

        t0 = time.perf_counter()
        prefill = self.runner.prefill(input_ids, output_hidden_states=self.drafter.needs_target_hidden_states)
        logits = prefill.logits[-1:]  # [1, V]
        if sampling.penalizes_repetition:
            logits = apply_repetition_penalty(logits, seen_mask(input_ids[0], logits.shape[-1]),
                                              sampling.repetition_penalty)
        first = next_token(logits, sampling, generator)
        stats.prefill_time = time.perf_counter() - t0
        state = DecodeState(sequence=input_ids, prompt_len=input_ids.shape[1], target=self.runner,
                            sampling=sampling, generator=generator, max_new_tokens=max_new_tokens)
        if prefill.hidden_states is not None:
            state.target_hidden = prefill.hidden_states[-1]
        done = emit(state, stops, first, streamer)
        if not done:
            self.drafter.begin(state)
            if self.overlap:
                self._overlapped(state, stops, stats, streamer)
            while not done and not self.overlap:
                done = self._step(state, stops, stats, streamer)

        stats.transfer_time += state.transfer_time
        stats.new_tokens = state.num_generated
        stats.draft_forwards = self.drafter.forward_count - draft_forwards_before
        stats.drafter_info = self.drafter.describe()
        if streamer is not None:
            streamer.end()
        return GenerationResult(state.sequence, stats)

    def _overlapped(self, state: DecodeState, stops: StoppingRules, stats: DecodingStats, streamer) -> None:
        """The rounds of overlap mode, with the target's and the drafter's own torch thread counts."""
        target_threads, draft_threads = split_threads(self.threads, self.drafter.device.type == "cpu")
        before = torch.get_num_threads()
        torch.set_num_threads(target_threads)
        try:
            OverlapRounds(self.runner, self.drafter, self.verifier, draft_threads).run(state, stops, stats, streamer)
        finally:
            torch.set_num_threads(before)

    # ------------------------------------------------------------------ one step
    def _step(self, state: DecodeState, stops: StoppingRules, stats: DecodingStats, streamer) -> bool:
        """draft -> verify (one target forward over the root and the tree) -> commit -> emit -> observe."""
        t0 = time.perf_counter()
        forwards_before = self._forward_seconds()
        proposed = on_device(self.drafter.propose(state), self.runner.device, stats)
        tree, index_in_proposed = fit(proposed, state.remaining)
        t1 = time.perf_counter()

        prefix_len = self.runner.length  # == len(sequence) - 1: the root is fed with the tree
        slot_tokens = torch.cat([state.sequence[0, -1:], tree.tokens.to(state.sequence.device)])
        hidden = self.drafter.needs_target_hidden_states
        out = self.runner.forward(slot_tokens, tree.slot_positions(prefix_len), tree.ancestors, hidden)
        step = verify_and_commit(self.runner, self.verifier, state, tree, out.logits, prefix_len, stats, proposed)
        if hidden:
            state.target_hidden = out.hidden_states[-1][step.kept_slots]
        stats.verify_time += time.perf_counter() - t1
        stats.draft_time += t1 - t0
        done = emit(state, stops, step.tokens, streamer)

        result = step.result
        if index_in_proposed is not None:  # report node indices of the tree the drafter proposed
            result = VerificationResult(index_in_proposed[result.accepted_nodes], result.tokens, result.bonus)
        outcome = StepOutcome(proposed, result, out.logits, state.sequence[0, -result.tokens.numel():],
                              out.hidden_states)
        t2 = time.perf_counter()
        self.drafter.observe(state, outcome)
        t3 = time.perf_counter()
        stats.draft_time += t3 - t2
        target_seconds, draft_seconds = (a - b for a, b in zip(self._forward_seconds(), forwards_before))
        stats.record_step_time(t3 - t0, target_seconds, draft_seconds)
        return done

    def _forward_seconds(self) -> tuple[float, float]:
        """Seconds spent so far inside the target's and the drafter's model forwards: the timing hook of the
        per-step overhead (DecodingStats.overhead_time)."""
        return self.runner.forward_seconds, self.drafter.forward_seconds

    # ------------------------------------------------------------------ input checks
    def _check_prompt(self, input_ids, attention_mask) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor):
            input_ids = torch.as_tensor(input_ids, dtype=torch.long)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise InvalidInputError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[0] != 1:
            raise InvalidInputError(f"SpecEngine decodes one sequence at a time; got a batch of {input_ids.shape[0]}")
        if input_ids.shape[1] == 0:
            raise InvalidInputError("the prompt is empty: input_ids has no tokens")
        if attention_mask is not None and not bool(torch.as_tensor(attention_mask).bool().all()):
            raise InvalidInputError("padded prompts are not supported: attention_mask must be all ones")
        if input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise InvalidInputError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        vocab = self.runner.vocab_size
        if bool((input_ids < 0).any()) or bool((input_ids >= vocab).any()):
            raise InvalidInputError(f"input_ids hold token ids outside the target vocabulary [0, {vocab})")
        return input_ids.long().to(self.runner.device)

    def _check_length(self, input_ids: torch.Tensor, max_new_tokens) -> None:
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        limit = self.runner.max_positions
        if limit is not None and input_ids.shape[1] + max_new_tokens > limit:
            raise InvalidInputError(
                f"prompt ({input_ids.shape[1]} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the target's "
                f"context of {limit} positions")

    def _check_sampling(self, sampling: SamplingConfig) -> None:
        if sampling.do_sample and not self.verifier.samples:
            raise InvalidInputError(
                f"do_sample=True needs a sampling verifier; {self.verifier.name!r} decodes greedily")
        if not sampling.do_sample and self.verifier.samples:
            raise InvalidInputError(f"verifier {self.verifier.name!r} samples; pass do_sample=True or use 'greedy'")
