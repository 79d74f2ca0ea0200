"""Several `worker` processes on one run, against the real PostgreSQL and Redis and one simulated provider served by
the test: a worker that joins late takes a share, one killed with SIGKILL mid-run loses only its calls in flight
(the others take its items over when its lease expires), every item ends in the results exactly once, and the
requests of all workers together stay within the provider's limit as the simulator counted them. Also: what the
CLI refuses (SQLite, per-process limits), and the simulator's peak count on a fake clock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from flashcard_pipeline.simulator import SimulatorConfig
from flashcard_pipeline.simulator.threaded import simulator_in_a_thread
from flashcard_pipeline.storage.db import create_db_engine
from flashcard_pipeline.storage.leases import LeaseStore
from flashcard_pipeline.storage.ledger import Ledger
from flashcard_pipeline.storage.schema import Item, StageState
from tests.conftest import REDIS_URL, require_service
from tests.test_circuit_breaker_store import cli, words
from tests.test_simulator import FakeClock, analysis_body, started

SRC = Path(__file__).resolve().parents[1] / "src"
runner = CliRunner()
#: The provider's limit: 900 requests a minute, enforced over 5 s windows (75 per window); the workers plan for 80%.
RPM, WINDOW = 900, 5.0
PER_WINDOW = int(RPM * WINDOW / 60)
CONCURRENCY = 3
LEASE = 3.0


def worker_env(prefix: str) -> dict[str, str]:
    """Every worker shares the limits and the cache through Redis, under keys of this test alone."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("RL_", "CACHE_", "WORKER_", "FLASHCARD_", "CB_", "RETRY_"))}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
               RL_BACKEND="redis", RL_REDIS_URL=REDIS_URL, RL_REDIS_PREFIX=f"{prefix}:rl:", RL_ADAPTIVE="false",
               RL_SAFETY="0.8", RL_BURST_SHARE="0.005", CACHE_BACKEND="redis", CACHE_REDIS_URL=REDIS_URL,
               CACHE_REDIS_PREFIX=f"{prefix}:cache:", WORKER_HEARTBEAT_INTERVAL="0.5", WORKER_POLL_INTERVAL="0.5")
    return env


