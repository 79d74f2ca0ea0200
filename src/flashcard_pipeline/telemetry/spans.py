"""The pipeline's hooks as spans and metrics: one span per item, stage, provider attempt and ledger batch.

Each item is the root of its own trace, linked to the run's span: a 10,000-word run is then 10,000 small traces
a trace backend can show and a tail sampler can keep or drop one by one (every item with an error kept), instead
of one trace too large for either. Stages are children of their item, attempts of their stage; the database
spans of the SQLAlchemy instrumentation nest under whichever is current. Ledger batches, which mix the writes of
many items, are traces of their own, linked to the run.

The attempt span is the GenAI client span (``chat {model}``, kind CLIENT): the LLM client makes exactly one HTTP
request per attempt, so an httpx span under it would repeat it with less to say (see docs/observability.md).
Prompts and answers go on it only when asked (``capture_content``); the API key never does (headers are not read).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.parse
from collections.abc import Iterator
from contextvars import ContextVar
from types import TracebackType
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.server_attributes import SERVER_ADDRESS, SERVER_PORT
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from flashcard_pipeline.errors import StructuredError
from flashcard_pipeline.hooks import LeaseLost, Note, RunHooks
from flashcard_pipeline.llm.types import ChatRequest, ChatResponse
from flashcard_pipeline.models import VocabularyItem
from flashcard_pipeline.resilience import CallContext
from flashcard_pipeline.telemetry.instruments import Instruments

OPERATION = "chat"
#: The stage whose block the current task is in: the engine's listener puts limiter waits on it.
CURRENT_STAGE: ContextVar[StageSpan | None] = ContextVar("flashcard_stage", default=None)


def error_type(error: BaseException) -> str:
    """``error.type``: our error code (``rate_limited``, ``server_error``, ``read_timeout``, ...), else the class."""
    return error.code if isinstance(error, StructuredError) else type(error).__qualname__


def mark_failed(span: trace.Span, error: BaseException, *, record: bool = True) -> None:
    span.set_attribute(ERROR_TYPE, error_type(error))
    if isinstance(error, StructuredError):
        span.set_attribute("flashcard.error.category", error.category.value)
    if record:
        span.record_exception(error, escaped=True)
    span.set_status(Status(StatusCode.ERROR, str(error)[:300]))


class ScopedSpan(Note):
    """A span made current for a block; an exception leaving the block is recorded and fails it."""

    __slots__ = ("_span", "_started", "_token", "error", "hooks")

    def __init__(self, hooks: TelemetryHooks, span: trace.Span) -> None:
        self.hooks = hooks
        self._span = span
        self._token: object = None
        self._started = 0.0
        self.error: BaseException | None = None

    def __enter__(self) -> ScopedSpan:
        self._token = otel_context.attach(trace.set_span_in_context(self._span))
        self._started = time.perf_counter()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        otel_context.detach(self._token)  # type: ignore[arg-type]
        try:
            if isinstance(exc, asyncio.CancelledError):
                self._span.add_event("cancelled")
            elif isinstance(exc, LeaseLost):
                self._span.add_event("lease_lost")  # not a failure: another worker finishes the item
            elif exc is not None:
                self.error = exc
                mark_failed(self._span, exc)
            self.finished(time.perf_counter() - self._started)
        finally:
            self._span.end()

    def finished(self, seconds: float) -> None:
        """What the block's end records besides the span (metrics)."""


class ItemSpan(ScopedSpan):
    __slots__ = ("_outcome",)

    def __init__(self, hooks: TelemetryHooks, span: trace.Span) -> None:
        super().__init__(hooks, span)
        self._outcome = "done"

    def failed(self, error: StructuredError) -> None:
        self._outcome = "failed"
        mark_failed(self._span, error, record=False)  # recorded where it happened, on its stage or attempt

    def handed_over(self) -> None:
        self._outcome = "handed_over"

    def finished(self, seconds: float) -> None:
        if self.error is None:
            outcome = self._outcome
            self._span.set_attribute("flashcard.outcome", outcome)
            self.hooks.instruments.items.add(1, {**self.hooks.model_attributes, "flashcard.outcome": outcome})


