"""Registries: the names a flag accepts, each mapped to the class or function behind it.

fedprune's extension points (sparsity schedules, mask criteria, datasets, the
tables of RESULTS.md) are each one `Registry`. An entry is registered where it
is defined, with a decorator or an `add` call, and carries its spec: the name
(the flag value), a one-line help text, and the parameters it reads (config
fields, equal to the driver flags). Flag choices, `--help` text and
`ExperimentConfig.validate` read the registries, so adding a schedule,
criterion, dataset or table is one class or function in one module, plus its
test; the drivers import users' own modules with `--extensions` before flags
are checked (`fedprune/extensions.py`). docs/extending.md shows one of each.

Entries validate their own parameters when they are built (the constructor
raises `fedprune.errors.InvalidArgument` naming the flag, as tfmot's schedule
classes do), so `build` is also the check.

Importing this module is cheap (no TensorFlow).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from fedprune.errors import InvalidArgument

T = TypeVar("T")


def _signature_params(target: Callable) -> tuple[str, ...]:
    """The names a target takes as keywords: a dataclass's init fields, a function's keywords."""
    if dataclasses.is_dataclass(target):
        return tuple(f.name for f in dataclasses.fields(target) if f.init)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in inspect.signature(target).parameters.values()
                 if p.kind in kinds)


@dataclasses.dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered name and its spec.

    Attributes:
      name: the flag value that selects it.
      help: one line for `--help` (a phrase, no final period).
      target: the class or function; `build` calls it with `params` as keywords.
      params: the config fields (= driver flags) it reads, in order.
    """

    name: Hashable
    help: str
    target: T
    params: tuple[str, ...]

    def build(self, values: Mapping[str, Any]):
        """`target(**{p: values[p]})` for the params present in `values`.

        Params missing from `values` take the target's own defaults. The target
        validates them and raises `InvalidArgument` naming the flag.
        """
        return self.target(**{p: values[p] for p in self.params if p in values})


class Registry(Generic[T]):
    """Names accepted by one flag, in registration order, each with its `Entry`.

    Iterating yields the names, so `"|".join(registry)` and `name in registry`
    read like the tuples of names they replace.
    """

    def __init__(self, flag: str, what: str):
        """
        Args:
          flag: the driver flag (without `--`) whose values these are; errors name it.
          what: what an entry is, for messages (e.g. "sparsity schedule").
        """
        self.flag = flag
        self.what = what
        self._entries: dict[Hashable, Entry[T]] = {}

    def add(self, name: Hashable, target: T, *, help: str,
            params: tuple[str, ...] | None = None) -> T:
        """Registers `target` under `name`; returns `target`.

        Args:
          name: the flag value; a string without `,` or `|` (they separate lists
            of names), or an int (tables).
          target: a class or function, called with `params` as keywords by `build`.
          help: one non-empty line.
          params: the config fields it reads; default: a dataclass's fields or a
            function's keyword parameters.

        Raises:
          ValueError: a malformed name or help, or `name` taken by another target
            (registering the same target again is a no-op, e.g. a re-imported module).
        """
        if isinstance(name, str):
            if not name or any(c in name for c in ",| \n"):
                raise ValueError(f"{self.what} name {name!r}: expected a non-empty word "
                                 "without ',', '|' or spaces")
        elif not isinstance(name, int):
            raise ValueError(f"{self.what} name {name!r}: expected a string or an int")
        if not help or not help.strip() or "\n" in help:
            raise ValueError(f"{self.what} {name!r}: help must be one non-empty line")
        old = self._entries.get(name)
        if old is not None and old.target is not target:
            raise ValueError(f"{self.what} {name!r} is registered already (by "
                             f"{getattr(old.target, '__module__', '?')}."
                             f"{getattr(old.target, '__qualname__', old.target)})")
        params = _signature_params(target) if params is None else tuple(params)
        self._entries[name] = Entry(name, help.strip(), target, params)
        return target

    def register(self, name: Hashable, *, help: str,
                 params: tuple[str, ...] | None = None) -> Callable[[T], T]:
        """`add` as a class or function decorator: `@REGISTRY.register("name", help=...)`."""

        def decorator(target: T) -> T:
            return self.add(name, target, help=help, params=params)

        return decorator

    def accepted(self) -> str:
        """What the flag accepts, for error messages: `one of a|b|c`."""
        return "one of " + "|".join(map(str, self._entries))

    def check(self, name) -> None:
        """Raises `InvalidArgument` (flag, value, accepted names) for an unknown name."""
        if name not in self._entries:
            raise InvalidArgument(self.flag, name, self.accepted())

    def entry(self, name) -> Entry[T]:
        """The entry of `name`; `InvalidArgument` naming the flag for an unknown one."""
        self.check(name)
        return self._entries[name]

    def __getitem__(self, name) -> T:
        """The registered class or function; `InvalidArgument` for an unknown name."""
        return self.entry(name).target

    def build(self, name, values: Mapping[str, Any]):
        """Builds (and so validates) entry `name` from config values; see `Entry.build`."""
        return self.entry(name).build(values)

    def names(self) -> tuple:
        return tuple(self._entries)

    def entries(self) -> tuple[Entry[T], ...]:
        return tuple(self._entries.values())

    def values(self) -> tuple[T, ...]:
        """The registered targets, in registration order."""
        return tuple(e.target for e in self._entries.values())

    def describe(self) -> str:
        """Every name with its help, for `--help`: `a: help of a; b: help of b.`"""
        return "; ".join(f"{e.name}: {e.help}" for e in self._entries.values()) + "."

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.flag!r}: {'|'.join(map(str, self._entries))})"
