"""Telemetry: span trees, attributes and metric points of real runs against the simulator (the SDK's in-memory
exporters), secrets and content kept out, the engine's events as span events, the OTLP/HTTP export decoded by a
local receiver, the settings, and nothing of OpenTelemetry imported when telemetry is off."""

from __future__ import annotations

import asyncio
import http.server
import json
import re
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from flashcard_pipeline.config import telemetry_settings
from flashcard_pipeline.errors import ConfigurationError, ServerError
from flashcard_pipeline.models import VocabularyItem
from flashcard_pipeline.resilience import (
    BreakerPause,
    CallContext,
    CircuitBreakerConfig,
    CircuitState,
    CircuitTransition,
    EventHub,
    LimitCut,
    LimitPause,
    LimitWait,
    Resilience,
    RetryConfig,
    RetryEvent,
)
from flashcard_pipeline.runner import ProcessOptions, default_policy, process
from flashcard_pipeline.simulator import SimulatorConfig, run_simulator
from flashcard_pipeline.stages import StageSettings, build_nuance_request
from flashcard_pipeline.storage.db import open_database
from flashcard_pipeline.storage.ledger import Ledger
from flashcard_pipeline.telemetry import Telemetry
from flashcard_pipeline.telemetry.spans import TelemetryHooks
from tests.conftest import json_server

SECRET = "sk-or-v1-telemetry-SECRET-0123456789abcdef"
TERMS = ["학교", "먹다", "빨리", "사과", "가다", "예쁘다", "책", "물", "크다", "친구", "집", "보다"]


def word_list(tmp_path: Path, terms: list[str] = TERMS) -> Path:
    path = tmp_path / "words.csv"
    path.write_text("position,term\n" + "".join(f"{i},{t}\n" for i, t in enumerate(terms, 1)), encoding="utf-8")
    return path


@dataclass
class Captured:
    telemetry: Telemetry
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def points(self, name: str) -> list[Any]:
        """Every data point of the metric ``name`` in one collection."""
        data = self.metrics.get_metrics_data()
        assert data is not None
        return [point for rm in data.resource_metrics for sm in rm.scope_metrics for metric in sm.metrics
                if metric.name == name for point in metric.data.data_points]

    def dump(self) -> str:
        """Every span, event, attribute, resource and metric point as text: what an exporter could send."""
        data = self.metrics.get_metrics_data()
        return "\n".join([*(span.to_json() for span in self.finished()), data.to_json() if data else ""])


@pytest.fixture
def captured() -> Iterator[Captured]:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    metrics = InMemoryMetricReader()
    telemetry = Telemetry(tracer_provider=tracer_provider, meter_provider=MeterProvider(metric_readers=[metrics]))
    yield Captured(telemetry, spans, metrics)
    telemetry.shutdown()


def faulty_options(tmp_path: Path, db_url: str, **changes: Any) -> ProcessOptions:
    values: dict[str, Any] = dict(
        input_path=word_list(tmp_path), output=tmp_path / "cards.jsonl", provider="simulated", db_url=db_url,
        concurrency=4, simulator=SimulatorConfig(server_error_rate=0.2, schema_invalid_rate=0.1, seed=3),
        retry=RetryConfig(initial_delay=0.0, max_attempts=3), breaker=CircuitBreakerConfig(enabled=False))
    values.update(changes)
    return ProcessOptions(**values)


def by_id(spans: list[ReadableSpan]) -> dict[int, ReadableSpan]:
    return {span.context.span_id: span for span in spans}


