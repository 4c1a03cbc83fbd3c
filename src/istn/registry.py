"""Registries: the kinds of a thing (transformation models, similarities) by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from .errors import IstnError

T = TypeVar("T", bound=type)


class Registry(dict[str, type]):
    """``name -> class`` for one kind of thing; ``register`` adds, ``lookup`` finds.

    The command line's choices, the config's checks and the checkpoints' checks all
    read the same registry, so a new kind is one class and one decorator line.
    """

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: make the class available under ``name`` (sets ``cls.name``)."""
        def add(cls: T) -> T:
            if name in self:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            cls.name = name
            self[name] = cls
            return cls
        return add

    def lookup(self, name: str) -> type:
        """The class registered as ``name``; an IstnError naming the choices otherwise."""
        if name not in self:
            raise IstnError(f"{self.kind} '{name}' is unknown; use one of {', '.join(self)}")
        return self[name]
