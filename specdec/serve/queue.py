"""One worker thread that runs submitted jobs one at a time, in arrival order, from a bounded queue.

The engine decodes one sequence at a time and keeps one KV cache, so every generation goes through this queue: no
two ever run at once. A submit past ``max_waiting`` jobs raises :class:`QueueFull` at once (the server answers 429)
instead of letting requests pile up. No batching yet: continuous batching would replace this module.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable


class QueueFull(Exception):
    """``max_waiting`` jobs are already waiting."""


class GenerationQueue:
    def __init__(self, max_waiting: int):
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {max_waiting}")
        self.max_waiting = max_waiting
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting = 0  # submitted, not yet started
        self._running = False
        self._mean_seconds = 0.0  # running mean of a job's duration (the Retry-After estimate)
        self._done = 0
        self._thread = threading.Thread(target=self._work, name="specdec-serve-worker", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def running(self) -> bool:
        return self._running

    def submit(self, job: Callable[[], object]) -> Future:
        """Queue ``job`` (run on the worker thread); its result or exception arrives in the returned future."""
        future: Future = Future()
        with self._lock:
            if self._waiting >= self.max_waiting:
                raise QueueFull(f"{self._waiting} requests are already waiting")
            self._waiting += 1
            self._jobs.put((job, future))
        return future

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the jobs ahead times their mean duration, at least 1."""
        return max(1, round(self._mean_seconds * (self._waiting + int(self._running))))

    def close(self) -> None:
        """Stop the worker after the jobs already queued."""
        self._jobs.put(None)
        self._thread.join()

    def _work(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, future = item
            with self._lock:
                self._waiting -= 1
                self._running = True
            t0 = time.perf_counter()
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(job())
                    except BaseException as exc:  # noqa: BLE001 - handed to the request that submitted it
                        future.set_exception(exc)
            finally:
                seconds = time.perf_counter() - t0
                with self._lock:
                    self._running = False
                    self._done += 1
                    self._mean_seconds += (seconds - self._mean_seconds) / self._done
