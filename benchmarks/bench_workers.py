"""Throughput of 1, 2 and 4 `worker` processes on one run, with the provider's limit above and below their demand.

    python benchmarks/bench_workers.py [--items 200] [--latency 0.2] [--concurrency 4] [--repeats 3]

Needs PostgreSQL (127.0.0.1:5432, db ``test``; a schema per case, dropped afterwards) and Redis (127.0.0.1:6379/15;
a key prefix per case, deleted afterwards). One simulator answers every call after a fixed latency and enforces
the limit over 5 s windows (pro rata), as a provider that checks a minute's limit over shorter periods does; it
counts the peak requests it received per window. Each worker has ``--concurrency`` calls in flight, so it demands
``concurrency / latency`` requests a second: the "above" limit is far over what 4 workers ask, the "below" one is
what 2 workers ask. Items/s is measured in the ledger, from the first call's record to the last item's, so the
workers' start-up (imports, about a second each) is left out; the wall column includes it.

The workers plan for RL_SAFETY=0.9 of the limit with a bucket of RL_BURST_SHARE=0.005 of it: a burst must fit in
what one 5 s window leaves over (see docs/scaling.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import create_engine, func, select, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from flashcard_pipeline.runner import ProcessOptions, process
from flashcard_pipeline.simulator import SimulatorConfig
from flashcard_pipeline.simulator.threaded import simulator_in_a_thread
from flashcard_pipeline.storage.db import create_db_engine
from flashcard_pipeline.storage.schema import ApiCall, Item

SRC = Path(__file__).resolve().parents[1] / "src"
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379/15"
WINDOW = 5.0


@contextlib.contextmanager
def schema() -> Iterator[str]:
    admin = create_engine(POSTGRES, poolclass=NullPool)
    name = f"bench_{uuid.uuid4().hex[:12]}"
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{name}"'))
    try:
        yield f"{POSTGRES}?options=-csearch_path%3D{name}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{name}" CASCADE'))
        admin.dispose()


def forget_keys(prefix: str) -> None:
    from redis import Redis

    client = Redis.from_url(REDIS)
    keys = list(client.scan_iter(f"*{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


def one_case(items: int, workers: int, rpm: int, latency: float, concurrency: int, folder: Path) -> dict[str, float]:
    source = folder / "words.csv"
    source.write_text("position,term\n" + "".join(f"{i},낱말{i}\n" for i in range(1, items + 1)), encoding="utf-8")
    prefix = f"bench-workers-{uuid.uuid4().hex[:12]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RL_", "CACHE_", "WORKER_", "FLASHCARD_"))}
    env.update(PYTHONPATH=str(SRC), RL_BACKEND="redis", RL_REDIS_URL=REDIS, RL_REDIS_PREFIX=f"{prefix}:rl:",
               RL_ADAPTIVE="false", RL_SAFETY="0.9", RL_BURST_SHARE="0.005", CACHE_REDIS_PREFIX=f"{prefix}:c:",
               WORKER_HEARTBEAT_INTERVAL="1", WORKER_POLL_INTERVAL="0.5")
    with schema() as db, simulator_in_a_thread(SimulatorConfig(latency=latency, requests_per_minute=rpm,
                                                   limit_window=WINDOW)) as (base_url, stats):
        result = asyncio.run(process(ProcessOptions(input_path=source, provider="simulated", db_url=db, workers=0)))
        assert result.outcome is not None
        run = str(result.outcome.run_id)
        started = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-m", "flashcard_pipeline", "--quiet", "worker", "--run", run,
                                   "--db", db, "--base-url", base_url, "--concurrency", str(concurrency), "--rpm",
                                   str(rpm)], env=env, stdout=subprocess.DEVNULL) for _ in range(workers)]
        codes = [proc.wait() for proc in procs]
        wall = time.perf_counter() - started
        assert codes == [0] * workers, codes
        sim = stats()
        engine = create_db_engine(db)
        with Session(engine) as session:
            first = session.scalar(select(func.min(ApiCall.created_at)))
            last = session.scalar(select(func.max(Item.updated_at)))
        engine.dispose()
    forget_keys(prefix)
    seconds = (last - first).total_seconds()
    return {"items_per_s": items / seconds, "requests_per_s": sim.outcomes["ok"] / seconds, "wall": wall,
            "peak": sim.peak_requests_per_window, "rate_limited": sim.outcomes["rate_limited"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    demand = args.concurrency / args.latency * 60  # requests a minute one worker asks for
    counts = [int(n) for n in args.workers.split(",")]
    limits = {"above": int(demand * max(counts) * 2.5), "below": int(demand * 2)}
    print(f"{args.items} items, latency {args.latency} s, concurrency {args.concurrency}: one worker demands "
          f"{demand / 60:.0f} requests/s; limits enforced over {WINDOW:g} s windows; median of {args.repeats}")
    print(f"{'limit':>7} {'req/min':>8} {'workers':>7} {'items/s':>8} {'req/s':>6} {'limit req/s':>11} "
          f"{'peak/window':>11} {'allowed':>7} {'429s':>5} {'wall s':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, rpm in limits.items():
            for workers in counts:
                runs = [one_case(args.items, workers, rpm, args.latency, args.concurrency, Path(tmp))
                        for _ in range(args.repeats)]
                med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
                print(f"{name:>7} {rpm:>8} {workers:>7} {med['items_per_s']:>8.1f} {med['requests_per_s']:>6.1f} "
                      f"{rpm / 60:>11.1f} {max(r['peak'] for r in runs):>11} {int(rpm * WINDOW / 60):>7} "
                      f"{sum(r['rate_limited'] for r in runs):>5} {med['wall']:>6.1f}", flush=True)


if __name__ == "__main__":
    main()
