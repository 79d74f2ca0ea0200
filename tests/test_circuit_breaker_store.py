"""Circuit breakers in the database and on the command line: the command log, transitions and snapshots
(SQLite and PostgreSQL), the sync of a running process, `breaker status|isolate|close|reset`, and
`process` with its breakers: a second terminal isolates a running run within two seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy.exc
from typer.testing import CliRunner

from flashcard_pipeline.cli.app import app
from flashcard_pipeline.errors import ConfigurationError, ServerError
from flashcard_pipeline.resilience import CallContext, PolicyPipeline, Resilience
from flashcard_pipeline.resilience.breaker import (
    CircuitBreaker,
    CircuitBreakerConfig,
    CircuitState,
    CircuitTransition,
    CircuitWaitExceededError,
)
from flashcard_pipeline.resilience.retry import RetryConfig, RetryPolicy
from flashcard_pipeline.resilience.testing import FakeClock
from flashcard_pipeline.runner import ProcessOptions, default_policy, process
from flashcard_pipeline.simulator import SimulatorConfig, run_simulator
from flashcard_pipeline.storage.breaker_store import BreakerStore, BreakerSync, process_owner
from flashcard_pipeline.storage.db import open_database
from flashcard_pipeline.storage.ledger import Ledger
from flashcard_pipeline.storage.schema import RunStatus
from tests.test_circuit_breaker_load import Watch

runner = CliRunner()
CIRCUIT = "openrouter/openai/gpt-4o-mini"
CTX = CallContext(stage="nuance", item_key="학교", provider="openrouter", model="openai/gpt-4o-mini",
                  estimated_tokens=10)
SIM_CIRCUIT = "simulated/simulated/flashcard-sim"


@pytest.fixture(autouse=True)
def _no_breaker_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("CB_", "RETRY_")):
            monkeypatch.delenv(name)


@pytest.fixture
def store(db_url: str) -> BreakerStore:
    return BreakerStore(open_database(db_url))


def cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def words(tmp_path: Path, count: int) -> Path:
    path = tmp_path / "words.csv"
    path.write_text("position,term,type\n" + "".join(f"{i},낱말{i},noun\n" for i in range(1, count + 1)),
                    encoding="utf-8")
    return path


async def down() -> str:
    raise ServerError("503", status_code=503)


# -- the store ------------------------------------------------------------------------------------------


def test_commands_are_a_broadcast_log_and_the_newest_per_circuit_stands(store: BreakerStore) -> None:
    assert store.last_command_id() == 0 and store.latest_commands() == {}
    first = store.add_command(CIRCUIT, "isolate", " incident 7 ", requested_by="alice@laptop")
    store.add_command("simulated/simulated/flashcard-sim", "isolate", "drill")
    third = store.add_command("simulated/simulated/flashcard-sim", "close", "drill over")
    assert first.reason == "incident 7" and first.requested_by == "alice@laptop" and first.created_at.tzinfo
    assert [c.id for c in store.commands_after(first.id)] == [first.id + 1, third.id]
    latest = store.latest_commands()
    assert {name: c.action for name, c in latest.items()} == {CIRCUIT: "isolate", SIM_CIRCUIT: "close"}
    assert store.last_command_id() == third.id and store.known_circuits() == sorted([CIRCUIT, SIM_CIRCUIT])
    with pytest.raises(ValueError, match="unknown breaker action"):
        store.add_command(CIRCUIT, "explode", "why not")
    with pytest.raises(ValueError, match="reason"):
        store.add_command(CIRCUIT, "close", "  ")
    store.engine.dispose()


async def test_transitions_and_snapshots_round_trip(store: BreakerStore) -> None:
    clock = FakeClock(autojump=False)
    policy = Resilience(breaker=CircuitBreakerConfig(min_throughput=2), clock=clock)
    seen: list[Any] = []
    policy.events.subscribe(CircuitTransition, seen.append)
    for _ in range(2):
        with pytest.raises(ServerError):
            await policy.execute(down, CTX)
    policy.manual_control.isolate("maintenance", source="bob@desk")
    store.write(seen, list(policy.breaker_snapshot().values()), owner="host:1", run_id=None)
    events = store.events()
    assert [(e.from_state, e.to_state, e.manual, e.source) for e in events] == [
        ("closed", "open", False, None), ("open", "isolated", True, "bob@desk")]
    assert events[0].failure_count == 2 and events[0].throughput == 2 and events[0].break_duration == 30.0
    assert events[1].reason == "isolated by hand: maintenance" and events[1].owner == "host:1"
    (snapshot,) = store.snapshots()
    assert (snapshot.circuit, snapshot.state, snapshot.failure_count, snapshot.active) == (
        CIRCUIT, "isolated", 2, True)
    assert snapshot.live() and snapshot.stats["isolation_reason"] == "maintenance"
    assert json.loads(json.dumps(snapshot.to_dict()))["live"] is True
    store.write([], list(policy.breaker_snapshot().values()), owner="host:1", active=False)
    (stopped,) = store.snapshots()
    assert not stopped.live() and store.forget_stopped() == 1 and store.snapshots() == []
    assert len(store.events(limit=1)) == 1 and store.events(circuit="other/x") == []
    store.engine.dispose()


# -- the sync of a running process ------------------------------------------------------------------------


async def wait_until(predicate: Any, seconds: float = 5.0) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > seconds:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_the_sync_applies_commands_records_transitions_and_survives_database_errors(
        store: BreakerStore, caplog: pytest.LogCaptureFixture) -> None:
    store.add_command(CIRCUIT, "isolate", "standing isolation from yesterday")
    store.add_command("simulated/simulated/flashcard-sim", "isolate", "drill")
    store.add_command("simulated/simulated/flashcard-sim", "close", "drill over")
    policy = Resilience(breaker=CircuitBreakerConfig(), clock=FakeClock(autojump=False))
    async with BreakerSync(store, policy, poll_interval=0.02, owner="me:1") as sync:
        breaker = policy.breaker_named(CIRCUIT)
        assert breaker.state_provider.state is CircuitState.ISOLATED, "a standing isolation holds at start"
        assert policy.breaker_named(SIM_CIRCUIT).state_provider.state is CircuitState.CLOSED
        command = store.add_command(CIRCUIT, "close", "provider is back", requested_by="carol@ops")
        await wait_until(lambda: breaker.state_provider.state is CircuitState.CLOSED)
        assert breaker.state_provider.transitions[-1].source == f"command #{command.id} from carol@ops"
        store.add_command(CIRCUIT, "reset", "fresh counters")
        await wait_until(lambda: len(sync.applied) == 3)

        real_write = store.write
        failures = {"left": 2}

        def flaky_write(*args: Any, **kwargs: Any) -> None:
            if failures["left"]:
                failures["left"] -= 1
                raise sqlalchemy.exc.OperationalError(
                    "INSERT INTO circuit_breaker_states (circuit) VALUES (?)", ("x",),
                    sqlite3.OperationalError("database is locked"))
            real_write(*args, **kwargs)

        store.write = flaky_write  # type: ignore[method-assign]
        store.add_command(CIRCUIT, "isolate", "second incident")
        await wait_until(lambda: breaker.state_provider.state is CircuitState.ISOLATED)
        await wait_until(lambda: failures["left"] == 0 and any(
            e.reason == "isolated by hand: second incident" for e in store.events(limit=50)))
    warned = [r.getMessage() for r in caplog.records if "sync failed" in r.getMessage()]
    assert warned, "the error was logged, the run went on"
    assert warned[0] == ("circuit breaker database sync failed (retrying in 0.02 s): OperationalError: database is "
                         "locked"), "one line: the driver's message, not SQLAlchemy's statement and parameters"
    reasons = [(e.to_state, e.reason) for e in store.events(limit=50)]
    assert reasons == [
        ("isolated", "isolated by hand: standing isolation from yesterday"),
        ("closed", "closed by hand: provider is back"),
        ("closed", "reset by hand: fresh counters"),
        ("isolated", "isolated by hand: second incident")]
    snapshots = {s.circuit: s for s in store.snapshots()}
    assert snapshots[CIRCUIT].state == "isolated" and not snapshots[CIRCUIT].active, "stopped cleanly"
    store.engine.dispose()


async def ok() -> str:
    return "ok"


async def test_commands_for_circuits_this_process_does_not_use_leave_its_snapshots_alone(
        store: BreakerStore, db_url: str) -> None:
    other = "openrouter/anthropic/claude-3-haiku"
    store.add_command(other, "isolate", "standing isolation of another model")
    policy = Resilience(breaker=CircuitBreakerConfig(), clock=FakeClock(autojump=False))
    async with BreakerSync(store, policy, poll_interval=0.02, owner="me:1") as sync:
        assert await policy.execute(ok, CTX) == "ok"
        for action in ("close", "reset", "isolate"):
            store.add_command(other, action, f"{action} the other model")
        store.add_command(SIM_CIRCUIT, "close", "another process's circuit")
        await wait_until(lambda: len(sync.applied) == 5)
        await wait_until(lambda: {s.circuit for s in store.snapshots()} == {CIRCUIT})
        assert set(policy.breakers) == {CIRCUIT}, "a command never makes a circuit"
    assert [(s.circuit, s.owner) for s in store.snapshots()] == [(CIRCUIT, "me:1")]
    assert store.events() == [], "nothing happened to a circuit this process has"
    data = json.loads(cli("breaker", "status", "--db", db_url, "--json", "--all")[1])
    assert [c["circuit"] for c in data["circuits"]] == [CIRCUIT] and list(data["isolated"]) == [other]
    store.engine.dispose()


async def test_a_standing_isolation_holds_a_circuit_first_made_after_the_command(store: BreakerStore) -> None:
    standing = store.add_command(CIRCUIT, "isolate", "provider incident", requested_by="alice@ops")
    policy = Resilience(breaker=CircuitBreakerConfig(max_wait=0.0), clock=FakeClock(autojump=False))
    calls: list[str] = []

    async def counted() -> str:
        calls.append("sent")
        return "ok"

    async with BreakerSync(store, policy, poll_interval=0.02, owner="me:1") as sync:
        assert policy.breakers == {}, "not made at start"
        with pytest.raises(CircuitWaitExceededError, match="provider incident"):
            await policy.execute(counted, CTX)
        assert calls == [], "the first call is held, not sent"
        breaker = policy.breakers[CIRCUIT]
        assert breaker.state_provider.transitions[-1].source == f"command #{standing.id} from alice@ops"

        later = CallContext(stage="nuance", item_key="학교", provider="openrouter", model="later", estimated_tokens=1)
        store.add_command("openrouter/later", "isolate", "isolated while the run was going")
        released = CallContext(stage="nuance", item_key="학교", provider="openrouter", model="back",
                               estimated_tokens=1)
        store.add_command("openrouter/back", "isolate", "drill")
        store.add_command("openrouter/back", "close", "drill over")
        await wait_until(lambda: len(sync.applied) == 4)
        assert set(policy.breakers) == {CIRCUIT}
        with pytest.raises(CircuitWaitExceededError, match="isolated while the run was going"):
            await policy.execute(counted, later)
        assert await policy.execute(counted, released) == "ok" and calls == ["sent"], "a closed isolation is over"
        await wait_until(lambda: len(store.events(limit=50)) == 2)
    assert [(e.circuit, e.to_state, e.reason) for e in store.events()] == [
        (CIRCUIT, "isolated", "isolated by hand: provider incident"),
        ("openrouter/later", "isolated", "isolated by hand: isolated while the run was going")]
    assert {s.circuit: s.state for s in store.snapshots()} == {
        CIRCUIT: "isolated", "openrouter/later": "isolated", "openrouter/back": "closed"}
    store.engine.dispose()


async def test_a_trip_in_one_worker_opens_the_circuit_in_the_others_once(store: BreakerStore) -> None:
    """Workers of one run call the same provider: one worker's evidence opens every worker's circuit, and the
    follow is not echoed back (a followed trip travels one hop)."""
    config = CircuitBreakerConfig(min_throughput=2, max_wait=0.0, break_duration=60.0)
    stale = Resilience(breaker=config, clock=FakeClock(autojump=False))
    async with BreakerSync(store, stale, poll_interval=0.02, owner="old:9"):
        stale.breaker_named(CIRCUIT).manual_control.trip("yesterday's outage")
    first, second, third = (Resilience(breaker=config, clock=FakeClock(autojump=False)) for _ in range(3))
    async with (BreakerSync(store, first, poll_interval=0.02, owner="a:1"),
                BreakerSync(store, second, poll_interval=0.02, owner="b:2"),
                BreakerSync(store, third, poll_interval=0.02, owner="c:3", follow_peers=False)):
        breakers = [engine.breaker_named(CIRCUIT) for engine in (first, second, third)]
        await asyncio.sleep(0.1)
        assert all(b.state_provider.state is CircuitState.CLOSED for b in breakers), "an old trip is not followed"
        for _ in range(2):
            with pytest.raises(ServerError):
                await first.execute(down, CTX)
        assert breakers[0].state_provider.state is CircuitState.OPEN
        await wait_until(lambda: breakers[1].state_provider.state is CircuitState.OPEN)
        followed = breakers[1].state_provider.transitions[-1]
        assert followed.source == "peer:a:1" and followed.reason.startswith("followed a:1: ")
        assert followed.break_duration == 60.0, "a followed trip breaks and probes like its own"
        await asyncio.sleep(0.2)
        assert breakers[2].state_provider.state is CircuitState.CLOSED, "follow_peers=False keeps its own counsel"
        assert len(breakers[0].state_provider.transitions) == 1, "the follow is not echoed back to the first"
        with pytest.raises(CircuitWaitExceededError):
            await second.execute(ok, CTX)
    opened = [(e.owner, e.source) for e in store.events(limit=50) if e.to_state == "open"]
    assert opened == [("old:9", None), ("a:1", None), ("b:2", "peer:a:1")]
    store.engine.dispose()


# -- the command line ---------------------------------------------------------------------------------------


def test_status_isolate_close_and_reset_on_the_command_line(tmp_path: Path, db_url: str) -> None:
    if db_url.startswith("sqlite"):
        code, _, stderr = cli("breaker", "status", "--db", db_url)
        assert code == 2 and "no database at" in stderr, "a mistyped --db is not a new empty database"
    open_database(db_url).dispose()
    code, stdout, _ = cli("breaker", "status", "--db", db_url)
    assert code == 0 and "no circuit reported yet" in stdout
    code, _, stderr = cli("breaker", "isolate", "--db", db_url, "-r", "x")
    assert code == 2 and "known circuits: none yet" in stderr
    code, _, stderr = cli("breaker", "isolate", "nomodel", "--db", db_url, "-r", "x")
    assert code == 2 and "provider/model" in stderr
    code, _, stderr = cli("breaker", "isolate", CIRCUIT, "--db", db_url)
    assert code == 2 and "--reason" in stderr
    code, _, stderr = cli("breaker", "isolate", CIRCUIT, "--db", db_url, "-r", "   ")
    assert code == 2 and "must not be empty" in stderr

    code, _, stderr = cli("breaker", "isolate", CIRCUIT, "--db", db_url, "--reason", "upstream incident")
    assert code == 2 and f"unknown circuit {CIRCUIT!r}" in stderr and "--new" in stderr
    assert json.loads(cli("breaker", "status", "--db", db_url, "--json")[1])["commands"] == []
    code, stdout, _ = cli("breaker", "isolate", CIRCUIT, "--new", "--db", db_url, "--reason", "upstream incident")
    assert code == 0 and "command #1" in stdout and "isolated from its first call (also in later runs)" in stdout
    code, stdout, _ = cli("breaker", "status", "--db", db_url, "--json")
    data = json.loads(stdout)
    assert data["isolated"][CIRCUIT]["reason"] == "upstream incident" and data["circuits"] == []
    code, stdout, _ = cli("breaker", "status", "--db", db_url)
    assert f"{CIRCUIT} is isolated" in stdout and "upstream incident" in stdout

    assert cli("breaker", "close", "--db", db_url, "-r", "over")[0] == 0, "the only known circuit is the default"
    code, stdout, _ = cli("breaker", "reset", "--all", "--db", db_url, "-r", "clean slate")
    assert code == 0 and f"reset {CIRCUIT}" in stdout
    assert cli("breaker", "close", CIRCUIT, "--all", "--db", db_url, "-r", "x")[0] == 2
    code, _, stderr = cli("breaker", "close", CIRCUIT + "x", "--db", db_url, "-r", "typo")
    assert code == 2 and "unknown circuit" in stderr and "--new" not in stderr
    data = json.loads(cli("breaker", "status", "--db", db_url, "--json")[1])
    assert data["isolated"] == {} and [c["action"] for c in data["commands"]] == ["isolate", "close", "reset"]


def test_process_fails_items_clearly_after_the_max_wait_and_runs_once_closed(tmp_path: Path, db_url: str) -> None:
    source = words(tmp_path, 3)
    assert cli("breaker", "isolate", SIM_CIRCUIT, "--new", "--db", db_url, "-r", "fire drill")[0] == 0
    started = time.monotonic()
    code, stdout, stderr = cli("process", str(source), "--provider", "simulated", "--db", db_url, "-o",
                               str(tmp_path / "a.jsonl"), "--breaker-max-wait", "0.2")
    assert code == 1, stdout + stderr
    assert time.monotonic() - started < 10
    assert stderr.count("circuit_open/circuit_wait_exceeded") == 3 and "fire drill" in stderr
    ledger = Ledger(open_database(db_url))
    run = ledger.get_run()
    assert run is not None and ledger.summary(run.id).api_calls == 0, "nothing reached the provider"
    assert {f.category for f in ledger.failures(run.id)} == {"circuit_open"}
    metrics = ledger.run_metrics(run.id) or {}
    assert metrics["circuit_breakers"][SIM_CIRCUIT]["state"] == "isolated"

    assert cli("breaker", "close", SIM_CIRCUIT, "--db", db_url, "-r", "drill over")[0] == 0
    code, stdout, stderr = cli("process", str(source), "--provider", "simulated", "--db", db_url, "-o",
                               str(tmp_path / "a.jsonl"), "--breaker-max-wait", "0.2")
    assert code == 0, stdout + stderr
    data = json.loads(cli("breaker", "status", "--db", db_url, "--json")[1])
    assert [c["state"] for c in data["circuits"]] == ["closed"]
    assert [(t["to_state"], t["manual"]) for t in data["transitions"]] == [("isolated", True)]
    ledger.engine.dispose()


def test_bad_breaker_settings_are_a_usage_error(tmp_path: Path, db_url: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    source, out = str(words(tmp_path, 1)), str(tmp_path / "out.jsonl")
    code, _, stderr = cli("process", source, "--provider", "simulated", "--db", db_url, "-o", out)
    assert code == 0, stderr
    monkeypatch.setenv("CB_FAILURE_RATIO", "2")
    for extra in ([], ["--breaker-max-wait", "5"]):
        code, _, stderr = cli("process", source, "--provider", "simulated", "--db", db_url, "-o", out, *extra)
        assert code == 2 and "CB_FAILURE_RATIO" in stderr and "Traceback" not in stderr
    monkeypatch.delenv("CB_FAILURE_RATIO")
    assert cli("process", source, "--provider", "simulated", "--db", db_url, "-o", out,
               "--breaker-max-wait", "-1")[0] == 2


# -- the runner -------------------------------------------------------------------------------------------------


def test_the_default_policy_is_retry_around_breaker_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    options = ProcessOptions(input_path=tmp_path / "x.csv")
    monkeypatch.setenv("CB_MAX_WAIT", "42")
    policy = default_policy(options).pipeline("openrouter", "m").policy
    assert isinstance(policy, PolicyPipeline)
    retry, breaker, *inner = policy.policies  # retry outermost, then the breaker (a rate limiter may follow)
    assert isinstance(retry, RetryPolicy) and isinstance(breaker, CircuitBreaker)
    assert not any(isinstance(p, RetryPolicy | CircuitBreaker) for p in inner)
    assert breaker.config.max_wait == 42.0
    engine = default_policy(ProcessOptions(input_path=tmp_path / "x.csv", retry=RetryConfig(max_attempts=7),
                                           breaker=CircuitBreakerConfig(min_throughput=3)))
    chosen = engine.pipeline("openrouter", "m").policy
    assert isinstance(chosen, PolicyPipeline)
    assert [type(p) for p in chosen.policies][:2] == [RetryPolicy, CircuitBreaker]
    assert engine.breaker_config is not None and engine.breaker_config.min_throughput == 3
    assert engine.retry is not None and engine.retry.config.max_attempts == 7
    monkeypatch.setenv("CB_ENABLED", "false")
    assert default_policy(options).breaker_config is None
    monkeypatch.setenv("CB_ENABLED", "maybe")
    with pytest.raises(ConfigurationError, match="CB_ENABLED"):
        default_policy(options)


async def status_from_another_terminal(db: str) -> dict[str, Any]:
    """`breaker status --json` as its own process, as an operator would run it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flashcard_pipeline", "breaker", "status", "--json", "--db", db,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, out.decode() + err.decode()
    data: dict[str, Any] = json.loads(out)
    return data