def parent_of(span: ReadableSpan, index: dict[int, ReadableSpan]) -> ReadableSpan | None:
    return None if span.parent is None else index[span.parent.span_id]


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def test_a_run_is_a_trace_per_item_with_stages_attempts_and_database_spans(
        tmp_path: Path, sqlite_url: str, captured: Captured) -> None:
    options = faulty_options(tmp_path, sqlite_url)
    policy = default_policy(options)
    result = asyncio.run(process(options, policy=policy, telemetry=captured.telemetry))
    assert result.outcome is not None
    ledger = Ledger(open_database(sqlite_url))
    calls = ledger.api_calls(result.outcome.run_id)
    spans = captured.finished()
    index = by_id(spans)
    assert all(span.parent is None or span.parent.span_id in index for span in spans), "a parent was not exported"

    (run,) = [s for s in spans if s.name == "run"]
    assert run.parent is None and attrs(run)["flashcard.run.id"] == result.outcome.run_id
    assert attrs(run)["flashcard.items.total"] == len(TERMS)
    assert attrs(run)["gen_ai.provider.name"] == "simulated"

    items = [s for s in spans if s.name == "item"]
    assert sorted(attrs(s)["flashcard.item"] for s in items) == sorted(TERMS)
    for item in items:  # each item its own trace, linked to the run
        assert item.parent is None and item.context.trace_id != run.context.trace_id
        assert [link.context.span_id for link in item.links] == [run.context.span_id]
    failed_items = {f.term for f in result.outcome.failures}
    assert {attrs(s)["flashcard.item"] for s in items if s.status.status_code is StatusCode.ERROR} == failed_items
    assert {attrs(s)["flashcard.outcome"] for s in items} <= {"done", "failed"}

    stages = [s for s in spans if s.name.startswith("stage ")]
    assert stages and all(parent_of(s, index).name == "item" for s in stages)  # type: ignore[union-attr]
    assert {s.name for s in stages} == {"stage nuance", "stage cards"}

    attempts = [s for s in spans if s.name == "chat simulated/flashcard-sim"]
    assert len(attempts) == len(calls)  # one span per provider attempt, as the ledger recorded them
    for attempt in attempts:
        a = attrs(attempt)
        assert attempt.kind is SpanKind.CLIENT and parent_of(attempt, index).name.startswith("stage ")  # type: ignore[union-attr]
        assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "simulated"
        assert a["gen_ai.request.model"] == "simulated/flashcard-sim"
        assert a["server.address"] == "127.0.0.1" and a["flashcard.attempt"] >= 1
        assert a["flashcard.stage"] in ("nuance", "cards") and a["flashcard.item"] in TERMS
        assert a["flashcard.breaker.state"] == "none"  # this run has no breaker
        if attempt.status.status_code is StatusCode.ERROR:
            assert any(event.name == "exception" for event in attempt.events)
        else:
            assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
            assert a["gen_ai.response.model"] and list(a["gen_ai.response.finish_reasons"]) == ["stop"]
            assert a["http.response.status_code"] == 200
    # error.type is the code the ledger stored for the same failed attempt
    assert Counter(attrs(s).get("error.type") for s in attempts if "error.type" in attrs(s)) \
        == Counter(call.error_code for call in calls if call.error_code)
    assert any(c.error_code == "server_error" for c in calls), "the faults did not happen: the test proves nothing"

    retry = Resilience.find(policy).retry  # type: ignore[union-attr]
    assert retry is not None
    events = Counter(e.name for s in stages for e in s.events if e.name.startswith("retry."))
    assert events["retry.retry"] == retry.stats.retries and events["retry.reask"] == retry.stats.reasks
    assert events["retry.give_up"] == retry.stats.gave_up

    sql = [s for s in spans if s.kind is SpanKind.CLIENT and s.name.split()[0] in ("SELECT", "INSERT", "UPDATE")]
    assert any(parent_of(s, index) is not None and parent_of(s, index).name.startswith("stage ")  # type: ignore[union-attr]
               for s in sql), "the stages' database reads are not under them"
    batches = [s for s in spans if s.name == "ledger write"]
    assert batches and all(b.parent is None and b.links[0].context.span_id == run.context.span_id for b in batches)
    assert sum(attrs(b)["flashcard.ledger.operations"] for b in batches) > len(calls)
    assert any(parent_of(s, index) in batches for s in sql if s.name.startswith("INSERT"))
    assert all(attrs(s)["db.statement"] for s in sql if "db.statement" in attrs(s))

    # Metrics agree with the ledger.
    durations = captured.points("gen_ai.client.operation.duration")
    assert sum(p.count for p in durations) == len(calls)
    by_outcome = Counter()
    for p in durations:
        by_outcome[p.attributes.get("error.type", "ok")] += p.count
    assert by_outcome == Counter(call.error_code or "ok" for call in calls)
    tokens = captured.points("gen_ai.client.token.usage")
    assert sum(p.sum for p in tokens if p.attributes["gen_ai.token.type"] == "input") \
        == sum(c.tokens_in for c in calls)
    assert sum(p.value for p in captured.points("flashcard.llm.cost.usd")) == pytest.approx(
        sum(c.cost_usd or 0 for c in calls))
    items_metric = {p.attributes["flashcard.outcome"]: p.value for p in captured.points("flashcard.items")}
    assert items_metric.get("done", 0) == result.outcome.stats.done
    assert items_metric.get("failed", 0) == result.outcome.stats.failed
    retries = Counter()
    for p in captured.points("flashcard.retries"):
        retries[p.attributes["flashcard.retry.action"]] += p.value
    assert retries["retry"] == retry.stats.retries and retries["reask"] == retry.stats.reasks
    assert sum(p.value for p in captured.points("flashcard.cache.lookups")
               if p.attributes["flashcard.cache.result"] == "miss") == len(stages)
    run_items = {p.attributes["flashcard.item.state"]: p.value for p in captured.points("flashcard.run.items")}
    assert run_items["total"] == len(TERMS) and run_items["done"] == result.outcome.stats.done
    assert captured.points("flashcard.run.cost.usd")[0].value == pytest.approx(sum(c.cost_usd or 0 for c in calls))
    assert captured.points("flashcard.db.pool.checkouts")[0].value > 0
    assert 0 <= captured.points("flashcard.db.pool.efficiency")[0].value <= 1


