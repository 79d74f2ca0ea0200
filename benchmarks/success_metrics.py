"""The plan's success metrics, measured against the naive baseline it assumes, side by side in one run.

    python benchmarks/success_metrics.py [--words 300] [--concurrency 16] [--outage 30] [--smoke]

One workload, run twice against the same simulated provider:

- **the baseline**, what the plan replaces and what a user writes in an afternoon: asyncio + httpx (its default
  5 s timeout), a fixed-delay retry loop (3 attempts, 1 s apart, no jitter, Retry-After ignored), pybreaker with its
  defaults (opens after 5 consecutive failures, for 60 s), no rate limiter, no cache, and a new database connection
  for every write;
- **the project** with its defaults (`process --provider openai-compatible`; the same read timeout so that a hung
  call costs both sides the same).

The provider: 5% 5xx, 2% hangs (longer than the timeout), 1% malformed answers, a rolling-window limit below what
the concurrency would send, 0.2-0.5 s per answer, and an outage (every call a 503) for `--outage` seconds starting
a third of the way into the first run. Then a second run over a list that shares 70% of its words with the first
(the cache's work). Same prompts and answer validation on both sides (the project's stage builders and parsers).

Prints one table: the plan's metric, the baseline, the project, the change and the plan's target.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sqlite3
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from flashcard_pipeline.ingest import VocabularyReader
from flashcard_pipeline.models import VocabularyItem
from flashcard_pipeline.simulator import Simulator, SimulatorConfig, run_simulator
from flashcard_pipeline.stages import (
    StageSettings,
    build_cards_request,
    build_nuance_request,
    parse_cards,
    parse_nuance,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "korean_1000_terms.csv"
MODEL = "gpt-4o-mini"
TIMEOUT = 5.0


@dataclass(frozen=True)
class Workload:
    words: int
    concurrency: int
    outage: float
    requests_per_minute: int
    overlap: float = 0.7

    def provider(self, *, outage: bool = False) -> SimulatorConfig:
        if outage:
            return SimulatorConfig(server_error_rate=1.0, latency=(0.2, 0.5), seed=11)
        return SimulatorConfig(server_error_rate=0.05, hang_rate=0.02, hang_seconds=TIMEOUT * 3,
                               malformed_json_rate=0.01, requests_per_minute=self.requests_per_minute,
                               latency=(0.2, 0.5), seed=11)

    def lists(self, folder: Path) -> tuple[Path, Path]:
        """The first list, and a second that shares ``overlap`` of its words with it (the rest are new)."""
        items = [item for _, item in zip(range(self.words * 2), VocabularyReader(DATA), strict=False)]
        first, fresh = items[:self.words], items[self.words:]
        kept = int(self.words * self.overlap)
        second = first[:kept] + fresh[:self.words - kept]
        return _write(folder / "first.csv", first), _write(folder / "second.csv", second)


def _write(path: Path, items: list[VocabularyItem]) -> Path:
    lines = ["position,term,type"] + [f"{i},{item.term},{item.type or ''}" for i, item in enumerate(items, 1)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclass
class Measured:
    """What one side did over both runs (the latencies and failures are the first run's)."""

    items: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    breaker_trips: int = 0
    into_outage: int = 0
    rate_limited: int = 0
    pool_efficiency: float | None = None
    second_run_hit_rate: float = 0.0
    #: Of the second list's words that the first run had finished: the share answered from the cache.
    repeat_hit_rate: float = 0.0
    #: Words finished over both runs (the cost is divided by it).
    finished: int = 0
    cost: float = 0.0
    wall: float = 0.0


@contextlib.asynccontextmanager
async def outage_during(sim: Simulator, workload: Workload, after: int, measured: Measured) -> AsyncIterator[None]:
    """Turn the provider off for ``workload.outage`` seconds once ``after`` requests have arrived, counting what
    arrives meanwhile: both sides meet the outage at the same point of their work, whatever their pace."""

    async def schedule() -> None:
        while sim.stats().total < after:  # noqa: ASYNC110 - the simulator counts, it does not signal
            await asyncio.sleep(0.05)
        before = sim.stats().total
        sim.config = workload.provider(outage=True)
        await asyncio.sleep(workload.outage)
        measured.into_outage = sim.stats().total - before
        sim.config = workload.provider()

    task = asyncio.create_task(schedule())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sim.config = workload.provider()


# -- the baseline ------------------------------------------------------------------------------------------


class _Trips:
    """A pybreaker listener counting how often the circuit opened."""

    def __init__(self) -> None:
        self.opened = 0

    def before_call(self, cb: Any, func: Any, *args: Any, **kwargs: Any) -> None: ...
    def success(self, cb: Any) -> None: ...
    def failure(self, cb: Any, exc: BaseException) -> None: ...

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        if getattr(new_state, "name", str(new_state)) == "open":
            self.opened += 1


async def baseline_run(url: str, items: list[VocabularyItem], workload: Workload, db: Path,
                       measured: Measured, *, first: bool) -> None:
    import pybreaker

    trips = _Trips()
    breaker = pybreaker.CircuitBreaker(listeners=[trips])
    settings = StageSettings(provider="openai-compatible", model=MODEL)
    with sqlite3.connect(db) as conn:
        conn.execute("create table if not exists results (term text, stage text, payload text)")

    def save(term: str, stage: str, payload: str) -> None:
        with contextlib.closing(sqlite3.connect(db)) as conn, conn:  # a new connection for every write
            conn.execute("insert into results values (?, ?, ?)", (term, stage, payload))

    async def ask(client: httpx.AsyncClient, body: dict[str, Any], parse: Callable[[str], Any]) -> Any:
        for attempt in range(3):
            try:
                with breaker.calling():
                    response = await client.post(f"{url}/chat/completions", json=body)
                    if response.status_code == 429:
                        measured.rate_limited += 1
                    response.raise_for_status()
                    return parse(response.json()["choices"][0]["message"]["content"])
            except Exception:
                if attempt == 2:
                    raise
                await asyncio.sleep(1.0)
        raise AssertionError("unreachable")

    queue: asyncio.Queue[VocabularyItem] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:

        async def worker() -> None:
            while not queue.empty():
                item = queue.get_nowait()
                started = time.perf_counter()
                try:
                    analysis = await ask(client, build_nuance_request(item, settings).request.to_body(),
                                         lambda text, item=item: parse_nuance(text, item))
                    await asyncio.to_thread(save, item.term, "nuance", analysis.model_dump_json())
                    cards = await ask(client, build_cards_request(item, analysis, settings).request.to_body(),
                                      lambda text, analysis=analysis: parse_cards(text, analysis))
                    await asyncio.to_thread(save, item.term, "cards", cards.model_dump_json())
                except Exception:
                    if first:
                        measured.failed += 1
                    continue
                measured.finished += 1
                if first:
                    measured.latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(workload.concurrency)))
    measured.breaker_trips += trips.opened


