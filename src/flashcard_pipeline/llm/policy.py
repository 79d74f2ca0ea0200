"""The seam between the stages and the resilience engine.

Stages never call the client directly; they hand a zero-argument call to a :class:`CallPolicy`.
Retries, circuit breakers and rate limiters are policies too, so they can be added and stacked
later without touching the stages.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, runtime_checkable

T = TypeVar("T")


@dataclass(frozen=True)
class CallContext:
    """What a policy may key on (limiter buckets, breaker per model) and log."""

    stage: str
    item_key: str
    provider: str
    model: str
    #: Prompt estimate plus ``max_tokens``: the most this call can draw from a token budget.
    estimated_tokens: int
    #: Run by a retry policy before each retry, outside every inner layer; an error it raises ends the loop
    #: (the pipeline's budget check: a retry costs money, but refusing it must not look like a provider outcome
    #: to a breaker or take a rate-limit slot).
    before_retry: Callable[[], None] | None = field(default=None, compare=False, repr=False)


@runtime_checkable
class CallPolicy(Protocol):
    async def execute(self, call: Callable[[], Awaitable[T]], context: CallContext) -> T:
        """Run ``call`` (possibly several times, each invocation giving a fresh awaitable)."""
        ...


class DirectPolicy:
    """Call once and let every error, cancellation included, propagate unchanged."""

    async def execute(self, call: Callable[[], Awaitable[T]], context: CallContext) -> T:
        return await call()


class PolicyPipeline:
    """Compose policies outermost-first, like a Polly pipeline.

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


#: Set by a retry loop for the duration of one request. Its presence tells a nested retry policy not to
#: retry again; its value collects the seconds inner policies spent paused (an open circuit, a rate
#: limit), which the retry loop does not count against its deadline: waiting for the provider to come
#: back is not time spent trying, and must not make an item give up the moment the provider returns.
RETRY_SCOPE: ContextVar[list[float] | None] = ContextVar("flashcard_pipeline_retry_scope", default=None)


def record_pause(seconds: float) -> None:
    """Report a pause to the enclosing retry loop, if any."""
    paused = RETRY_SCOPE.get()
    if paused is not None and seconds > 0:
        paused[0] += seconds
