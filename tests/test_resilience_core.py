"""The engine's core: the call-policy protocol and its composition, the per-call context, the event hub."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from flashcard_pipeline.errors import RateLimitError
from flashcard_pipeline.resilience import (
    CallContext,
    CallPolicy,
    DirectPolicy,
    PolicyPipeline,
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
