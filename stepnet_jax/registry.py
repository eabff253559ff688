"""Name -> object tables (models, methods, optimizers, schedules, objectives).

A config names what it wants; the registry turns the name into the object, and an
unknown name is an error that lists the known ones, never a silent default.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar('T')


class UnknownName(ValueError):
  """A name no entry is registered under (a misspelt model, method or optimizer in a config):
  the commands end on its one-line message, which lists the known names (``cli.FAILURES``)."""


class Registry(Generic[T]):
  """An ordered table of named entries of one kind (e.g. 'optimizer').

  >>> SQUARES = Registry('square')
  >>> @SQUARES.register('two')
  ... def _two():
  ...   return 4
  >>> SQUARES.get('two')()
  4
  """

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, T] = {}

  def register(self, name: str, entry: T | None = None):
    """Adds ``entry`` under ``name``; without ``entry``, a decorator that adds what it decorates."""

    def add(obj: T) -> T:
      if name in self._entries:
        raise ValueError(f'{self.kind} {name!r} is registered twice')
      self._entries[name] = obj
      return obj

    return add if entry is None else add(entry)

  def get(self, name: str) -> T:
    """The entry called ``name``; an unknown name raises ``UnknownName`` listing the known ones."""
    if name not in self._entries:
      raise UnknownName(f'unknown {self.kind} {name!r}; choose from {", ".join(self._entries)}')
    return self._entries[name]

  def names(self) -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(self._entries)