def test_cached_answers_are_cache_hits_on_stage_spans_and_make_no_attempt(
        tmp_path: Path, sqlite_url: str, captured: Captured) -> None:
    options = faulty_options(tmp_path, sqlite_url, simulator=SimulatorConfig())
    asyncio.run(process(options))  # without telemetry: fills the cache
    asyncio.run(process(faulty_options(tmp_path, sqlite_url, simulator=SimulatorConfig(), limit=5),
                        telemetry=captured.telemetry))  # another run (its key has the limit) of the same words
    spans = captured.finished()
    stages = [s for s in spans if s.name.startswith("stage ")]
    assert len(stages) == 10 and all(attrs(s)["flashcard.cache.hit"] is True for s in stages)
    assert {attrs(s)["flashcard.cache.source"] for s in stages} == {"cache"}
    assert not [s for s in spans if s.name.startswith("chat ")]
    hits = Counter()
    for p in captured.points("flashcard.cache.lookups"):
        hits[(p.attributes["flashcard.cache.type"], p.attributes["flashcard.cache.result"])] += p.value
    assert hits == {("nuance", "hit"): 5, ("cards", "hit"): 5}
    assert not captured.points("gen_ai.client.operation.duration")


def test_housekeeping_polls_are_not_traced(tmp_path: Path, sqlite_url: str, captured: Captured) -> None:
    """The breaker's command polls (here every 20 ms) would otherwise be a trace each."""
    options = faulty_options(tmp_path, sqlite_url, simulator=SimulatorConfig(latency=0.02), concurrency=1,
                             breaker=CircuitBreakerConfig(poll_interval=0.02))
    result = asyncio.run(process(options, telemetry=captured.telemetry))
    assert result.outcome is not None and result.outcome.stats.done == len(TERMS)  # lasting about half a second
    statements = [str(attrs(s).get("db.statement", "")) for s in captured.finished()]
    assert any("stage_results" in statement for statement in statements)  # the database is traced
    assert not [statement for statement in statements if "circuit_breaker_commands" in statement]


