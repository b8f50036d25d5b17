"""One generation at a time per model: what makes a :class:`~specdec.engine.SpecEngine` safe to share between threads.

A generate() call mutates state that outlives a single forward: the target runner's KV cache, the drafter's own
cache and tables, its running acceptance rates. Two calls interleaving on that state give shape errors or, worse,
one prompt's continuation in the other's output. So every call holds a lock for its whole duration: one lock per
target model (every engine built on that model, whatever its drafter) and one per drafter object (a drafter shared by
engines on different targets). Calls from several threads are therefore *serialized*, never interleaved; engines on
different models run concurrently. Locks are always taken in the same order (target, then drafter), so two engines
cannot deadlock each other.

A call made from inside a running call on the same thread (a streamer or drafter calling generate again on the same
model) would wait for itself forever; it raises :class:`~specdec.errors.ConcurrentUseError` instead.

This is the choice of HF pipelines and llama.cpp's server slots (one sequence per context at a time), not of vLLM,
whose engine batches concurrent requests; a batched engine is out of scope here.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import ExitStack, contextmanager
from functools import wraps

from specdec.errors import ConcurrentUseError

_LOCKS: "weakref.WeakKeyDictionary[object, _OwnedLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()  # creating a lock for an object is itself a race


class _OwnedLock:
    """A lock that knows which thread holds it, so a same-thread re-entry is an error instead of a deadlock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.owner: int | None = None

    def acquire(self, what: str) -> None:
        if self.owner == threading.get_ident():
            raise ConcurrentUseError(
                f"generate() was called again from inside a running generate() on the same {what} (from a streamer "
                "or drafter callback?); a model generates one sequence at a time: call it after the first returns")
        self._lock.acquire()
        self.owner = threading.get_ident()

    def release(self) -> None:
        self.owner = None
        self._lock.release()


_BY_ID: dict[int, _OwnedLock] = {}  # objects that cannot be weakly referenced or hashed (kept for the process)


def _lock_of(obj) -> _OwnedLock:
    with _LOCKS_GUARD:
        try:
            lock = _LOCKS.get(obj)
            if lock is None:
                lock = _LOCKS[obj] = _OwnedLock()
        except TypeError:  # unhashable (an eq dataclass) or without __weakref__ (__slots__)
            lock = _BY_ID.setdefault(id(obj), _OwnedLock())
        return lock


@contextmanager
def exclusive(target, drafter):
    """Hold ``target``'s and ``drafter``'s generation locks (in that order) for the body."""
    with ExitStack() as stack:
        for obj, what in ((target, "target model"), (drafter, "drafter")):
            lock = _lock_of(obj)
            lock.acquire(what)
            stack.callback(lock.release)
        yield


def one_generation_at_a_time(method):
    """Decorate an engine method so that calls on engines sharing its target model or drafter are serialized."""

    @wraps(method)
    def serialized(self, *args, **kwargs):
        with exclusive(self.target, self.drafter):
            return method(self, *args, **kwargs)

    return serialized
