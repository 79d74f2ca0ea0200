"""Option values without pydantic in the common cases, so that the status commands start fast.

Typer converts every option value that is not already a bool (``-v``'s count 0, ``--history 10``, ``runs show
7``) through a pydantic TypeAdapter, and importing pydantic costs a tenth of a second, a third of what
``runs list`` may take. :func:`install` gives each parameter of a command a converter that takes the plain cases
itself (an int or a float already of its type, a decimal integer, a string, within the option's bounds) and hands
every other value to Typer's own converter, built on first use; tests/test_startup.py checks that both give the
same values. It relies on Typer's ``_TyperParameter._runtime_param`` (typer >= 0.26): a parameter without it is
left alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from typer.core import TyperGroup

_INTEGER = re.compile(r"-?(0|[1-9][0-9]{0,17})")


class _NotPlain(Exception):
    pass


def plain_value(descriptor: Any, value: Any) -> Any:
    """``value`` as Typer would convert it, for the plain cases; :class:`_NotPlain` for the others."""
    annotation = descriptor.annotation
    info = descriptor.parameter_info
    if annotation is str and type(value) is str:
        return value
    if annotation is int and type(value) is int:
        number: float = value
    elif annotation is int and type(value) is str and _INTEGER.fullmatch(value):
        number = int(value)
    elif annotation is float and type(value) is float:
        number = value
    else:
        raise _NotPlain
    if info.clamp or (info.min is not None and number < info.min) or (info.max is not None and number > info.max):
        raise _NotPlain  # Typer's converter clamps, or says what is wrong
    return number


class _PlainFirst:
    """A parameter's converter: the plain cases here, the rest by Typer's (``RuntimeParam.coerce``'s contract)."""

    def coerce(self, value: Any, param: Any, ctx: Any) -> Any:
        if value is None:
            return () if param.multiple or param.nargs == -1 else None
        if not (param.multiple or param.nargs == -1):
            try:
                return plain_value(param.type_descriptor, value)
            except _NotPlain:
                pass
        from typer._coercion import build_runtime_param

        param._runtime_param = build_runtime_param(param.type_descriptor)
        return param._runtime_param.coerce(value, param=param, ctx=ctx)


_PLAIN_FIRST = _PlainFirst()


def install(params: Iterable[Any]) -> None:
    """Give each Typer parameter whose converter is not built yet the plain-first one."""
    for param in params:
        if getattr(param, "_runtime_param", False) is None and hasattr(param, "type_descriptor"):
            param._runtime_param = _PLAIN_FIRST


class PlainFirstGroup(TyperGroup):
    """A command group whose own options and whose commands' options convert plain values without pydantic."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        install(self.get_params(ctx))  # with the help option, made on first use
        return super().parse_args(ctx, args)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None and not isinstance(command, TyperGroup):
            install(command.get_params(ctx))
        return name, command, rest
