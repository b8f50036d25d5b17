"""llama.cpp as a benchmark baseline: plain decoding (and its prompt-lookup mode) on the GGUF file the target was
converted from, fed the same token ids, with the same threads and new-token budget.

llama.cpp runs the GGUF's own quantized tensors (Q4_K_M for the shipped Qwen models), so it is a different
numerical model from our de-quantized bf16/fp32 one: its outputs are compared with plain greedy for the record
(``identical``), but a difference is not examined as a near-tie (``Method.exact = False``). Through
llama-cpp-python, an optional extra (``pip install 'specdec[llamacpp]'`` builds it from PyPI; see docs/benchmarks.md
for a CPU whose AMX the OS does not enable).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specdec.benchmarks.methods import Method, RunRecord, Sampling
from specdec.errors import InvalidInputError
from specdec.stopping import normalize_eos

INSTALL_HINT = "pip install 'specdec[llamacpp]' (builds llama-cpp-python from source; docs/benchmarks.md)"
DEFAULT_CONTEXT = 8192  # prompt + new tokens; the KV cache (f16) of the 1.5B over 8192 positions is 235 MB


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        raise InvalidInputError(f"the llama-cpp baselines need llama-cpp-python: {INSTALL_HINT}") from exc
    return llama_cpp


@dataclass
class LlamaCppGenerate(Method):
    """One ``llama_cpp.Llama`` over ``gguf``: greedy (``top_k=1``) or the benchmark's sampling, a fresh KV cache per
    call (no prompt-prefix reuse between calls: HF ``generate`` re-reads every prompt too). ``prompt_lookup`` > 0
    adds llama-cpp-python's prompt-lookup draft (``LlamaPromptLookupDecoding``) with that many tokens per draft;
    it needs ``logits_all`` (without it, llama-cpp-python 0.3.x crashes on prompts over one batch)."""

    name: str
    gguf: str
    threads: int
    sampling: Sampling = Sampling()
    prompt_lookup: int = 0
    context: int = DEFAULT_CONTEXT
    kind: str = "baseline"
    exact: bool = False  # llama.cpp's quantized numerics: a difference from plain greedy is not a tie analysis
    _llm: object = field(default=None, repr=False)

    def _model(self):
        if self._llm is None:
            llama_cpp = import_llama_cpp()
            draft = None
            if self.prompt_lookup:
                from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

                draft = LlamaPromptLookupDecoding(num_pred_tokens=self.prompt_lookup)
            self._llm = llama_cpp.Llama(model_path=self.gguf, n_ctx=self.context, n_threads=self.threads,
                                        n_threads_batch=self.threads, logits_all=bool(self.prompt_lookup),
                                        draft_model=draft, verbose=False)
        return self._llm

    def generate(self, input_ids, max_new_tokens, eos_token_id, seed: int = 0) -> RunRecord:
        if input_ids.shape[0] != 1:
            raise InvalidInputError("the llama-cpp baselines decode one prompt at a time (batch size 1)")
        prompt = input_ids[0].tolist()
        if len(prompt) + max_new_tokens > self.context:
            raise InvalidInputError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceed the "
                                    f"llama-cpp context of {self.context}; pass a larger context")
        llm = self._model()
        eos = set(normalize_eos(eos_token_id))
        s = self.sampling
        options = {"temp": 0.0, "top_k": 1} if not s.do_sample else {
            "temp": s.temperature, "top_k": s.top_k or 0, "top_p": 1.0 if s.top_p is None else s.top_p}

        def run() -> list[int]:
            llm.reset()  # forget the previous call's tokens: llama-cpp-python would reuse a shared prefix
            if s.do_sample:
                llm.set_seed(seed)
            out: list[int] = []
            for token in llm.generate(prompt, min_p=0.0, typical_p=1.0, repeat_penalty=1.0, **options):
                out.append(int(token))
                if token in eos or len(out) == max_new_tokens:
                    break
            return out

        tokens, seconds = self._timed(run)
        return RunRecord(torch.tensor(tokens, dtype=torch.long), seconds)
