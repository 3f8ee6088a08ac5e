"""Actors: classes that provide resources and the operations on them.

    class Slice(Actor):
        resources = ("/cluster/ey04", "/slice/13")

        @operation
        async def status(self, verbose: bool = False) -> dict:
            ...

        @operation("restart")
        def restart_slice(self) -> str:
            ...

Operations take keyword arguments and return plain msgpack-able values; they
may be coroutines. An exception raised by an operation reaches the caller as
an ``operation-failed`` error carrying its message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, overload

from agent.resources import validate_resource

F = TypeVar("F", bound=Callable[..., Any])
_OPERATION = "__agent_operation__"


@overload
def operation(name: F) -> F: ...


@overload
def operation(name: str | None = None) -> Callable[[F], F]: ...


def operation(name: Any = None) -> Any:
    """Mark a method as an operation, named after the method or ``name``."""
    if callable(name):
        setattr(name, _OPERATION, name.__name__)
        return name

    def mark(function: F) -> F:
        setattr(function, _OPERATION, name or function.__name__)
        return function

    return mark


class Actor:
    """Base of every actor: declare ``resources`` and decorate operations."""

    resources: tuple[str, ...] = ()

    def __init__(self, resources: tuple[str, ...] | list[str] | None = None) -> None:
        if resources is not None:
            self.resources = tuple(resources)
        for resource in self.resources:
            validate_resource(resource)

    def operations(self) -> dict[str, Callable[..., Any]]:
        found: dict[str, Callable[..., Any]] = {}
        for attribute in dir(type(self)):
            member = getattr(type(self), attribute, None)
            name = getattr(member, _OPERATION, None)
            if name is not None:
                found[name] = getattr(self, attribute)
        return found
