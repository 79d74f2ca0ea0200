"""The run's metric instruments, and the gauges read from the live run when a reader collects.

Names follow the OpenTelemetry GenAI conventions where one exists (``gen_ai.client.operation.duration``,
``gen_ai.client.token.usage``), ``flashcard.*`` otherwise. Units are chosen so a Prometheus exporter, ours or the
Collector's, gives the same names: seconds become ``_seconds``, counters get ``_total``, and nothing carries the
unit ``1`` (which the Collector would turn into ``_ratio``). docs/observability.md lists them as Prometheus sees them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.semconv._incubating.metrics.gen_ai_metrics import (
    GEN_AI_CLIENT_OPERATION_DURATION,
    GEN_AI_CLIENT_TOKEN_USAGE,
)

if TYPE_CHECKING:
    from flashcard_pipeline.pipeline import RunStats
    from flashcard_pipeline.resilience import LimitGroup
    from flashcard_pipeline.storage.pool_monitor import PoolMonitor

#: The GenAI conventions' advised buckets: seconds, and tokens.
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CIRCUIT_STATES = ("closed", "open", "half_open", "isolated")


@dataclass
class RunView:
    """What the observable gauges read: the live run, its engine's parts and its database pool."""

    run_id: int
    provider: str
    model: str
    stats: RunStats
    #: Dollars this run spent before and during this invocation (the budget counts both).
    spent: Callable[[], float]
    max_cost: float | None = None
    pool: PoolMonitor | None = None
    limit_groups: Callable[[], Iterable[LimitGroup]] = tuple