async def _simulated_provider_run(tmp_path: Path, db_url: str, telemetry: Telemetry) -> None:
    async with run_simulator(SimulatorConfig(seed=1)) as simulator:
        options = ProcessOptions(input_path=word_list(tmp_path, TERMS[:3]), output=tmp_path / "cards.jsonl",
                                 provider="openai-compatible", base_url=simulator.base_url, api_key=SECRET,
                                 model="gpt-4o-mini", db_url=db_url)
        await process(options, telemetry=telemetry)


def test_prompts_answers_and_the_key_stay_out_of_spans_and_metrics(tmp_path: Path, sqlite_url: str,
                                                                    captured: Captured) -> None:
    asyncio.run(_simulated_provider_run(tmp_path, sqlite_url, captured.telemetry))
    prompt = build_nuance_request(VocabularyItem(position=1, term="학교"),
                                  StageSettings(provider="openai-compatible", model="gpt-4o-mini"))
    system_prompt = prompt.request.messages[0].content
    text = captured.dump()
    assert "chat gpt-4o-mini" in text  # the attempts were exported at all
    assert SECRET not in text
    assert system_prompt[:60] not in text and "gen_ai.input.messages" not in text
    assert "primary_meaning" not in text and "gen_ai.output.messages" not in text


def test_content_goes_on_attempt_spans_only_when_asked_and_the_key_never(tmp_path: Path, sqlite_url: str) -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    telemetry = Telemetry(tracer_provider=provider, capture_content=True)
    try:
        asyncio.run(_simulated_provider_run(tmp_path, sqlite_url, telemetry))
    finally:
        telemetry.shutdown()
    attempts = [s for s in spans.get_finished_spans() if s.name == "chat gpt-4o-mini"]
    assert len(attempts) == 6
    sent = json.loads(attrs(attempts[0])["gen_ai.input.messages"])
    assert [m["role"] for m in sent] == ["system", "user"] and sent[1]["parts"][0]["type"] == "text"
    answer = json.loads(attrs(attempts[0])["gen_ai.output.messages"])
    assert answer[0]["role"] == "assistant" and answer[0]["finish_reason"] == "stop"
    assert json.loads(answer[0]["parts"][0]["content"])  # the model's JSON, whole
    assert all(SECRET not in span.to_json() for span in spans.get_finished_spans())


def test_a_refused_key_echoed_by_the_provider_is_recorded_redacted(tmp_path: Path, sqlite_url: str,
                                                                   captured: Captured) -> None:
    def refuse(_body: Any) -> tuple[int, Any]:
        return 401, {"error": {"message": f"Incorrect API key provided: {SECRET}", "code": "invalid_api_key"}}

    with json_server(refuse) as url:
        options = ProcessOptions(input_path=word_list(tmp_path, TERMS[:2]), output=tmp_path / "c.jsonl",
                                 provider="openai-compatible", base_url=url, api_key=SECRET, model="gpt-4o-mini",
                                 db_url=sqlite_url, concurrency=1)
        result = asyncio.run(process(options, telemetry=captured.telemetry))
    assert result.outcome is not None and result.outcome.abort_reason
    spans = captured.finished()
    (attempt, *_) = [s for s in spans if s.name == "chat gpt-4o-mini"]
    assert attrs(attempt)["error.type"] == "authentication_failed"
    assert attrs(attempt)["flashcard.error.category"] == "authentication"
    exception = next(e for e in attempt.events if e.name == "exception")
    assert "***" in str(exception.attributes["exception.message"])
    (run,) = [s for s in spans if s.name == "run"]
    assert run.status.status_code is StatusCode.ERROR and attrs(run)["flashcard.run.status"] == "aborted"
    assert SECRET not in captured.dump()