async def baseline(workload: Workload, lists: tuple[Path, Path], folder: Path) -> Measured:
    measured = Measured()
    first, second = ([item for item in VocabularyReader(path)] for path in lists)
    async with run_simulator(workload.provider()) as sim:
        started = time.perf_counter()
        async with outage_during(sim, workload, _outage_start(workload), measured):
            await baseline_run(sim.base_url, first, workload, folder / "baseline.db", measured, first=True)
        await baseline_run(sim.base_url, second, workload, folder / "baseline.db", measured, first=False)
        measured.wall = time.perf_counter() - started
        measured.cost = sim.stats().cost_usd
    measured.items = len(first)
    measured.second_run_hit_rate = 0.0  # no cache: every answer of the second list is asked again
    return measured


# -- the project ------------------------------------------------------------------------------------------


async def project(workload: Workload, lists: tuple[Path, Path], folder: Path) -> Measured:
    from flashcard_pipeline.runner import ProcessOptions, process
    from flashcard_pipeline.storage.db import open_database
    from flashcard_pipeline.storage.ledger import Ledger

    measured = Measured()
    db = f"sqlite:///{folder / 'project.db'}"
    async with run_simulator(workload.provider()) as sim:

        def options(path: Path) -> ProcessOptions:
            return ProcessOptions(input_path=path, output=folder / f"{path.stem}.jsonl", provider="openai-compatible",
                                  base_url=sim.base_url, model=MODEL, db_url=db, concurrency=workload.concurrency,
                                  timeout=TIMEOUT)

        started = time.perf_counter()
        async with outage_during(sim, workload, _outage_start(workload), measured):
            first = await process(options(lists[0]))
        second = await process(options(lists[1]))
        measured.wall = time.perf_counter() - started
        measured.cost = sim.stats().cost_usd
    assert first.outcome is not None and second.outcome is not None
    engine = open_database(db)
    try:
        ledger = Ledger(engine)
        run = first.outcome.run_id
        measured.items = first.outcome.stats.total
        measured.failed = first.outcome.stats.total - first.outcome.stats.done
        measured.latencies = _item_latencies(engine, run)
        metrics = ledger.run_metrics(run) or {}
        measured.pool_efficiency = (metrics.get("pool") or {}).get("efficiency")
        measured.breaker_trips = _opened(engine)
        measured.rate_limited = sum(1 for call in ledger.api_calls(run) + ledger.api_calls(second.outcome.run_id)
                                    if call.http_status == 429)
        measured.second_run_hit_rate = second.outcome.stats.cache_hits / (2 * second.outcome.stats.total)
        measured.finished = first.outcome.stats.done + second.outcome.stats.done - second.outcome.stats.already_done
        answered = {result.item.term for result in ledger.results(run)}
        repeated = [item.term for item in VocabularyReader(lists[1]) if item.term in answered]
        measured.repeat_hit_rate = (second.outcome.stats.cache_hits / (2 * len(repeated))) if repeated else 0.0
    finally:
        engine.dispose()
    return measured


