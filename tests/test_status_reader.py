"""The status commands' quick reader (stdlib sqlite3 / psycopg) against the SQLAlchemy stores: the same records
from the same database, and every status command printing the same on both paths, on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select
from typer.testing import CliRunner

from flashcard_pipeline import monitoring, quick_settings
from flashcard_pipeline.cli.app import app
from flashcard_pipeline.models import VocabularyItem
from flashcard_pipeline.storage import status_reader
from flashcard_pipeline.storage.breaker_store import BreakerStore
from flashcard_pipeline.storage.db import open_database
from flashcard_pipeline.storage.leases import LeaseStore
from flashcard_pipeline.storage.ledger import (
    CallRecorded,
    Ledger,
    StageCompleted,
    StageFailed,
    StageStarted,
)
from flashcard_pipeline.storage.records import RunRecord, RunSummary
from flashcard_pipeline.storage.schema import ApiCall, CircuitBreakerEvent, CircuitBreakerSnapshot, RunStatus
from flashcard_pipeline.storage.status_reader import FullStatus, StatusReader, open_status

runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_declined_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """A DB_*, RL_* or other LOG_* variable in the developer's shell would send every command the full way."""
    for name in list(os.environ):
        if quick_settings.env_handling(name) == "declined":
            monkeypatch.delenv(name)
CIRCUIT = "openrouter/openai/gpt-4o-mini"


def _published(now: datetime) -> dict[str, Any]:
    dimension = {"mode": "adaptive", "planned_per_minute": 480.0, "rate_per_minute": 480.0, "burst": 12.5,
                 "available": 3.25, "paused_for": 0.0, "acquire": {"acquired": 9, "waited": 2, "wait_time": 0.75,
                                                                   "refunded": 1}}
    return {"backend": "memory", "algorithm": "token_bucket", "shards": 1, "updated_at": now.isoformat(),
            "limits": {CIRCUIT: {"rate_limited": 2, "paused_total_s": 1.5, "waiting": 1, "verdict": "noise",
                                 "rate_limited_not_rate_related": 1, "share_429_not_rate_related": 0.05,
                                 "requests": dimension, "tokens": {**dimension, "mode": "configured",
                                                                   "reason": "RL_TOKENS_PER_MINUTE"}}}}