def test_engine_events_become_span_events_on_the_stage_and_the_run(captured: Captured) -> None:
    """Each event kind, emitted as the engine emits it (synchronously, in the task of the call it concerns)."""
    telemetry = captured.telemetry
    engine = Resilience(breaker=CircuitBreakerConfig(), retry=RetryConfig())
    hooks: TelemetryHooks = telemetry.hooks(provider="p", model="m", base_url="https://api.example.com/v1")
    telemetry.listen(engine.events)
    engine.pipeline("p", "m")  # makes the circuit: CircuitCreated
    assert telemetry.instruments.circuits == {"p/m": "closed"}
    item = VocabularyItem(position=1, term="학교")
    context = CallContext(stage="nuance", item_key="학교", provider="p", model="m", estimated_tokens=10)
    events: EventHub = engine.events
    opened = CircuitTransition("p/m", CircuitState.CLOSED, CircuitState.OPEN, at=0.0, wall=datetime.now(UTC),
                               reason="failure ratio 0.6", break_duration=30.0)
    run_span = telemetry.tracer.start_span("run")
    telemetry.listener.run_span = run_span
    with hooks.item(item), hooks.stage("nuance", item):
        events.emit(LimitWait("p/m", "requests", 0.25))
        events.emit(LimitWait("p/m", "tokens", 0.5))
        with hooks.attempt(context, build_nuance_request(item, StageSettings(provider="p", model="m")).request, 1):
            pass
        events.emit(RetryEvent("retry", 1, ServerError("boom", status_code=503), 0.5, context))
        events.emit(opened)
        events.emit(LimitPause("p/m", 2.0))
        events.emit(LimitCut("p/m", "requests", 600.0, 300.0, "rate_limited"))
    events.emit(BreakerPause("circuit p/m open until 14:02"))  # no stage: on the run
    run_span.end()
    spans = {s.name: s for s in captured.finished()}
    stage = spans["stage nuance"]
    assert [e.name for e in stage.events] == ["ratelimit.wait", "ratelimit.wait", "retry.retry",
                                              "circuit.transition", "ratelimit.pause", "ratelimit.cut"]
    retry = stage.events[2].attributes
    assert retry["error.type"] == "server_error" and retry["flashcard.retry.delay_s"] == 0.5
    attempt = attrs(spans["chat m"])
    assert attempt["flashcard.ratelimit.wait_s"] == 0.75  # the waits that held this attempt
    assert attempt["flashcard.breaker.state"] == "closed" and attempt["server.port"] == 443
    assert [e.name for e in spans["run"].events] == ["circuit.transition", "ratelimit.pause", "ratelimit.cut",
                                                     "circuit.pause"]
    assert telemetry.instruments.circuits == {"p/m": "open"}
    states = {p.attributes["flashcard.circuit.state"]: p.value for p in captured.points("flashcard.circuit.state")}
    assert states == {"closed": 0, "open": 1, "half_open": 0, "isolated": 0}
    (transition,) = captured.points("flashcard.circuit.transitions")
    assert transition.attributes["flashcard.circuit.to"] == "open" and transition.value == 1
    assert sum(p.count for p in captured.points("flashcard.ratelimit.wait.duration")) == 2
    assert captured.points("flashcard.ratelimit.pause.time")[0].value == 2.0
    assert captured.points("flashcard.ratelimit.limit.changes")[0].attributes["flashcard.ratelimit.direction"] == "cut"


# -- OTLP over HTTP, decoded -----------------------------------------------------------------------------------

@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@pytest.fixture
def otlp_receiver() -> Iterator[tuple[str, list[Received]]]:
    received: list[Received] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


def _attributes(attributes: Any) -> dict[str, Any]:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in attributes}