def start_worker(db: str, run_id: int, base_url: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "flashcard_pipeline", "worker", "--run", str(run_id), "--db", db,
                             "--base-url", base_url, "--concurrency", str(CONCURRENCY), "--rpm", str(RPM),
                             "--lease", str(LEASE)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own in the test Redis, its keys deleted afterwards."""
    from redis import Redis

    require_service("127.0.0.1", 6379, "Redis")
    prefix = f"test-workers-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(f"*{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.mark.slow
def test_workers_share_a_run_a_late_one_takes_a_share_and_a_killed_one_is_taken_over(
        tmp_path: Path, postgres_url: str, redis_prefix: str) -> None:
    count = 120
    code, stdout, stderr = cli("process", str(words(tmp_path, count)), "--provider", "simulated", "--db",
                               postgres_url, "--workers", "0")
    assert code == 0, stderr
    assert "worker --run 1" in stdout
    engine = create_db_engine(postgres_url)
    store, ledger = LeaseStore(engine), Ledger(engine)
    env = worker_env(redis_prefix)
    config = SimulatorConfig(latency=0.1, requests_per_minute=RPM, limit_window=WINDOW, seed=3)
    procs: list[subprocess.Popen[str]] = []
    try:
        with simulator_in_a_thread(config) as (base_url, sim_stats):
            procs += [start_worker(postgres_url, 1, base_url, env) for _ in range(2)]
            wait_for(lambda: ledger.summary(1).done >= 10, "the first workers to finish 10 items")
            procs.append(start_worker(postgres_url, 1, base_url, env))  # joins late

            def by_pid() -> dict[int, Any]:
                return {w.pid: w for w in store.workers(1)}

            wait_for(lambda: getattr(by_pid().get(procs[2].pid), "items_done", 0) >= 1,
                     "the late worker to finish an item")
            late_share_before_the_kill = by_pid()[procs[2].pid].items_done
            victim = procs[0]
            victim_id = by_pid()[victim.pid].id

            def victim_holds_items() -> bool:
                with Session(engine) as session:
                    return session.scalar(select(Item.id).where(
                        Item.lease_owner == victim_id, Item.cards_state != StageState.DONE).limit(1)) is not None

            wait_for(victim_holds_items, "the victim to hold open items")
            assert ledger.summary(1).pending > 0, "killed mid-run"
            victim.send_signal(signal.SIGKILL)
            outputs = [proc.communicate(timeout=120) for proc in procs[1:]]
            victim.wait(30)
            stats = sim_stats()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert victim.returncode == -signal.SIGKILL
    for proc, (out, err) in zip(procs[1:], outputs, strict=True):
        assert proc.returncode == 0, err
        assert "run completed" in out

    # Every item once in the results, with its cards.
    results = list(ledger.results(1))
    assert sorted(r.item.position for r in results) == list(range(1, count + 1))
    assert all(r.cards for r in results)
    summary = ledger.summary(1)
    assert (summary.done, summary.pending, summary.failed) == (count, 0, 0)

    # Paid twice: only the victim's calls in flight at the kill (its answers before them were committed).
    repeats = sum(n - 1 for stage in stats.term_successes_by_stage.values() for n in stage.values() if n > 1)
    assert repeats <= CONCURRENCY, stats.term_successes_by_stage
    assert stats.outcomes["ok"] == 2 * count + repeats

    # All workers together within the provider's limit, as the provider counted: never a 429.
    assert stats.peak_requests_per_window <= PER_WINDOW, stats.peak_requests_per_window
    assert stats.outcomes["rate_limited"] == 0

    # The late worker took a share before anybody died; `runs show` and `monitor` list every worker.
    assert late_share_before_the_kill >= 1
    code, stdout, _ = cli("runs", "show", "1", "--db", postgres_url, "--json")
    listed = {w["pid"]: w for w in json.loads(stdout)["workers"]}
    assert code == 0 and set(listed) == {proc.pid for proc in procs}
    assert listed[victim.pid]["state"] == "lost"
    assert all(listed[p.pid]["state"] == "stopped" for p in procs[1:])
    # A worker's count is as of its last heartbeat: exact for those that stopped, short for the killed one.
    reported = sum(w["items_done"] for w in listed.values())
    assert all(listed[p.pid]["items_done"] >= 1 for p in procs[1:]) and reported <= count
    assert all(w["host"] and w["last_heartbeat"] for w in listed.values())
    code, stdout, _ = cli("monitor", "--run", "1", "--once", "--db", postgres_url)
    assert code == 0 and stdout.count(" pid ") == 3 and "lost" in stdout
    engine.dispose()


def test_sqlite_refuses_workers_with_one_line(tmp_path: Path) -> None:
    source = words(tmp_path, 2)
    db = str(tmp_path / "ledger.db")
    code, _, stderr = cli("process", str(source), "--provider", "simulated", "--db", db, "--workers", "2")
    assert code == 2 and stderr.count("\n") == 1
    assert "--workers 2 needs PostgreSQL" in stderr and "SQLite" in stderr
    code, _, stderr = cli("worker", "--run", "1", "--db", db)
    assert code == 2 and "worker needs PostgreSQL" in stderr and stderr.count("\n") == 1
    assert not (tmp_path / "ledger.db").exists(), "a refused worker creates no database"


def test_a_worker_refuses_limits_it_would_not_share(tmp_path: Path, postgres_url: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli("process", str(words(tmp_path, 2)), "--provider", "simulated", "--db", postgres_url,
               "--workers", "0")[0] == 0
    monkeypatch.setenv("RL_BACKEND", "memory")
    code, _, stderr = cli("worker", "--run", "1", "--db", postgres_url, "--rpm", "600", "--base-url",
                          "http://127.0.0.1:9/v1")
    assert code == 2 and "RL_BACKEND=redis" in stderr and stderr.count("\n") == 1
    code, _, stderr = cli("process", str(words(tmp_path, 2)), "--provider", "simulated", "--db", postgres_url,
                          "--workers", "2", "--rpm", "600")
    assert code == 2 and "RL_BACKEND=redis" in stderr
    code, _, stderr = cli("worker", "--run", "7", "--db", postgres_url)
    assert code == 2 and "there is no run 7" in stderr


async def test_the_simulator_counts_the_peak_requests_per_limit_window() -> None:
    clock = FakeClock()
    async with started(SimulatorConfig(requests_per_minute=120, limit_window=5), clock=clock) as (sim, client):
        for second in (0.0, 1.0, 2.0, 3.0, 4.0, 4.5, 4.9, 6.0):  # 10 per 5 s admitted, whatever arrives
            clock.now = 1_000.0 + second
            await client.post("/chat/completions", json=analysis_body())
        clock.now = 1_020.0
        await client.post("/chat/completions", json=analysis_body())
        stats = sim.stats()
    assert stats.peak_requests_per_window == 7  # 0 .. 4.9; at 6.0 the first two have left the window
    assert stats.outcomes["ok"] == 9 and stats.outcomes["rate_limited"] == 0
    async with started(SimulatorConfig(requests_per_minute=24, limit_window=5), clock=clock) as (sim, client):
        codes = [(await client.post("/chat/completions", json=analysis_body())).status_code for _ in range(3)]
    assert codes == [200, 200, 429]  # 24 a minute is 2 per 5 s