async def test_a_second_terminal_isolates_a_running_process_within_two_seconds(tmp_path: Path,
                                                                              sqlite_url: str) -> None:
    """The default poll interval (1 s) is what is measured: `breaker isolate` runs as a subprocess, then the
    running process's breaker is watched; the run pauses (the display says why, and `breaker status --json` in
    another process shows the circuit as live) and goes on once closed.
    Real time, so SQLite only: the database code is covered on both backends above."""
    source = words(tmp_path, 200)
    policy = Resilience(retry=RetryConfig(max_attempts=2), breaker=CircuitBreakerConfig())
    breakers = policy
    watch = Watch()
    store = BreakerStore(open_database(sqlite_url))
    circuit = "openai-compatible/gpt-4o-mini"
    async with run_simulator(SimulatorConfig(latency=0.05)) as sim:
        options = ProcessOptions(input_path=source, output=tmp_path / "o.jsonl", provider="openai-compatible",
                                 base_url=sim.base_url, db_url=sqlite_url, concurrency=2)
        run = asyncio.create_task(process(options, watch, policy=policy))
        await wait_until(lambda: any(s.live() and s.circuit == circuit for s in store.snapshots()))

        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "flashcard_pipeline", "breaker", "isolate", circuit, "-r", "provider incident",
            "--db", sqlite_url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        assert proc.returncode == 0, out.decode() + err.decode()
        assert b"running processes apply it within 1 s" in out
        breaker = breakers.breaker_named(circuit)
        took = await wait_until(lambda: breaker.state_provider.state is CircuitState.ISOLATED)
        assert took < 2.0
        assert breaker.state_provider.isolation_reason == "provider incident"
        # Both workers must be parked at the breaker: a call already past it when the circuit was isolated still
        # finishes, and its item is counted once the ledger's batch (at most 100 ms) commits.
        await wait_until(lambda: "(provider incident); 2 calls waiting" in (watch.stats.pause_reason or ""))
        # The paused run is still running: `breaker status` from another terminal shows its circuit as live.
        await wait_until(lambda: any(s.state == "isolated" for s in store.snapshots()))
        (seen,) = (await status_from_another_terminal(sqlite_url))["circuits"]
        assert (seen["circuit"], seen["owner"], seen["state"], seen["active"], seen["live"]) == (
            circuit, process_owner(), "isolated", True, True)
        assert seen["stats"]["isolation_reason"] == "provider incident"
        await asyncio.sleep(0.3)
        assert watch.stats is not None
        paused_at = watch.stats.done
        await asyncio.sleep(0.3)
        assert watch.stats.done == paused_at and not run.done(), "the run is paused"

        sim.config = SimulatorConfig()  # answer at once from now on
        code, _, stderr = await asyncio.to_thread(cli, "breaker", "close", circuit, "-r", "incident resolved",
                                                  "--db", sqlite_url)
        assert code == 0, stderr
        result = await asyncio.wait_for(run, 30)
    assert result.outcome is not None and result.outcome.status is RunStatus.COMPLETED
    assert watch.stats.pause_reason is None and result.outcome.stats.done == 200
    events = [(e.to_state, e.reason, e.owner) for e in store.events()]
    assert events == [("isolated", "isolated by hand: provider incident", process_owner()),
                      ("closed", "closed by hand: incident resolved", process_owner())]
    store.engine.dispose()