def test_otlp_http_export_reaches_a_collector_configured_by_the_standard_variables(
        tmp_path: Path, sqlite_url: str, otlp_receiver: tuple[str, list[Received]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    url, received = otlp_receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", url)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=flashcards")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "vocab-worker")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=ci,team=korean")
    options = faulty_options(tmp_path, sqlite_url, simulator=SimulatorConfig(), telemetry="otlp")
    result = asyncio.run(process(options))
    assert result.outcome is not None and result.outcome.stats.done == len(TERMS)

    traces = [r for r in received if r.path == "/v1/traces"]
    metrics = [r for r in received if r.path == "/v1/metrics"]
    assert traces and metrics, [r.path for r in received]
    assert all(r.headers["content-type"] == "application/x-protobuf" and r.headers["x-tenant"] == "flashcards"
               for r in received)
    spans = []
    for request in traces:
        decoded = ExportTraceServiceRequest.FromString(request.body)
        for resource_spans in decoded.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            assert resource["service.name"] == "vocab-worker" and resource["team"] == "korean"
            assert resource["deployment.environment.name"] == "ci" and resource["service.version"]
            spans += [span for scope in resource_spans.scope_spans for span in scope.spans]
    names = Counter(span.name for span in spans)
    assert names["run"] == 1 and names["item"] == len(TERMS) and names["chat simulated/flashcard-sim"] == 2 * len(TERMS)
    chat = next(span for span in spans if span.name == "chat simulated/flashcard-sim")
    assert _attributes(chat.attributes)["gen_ai.usage.output_tokens"] > 0
    metric_names = set()
    for request in metrics:
        decoded_metrics = ExportMetricsServiceRequest.FromString(request.body)
        for resource_metrics in decoded_metrics.resource_metrics:
            assert _attributes(resource_metrics.resource.attributes)["service.name"] == "vocab-worker"
            for scope in resource_metrics.scope_metrics:
                for metric in scope.metrics:
                    metric_names.add(metric.name)
                    if metric.name == "gen_ai.client.operation.duration":
                        assert sum(p.count for p in metric.histogram.data_points) == 2 * len(TERMS)
    assert {"gen_ai.client.operation.duration", "gen_ai.client.token.usage", "flashcard.items",
            "flashcard.run.items", "db.client.connections.usage"} <= metric_names


