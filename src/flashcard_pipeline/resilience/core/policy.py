"""The call-policy protocol and its composition.

Stages never call the client directly; they hand a zero-argument call and its :class:`CallContext` to a
:class:`CallPolicy`. Retry, circuit breaker and rate limiter are policies; :class:`PolicyPipeline` stacks them
outermost-first, like a Polly pipeline.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, TypeVar, runtime_checkable

from flashcard_pipeline.resilience.core.context import CallContext

T = TypeVar("T")


@runtime_checkable
class CallPolicy(Protocol):
    def execute(self, call: Callable[[], Awaitable[T]], context: CallContext) -> Awaitable[T]:
        """Run ``call`` (possibly several times, each invocation giving a fresh awaitable)."""
        ...


class DirectPolicy:
    """Call once and let every error, cancellation included, propagate unchanged."""

    async def execute(self, call: Callable[[], Awaitable[T]], context: CallContext) -> T:
        return await call()


class PolicyPipeline:
    """Compose policies outermost-first.

    ``PolicyPipeline([a, b, c]).execute(call, ctx)`` runs
    ``a.execute(lambda: b.execute(lambda: c.execute(call, ctx), ctx), ctx)``, so an outer retry
    re-enters every inner policy on each attempt. An empty pipeline calls directly.
    """

    def __init__(self, policies: Sequence[CallPolicy]) -> None:
        self._policies = tuple(policies)

    @property
    def policies(self) -> tuple[CallPolicy, ...]:
        return self._policies

    async def execute(self, call: Callable[[], Awaitable[T]], context: CallContext) -> T:
        def layer(index: int) -> Callable[[], Awaitable[T]]:
            if index == len(self._policies):
                return call
            inner = layer(index + 1)
            return lambda: self._policies[index].execute(inner, context)

        return await layer(0)()