def populate(url: str) -> datetime:
    """A finished run and a running one with done, failed, quarantined, in-flight and pending items, calls ok and
    failed, a worker, breaker commands, transitions and snapshots; returns the instant the tests call now."""
    engine = open_database(url)
    try:
        ledger = Ledger(engine)
        terms = [VocabularyItem(position=i, term=f"낱말{i}", type="noun") for i in range(1, 7)]
        done = ledger.create_run(run_key="a", input_path="/lists/first.csv", input_sha256="a" * 64,
                                 provider="simulated", model="simulated/flashcard-sim",
                                 settings={"prompts": {"nuance": "v3", "cards": "v2"}, "temperature": 0.2},
                                 target_language="ko", learner_language="en", simulated=True, items=terms[:2])
        live = ledger.create_run(run_key="b", input_path="/lists/second list.csv", input_sha256="b" * 64,
                                 provider="openrouter", model="openai/gpt-4o-mini", settings={"params": {}},
                                 target_language="ko", learner_language="de", simulated=False, items=terms)
        ids = {run.id: [p.id for p in ledger.pending_items(run.id)] for run in (done, live)}
        ops: list[Any] = []

        def finish(run_id: int, item_id: int, cached: bool) -> None:
            for stage in ("nuance", "cards"):
                ops.extend([StageStarted(item_id, stage), StageCompleted(item_id, stage, f"k{item_id}{stage}", "{}",
                                                                         cached, run_id=run_id)])

        for item_id in ids[done.id]:
            finish(done.id, item_id, cached=False)
        first, second, third, fourth, fifth, _ = ids[live.id]
        finish(live.id, first, cached=True)
        finish(live.id, second, cached=False)
        ops += [StageStarted(third, "nuance"),
                StageFailed(third, "nuance", "external_service", "server_error", "502 from upstream"),
                StageStarted(fourth, "cards"),
                StageFailed(fourth, "cards", "invalid_response", "schema_violation", "no cards", quarantined=True,
                            last_answer='{"cards": []}'),
                StageStarted(fifth, "nuance")]
        for run_id, status, category, code, tokens, cost in (
                (done.id, "ok", None, None, 1200, 0.0012), (done.id, "ok", None, None, 900, 0.0009),
                (live.id, "ok", None, None, 1500, 0.002), (live.id, "ok", None, None, 700, None),
                (live.id, "error", "external_service", "server_error", 0, None),
                (live.id, "error", "external_service", "server_error", 0, None),
                (live.id, "error", "rate_limit", "too_many_requests", 0, None),
                (live.id, "error", None, None, 0, None)):
            ops.append(CallRecorded(run_id, None, "nuance", "p", "m", None, status, error_category=category,
                                    error_code=code, tokens_in=tokens, tokens_out=tokens // 3, cost_usd=cost))
        ledger.write_batch(ops)
        ledger.set_run_status(done.id, RunStatus.COMPLETED)
        now = datetime.now(UTC) + timedelta(seconds=2)
        ledger.merge_run_metrics(live.id, {
            "progress": {"updated_at": (now - timedelta(seconds=1.5)).isoformat(), "active": True,
                         "owner": "host-a:4242", "in_flight": 2, "requests": 6, "elapsed_s": 20.5,
                         "paused": "openrouter answered 429", "options": {"concurrency": 4, "max_attempts": 2,
                                                                          "force": False, "fallback_models": []}},
            "ratelimit": _published(now), "recovery": {"applied": {"reask_with_errors": 2, "quarantine": 1}},
            "cache": {"hits": 1, "misses": 5}, "circuit_breakers": {CIRCUIT: {"state": "open"}}})
        ledger.merge_run_metrics(done.id, {"progress": {"updated_at": (now - timedelta(minutes=5)).isoformat(),
                                                        "active": False, "owner": "host-a:4000", "elapsed_s": 9.0}})
        leases = LeaseStore(engine)
        worker = leases.register(live.id, host="host-b", pid=77, concurrency=2, lease_seconds=60.0,
                                 now=now - timedelta(seconds=40))
        leases.heartbeat(worker, now=now - timedelta(seconds=3), lease_seconds=60.0, items_done=2, items_failed=1,
                         in_flight=1)
        leases.release(leases.register(live.id, host="host-c", pid=78, concurrency=1, lease_seconds=30.0,
                                       now=now - timedelta(seconds=50)), now=now - timedelta(seconds=45),
                       items_done=0, items_failed=0)
        store = BreakerStore(engine)
        store.add_command(CIRCUIT, "isolate", "provider incident", requested_by="ops@desk")
        store.add_command("openai-compatible/local", "isolate", "maintenance", requested_by="ops@desk")
        store.add_command("openai-compatible/local", "close", "back", requested_by="ops@desk")
        with engine.begin() as conn:
            conn.execute(insert(CircuitBreakerEvent), [
                {"circuit": CIRCUIT, "from_state": "closed", "to_state": "open", "manual": False,
                 "reason": "failure ratio 0.8 over 10 calls", "source": None, "failure_count": 8, "throughput": 10,
                 "failure_ratio": 0.8, "break_duration": 30.0, "half_open_attempts": 0, "owner": "host-a:4242",
                 "run_id": live.id, "created_at": now - timedelta(seconds=30)},
                {"circuit": CIRCUIT, "from_state": "open", "to_state": "isolated", "manual": True,
                 "reason": "provider incident", "source": "command #1 from ops@desk", "failure_count": 8,
                 "throughput": 10, "failure_ratio": 0.8, "break_duration": None, "half_open_attempts": 0,
                 "owner": "host-a:4242", "run_id": None, "created_at": now - timedelta(seconds=20)}])
            stats = {"window": {"failures": 8, "throughput": 10}, "state": "isolated"}
            conn.execute(insert(CircuitBreakerSnapshot), [
                {"circuit": CIRCUIT, "owner": "host-a:4242", "run_id": live.id, "state": "isolated", "active": True,
                 "since": now - timedelta(seconds=20), "open_until": None, "failure_count": 8, "success_count": 2,
                 "rejected_count": 5, "stats_json": json.dumps(stats), "updated_at": now - timedelta(seconds=2)},
                {"circuit": CIRCUIT, "owner": "host-a:4000", "run_id": done.id, "state": "open", "active": False,
                 "since": now - timedelta(minutes=6), "open_until": now - timedelta(minutes=5),
                 "failure_count": 3, "success_count": 9, "rejected_count": 0, "stats_json": "{}",
                 "updated_at": now - timedelta(minutes=5)}])
    finally:
        engine.dispose()
    return now


class _Frozen(datetime):
    instant: datetime = datetime.now(UTC)

    @classmethod
    def now(cls, tz: Any = None) -> _Frozen:  # type: ignore[override]
        return cls.fromtimestamp(cls.instant.timestamp(), tz)


@pytest.fixture
def database(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A populated database, the commands' clock stopped at its ``now``."""
    _Frozen.instant = populate(db_url)
    monkeypatch.setattr(monitoring, "datetime", _Frozen)
    for module in ("runs_commands", "breaker_commands", "ratelimit_commands"):  # imported by cli.app, in its order
        monkeypatch.setattr(f"flashcard_pipeline.cli.{module}.datetime", _Frozen)
    yield db_url


def _reader(url: str) -> StatusReader:
    settings = quick_settings.read()
    assert settings is not None
    target = quick_settings.database_target(url, settings)
    reader = StatusReader.open(target) if target is not None else None
    assert reader is not None, f"the quick reader declined {url}"
    return reader


def test_both_readers_return_the_same_records(database: str) -> None:
    quick, full = _reader(database), FullStatus(open_database(database, must_exist=True))
    try:
        now = _Frozen.instant
        ids = [run.id for run in full.runs()]
        assert len(ids) == 2
        assert quick.runs() == full.runs() and quick.runs(limit=1) == full.runs(limit=1)
        assert quick.get_run() == full.get_run() and quick.get_run(99) is None
        assert quick.summaries(ids) == full.summaries(ids) and quick.summaries([]) == {}
        for run_id in ids:
            assert quick.get_run(run_id) == full.get_run(run_id)
            assert quick.run_metrics(run_id) == full.run_metrics(run_id)
            assert quick.summary(run_id) == full.summary(run_id)
            assert quick.errors_by_code(run_id) == full.errors_by_code(run_id)
            assert quick.failures(run_id) == full.failures(run_id)
            assert quick.quarantined(run_id) == full.quarantined(run_id)
            assert quick.workers(run_id) == full.workers(run_id)
            for seconds in (0.001, 5, 60, 3600):
                since = now - timedelta(seconds=seconds)
                assert quick.recent_activity(run_id, since) == full.recent_activity(run_id, since)
        summary = full.summary(ids[0])
        assert (summary.done, summary.failed, summary.quarantined, summary.pending, summary.cached_stages) == \
            (2, 2, 1, 2, 2)  # the data covers every branch the records have
        assert full.errors_by_code(ids[0]) == {"external_service/server_error": 2, "rate_limit/too_many_requests": 1,
                                               "unknown/unknown": 1}
        assert quick.snapshots() == full.snapshots() and len(full.snapshots()) == 2
        assert quick.events() == full.events() and quick.events(limit=1) == full.events(limit=1)
        assert quick.latest_commands() == full.latest_commands()
        assert quick.recent_commands() == full.recent_commands() and len(full.recent_commands(2)) == 2
    finally:
        quick.close()
        full.close()


def test_the_pace_window_takes_a_call_made_at_its_first_instant(database: str) -> None:
    """``created_at >= since`` at the stored value itself: the quick reader binds a time as SQLAlchemy does (on
    SQLite: text in the same format, zone dropped), or calls at the window's edge would go uncounted."""
    engine = open_database(database)
    try:
        with engine.connect() as conn:
            run_id, stamp = conn.execute(select(ApiCall.run_id, ApiCall.created_at)
                                         .order_by(ApiCall.id.desc()).limit(1)).one()
    finally:
        engine.dispose()
    quick, full = _reader(database), FullStatus(open_database(database))
    try:
        for since in (stamp, stamp + timedelta(microseconds=1), stamp - timedelta(microseconds=1)):
            since = since if since.tzinfo else since.replace(tzinfo=UTC)
            assert quick.recent_activity(run_id, since) == full.recent_activity(run_id, since)
        assert quick.recent_activity(run_id, stamp.replace(tzinfo=UTC))[0] > 0
    finally:
        quick.close()
        full.close()


STATUS_COMMANDS = [
    ["runs", "list"], ["runs", "list", "--limit", "1"], ["runs", "show", "1"], ["runs", "show", "2"],
    ["runs", "show", "3"], ["breaker", "status"], ["breaker", "status", "--all", "--history", "1"],
    ["ratelimit", "status"], ["ratelimit", "status", "--run", "1"], ["ratelimit", "status", "--run", "9"],
    ["monitor", "--once"], ["monitor", "--once", "--run", "1"], ["monitor", "--once", "--run", "7"],
]


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_every_status_command_prints_the_same_on_both_paths(database: str, as_json: bool,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real_open = StatusReader.open.__func__  # type: ignore[attr-defined]

    def spy(cls: type[StatusReader], target: Any) -> StatusReader | None:
        reader = real_open(cls, target)
        opened.append("quick" if reader is not None else "declined")
        return reader  # type: ignore[no-any-return]

    def run(args: list[str]) -> tuple[int, str, str]:
        result = runner.invoke(app, [*args, "--db", database, *(["--json"] if as_json else [])],
                               env={"COLUMNS": "100"})
        return result.exit_code, result.stdout, result.stderr

    for args in STATUS_COMMANDS:
        monkeypatch.setattr(StatusReader, "open", classmethod(spy))
        quick = run(args)
        assert opened == ["quick"], (args, opened)
        monkeypatch.setattr(StatusReader, "open", classmethod(lambda cls, target: None))
        full = run(args)
        assert quick == full, args
        opened.clear()
        if args[-1] not in ("3", "9", "7"):
            assert quick[0] == 0 and quick[1].strip(), (args, quick)
    _, stdout, _ = run(["monitor", "--once"])
    if as_json:
        snapshot = json.loads(stdout)
        assert snapshot["state"] == "running" and snapshot["calls_per_minute"] > 0 and snapshot["workers"]


def test_a_database_at_another_revision_is_left_to_the_full_path(tmp_path: Path) -> None:
    """Its tables may not be those the quick reader's SQL names: the full path migrates it (or refuses it)."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    populate(url)
    settings = quick_settings.read()
    assert settings is not None
    target = quick_settings.database_target(url, settings)
    assert target is not None and target.path is not None
    reader = StatusReader.open(target)
    assert reader is not None
    reader.close()
    for statement in ("UPDATE alembic_version SET version_num = '0004'", "DROP TABLE alembic_version"):
        with contextlib.closing(sqlite3.connect(target.path)) as connection, connection:
            connection.execute(statement)
        assert StatusReader.open(target) is None, statement


def test_settings_the_quick_path_does_not_read_take_the_full_path(database: str, monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    monkeypatch.setenv("DB_POOL_SIZE", "3")
    source = open_status(database, quick_settings.read())
    try:
        assert isinstance(source, FullStatus)
    finally:
        source.close()
    monkeypatch.delenv("DB_POOL_SIZE")
    assert quick_settings.database_target(f"sqlite:///{tmp_path / 'missing.db'}", quick_settings.read()) is None
    source = open_status(database, quick_settings.read())
    try:
        assert isinstance(source, status_reader.StatusReader)
    finally:
        source.close()


def test_the_pace_counts_what_finished_since_the_processes_first_heartbeat() -> None:
    """The first heartbeat says the process has run ~0 s; items may finish before the next one. The pace window is
    the running time as of now (that elapsed time plus the heartbeat's age), so their calls count."""
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    calls_at = now - timedelta(seconds=0.4)
    run = RunRecord(id=1, run_key="k", status="running", total_items=4, simulated=True, provider="p", model="m",
                    target_language="ko", learner_language="en", created_at=now - timedelta(seconds=1))

    class Source:
        def get_run(self, run_id: int | None = None) -> RunRecord:
            return run

        def run_metrics(self, run_id: int) -> dict[str, Any]:
            return {"progress": {"updated_at": (now - timedelta(seconds=0.9)).isoformat(), "active": True,
                                 "elapsed_s": 0.012, "in_flight": 0, "owner": "h:1"}}

        def recent_activity(self, run_id: int, since: datetime) -> tuple[int, int]:
            return (4, 2) if since <= calls_at else (0, 0)

        def summary(self, run_id: int) -> RunSummary:
            return RunSummary(total=4, done=2, pending=2, api_calls=4)

        def workers(self, run_id: int) -> list[Any]:
            return []

        def snapshots(self) -> list[Any]:
            return []

        def latest_commands(self) -> dict[str, Any]:
            return {}

        def errors_by_code(self, run_id: int) -> dict[str, int]:
            return {}

    snapshot = monitoring.take_snapshot(Source(), run, now)  # type: ignore[arg-type]
    assert snapshot.state == "running" and snapshot.calls_per_minute > 0 and snapshot.items_per_minute > 0
