"""The server's counters, rendered in Prometheus' text format (``GET /metrics``).

Names and meanings follow vLLM's speculative-decoding metrics where they overlap (``num_drafts``, accepted tokens,
acceptance per draft position); the per-step numbers come from each request's :class:`specdec.stats.DecodingStats`.
Acceptance by depth d is kept as two counters, steps that drafted and reached depth d and steps that accepted its
token, so a scraper can compute the rate over any window (the gauge gives the lifetime rate).
"""

from __future__ import annotations

import threading

import numpy as np

from specdec.stats import DecodingStats

PREFIX = "specdec"


class Metrics:
    def __init__(self, model: str):
        self.model = model
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}  # (endpoint, HTTP status) -> count
        self.cancelled = 0  # generations stopped because their client went away
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.steps = 0  # verification forwards of the target (prefill excluded)
        self.step_tokens = 0  # tokens those steps produced (accepted + 1 each): tau = step_tokens / steps
        self.draft_forwards = 0
        self.reached = np.zeros(0, dtype=np.int64)  # [depth] steps whose draft reached depth d+1
        self.accepted = np.zeros(0, dtype=np.int64)  # [depth] steps that accepted the token at depth d+1
        self.seconds = {"prefill": 0.0, "draft": 0.0, "verify": 0.0}

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def count_cancelled(self) -> None:
        with self._lock:
            self.cancelled += 1

    def count_generation(self, prompt_tokens: int, stats: DecodingStats) -> None:
        lengths = np.asarray(stats.accepted_lengths, dtype=np.int64)  # [steps] accepted + 1
        depths = np.asarray(stats.draft_depths, dtype=np.int64)  # [steps]
        top = int(depths.max(initial=0))
        d = np.arange(1, top + 1)[:, None]  # [top, 1]
        reached = ((depths[None] >= d) & (lengths[None] >= d)).sum(1)  # [top]
        accepted = ((depths[None] >= d) & (lengths[None] >= d + 1)).sum(1)
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += stats.new_tokens
            self.steps += len(lengths)
            self.step_tokens += int(lengths.sum())
            self.draft_forwards += stats.draft_forwards
            self.reached = _add(self.reached, reached)
            self.accepted = _add(self.accepted, accepted)
            self.seconds["prefill"] += stats.prefill_time
            self.seconds["draft"] += stats.draft_time
            self.seconds["verify"] += stats.verify_time

    def render(self, waiting: int, running: bool) -> str:
        with self._lock:
            label = f'model="{_escape(self.model)}"'
            lines: list[str] = []

            def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
                lines.append(f"# HELP {PREFIX}_{name} {help_}")
                lines.append(f"# TYPE {PREFIX}_{name} {kind}")
                for labels, value in samples:
                    lines.append(f"{PREFIX}_{name}{{{label}{labels}}} {_number(value)}")

            metric("requests_total", "counter", "HTTP requests answered, by endpoint and status code.",
                   [(f',endpoint="{e}",status="{s}"', n) for (e, s), n in sorted(self.requests.items())])
            metric("requests_cancelled_total", "counter", "Generations stopped early because the client disconnected.",
                   [("", self.cancelled)])
            metric("queue_waiting", "gauge", "Requests waiting for the engine.", [("", waiting)])
            metric("queue_running", "gauge", "Requests generating now (0 or 1: one engine, no batching).",
                   [("", int(running))])
            metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", self.prompt_tokens)])
            metric("generation_tokens_total", "counter", "Tokens generated.", [("", self.generation_tokens)])
            metric("spec_decode_num_drafts_total", "counter", "Verification steps (target forwards after prefill).",
                   [("", self.steps)])
            metric("spec_decode_num_emitted_tokens_total", "counter",
                   "Tokens the verification steps produced (accepted drafts + one each).", [("", self.step_tokens)])
            metric("spec_decode_mean_accepted_length", "gauge",
                   "tau: tokens per verification step over the server's lifetime.",
                   [("", self.step_tokens / self.steps if self.steps else 0.0)])
            metric("spec_decode_draft_forwards_total", "counter", "Drafter model forwards (0 for model-free drafters).",
                   [("", self.draft_forwards)])
            metric("spec_decode_num_drafted_by_depth_total", "counter",
                   "Steps whose draft reached depth d (drafted that deep and every token above accepted).",
                   [(f',depth="{i + 1}"', n) for i, n in enumerate(self.reached.tolist())])
            metric("spec_decode_num_accepted_by_depth_total", "counter",
                   "Steps that accepted the draft token at depth d.",
                   [(f',depth="{i + 1}"', n) for i, n in enumerate(self.accepted.tolist())])
            metric("spec_decode_acceptance_rate_by_depth", "gauge",
                   "Accepted / reached at depth d over the server's lifetime.",
                   [(f',depth="{i + 1}"', a / r if r else 0.0)
                    for i, (a, r) in enumerate(zip(self.accepted.tolist(), self.reached.tolist()))])
            metric("phase_seconds_total", "counter", "Seconds spent in prefill, drafting and verification.",
                   [(f',phase="{p}"', s) for p, s in self.seconds.items()])
        return "\n".join(lines) + "\n"


def _add(total: np.ndarray, more: np.ndarray) -> np.ndarray:
    out = np.zeros(max(len(total), len(more)), dtype=np.int64)
    out[:len(total)] += total
    out[:len(more)] += more
    return out


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
