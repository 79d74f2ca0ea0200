"""The engine's core: the call-policy protocol and its composition, the per-call context, the event hub."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest

from flashcard_pipeline.errors import RateLimitError
from flashcard_pipeline.resilience import (
    CallContext,
    CallPolicy,
    DirectPolicy,
    EventHub,
    PolicyPipeline,
    ProviderAnswer,
    ResilienceEvent,
    RetryEvent,
)

CTX = CallContext(stage="nuance", item_key="사과", provider="openrouter", model="m", estimated_tokens=2000)


class Recording:
    def __init__(self, name: str, log: list[str], attempts: int = 1) -> None:
        self.name, self.log, self.attempts = name, log, attempts

    async def execute(self, call: Callable[[], Any], context: CallContext) -> Any:
        assert context is CTX
        result = None
        for _ in range(self.attempts):
            self.log.append(f"{self.name}>")
            result = await call()
            self.log.append(f"<{self.name}")
        return result


async def test_pipeline_composes_outermost_first() -> None:
    log: list[str] = []

    async def call() -> str:
        log.append("call")
        return "done"

    pipeline = PolicyPipeline([Recording("a", log), Recording("b", log), Recording("c", log)])
    assert await pipeline.execute(call, CTX) == "done"
    assert log == ["a>", "b>", "c>", "call", "<c", "<b", "<a"]


async def test_outer_policy_re_entering_gets_fresh_inner_calls() -> None:
    log: list[str] = []
    calls = 0

    async def call() -> int:
        nonlocal calls
        calls += 1
        return calls

    pipeline = PolicyPipeline([Recording("retry", log, attempts=2), Recording("inner", log)])
    assert await pipeline.execute(call, CTX) == 2
    assert log == ["retry>", "inner>", "<inner", "<retry", "retry>", "inner>", "<inner", "<retry"]


async def test_empty_pipeline_and_direct_policy_call_once() -> None:
    calls: list[int] = []

    async def call() -> str:
        calls.append(1)
        return "x"

    assert await PolicyPipeline([]).execute(call, CTX) == "x"
    assert await DirectPolicy().execute(call, CTX) == "x"
    assert len(calls) == 2
    assert isinstance(DirectPolicy(), CallPolicy)
    assert isinstance(PolicyPipeline([]), CallPolicy)


async def test_direct_policy_propagates_errors_and_cancellation() -> None:
    error = RateLimitError("slow down", status_code=429)

    async def failing() -> None:
        raise error

    with pytest.raises(RateLimitError) as info:
        await PolicyPipeline([DirectPolicy(), DirectPolicy()]).execute(failing, CTX)
    assert info.value is error

    async def cancelled() -> None:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await DirectPolicy().execute(cancelled, CTX)

    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(PolicyPipeline([DirectPolicy()]).execute(forever, CTX))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


# -- the per-call context ---------------------------------------------------------------------------------

def test_a_context_collects_pauses_and_the_answer_of_its_own_request_only() -> None:
    one = CallContext(stage="nuance", item_key="a", provider="p", model="m", estimated_tokens=1)
    other = CallContext(stage="nuance", item_key="a", provider="p", model="m", estimated_tokens=1)
    one.record_pause(2.5)
    one.record_pause(0.0)
    one.record_pause(-1.0)
    one.report(ProviderAnswer(120, {"x-ratelimit-limit-requests": "60"}))
    assert (one.paused, one.key) == (2.5, ("p", "m"))
    assert one.answer is not None and one.answer.total_tokens == 120
    assert (other.paused, other.answer, other.retrying) == (0.0, None, False), "nothing is shared between requests"
    assert one != other, "a context is one request, not a value"


# -- the event hub ----------------------------------------------------------------------------------------

class Ping(ResilienceEvent):
    pass


class LoudPing(Ping):
    pass


def test_the_hub_delivers_by_type_in_order_and_survives_a_failing_listener(caplog: pytest.LogCaptureFixture) -> None:
    hub = EventHub()
    assert not hub.wants(Ping)
    pings: list[ResilienceEvent] = []
    everything: list[ResilienceEvent] = []

    def broken(event: ResilienceEvent) -> None:
        raise RuntimeError("dashboard is down")

    hub.subscribe(ResilienceEvent, broken)
    hub.subscribe(Ping, pings.append)
    hub.subscribe(ResilienceEvent, everything.append)
    assert hub.wants(Ping) and hub.wants(RetryEvent), "a subscriber of every event wants each kind"
    first, second, third = Ping(), LoudPing(), ResilienceEvent()
    with caplog.at_level(logging.ERROR, logger="flashcard_pipeline.resilience.events"):
        for event in (first, second, third):
            hub.emit(event)
    assert pings == [first, second], "a subscriber gets its type and its subclasses"
    assert everything == [first, second, third], "a failing listener does not stop the others"
    assert sum("listener failed" in r.getMessage() for r in caplog.records) == 3
    hub.unsubscribe(Ping, pings.append)
    hub.unsubscribe(RetryEvent, pings.append)  # never subscribed: ignored
    hub.emit(Ping())
    assert len(pings) == 2 and len(everything) == 4
