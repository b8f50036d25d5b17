"""Exceptions raised by specdec. Each names the problem in words a user can act on."""

from __future__ import annotations


class SpecDecError(Exception):
    """Base class of every error specdec raises on purpose."""


class InvalidInputError(SpecDecError, ValueError):
    """A generation argument or prompt that cannot be served (empty prompt, too long, bad max_new_tokens...)."""


class IncompatibleModelsError(SpecDecError, ValueError):
    """Drafter and target cannot work together (different vocabularies, ...)."""


class UnknownNameError(SpecDecError, KeyError):
    """A registry lookup (drafter, verifier, model, preset) for a name that does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ModelFetchError(SpecDecError, RuntimeError):
    """A model package could not be downloaded or unpacked."""


class ChecksumError(SpecDecError, RuntimeError):
    """An assembled model file does not have the sha256 it must have."""


class CorruptCacheError(SpecDecError, RuntimeError):
    """A cached model file is truncated or unreadable; the message names the file and the command that re-fetches it."""


class HeadsTargetMismatchError(IncompatibleModelsError):
    """Trained draft heads were made for another target model; the message names the field that differs."""


class CorruptHeadsError(SpecDecError, RuntimeError):
    """A draft-heads file is missing, truncated, half-written or fails its sha256; the message names the file."""


class HeadsConfigError(SpecDecError, ValueError):
    """A draft-heads config that its tensors (or the target) do not match; the message names the tensor or field."""


class ConcurrentUseError(SpecDecError, RuntimeError):
    """A generate() call that would interleave with a running one on the same model (a same-thread re-entry)."""


class UnsafeFileError(SpecDecError, ValueError):
    """A file that cannot be read safely: a pickle that would run code, or a path that leaves its folder."""


class KernelBuildError(SpecDecError, RuntimeError):
    """The CPU kernels could not be built (a build that timed out, failed or waited too long on another one)."""
