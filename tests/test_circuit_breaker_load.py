"""Load test: whole `process` runs against the simulator while it fails in bursts, steadily, on and off,
more and more, and for 30 seconds straight.

Everything that takes time runs on one FakeClock without autojump: the simulator's latency, the retry
back-off and the breaker's waits. A driver moves the clock forward only when every item in flight is
asleep on it (waiting for an answer, a back-off or the circuit), so the run is a discrete-event
simulation over real HTTP on the loopback: minutes of virtual time in about a second, with every
request at its exact virtual instant. The simulator's fault rate follows a schedule on the same
clock (its ``config`` is read per request, so swapping it switches faults at run time).

Checked for every pattern: the run completes by itself once the server is healthy again; no request
reaches the server while the circuit is open and at most one per half-open period; the requests that
reach a failing server stay below what the trip rule allows plus one probe per break.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from flashcard_pipeline.errors import StructuredError
from flashcard_pipeline.pipeline import RunStats
from flashcard_pipeline.resilience import CallContext, PolicyPipeline, Resilience
from flashcard_pipeline.resilience.breaker import (
    CircuitBreakerConfig,
    CircuitState,
    CircuitTransition,
)
from flashcard_pipeline.resilience.breaker.window import one_sided_z, trips
from flashcard_pipeline.resilience.retry import RetryConfig
from flashcard_pipeline.resilience.testing import FakeClock
from flashcard_pipeline.runner import ProcessOptions, SilentReporter, process
from flashcard_pipeline.simulator import Simulator, SimulatorConfig, run_simulator
from flashcard_pipeline.storage.breaker_store import BreakerStore
from flashcard_pipeline.storage.db import open_database
from flashcard_pipeline.storage.schema import RunStatus

T = TypeVar("T")
LATENCY = 0.5
STEP = 0.25
CONCURRENCY = 4
#: Short failing bursts after healthy traffic trip it only on the plain ratio (confidence 0); the defaults' bound
#: needs a longer streak, which the 30 s outage below gives.
FAST = CircuitBreakerConfig(confidence=0.0,
                            min_throughput=10, failure_ratio=0.5, sampling_duration=5.0, sampling_buckets=5,
                            break_duration=5.0, max_break_duration=20.0, max_wait=600.0)
RETRY = RetryConfig(max_attempts=12, initial_delay=0.5, max_delay=4.0, max_elapsed=None)


@dataclass(frozen=True)
class Phase:
    """From ``start`` (virtual seconds) on, the server fails this share of requests."""

    start: float
    error_rate: float


PATTERNS: dict[str, list[Phase]] = {
    "burst": [Phase(0, 0.0), Phase(4, 1.0), Phase(7, 0.0)],
    "steady": [Phase(0, 0.1)],
    "intermittent": [Phase(0, 0.0), Phase(3, 1.0), Phase(7, 0.0), Phase(12, 1.0), Phase(16, 0.0),
                     Phase(21, 1.0), Phase(25, 0.0)],
    "escalating": [Phase(0, 0.0), Phase(3, 0.25), Phase(6, 0.5), Phase(9, 1.0), Phase(25, 0.0)],
    "outage": [Phase(0, 0.0), Phase(3, 1.0), Phase(33, 0.0)],
}


@dataclass
class Log:
    """Requests as they pass the breaker, and transitions, in one order."""

    events: list[tuple[str, float, Any]] = field(default_factory=list)

    def requests(self, start: float = -math.inf, end: float = math.inf) -> list[tuple[float, bool]]:
        return [(t, ok) for kind, t, ok in self.events if kind == "request" and start <= t < end]


class Recorder:
    """Innermost policy: each call it sees is one HTTP request to the simulator."""

    def __init__(self, clock: FakeClock, log: Log) -> None:
        self.clock = clock
        self.log = log

    async def execute(self, call: Callable[[], Awaitable[T]], context: CallContext) -> T:
        index = len(self.log.events)
        self.log.events.append(("request", self.clock.monotonic(), True))
        try:
            return await call()
        except StructuredError:
            self.log.events[index] = ("request", self.log.events[index][1], False)
            raise


class Watch(SilentReporter):
    """A Reporter that hands the live RunStats to the driver."""

    def __init__(self) -> None:
        self.stats: RunStats | None = None

    @contextlib.asynccontextmanager
    async def live(self, stats: RunStats) -> AsyncIterator[None]:
        self.stats = stats
        yield


@dataclass
class Outcome:
    status: RunStatus
    done: int
    total: int
    log: Log
    transitions: list[CircuitTransition]
    pauses: list[str]
    simulator_requests: int
    virtual_seconds: float
    stored_transitions: int


def word_list(folder: Path, items: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "words.csv"
    source.write_text("position,term,type\n" + "".join(f"{i},낱말{i},noun\n" for i in range(1, items + 1)),
                      encoding="utf-8")
    return source


def rate_at(phases: list[Phase], now: float) -> float:
    return [p for p in phases if p.start <= now][-1].error_rate


async def run_pattern(tmp_path: Path, phases: list[Phase], breaker_config: CircuitBreakerConfig | None,
                      items: int = 80) -> Outcome:
    """One `process` run under ``phases``; without a breaker config, with retries alone (the baseline)."""
    clock = FakeClock(autojump=False)
    log = Log()
    engine = Resilience(retry=RETRY, breaker=breaker_config, clock=clock, rng=random.Random(7))
    engine.events.subscribe(CircuitTransition, lambda t: log.events.append(("transition", t.at, t)))
    policy = PolicyPipeline([engine, Recorder(clock, log)])
    source = word_list(tmp_path, items)
    db_url = f"sqlite:///{tmp_path / 'load.db'}"
    watch = Watch()
    pauses: list[str] = []

    def healthy_config(rate: float) -> SimulatorConfig:
        return SimulatorConfig(latency=LATENCY, server_error_rate=rate, seed=3)

    async with run_simulator(healthy_config(rate_at(phases, 0.0)), clock=clock.monotonic,
                             sleep=clock.sleep) as sim:
        options = ProcessOptions(input_path=source, output=tmp_path / "cards.jsonl", provider="openai-compatible",
                                 base_url=sim.base_url, db_url=db_url, concurrency=CONCURRENCY)
        task = asyncio.create_task(process(options, watch, policy=policy))
        await drive(clock, task, watch, sim, phases, healthy_config, pauses)
        result = task.result()
        requests = sim.stats().total
    assert result.outcome is not None
    store = BreakerStore(open_database(db_url))
    stored = len(store.events(limit=10_000))
    store.engine.dispose()
    transitions = [event for kind, _, event in log.events if kind == "transition"]
    return Outcome(result.outcome.status, result.outcome.stats.done, result.outcome.stats.total, log, transitions,
                   pauses, requests, clock.monotonic(), stored)


async def drive(clock: FakeClock, task: asyncio.Task[Any], watch: Watch, sim: Simulator, phases: list[Phase],
                make_config: Callable[[float], SimulatorConfig], pauses: list[str]) -> None:
    """Advance the clock by STEP whenever every item in flight sleeps on it; switch faults on schedule."""
    rate = rate_at(phases, 0.0)
    for _ in range(200_000):
        if task.done():
            return
        stats = watch.stats
        if stats is not None and stats.pause_reason and (not pauses or pauses[-1] != stats.pause_reason):
            pauses.append(stats.pause_reason)
        if stats is not None and stats.in_flight > 0 and clock.sleepers >= stats.in_flight:
            # Only a quiet state that lasts counts: an item between two awaits (a database read in a
            # worker thread) must not see the clock jump under it, however slow the machine is.
            await asyncio.sleep(0.002)
            if not (stats.in_flight > 0 and clock.sleepers >= stats.in_flight):
                continue
            clock.advance(STEP)
            wanted = rate_at(phases, clock.monotonic())
            if wanted != rate:
                rate = wanted
                sim.config = make_config(rate)
            await asyncio.sleep(0)
        else:
            await asyncio.sleep(0.0005)
    raise AssertionError("the run did not finish")


def check_no_request_while_open(outcome: Outcome, probes: int = 1) -> None:
    """Walk the log: nothing passes an open circuit; a half-open one lets at most ``probes`` through."""
    state = CircuitState.CLOSED
    in_half_open = 0
    for kind, _, event in outcome.log.events:
        if kind == "transition":
            state = event.to_state
            in_half_open = 0
            continue
        assert state is not CircuitState.OPEN, "a request passed an open circuit"
        if state is CircuitState.HALF_OPEN:
            in_half_open += 1
            assert in_half_open <= probes, "more probes than permitted"


def failing_periods(phases: list[Phase]) -> list[tuple[float, float]]:
    periods = []
    for index, phase in enumerate(phases):
        if phase.error_rate == 1.0:
            end = phases[index + 1].start if index + 1 < len(phases) else math.inf
            periods.append((phase.start, end))
    return periods


def failing_bound(outcome: Outcome, phases: list[Phase], config: CircuitBreakerConfig) -> tuple[int, int]:
    """(requests that reached the server while it failed every request, the most the breaker allows).

    Per failing period [a, b): the trip rule needs at most the failures that, after S successes (those still
    in the window at a), satisfy it (ratio and, with a confidence, its Wilson bound); calls already in flight
    when it trips add at most the concurrency; after that one probe per break interval, the shortest being
    break_duration.
    """
    reached = allowed = 0
    for start, end in failing_periods(phases):
        reached += len(outcome.log.requests(start, end))
        window_start = start - config.sampling_duration - config.bucket_duration
        successes = sum(ok for _, ok in outcome.log.requests(window_start, start))
        needed = next(f for f in itertools.count(1) if trips(f, successes + f, ratio=config.failure_ratio,
                                                             min_throughput=config.min_throughput,
                                                             z=one_sided_z(config.confidence)))
        last_request = max((t for t, _ in outcome.log.requests(start, end)), default=start)
        probes = 1 + math.floor((min(end, last_request + STEP) - start) / config.break_duration)
        allowed += needed + CONCURRENCY + probes
    return reached, allowed


def opened(outcome: Outcome) -> list[CircuitTransition]:
    return [t for t in outcome.transitions if t.to_state is CircuitState.OPEN]


@pytest.mark.parametrize("pattern", ["burst", "intermittent", "escalating"])
async def test_failure_patterns_stay_bounded_and_the_run_completes(tmp_path: Path, pattern: str) -> None:
    phases = PATTERNS[pattern]
    outcome = await run_pattern(tmp_path, phases, FAST)
    assert outcome.status is RunStatus.COMPLETED and outcome.done == outcome.total, "it recovered by itself"
    assert opened(outcome), "the failing period tripped the circuit"
    check_no_request_while_open(outcome)
    reached, allowed = failing_bound(outcome, phases, FAST)
    assert 0 < reached <= allowed
    assert outcome.simulator_requests == len(outcome.log.requests())
    assert outcome.stored_transitions == len(outcome.transitions), "every transition reached the database"
    assert any("open until" in p for p in outcome.pauses), "the progress display said why it paused"


async def test_a_steady_low_error_rate_never_trips(tmp_path: Path) -> None:
    outcome = await run_pattern(tmp_path, PATTERNS["steady"], FAST)
    assert outcome.status is RunStatus.COMPLETED and outcome.done == outcome.total
    failed = sum(not ok for _, ok in outcome.log.requests())
    assert failed > 5, "the server did fail now and then"
    assert opened(outcome) == [] and outcome.pauses == []


@pytest.mark.parametrize("config", [FAST, CircuitBreakerConfig()], ids=["5s-break", "defaults"])
async def test_a_30_second_outage_gets_at_most_one_probe_per_break_interval(tmp_path: Path,
                                                                          config: CircuitBreakerConfig) -> None:
    phases = PATTERNS["outage"]
    (down, up), = failing_periods(phases)
    assert up - down == 30.0
    outcome = await run_pattern(tmp_path, phases, config, items=60)
    assert outcome.status is RunStatus.COMPLETED and outcome.done == outcome.total
    check_no_request_while_open(outcome)
    trips = opened(outcome)
    tripped_at = trips[0].at
    assert down <= tripped_at < up, "it tripped during the outage (once the window's successes were outweighed)"
    probes = [t for t, _ in outcome.log.requests(tripped_at + 1e-9, up)]
    gaps = [b - a for a, b in zip([tripped_at, *probes], probes, strict=False)]
    assert all(gap >= config.break_duration for gap in gaps), f"probes too close: {probes}"
    assert len(probes) <= 1 + (up - tripped_at) // config.break_duration
    assert all(not ok for t, ok in outcome.log.requests(tripped_at + 1e-9, up)), "only failing probes then"
    reached, allowed = failing_bound(outcome, phases, config)
    assert reached <= allowed
    closed_at = next(t.at for t in outcome.transitions if t.to_state is CircuitState.CLOSED)
    assert up <= closed_at <= up + config.break_duration * 2 ** len(probes), "closed soon after recovery"
    assert outcome.virtual_seconds > up


async def test_the_breaker_cuts_the_load_on_a_failing_server_compared_with_retries_alone(tmp_path: Path) -> None:
    phases = PATTERNS["outage"]
    (down, up), = failing_periods(phases)
    with_breaker = await run_pattern(tmp_path / "breaker", phases, FAST, items=60)
    retries_only = await run_pattern(tmp_path / "retries", phases, None, items=60)
    assert retries_only.status is RunStatus.COMPLETED, "retries alone also get through a 30 s outage..."
    hammered = len(retries_only.log.requests(down, up))
    spared = len(with_breaker.log.requests(down, up))
    assert hammered >= 2 * spared, f"...but send {hammered} requests into it, against {spared} with the breaker"
