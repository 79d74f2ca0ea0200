"""`runs list|show|delete` and `monitor`: a run seen and steered from a second terminal, against a real running
`process` (a subprocess whose simulated provider answers slowly)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from flashcard_pipeline.cli.app import app
from flashcard_pipeline.monitoring import STALE_AFTER, run_state
from flashcard_pipeline.storage.db import open_database
from flashcard_pipeline.storage.ledger import RunRecord
from flashcard_pipeline.storage.schema import ApiCall, Card, Item, StageResult

runner = CliRunner()


def cli(*args: str, input: str | None = None) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), input=input)
    return result.exit_code, result.stdout, result.stderr


def words(tmp_path: Path, count: int, name: str = "words.csv", stem: str = "낱말") -> Path:
    path = tmp_path / name
    path.write_text("position,term,type\n" + "".join(f"{i},{stem}{i},noun\n" for i in range(1, count + 1)),
                    encoding="utf-8")
    return path


def process(tmp_path: Path, db: str, source: Path, *extra: str) -> subprocess.Popen[str]:
    """`process` in a process of its own, as a user starts it in the first terminal."""
    return subprocess.Popen([sys.executable, "-m", "flashcard_pipeline", "process", str(source), "--provider",
                             "simulated", "--db", db, "-o", str(tmp_path / f"{source.stem}.jsonl"), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))


def test_runs_list_show_and_delete(tmp_path: Path, db_url: str) -> None:
    assert cli("runs", "list", "--db", db_url)[0] == (2 if db_url.startswith("sqlite") else 0)
    first = words(tmp_path, 3, "first.csv")
    second = words(tmp_path, 2, "second.csv", stem="단어")
    assert cli("process", str(first), "--provider", "simulated", "--db", db_url, "-o",
               str(tmp_path / "1.jsonl"))[0] == 0
    code, _, stderr = cli("process", str(second), "--provider", "simulated", "--db", db_url, "-o",
                          str(tmp_path / "2.jsonl"), "--sim", "schema_invalid_rate=1", "--max-attempts", "1")
    assert code == 1, stderr

    code, stdout, _ = cli("runs", "list", "--db", db_url, "--json")
    runs = json.loads(stdout)
    assert code == 0 and [r["id"] for r in runs] == [2, 1]
    assert runs[1] | {"state": "completed", "done": 3, "total": 3, "failed": 0, "api_calls": 6,
                      "model": "simulated/flashcard-sim", "simulated": True} == runs[1]
    assert runs[0]["state"] == "failed" and runs[0]["failed"] == 2 and runs[0]["input_path"] == str(second)
    assert runs[1]["cost_usd"] > 0 and runs[1]["duration_s"] >= 0
    code, stdout, _ = cli("runs", "list", "--db", db_url)
    assert code == 0 and "first.csv · simulated/simulated/flashcard-sim" in stdout and "3/3 done" in stdout

    code, stdout, _ = cli("runs", "show", "2", "--db", db_url, "--json")
    shown = json.loads(stdout)
    assert code == 0 and shown["errors_by_category"] == {"invalid_response": 6}
    assert shown["errors_by_code"] == {"invalid_response/schema_violation": 6}
    # Answers that keep breaking the schema set their items aside (quarantined), with the re-asks on record.
    assert shown["failures"] == [] and shown["quarantined"] == 2
    assert [(q["term"], q["code"]) for q in shown["quarantined_items"]] == [("단어1", "schema_violation"),
                                                                           ("단어2", "schema_violation")]
    assert shown["recovery"]["applied"] == {"quarantine": 2, "reask_with_errors": 6}
    assert set(shown["settings"]["prompts"]) == {"cards", "nuance"}
    assert shown["last_invocation"]["max_attempts"] == 1 and shown["last_invocation"]["concurrency"] == 8
    result = runner.invoke(app, ["runs", "show", "1", "--db", db_url], env={"COLUMNS": "250"})
    code, stdout = result.exit_code, result.stdout
    for part in (str(first), "simulated/simulated/flashcard-sim", "3/3 done", "6 API calls", "est.", "completed"):
        assert part in stdout, part
    assert cli("runs", "show", "9", "--db", db_url)[0] == 2

    code, stdout, _ = cli("runs", "delete", "1", "--db", db_url, input="n\n")
    assert code == 1 and "3 items with their 3 finished answers and cards will be deleted" in stdout
    assert stdout.strip().endswith("nothing deleted")
    assert [r["id"] for r in json.loads(cli("runs", "list", "--db", db_url, "--json")[1])] == [2, 1]
    code, stdout, _ = cli("runs", "delete", "1", "--db", db_url, "--yes")
    assert code == 0 and "deleted run 1" in stdout
    engine = open_database(db_url)
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(Item).where(Item.run_id == 1)) == 0
        assert session.scalar(select(func.count()).select_from(Card).where(Card.run_id == 1)) == 0
        assert session.scalar(select(func.count()).select_from(StageResult)) == 0  # run 2 finished nothing
        # The call log keeps the calls (and their cost): they were made and paid for.
        assert session.scalar(select(func.count()).select_from(ApiCall).where(ApiCall.run_id.is_(None))) == 6
    engine.dispose()
    assert [r["id"] for r in json.loads(cli("runs", "list", "--db", db_url, "--json")[1])] == [2]
    assert cli("export", "--db", db_url, "--run", "1", "-o", str(tmp_path / "x.jsonl"))[0] == 2
    # The answers are still in the cache: the same list again costs nothing.
    code, stdout, _ = cli("process", str(first), "--provider", "simulated", "--db", db_url, "-o",
                          str(tmp_path / "3.jsonl"))
    assert code == 0 and "0 API calls" in stdout
    assert cli("runs", "delete", "1", "--db", db_url, "--yes")[0] == 2


def test_run_state_from_the_heartbeat() -> None:
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    run = RunRecord(id=1, run_key="k", status="running", total_items=1, simulated=True, provider="p", model="m",
                    target_language="Korean", learner_language="English", created_at=now - timedelta(hours=1),
                    updated_at=now - timedelta(hours=1))
    fresh = {"active": True, "updated_at": (now - timedelta(seconds=2)).isoformat()}
    assert run_state(run, fresh, now) == "running"
    assert run_state(run, {**fresh, "active": False}, now) == "interrupted"  # stopped without a final status
    assert run_state(run, {**fresh, "updated_at": (now - STALE_AFTER).isoformat()}, now) == "interrupted"
    assert run_state(run, None, now) == "interrupted"
    just_made = RunRecord(**{**run.__dict__, "created_at": now, "updated_at": now})
    assert run_state(just_made, None, now) == "starting"
    failed = RunRecord(**{**run.__dict__, "status": "failed"})
    assert run_state(failed, fresh, now) == "running", "a failed run being resumed is running"
    assert run_state(failed, {**fresh, "active": False}, now) == "failed"


@pytest.mark.slow
def test_monitor_watches_a_running_process_from_a_second_terminal(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'watched.db'}"
    source = words(tmp_path, 40)
    worker = process(tmp_path, db, source, "--sim", "latency=0.25", "--concurrency", "2", "--rpm", "6000")
    try:
        snapshot = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            code, stdout, stderr = cli("monitor", "--once", "--json", "--db", db)
            if code == 0:
                snapshot = json.loads(stdout)
                if snapshot["state"] == "running" and snapshot["done"] >= 2 and snapshot["limits"]:
                    break
            time.sleep(0.3)
        assert snapshot is not None and snapshot["state"] == "running", (snapshot, worker.poll())
        assert 2 <= snapshot["done"] < snapshot["total"] == 40 and snapshot["pending"] > 0
        assert snapshot["in_flight"] in (0, 1, 2) and snapshot["calls_per_minute"] > 0
        assert snapshot["eta_seconds"] is not None and snapshot["eta_seconds"] > 0
        assert snapshot["cost_usd"] > 0 and snapshot["api_errors"] == 0
        assert snapshot["heartbeat_age_s"] < 5 and snapshot["owner"].endswith(f":{worker.pid}")
        assert [c["circuit"] for c in snapshot["circuits"]] == ["simulated/simulated/flashcard-sim"]
        limits = snapshot["limits"]["limits"]["simulated/simulated/flashcard-sim"]
        assert limits["requests"]["mode"] == "configured" and limits["requests"]["planned_per_minute"] == 6000
        code, _, stderr = cli("runs", "delete", "1", "--db", db, "--yes")
        assert code == 2 and "is running" in stderr

        # `monitor` in the second terminal follows the run and exits when it ends, with the run's outcome.
        watcher = subprocess.run([sys.executable, "-m", "flashcard_pipeline", "monitor", "--db", db, "--interval",
                                  "0.5"], capture_output=True, text=True, timeout=120, env=dict(os.environ))
        assert worker.wait(timeout=60) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    assert watcher.returncode == 0, watcher.stderr
    lines = watcher.stdout.splitlines()
    assert any(line.startswith("run 1 running · done ") for line in lines), lines[:5]
    assert "run 1 ended: completed" in lines[-1]
    assert "40/40 done" in watcher.stdout
    final = json.loads(cli("monitor", "--once", "--json", "--db", db)[1])
    assert final["state"] == "completed" and final["done"] == 40 and final["in_flight"] == 0


@pytest.mark.slow
def test_monitor_reports_a_killed_process_as_interrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = f"sqlite:///{tmp_path / 'killed.db'}"
    worker = process(tmp_path, db, words(tmp_path, 30), "--sim", "latency=0.3", "--concurrency", "1")
    deadline, state, stderr = time.monotonic() + 90, None, ""
    while time.monotonic() < deadline and state != "running":
        code, stdout, stderr = cli("monitor", "--once", "--json", "--db", db)
        state = json.loads(stdout)["state"] if code == 0 else None
        time.sleep(0.3)
    worker.kill()
    worker.wait(timeout=30)
    assert state == "running", stderr
    monkeypatch.setattr("flashcard_pipeline.monitoring.STALE_AFTER", timedelta(seconds=2))
    time.sleep(2.5)
    code, stdout, stderr = cli("monitor", "--db", db)
    assert code == 1 and "ended: interrupted (its process stopped without finishing" in stdout, stdout + stderr
    runs = json.loads(cli("runs", "list", "--db", db, "--json")[1])
    assert runs[0]["state"] == "interrupted" and runs[0]["status"] == "running"


def test_monitor_without_a_run(tmp_path: Path) -> None:
    code, _, stderr = cli("monitor", "--db", str(tmp_path / "none.db"))
    assert code == 2 and "no database at" in stderr


def test_monitor_reads_the_shared_limits_from_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import redis

    from tests.conftest import REDIS_URL, require_service

    require_service("127.0.0.1", 6379, "Redis")
    prefix = f"test:monitor:{uuid.uuid4().hex}:"
    monkeypatch.setenv("RL_BACKEND", "redis")
    monkeypatch.setenv("RL_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("RL_REDIS_PREFIX", prefix)
    db = f"sqlite:///{tmp_path / 'redis.db'}"
    client = redis.Redis.from_url(REDIS_URL)
    try:
        code, _, stderr = cli("process", str(words(tmp_path, 2)), "--provider", "simulated", "--rpm", "600",
                              "--db", db, "-o", str(tmp_path / "r.jsonl"))
        assert code == 0, stderr
        code, stdout, stderr = cli("monitor", "--once", "--json", "--db", db)
        assert code == 0, stderr
        live = {state["key"]: state for state in json.loads(stdout)["redis"]}
        requests = live[f"{prefix}{{simulated/simulated/flashcard-sim}}:requests"]
        assert requests["rate_per_minute"] > 0 and requests["used_last_minute_all_processes"] == 4
        result = runner.invoke(app, ["monitor", "--once", "--db", db], env={"COLUMNS": "200"})
        assert result.exit_code == 0 and f"{prefix}{{simulated/simulated/flashcard-sim}}:requests" in result.stdout
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()
