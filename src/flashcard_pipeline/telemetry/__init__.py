"""OpenTelemetry traces and metrics of a run, at the edge of the package.

Nothing here is imported unless telemetry is on (``--telemetry otlp|console``, FLASHCARD_TELEMETRY, or
``--metrics-port``): the runner imports this package lazily, so a run without it pays nothing, not even the
import. :class:`Telemetry` holds the providers; for a run it hands the pipeline :class:`TelemetryHooks` (spans and
metrics per item, stage, attempt and ledger batch), subscribes an :class:`EngineListener` to the engine's events,
traces the database through the OpenTelemetry SQLAlchemy instrumentation and reads the run's gauges.
Tests build one over the SDK's in-memory exporters with ``Telemetry(tracer_provider=..., meter_provider=...)``;
no global provider is ever set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Link, NoOpTracerProvider

from flashcard_pipeline.config import TelemetrySettings
from flashcard_pipeline.telemetry.exporters import Providers, build, package_version
from flashcard_pipeline.telemetry.instruments import Instruments, RunView
from flashcard_pipeline.telemetry.listener import EngineListener
from flashcard_pipeline.telemetry.spans import TelemetryHooks, mark_failed

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from flashcard_pipeline.pipeline import RunOutcome, RunStats
    from flashcard_pipeline.resilience import EventHub, LimitGroup
    from flashcard_pipeline.storage.ledger import RunRecord
    from flashcard_pipeline.storage.pool_monitor import PoolMonitor

SCOPE = "flashcard_pipeline"

__all__ = ["EngineListener", "Instruments", "RunView", "Telemetry", "TelemetryHooks"]


class RunScope:
    """The run's span while it runs; the runner reports how the run ended."""

    def __init__(self, span: trace.Span) -> None:
        self.span = span

    def outcome(self, outcome: RunOutcome) -> None:
        stats = outcome.stats
        self.span.set_attributes({"flashcard.run.status": str(outcome.status), "flashcard.items.total": stats.total,
                                  "flashcard.items.done": stats.done,
                                  "flashcard.items.failed": stats.failed, "flashcard.requests": stats.requests,
                                  "flashcard.cost_usd": round(stats.cost_usd, 6)})
        if outcome.abort_reason is not None:
            self.span.set_status(trace.Status(trace.StatusCode.ERROR, outcome.abort_reason[:300]))


class Telemetry:
    """One process's tracer and meter providers, and the run they watch."""

    def __init__(self, *, tracer_provider: TracerProvider | None = None, meter_provider: MeterProvider | None = None,
                 capture_content: bool = False, providers: Providers | None = None) -> None:
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.capture_content = capture_content
        self._providers = providers
        self.tracer = (tracer_provider or NoOpTracerProvider()).get_tracer(SCOPE, package_version())
        self.instruments = Instruments((meter_provider or NoOpMeterProvider()).get_meter(SCOPE, package_version()))
        self.listener = EngineListener(self.instruments)
        self._instrumented = False

    @classmethod
    def start(cls, settings: TelemetrySettings) -> Telemetry:
        providers = build(settings)
        return cls(tracer_provider=providers.tracer_provider, meter_provider=providers.meter_provider,
                   capture_content=settings.capture_content, providers=providers)

    @property
    def metrics_url(self) -> str | None:
        return self._providers.metrics_url if self._providers is not None else None

    def hooks(self, *, provider: str, model: str, base_url: str | None = None) -> TelemetryHooks:
        return TelemetryHooks(self.tracer, self.instruments, provider=provider, model=model, base_url=base_url,
                              capture_content=self.capture_content)

    def instrument_database(self, engine: Engine) -> None:
        """Trace every statement on ``engine`` with the OpenTelemetry SQLAlchemy instrumentation.

        Its engine tracer on our one engine, as ``SQLAlchemyInstrumentor().instrument(engine=...)`` makes it, without
        the instrumentor's process-wide patches: of ``create_engine`` (we make no other engine) and of
        ``Engine.connect``, which adds a ``connect`` span to every checkout, a third of the database spans of a
        run for what the pool metrics already say (docs/benchmarks.md, "Telemetry")."""
        if self.tracer_provider is None:
            return  # without traces it would only repeat, slower, what the pool monitor's gauges say
        from opentelemetry.instrumentation.sqlalchemy import __name__ as scope
        from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
        from opentelemetry.instrumentation.sqlalchemy.version import __version__
        from opentelemetry.semconv.metrics import MetricInstruments

        tracer = (self.tracer_provider or NoOpTracerProvider()).get_tracer(scope, __version__)
        meter = (self.meter_provider or NoOpMeterProvider()).get_meter(scope, __version__)
        usage = meter.create_up_down_counter(
            MetricInstruments.DB_CLIENT_CONNECTIONS_USAGE, unit="connections",
            description="The number of connections that are currently in state described by the state attribute.")
        EngineTracer(tracer, engine, usage)
        self._instrumented = True

    def listen(self, events: EventHub) -> None:
        self.listener.attach(events)

    @contextlib.contextmanager
    def run(self, run: RunRecord, hooks: TelemetryHooks, stats: RunStats, *, spent: Callable[[], float],
            max_cost: float | None = None, pool: PoolMonitor | None = None,
            limit_groups: Callable[[], Iterable[LimitGroup]] = tuple, resumed: bool = False) -> Iterator[RunScope]:
        """The run's span, current for the block (so the run's own database work nests under it); item and
        ledger batch traces link to it. The gauges read ``stats`` and the rest from here on."""
        self.instruments.view = RunView(run_id=run.id, provider=hooks.provider, model=hooks.model, stats=stats,
                                        spent=spent, max_cost=max_cost, pool=pool, limit_groups=limit_groups)
        span = self.tracer.start_span("run", attributes={
            "flashcard.run.id": run.id, "flashcard.run.resumed": resumed, "flashcard.language": run.target_language,
            **hooks.model_attributes})
        hooks.run_links = [Link(span.get_span_context())]
        self.listener.run_span = span
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            yield RunScope(span)
        except BaseException as error:
            mark_failed(span, error)
            raise
        finally:
            otel_context.detach(token)
            self.listener.run_span = None
            span.end()

    def shutdown(self) -> None:
        """Flush and stop: the batch of spans and the last metrics are exported before this returns."""
        if self._instrumented:
            from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer

            EngineTracer.remove_all_event_listeners()
            self._instrumented = False
        if self._providers is not None:
            self._providers.close()