def _item_latencies(engine: Any, run_id: int) -> list[float]:
    """Per finished item: from its first call's start to its last call's end (from the call log)."""
    from sqlalchemy import text

    with engine.connect() as conn:
        rows = conn.execute(text(
            "select item_id, created_at, latency_ms from api_calls where run_id = :run"), {"run": run_id}).all()
    spans: dict[int, tuple[float, float]] = {}
    for item_id, created, latency_ms in rows:
        end = _timestamp(created)
        begin = end - latency_ms / 1000
        low, high = spans.get(item_id, (begin, end))
        spans[item_id] = (min(low, begin), max(high, end))
    return [high - low for low, high in spans.values()]


def _timestamp(value: Any) -> float:
    from datetime import UTC, datetime

    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return float(value.timestamp())


def _opened(engine: Any) -> int:
    from sqlalchemy import text

    with engine.connect() as conn:
        return int(conn.execute(text("select count(*) from circuit_breaker_events where to_state = 'open'")).scalar()
                   or 0)


def _outage_start(workload: Workload) -> int:
    """A third of the way into the first run: after a third of its two calls per word have arrived."""
    return max(1, 2 * workload.words // 3)


# -- the table ----------------------------------------------------------------------------------------------


def _percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def _change(before: float, after: float) -> str:
    if before == 0:
        return "n/a" if after == 0 else "+inf"
    return f"{100 * (after - before) / before:+.0f}%"


def table(base: Measured, ours: Measured) -> list[tuple[str, str, str, str, str]]:
    error = (base.failed / base.items, ours.failed / ours.items)
    per_word = (base.cost / max(1, base.finished), ours.cost / max(1, ours.finished))
    rows = [
        ("error rate (items failed)", f"{error[0]:.1%}", f"{error[1]:.1%}", _change(*error), "-50%"),
        ("p95 item latency (s)", f"{_percentile(base.latencies, 0.95):.1f}",
         f"{_percentile(ours.latencies, 0.95):.1f}",
         _change(_percentile(base.latencies, 0.95), _percentile(ours.latencies, 0.95)), "-30%"),
        ("p99 item latency (s)", f"{_percentile(base.latencies, 0.99):.1f}",
         f"{_percentile(ours.latencies, 0.99):.1f}",
         _change(_percentile(base.latencies, 0.99), _percentile(ours.latencies, 0.99)), "-30%"),
        ("circuit breaker trips", str(base.breaker_trips), str(ours.breaker_trips),
         _change(base.breaker_trips, ours.breaker_trips), "-80%"),
        ("requests sent into the outage", str(base.into_outage), str(ours.into_outage),
         _change(base.into_outage, ours.into_outage), "fewer"),
        ("429s received", str(base.rate_limited), str(ours.rate_limited),
         _change(base.rate_limited, ours.rate_limited), "-60%"),
        ("pool efficiency", "0% (a connection per write)",
         "-" if ours.pool_efficiency is None else f"{ours.pool_efficiency:.1%}", "", "95%+"),
        ("cache hit rate, second run", f"{base.second_run_hit_rate:.0%}", f"{ours.second_run_hit_rate:.0%}", "",
         "85%+"),
        ("cache hits on words the first run answered", "0%", f"{ours.repeat_hit_rate:.0%}", "", "85%+"),
        ("words finished, both runs", str(base.finished), str(ours.finished), _change(base.finished, ours.finished),
         "more"),
        ("total cost (simulated $)", f"{base.cost:.4f}", f"{ours.cost:.4f}", _change(base.cost, ours.cost), "lower"),
        ("cost per finished word (simulated $)", f"{per_word[0]:.5f}", f"{per_word[1]:.5f}", _change(*per_word),
         "lower"),
        ("wall time (s)", f"{base.wall:.0f}", f"{ours.wall:.0f}", _change(base.wall, ours.wall), "lower"),
    ]
    return rows


async def main(workload: Workload) -> list[tuple[str, str, str, str, str]]:
    with tempfile.TemporaryDirectory(prefix="success-metrics-") as name:
        folder = Path(name)
        lists = workload.lists(folder)
        base = await baseline(workload, lists, folder)
        ours = await project(workload, lists, folder)
    return table(base, ours)


def run(argv: list[str] | None = None) -> list[tuple[str, str, str, str, str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--outage", type=float, default=30.0, help="seconds the provider is down")
    parser.add_argument("--rpm", type=int, default=600, help="the provider's rolling-window requests limit")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    workload = (Workload(words=8, concurrency=4, outage=0.3, requests_per_minute=600) if args.smoke else
                Workload(words=args.words, concurrency=args.concurrency, outage=args.outage,
                         requests_per_minute=args.rpm))
    rows = asyncio.run(main(workload))
    if args.json:
        print(json.dumps([dict(zip(("metric", "baseline", "project", "change", "target"), row, strict=True))
                          for row in rows], indent=2))
    else:
        print(f"{workload.words} words, concurrency {workload.concurrency}, limit {workload.requests_per_minute}/min, "
              f"outage {workload.outage:g} s")
        print("| metric | baseline | project | change | plan's target |")
        print("|---|---:|---:|---:|---:|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    return rows


if __name__ == "__main__":
    run(sys.argv[1:])