class Instruments:
    """Every instrument of a run, made once per meter; the gauges read ``view`` (none until a run is attached)."""

    def __init__(self, meter: Meter) -> None:
        self.view: RunView | None = None
        #: Each circuit's state as its events told (the attempt spans and the state gauge read it).
        self.circuits: dict[str, str] = {}
        self.operation_duration = meter.create_histogram(
            GEN_AI_CLIENT_OPERATION_DURATION, unit="s", description="Duration of each call to the provider",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self.token_usage = meter.create_histogram(
            GEN_AI_CLIENT_TOKEN_USAGE, unit="{token}", description="Tokens per call, by gen_ai.token.type",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS)
        self.cost = meter.create_counter(
            "flashcard.llm.cost.usd", description="US dollars the provider billed (simulated: what it would have)")
        self.items = meter.create_counter(
            "flashcard.items", unit="{item}",
            description="Items finished, by flashcard.outcome (done, failed, handed_over to another worker)")
        self.cache_lookups = meter.create_counter(
            "flashcard.cache.lookups", unit="{lookup}",
            description="Stage answers looked up, by flashcard.cache.type and flashcard.cache.result (hit, miss)")
        self.retries = meter.create_counter(
            "flashcard.retries", unit="{decision}",
            description="Retry decisions after a failed call, by flashcard.retry.action (retry, reask, give_up)")
        self.circuit_transitions = meter.create_counter(
            "flashcard.circuit.transitions", unit="{transition}",
            description="Circuit breaker changes of state, by circuit and from/to state")
        self.circuit_refusals = meter.create_counter(
            "flashcard.circuit.refusals", unit="{call}", description="Calls a circuit breaker refused")
        self.limit_wait = meter.create_histogram(
            "flashcard.ratelimit.wait.duration", unit="s", description="Seconds a call queued for its rate-limit slot",
            explicit_bucket_boundaries_advisory=WAIT_BUCKETS)
        self.limit_pauses = meter.create_counter(
            "flashcard.ratelimit.pauses", unit="{pause}",
            description="Pauses of every caller of a limit after a 429 (or a header saying nothing is left)")
        self.limit_pause_time = meter.create_counter(
            "flashcard.ratelimit.pause.time", unit="s", description="Seconds of those pauses")
        self.limit_changes = meter.create_counter(
            "flashcard.ratelimit.limit.changes", unit="{change}",
            description="Planned limit cuts and raises, by direction and cause")
        self.ledger_batch = meter.create_histogram(
            "flashcard.ledger.batch.duration", unit="s", description="Seconds to commit one ledger write batch",
            explicit_bucket_boundaries_advisory=WAIT_BUCKETS)
        meter.create_observable_gauge("flashcard.run.items", callbacks=[self._run_items], unit="{item}",
                                      description="The run's items by flashcard.item.state")
        meter.create_observable_gauge("flashcard.run.cost.usd", callbacks=[self._run_cost],
                                      description="US dollars the run has spent, earlier invocations included")
        meter.create_observable_gauge("flashcard.run.budget.usd", callbacks=[self._run_budget],
                                      description="The run's --max-cost")
        meter.create_observable_gauge("flashcard.circuit.state", callbacks=[self._circuit_state],
                                      description="1 for each circuit's current flashcard.circuit.state, else 0")
        meter.create_observable_gauge("flashcard.ratelimit.limit", callbacks=[self._limits],
                                      description="The planned limit per minute, by flashcard.ratelimit.dimension")
        meter.create_observable_counter("flashcard.db.pool.checkouts", callbacks=[self._pool_checkouts],
                                        unit="{checkout}", description="Connections checked out of the pool")
        meter.create_observable_counter("flashcard.db.pool.checkout.wait.time", callbacks=[self._pool_wait],
                                        unit="s", description="Seconds spent waiting for a pooled connection")
        meter.create_observable_gauge("flashcard.db.pool.efficiency", callbacks=[self._pool_efficiency],
                                      description="Share of checkouts served by an idle pooled connection")
        meter.create_observable_gauge("flashcard.db.pool.connections", callbacks=[self._pool_connections],
                                      unit="{connection}",
                                      description="Connections by flashcard.pool.state (checked_out, overflow)")

    # -- gauges, read on the reader's thread ---------------------------------------------------------------

    def _run(self) -> dict[str, str | int]:
        view = self.view
        assert view is not None
        return {"flashcard.run.id": view.run_id, "gen_ai.provider.name": view.provider,
                "gen_ai.request.model": view.model}

    def _run_items(self, _options: CallbackOptions) -> Iterator[Observation]:
        if (view := self.view) is None:
            return
        stats, run = view.stats, self._run()
        for state, value in (("total", stats.total), ("done", stats.done), ("failed", stats.failed),
                             ("in_flight", stats.in_flight), ("flagged", stats.flagged)):
            yield Observation(value, {**run, "flashcard.item.state": state})

    def _run_cost(self, _options: CallbackOptions) -> Iterator[Observation]:
        if self.view is not None:
            yield Observation(self.view.spent(), self._run())

    def _run_budget(self, _options: CallbackOptions) -> Iterator[Observation]:
        if self.view is not None and self.view.max_cost is not None:
            yield Observation(self.view.max_cost, self._run())

    def _circuit_state(self, _options: CallbackOptions) -> Iterator[Observation]:
        for circuit, current in list(self.circuits.items()):
            for state in CIRCUIT_STATES:
                yield Observation(int(state == current),
                                  {"flashcard.circuit": circuit, "flashcard.circuit.state": state})

    def _limits(self, _options: CallbackOptions) -> Iterator[Observation]:
        if self.view is None:
            return
        for group in list(self.view.limit_groups()):
            for dim in (group.requests, group.tokens):
                if math.isfinite(dim.planned):
                    yield Observation(dim.planned, {"flashcard.ratelimit.group": group.label,
                                                    "flashcard.ratelimit.dimension": dim.name})

    def _pool_snapshot(self) -> dict[str, float] | None:
        if self.view is None or self.view.pool is None:
            return None
        return self.view.pool.snapshot().to_dict()

    def _pool_checkouts(self, _options: CallbackOptions) -> Iterator[Observation]:
        if (snapshot := self._pool_snapshot()) is not None:
            yield Observation(snapshot["checkouts"])

    def _pool_wait(self, _options: CallbackOptions) -> Iterator[Observation]:
        if (snapshot := self._pool_snapshot()) is not None:
            yield Observation(snapshot["wait_total_s"])

    def _pool_efficiency(self, _options: CallbackOptions) -> Iterator[Observation]:
        if (snapshot := self._pool_snapshot()) is not None:
            yield Observation(snapshot["efficiency"])

    def _pool_connections(self, _options: CallbackOptions) -> Iterator[Observation]:
        if (snapshot := self._pool_snapshot()) is not None:
            for state in ("checked_out", "overflow", "peak_checked_out", "pool_size"):
                yield Observation(snapshot[state], {"flashcard.pool.state": state})