class StageSpan(ScopedSpan):
    __slots__ = ("_reset", "limit_wait", "stage")

    def __init__(self, hooks: TelemetryHooks, span: trace.Span, stage: str) -> None:
        super().__init__(hooks, span)
        self.stage = stage
        #: Seconds the rate limiter queued this stage's next call (the listener adds, the attempt takes).
        self.limit_wait = 0.0
        self._reset: object = None

    def __enter__(self) -> StageSpan:
        super().__enter__()
        self._reset = CURRENT_STAGE.set(self)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        CURRENT_STAGE.reset(self._reset)  # type: ignore[arg-type]
        super().__exit__(kind, exc, tb)

    def cache_hit(self, source: str) -> None:
        self._span.set_attributes({"flashcard.cache.hit": True, "flashcard.cache.source": source})
        self.hooks.instruments.cache_lookups.add(1, {"flashcard.cache.type": self.stage,
                                                     "flashcard.cache.result": "hit"})

    def cache_miss(self) -> None:
        self._span.set_attribute("flashcard.cache.hit", False)
        self.hooks.instruments.cache_lookups.add(1, {"flashcard.cache.type": self.stage,
                                                     "flashcard.cache.result": "miss"})

    def flagged(self, problems: list[str]) -> None:
        self._span.set_attribute("flashcard.flags", len(problems))
        if self.hooks.capture_content:
            self._span.add_event("content_check.flagged", {"flashcard.problems": problems})


class AttemptSpan(ScopedSpan):
    __slots__ = ("_attributes", "_response")

    def __init__(self, hooks: TelemetryHooks, span: trace.Span, attributes: dict[str, Any]) -> None:
        super().__init__(hooks, span)
        self._attributes = attributes
        self._response: ChatResponse | None = None

    def answered(self, response: ChatResponse) -> None:
        self._response = response
        usage = response.usage
        span = self._span
        span.set_attributes({
            gen_ai.GEN_AI_RESPONSE_MODEL: response.model,
            gen_ai.GEN_AI_USAGE_INPUT_TOKENS: usage.prompt_tokens,
            gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS: usage.completion_tokens,
            "http.response.status_code": response.status_code,
        })
        if response.finish_reason is not None:
            span.set_attribute(gen_ai.GEN_AI_RESPONSE_FINISH_REASONS, [response.finish_reason])
        if response.response_id is not None:
            span.set_attribute(gen_ai.GEN_AI_RESPONSE_ID, response.response_id)
        if usage.cost_usd is not None:
            span.set_attribute("flashcard.cost_usd", usage.cost_usd)
        if self.hooks.capture_content:
            span.set_attribute(gen_ai.GEN_AI_OUTPUT_MESSAGES, json.dumps(
                [{"role": "assistant", "parts": [{"type": "text", "content": response.content}],
                  "finish_reason": response.finish_reason or "stop"}], ensure_ascii=False))

    def finished(self, seconds: float) -> None:
        instruments = self.hooks.instruments
        attributes = self._attributes
        response, error = self._response, self.error
        if response is not None:
            attributes[gen_ai.GEN_AI_RESPONSE_MODEL] = response.model
        if error is not None:
            attributes[ERROR_TYPE] = error_type(error)
            if isinstance(error, StructuredError):
                attributes["flashcard.error.category"] = error.category.value
        attributes["flashcard.outcome"] = "ok" if error is None else "error"
        instruments.operation_duration.record(seconds, attributes)
        tokens, cost = _billed(response, error)
        if tokens is not None:
            instruments.token_usage.record(tokens[0], {**attributes, gen_ai.GEN_AI_TOKEN_TYPE: "input"})
            instruments.token_usage.record(tokens[1], {**attributes, gen_ai.GEN_AI_TOKEN_TYPE: "output"})
        if cost:
            instruments.cost.add(cost, self.hooks.model_attributes)