def test_the_sampler_variable_is_honoured(tmp_path: Path, sqlite_url: str,
                                          otlp_receiver: tuple[str, list[Received]],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    url, received = otlp_receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", url)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    asyncio.run(process(faulty_options(tmp_path, sqlite_url, simulator=SimulatorConfig(), telemetry="otlp")))
    assert [r.path for r in received if r.path == "/v1/traces"] == []
    assert [r.path for r in received if r.path == "/v1/metrics"]


# -- settings -------------------------------------------------------------------------------------------------

def test_settings_from_flags_and_the_standard_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not telemetry_settings().enabled
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")  # not ours to judge while telemetry is off
    assert not telemetry_settings().enabled
    with pytest.raises(ConfigurationError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        telemetry_settings(mode="otlp")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_PROTOCOL")
    monkeypatch.setenv("FLASHCARD_TELEMETRY", "otlp")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    settings = telemetry_settings()
    assert (settings.traces, settings.metrics, settings.traces_protocol) == ("otlp", "none", "http/protobuf")
    assert telemetry_settings(mode="console").traces == "console"
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not telemetry_settings().enabled
    monkeypatch.delenv("OTEL_SDK_DISABLED")
    monkeypatch.setenv("FLASHCARD_METRICS_PORT", "9464")
    assert telemetry_settings(mode="off").metrics_port == 9464 and telemetry_settings(mode="off").enabled
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true")
    assert telemetry_settings().capture_content and not telemetry_settings(capture_content=False).capture_content


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "flashcard_pipeline", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120, check=False)


def test_an_exporter_that_cannot_be_had_is_one_usage_line(tmp_path: Path) -> None:
    words = word_list(tmp_path, TERMS[:1])
    done = run_cli("process", str(words), "--provider", "simulated", "--telemetry", "otlp", "-o",
                   str(tmp_path / "c.jsonl"), env={"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    assert done.returncode == 2, done.stderr
    assert "opentelemetry-exporter-otlp-proto-grpc" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_metrics_port_in_use_is_one_usage_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli("process", str(word_list(tmp_path, TERMS[:1])), "--provider", "simulated",
                       "--metrics-port", str(port), "-o", str(tmp_path / "c.jsonl"))
    assert done.returncode == 2 and f"cannot serve metrics on 127.0.0.1:{port}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def run_python(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)


def off_run(tmp_path: Path, prelude: str = "") -> str:
    return f"""{prelude}
import asyncio, sys
from pathlib import Path
from flashcard_pipeline.cli.app import app  # everything `process` imports
from flashcard_pipeline.runner import ProcessOptions, process
result = asyncio.run(process(ProcessOptions(input_path=Path({str(word_list(tmp_path, TERMS[:2]))!r}),
                     output=Path({str(tmp_path / 'c.jsonl')!r}), provider="simulated")))
assert result.outcome.stats.done == 2
print(sorted(m for m in sys.modules if m.startswith(("flashcard_pipeline.telemetry", "opentelemetry.sdk.trace",
                                                     "opentelemetry.exporter", "opentelemetry.instrumentation",
                                                     "prometheus_client"))))
"""


#: What a machine without the ``telemetry`` extra looks like to Python.
WITHOUT_TELEMETRY = ("import sys\n"
                     "for name in ('opentelemetry', 'prometheus_client'): sys.modules[name] = None")


def test_telemetry_off_loads_nothing_of_it_and_needs_none_of_it_installed(tmp_path: Path) -> None:
    # Installed (redis-py then loads the metrics API on its own), our off path loads none of ours:
    done = run_python(off_run(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    # Not installed, the same run works.
    done = run_python(off_run(tmp_path, WITHOUT_TELEMETRY))
    assert done.returncode == 0, done.stderr


def test_telemetry_without_the_extra_says_how_to_install_it(tmp_path: Path) -> None:
    script = f"""{WITHOUT_TELEMETRY}
sys.argv = ["flashcard-pipeline", "process", {str(word_list(tmp_path, TERMS[:1]))!r}, "--provider", "simulated",
            "--telemetry", "otlp", "-o", {str(tmp_path / 'c.jsonl')!r}]
from flashcard_pipeline.cli.app import main
main()
"""
    done = run_python(script)
    assert done.returncode == 2, done.stderr
    assert re.fullmatch(r"error: telemetry needs OpenTelemetry \(opentelemetry is not installed\): "
                        r"pip install 'flashcard-pipeline\[telemetry\]'", done.stderr.strip()), done.stderr


async def test_an_item_handed_over_to_another_worker_is_neither_done_nor_failed(
        tmp_path: Path, sqlite_url: str, captured: Captured) -> None:
    """A worker that lost an item's lease drops it before the paid call: its trace says so, without an error."""
    from flashcard_pipeline.storage.ledger import PendingItem
    from tests.test_pipeline import ScriptedClient, new_run, pipeline

    ledger = Ledger(open_database(sqlite_url))
    run = new_run(ledger, ["학교", "먹다"])

    async def guard(pending: PendingItem) -> bool:
        return pending.item.term != "먹다"

    client = ScriptedClient()
    hooks = captured.telemetry.hooks(provider="openrouter", model="openai/gpt-4o-mini")
    outcome = await pipeline(ledger, client, hooks=hooks, guard=guard).run(run)
    assert outcome.stats.done == 1 and outcome.stats.failed == 0 and outcome.stats.handed_over == 1
    assert [term for term, _ in client.calls] == ["학교", "학교"]
    spans = captured.finished()
    items = {attrs(s)["flashcard.item"]: s for s in spans if s.name == "item"}
    assert attrs(items["먹다"])["flashcard.outcome"] == "handed_over"
    assert attrs(items["학교"])["flashcard.outcome"] == "done"
    dropped = [s for s in spans if s.name == "stage nuance" and attrs(s)["flashcard.item"] == "먹다"]
    assert len(dropped) == 1 and [e.name for e in dropped[0].events] == ["lease_lost"]
    assert all(s.status.status_code is not StatusCode.ERROR for s in spans)
    outcomes = {p.attributes["flashcard.outcome"]: p.value for p in captured.points("flashcard.items")}
    assert outcomes == {"done": 1, "handed_over": 1}
