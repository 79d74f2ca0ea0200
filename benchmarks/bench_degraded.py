"""A degraded provider, end to end: independent 429s, 5xx, hangs and resets must not starve a run.

    python benchmarks/bench_degraded.py [--words 200] [--concurrency 16] [--repeats 1]

One provider (the simulator, in this process, over HTTP): 10% of requests answered 429 with ``Retry-After: 1``
whatever the request rate (as OpenRouter relays a busy upstream's 429s), 20% 5xx, 3% hangs (longer than the
read timeout), 2% dropped connections, 0.2-0.5 s per answer. ``process`` runs the same words against it twice
per repeat, side by side: with its defaults, and with the rate limiter and the circuit breaker disabled
(``RL_ENABLED=false``, ``CB_ENABLED=false``). Each row: items done, wall time, requests, requests sent before
the Retry-After their 429 gave (the simulator counts them), good answers paid twice, 429s, and where the
limiter ended (its reason).

Prints a markdown table; ``--json`` the rows. tests/test_degraded_provider.py runs it small in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from flashcard_pipeline.ingest import VocabularyReader
from flashcard_pipeline.simulator import SimulatorConfig, run_simulator

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "korean_1000_terms.csv"
MODEL = "gpt-4o-mini"
#: The read timeout of both rows: a hang (30 s) is a timeout, not a slow answer.
TIMEOUT = 5.0


def provider(seed: int = 7, latency: tuple[float, float] = (0.2, 0.5), timeout: float = TIMEOUT) -> SimulatorConfig:
    return SimulatorConfig(rate_limit_rate=0.10, retry_after_seconds=1, server_error_rate=0.20, hang_rate=0.03,
                           hang_seconds=timeout * 6, dropped_connection_rate=0.02, latency=latency, seed=seed)


@dataclass
class Row:
    label: str
    words: int
    done: int
    failed: int
    wall_s: float
    requests: int
    rate_limited: int
    early_retries: int
    paid_twice: int
    circuit_opened: int
    limit_reason: str | None
    planned_rpm: float | None

    @property
    def words_per_minute(self) -> float:
        return self.done * 60 / self.wall_s if self.wall_s > 0 else 0.0


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """The RL_* / CB_* variables of one row (and none of the developer's own)."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(("RL_", "CB_"))}
    for name in saved:
        del os.environ[name]
    os.environ.update(values)
    try:
        yield
    finally:
        for name in values:
            os.environ.pop(name, None)
        os.environ.update(saved)


def write_words(folder: Path, words: int) -> Path:
    items = [item for _, item in zip(range(words), VocabularyReader(DATA), strict=False)]
    path = folder / "words.csv"
    lines = ["position,term,type"] + [f"{i},{item.term},{item.type or ''}" for i, item in enumerate(items, 1)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


async def run_row(label: str, words: Path, count: int, concurrency: int, folder: Path, config: SimulatorConfig,
                  env: dict[str, str], read_timeout: float = TIMEOUT) -> Row:
    from flashcard_pipeline.runner import ProcessOptions, process
    from flashcard_pipeline.storage.db import open_database
    from flashcard_pipeline.storage.ledger import Ledger

    db = f"sqlite:///{folder / f'{label}.db'}"
    with environment(**env):
        async with run_simulator(config) as sim:
            options = ProcessOptions(input_path=words, output=folder / f"{label}.jsonl", provider="openai-compatible",
                                     base_url=sim.base_url, model=MODEL, db_url=db, concurrency=concurrency,
                                     timeout=read_timeout)
            started = time.perf_counter()
            result = await process(options)
            wall = time.perf_counter() - started
            stats = sim.stats()
    assert result.outcome is not None
    outcome = result.outcome
    engine = open_database(db)
    try:
        metrics = Ledger(engine).run_metrics(outcome.run_id) or {}
    finally:
        engine.dispose()
    limits = ((metrics.get("ratelimit") or {}).get("limits") or {})
    requests_dim = next(iter(limits.values()), {}).get("requests", {}) if limits else {}
    events = metrics.get("resilience_events") or {}
    return Row(label=label, words=count, done=outcome.stats.done, failed=outcome.stats.failed, wall_s=round(wall, 1),
               requests=stats.total, rate_limited=stats.outcomes["rate_limit"] + stats.outcomes["rate_limited"],
               early_retries=stats.early_retries, paid_twice=stats.paid_twice,
               circuit_opened=int(events.get("circuit_open", 0)),
               limit_reason=requests_dim.get("reason"), planned_rpm=requests_dim.get("planned_per_minute"))


ROWS = {"defaults": {}, "limiter and breaker disabled": {"RL_ENABLED": "false", "CB_ENABLED": "false"}}


async def measure(words: int, concurrency: int, repeats: int, config: SimulatorConfig,
                  read_timeout: float = TIMEOUT) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-degraded-") as name:
        folder = Path(name)
        path = write_words(folder, words)
        for repeat in range(repeats):
            order = list(ROWS) if repeat % 2 == 0 else list(reversed(ROWS))
            for label in order:
                run_folder = folder / f"{repeat}"
                run_folder.mkdir(exist_ok=True)
                rows.append(await run_row(label, path, words, concurrency, run_folder, config, ROWS[label],
                                          read_timeout))
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| run | done / words | wall (s) | words/min | requests | 429s | sent before Retry-After | "
             "paid twice | circuit opened | limit at the end |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        limit = "-" if r.limit_reason is None else (
            f"{r.limit_reason}" + ("" if r.planned_rpm is None else f", {r.planned_rpm:,.0f}/min"))
        lines.append(f"| {r.label} | {r.done} / {r.words} | {r.wall_s:.1f} | {r.words_per_minute:.0f} | "
                     f"{r.requests:,} | {r.rate_limited} | {r.early_retries} | {r.paid_twice} | {r.circuit_opened} | "
                     f"{limit} |")
    by_label: dict[str, list[float]] = {}
    for r in rows:
        by_label.setdefault(r.label, []).append(r.words_per_minute)
    ours, bare = by_label.get("defaults"), by_label.get("limiter and breaker disabled")
    if ours and bare:
        import statistics

        ratio = statistics.median(ours) / statistics.median(bare)
        lines.append("")
        lines.append(f"defaults / disabled throughput (medians): {ratio:.0%}")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = asyncio.run(measure(args.words, args.concurrency, args.repeats, provider(args.seed)))
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        print(f"{args.words} words, --concurrency {args.concurrency}, 10% independent 429s (Retry-After 1 s), "
              f"20% 5xx, 3% hangs, 2% resets, read timeout {TIMEOUT:g} s, Python {sys.version.split()[0]}")
        print(table(rows))
    return rows


if __name__ == "__main__":
    run(sys.argv[1:])