def _billed(response: ChatResponse | None, error: BaseException | None) -> tuple[tuple[int, int] | None, float]:
    """Tokens and dollars of an attempt: its answer's usage, or what a failed but billed answer reported."""
    if response is not None:
        return (response.usage.prompt_tokens, response.usage.completion_tokens), response.usage.cost_usd or 0.0
    usage = error.details.get("usage") if isinstance(error, StructuredError) else None
    if not isinstance(usage, dict):
        return None, 0.0
    return ((int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)),
            float(usage.get("cost_usd") or 0.0))


class TelemetryHooks(RunHooks):
    """Spans and metrics for one run's provider and model (see the module docstring)."""

    def __init__(self, tracer: trace.Tracer, instruments: Instruments, *, provider: str, model: str,
                 base_url: str | None = None, capture_content: bool = False) -> None:
        self.tracer = tracer
        self.instruments = instruments
        self.capture_content = capture_content
        self.provider = provider
        self.model = model
        self.model_attributes = {gen_ai.GEN_AI_PROVIDER_NAME: provider, gen_ai.GEN_AI_REQUEST_MODEL: model}
        self.server: dict[str, Any] = {}
        if base_url:
            parts = urllib.parse.urlsplit(base_url)
            if parts.hostname:
                self.server[SERVER_ADDRESS] = parts.hostname
                self.server[SERVER_PORT] = parts.port or (443 if parts.scheme == "https" else 80)
        #: The run's span, which item and batch traces link to (none before a run starts).
        self.run_links: list[Link] = []

    def item(self, item: VocabularyItem) -> ItemSpan:
        span = self.tracer.start_span(
            "item", context=otel_context.Context(), links=self.run_links,
            attributes={"flashcard.item": item.term, "flashcard.item.position": item.position,
                        **self.model_attributes})
        return ItemSpan(self, span)

    def stage(self, stage: str, item: VocabularyItem) -> StageSpan:
        span = self.tracer.start_span(f"stage {stage}", attributes={"flashcard.stage": stage,
                                                                    "flashcard.item": item.term})
        return StageSpan(self, span, stage)

    def attempt(self, context: CallContext, request: ChatRequest, attempt: int) -> AttemptSpan:
        metric_attributes: dict[str, Any] = {gen_ai.GEN_AI_OPERATION_NAME: OPERATION, **self.model_attributes,
                                             "flashcard.stage": context.stage, **self.server}
        stage = CURRENT_STAGE.get()
        waited = 0.0
        if stage is not None:
            waited, stage.limit_wait = stage.limit_wait, 0.0
        attributes = {**metric_attributes, gen_ai.GEN_AI_OUTPUT_TYPE: "json",
                      gen_ai.GEN_AI_REQUEST_MAX_TOKENS: request.max_tokens,
                      "flashcard.item": context.item_key, "flashcard.attempt": attempt,
                      "flashcard.breaker.state": self.instruments.circuits.get(f"{context.provider}/{context.model}",
                                                                               "none"),
                      "flashcard.ratelimit.wait_s": round(waited, 6)}
        if request.temperature is not None:
            attributes[gen_ai.GEN_AI_REQUEST_TEMPERATURE] = request.temperature
        if self.capture_content:
            attributes[gen_ai.GEN_AI_INPUT_MESSAGES] = json.dumps(
                [{"role": m.role, "parts": [{"type": "text", "content": m.content}]} for m in request.messages],
                ensure_ascii=False)
        span = self.tracer.start_span(f"{OPERATION} {request.model}", kind=SpanKind.CLIENT, attributes=attributes)
        return AttemptSpan(self, span, metric_attributes)

    @contextlib.contextmanager
    def background(self) -> Iterator[None]:
        """Tasks started here (breaker command polls, limit publishing) copy a context in which the database
        instrumentation is off: a poll a second would otherwise be a trace a second."""
        with suppress_instrumentation():
            yield

    def ledger_batch(self, operations: int) -> LedgerSpan:
        span = self.tracer.start_span("ledger write", context=otel_context.Context(), links=self.run_links,
                                      attributes={"flashcard.ledger.operations": operations})
        return LedgerSpan(self, span)


class LedgerSpan(ScopedSpan):
    __slots__ = ()

    def finished(self, seconds: float) -> None:
        self.hooks.instruments.ledger_batch.record(seconds, {"flashcard.outcome": "ok" if self.error is None
                                                             else "error"})
