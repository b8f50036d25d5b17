"""Drafter options checked by name and type before a drafter is built, from what each drafter already declares: the
annotated parameters of its constructor (``model``, ``heads``, ``table``, ...) and the fields of its config dataclass
(the ``config`` parameter's type, built from ``**options``). So ``depth="4"``, ``depth=2.5``, ``min_prob="x"``,
``model="name"`` or a misspelt option fail at once with the option's name and type, for every registered drafter,
without a check in each drafter file. Range checks (``depth >= 1``...) stay in each config's ``__post_init__``.

An annotation this cannot resolve or does not know (a name imported only for type checkers, a Literal, a
callable...) is not checked here: the drafter's own checks still apply.
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
import os
import sys
import types
import typing
from collections import abc
from functools import lru_cache

from specdec.errors import InvalidInputError

_SKIPPED_PARAMS = {"self", "target", "config"}


@lru_cache(maxsize=None)
def declared_options(cls: type) -> tuple[dict[str, object], bool]:
    """({option name: its type, or None when unknown}, whether the drafter takes options it does not declare)."""
    signature = inspect.signature(cls.__init__)
    namespace = vars(sys.modules[cls.__module__])
    declared: dict[str, object] = {}
    open_ended = False
    config_cls = None
    for name, param in signature.parameters.items():
        if param.kind is param.VAR_KEYWORD:
            open_ended = True
            continue
        if param.kind is param.VAR_POSITIONAL:
            continue
        kind = _resolve(param.annotation, namespace)
        if name == "config":
            config_cls = next((t for t in _members(kind) if dataclasses.is_dataclass(t)), None)
        elif name not in _SKIPPED_PARAMS:
            declared[name] = kind
    if config_cls is not None and open_ended:  # **options build the config: its fields are the options
        open_ended = False
        config_namespace = vars(sys.modules[config_cls.__module__])
        for field in dataclasses.fields(config_cls):
            if field.init:
                declared[field.name] = _resolve(field.type, config_namespace)
    return declared, open_ended


def check_options(name: str, cls: type, options: dict) -> None:
    """Raise InvalidInputError for an option ``cls`` does not take or a value of the wrong type."""
    declared, open_ended = declared_options(cls)
    if not open_ended:
        unknown = sorted(set(options) - set(declared))
        if unknown:
            raise InvalidInputError(f"drafter {name!r} has no option {', '.join(map(repr, unknown))}; its options: "
                                    f"{', '.join(sorted(declared))}")
    for key, value in options.items():
        kind = declared.get(key)
        if kind is not None and not _matches(value, kind):
            raise InvalidInputError(f"drafter {name!r} option {key} must be {_describe(kind)}, got "
                                    f"{type(value).__name__} {value!r:.60}")


# ---------------------------------------------------------------------------------------------- types
def _resolve(annotation, namespace: dict):
    if annotation is inspect.Parameter.empty:
        return None
    for _ in range(2):  # a quoted annotation under `from __future__ import annotations` is a string of a string
        if not isinstance(annotation, str):
            break
        try:
            annotation = eval(annotation, dict(namespace), {})  # noqa: S307 - the drafter's own annotation text
        except Exception:  # a name only imported for type checkers
            return None
    return None if isinstance(annotation, str) else annotation


def _members(kind) -> tuple:
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return typing.get_args(kind)
    return (kind,)


def _matches(value, kind) -> bool:
    """Whether ``value`` fits ``kind``; True for a kind this does not know (not checked)."""
    for member in _members(kind):
        verdict = _matches_one(value, member)
        if verdict is None or verdict:
            return True
    return False


def _matches_one(value, kind) -> "bool | None":  # None: a kind this does not check
    if kind is None or kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, (str, os.PathLike))
    origin = typing.get_origin(kind)
    if origin is tuple or origin is list:
        args = typing.get_args(kind)
        if not isinstance(value, (tuple, list)):
            return False
        item = args[0] if args else None
        if len(args) == 2 and args[1] is Ellipsis or origin is list:
            return item is None or all(_matches(v, item) for v in value)
        return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
    if origin is not None and isinstance(origin, type) and issubclass(origin, abc.Mapping):
        return isinstance(value, abc.Mapping)
    if isinstance(kind, type):
        return isinstance(value, kind)
    return None


def _describe(kind) -> str:
    names = []
    for member in _members(kind):
        if member is None or member is type(None):
            names.append("None")
        elif member is str:
            names.append("a string")
        elif member is int:
            names.append("an int")
        elif member is float:
            names.append("a number")
        elif member is bool:
            names.append("true/false")
        elif typing.get_origin(member) in (tuple, list):
            names.append("a list")
        elif isinstance(member, type):
            names.append(f"a {member.__module__.split('.')[0]}.{member.__qualname__}"
                         if member.__module__ != "builtins" else member.__name__)
        else:
            names.append(str(member))
    return " or ".join(names)
