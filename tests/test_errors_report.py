"""`errors` and `logs` after a chaos run: the report's counts are the ledger's, every call has an id that its log
lines share, and `logs` filters by item and call."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool
from typer.testing import CliRunner

from flashcard_pipeline.analytics import error_report, percentile
from flashcard_pipeline.cli.app import app
from flashcard_pipeline.cli.errors_commands import parse_since
from flashcard_pipeline.errors import ConfigurationError
from tests.test_cli_e2e import words

runner = CliRunner()
CHAOS = ["--sim", "seed=11", "--sim", "server_error_rate=0.2", "--sim", "schema_invalid_rate=0.15",
         "--sim", "malformed_json_rate=0.05", "--sim", "rate_limit_rate=0.05", "--sim", "empty_content_rate=0.05",
         "--sim", "heeds_feedback=true"]
TERMS = ["학교", "먹다", "빨리", "바다", "하늘", "사랑", "사람", "예쁘다", "물", "책"]


@pytest.fixture
def chaos_run(tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    for name, value in {"RETRY_INITIAL_DELAY": "0.001", "RETRY_MAX_DELAY": "0.002", "RETRY_MAX_ATTEMPTS": "4",
                        "RL_REQUESTS_PER_MINUTE": "60000", "RL_ADAPTIVE": "false",
                        "CB_ENABLED": "false"}.items():
        monkeypatch.setenv(name, value)
    source = words(tmp_path, [f"{i},{t},noun" for i, t in enumerate(TERMS, start=1)])
    result = runner.invoke(app, ["process", str(source), "--provider", "simulated", "--db", sqlite_url,
                                 "-o", str(tmp_path / "deck.jsonl"), *CHAOS])
    assert result.exit_code in (0, 1), result.output
    return sqlite_url


def ledger_rows(url: str, sql: str) -> list[tuple]:  # type: ignore[type-arg]
    engine = create_engine(url, poolclass=NullPool)
    with engine.connect() as conn:
        rows = [tuple(row) for row in conn.execute(text(sql))]
    engine.dispose()
    return rows


def test_the_errors_report_counts_what_the_ledger_holds(chaos_run: str) -> None:
    result = runner.invoke(app, ["errors", "--db", chaos_run, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    expected = {(c, k, s, m): n for c, k, s, m, n in ledger_rows(chaos_run, """
        SELECT error_category, error_code, stage, model, COUNT(*) FROM api_calls WHERE status != 'ok'
        GROUP BY 1, 2, 3, 4""")}
    assert len(expected) >= 3, "the chaos run failed calls in several ways"
    got = {(g["category"], g["code"], g["stage"], g["model"]): g["count"] for g in report["groups"]}
    assert got == expected
    failed = sum(expected.values())
    [(calls, retries, throttled)] = ledger_rows(chaos_run, """
        SELECT COUNT(*), SUM(CASE WHEN attempt > 1 THEN 1 ELSE 0 END),
               SUM(CASE WHEN http_status = 429 THEN 1 ELSE 0 END) FROM api_calls""")
    assert (report["calls"], report["failed_calls"], report["successes"]) == (calls, failed, calls - failed)
    assert (report["retries"], report["rate_limited"]) == (retries, throttled)
    assert report["retries_per_success"] == pytest.approx(retries / (calls - failed))
    assert report["share_429"] == pytest.approx(throttled / calls)
    assert sum(g["share"] for g in report["groups"]) == pytest.approx(1.0)
    for group in report["groups"]:
        key = (group["category"], group["code"], group["stage"], group["model"])
        terms = {t for (t,) in ledger_rows(chaos_run, f"""
            SELECT DISTINCT i.term FROM api_calls a JOIN items i ON i.id = a.item_id WHERE a.status != 'ok'
            AND a.error_category = '{key[0]}' AND a.error_code = '{key[1]}' AND a.stage = '{key[2]}'""")}
        assert set(group["items"]) == terms and group["items_total"] == len(terms)
        [(example,)] = ledger_rows(chaos_run, f"SELECT error_message FROM api_calls WHERE call_id = "
                                              f"'{group['example_call_id']}'")
        assert example == group["example"]
        assert group["first_seen"] <= group["last_seen"]
    for row in report["latency"]:
        values = sorted(v for (v,) in ledger_rows(chaos_run, f"SELECT latency_ms FROM api_calls WHERE stage = "
                                                             f"'{row['stage']}' AND model = '{row['model']}'"))
        assert row["calls"] == len(values)
        assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"] == pytest.approx(values[-1], abs=0.1)
        assert row["p50_ms"] == pytest.approx(values[(len(values) + 1) // 2 - 1], abs=0.1)
    text_report = runner.invoke(app, ["errors", "--db", chaos_run]).stdout
    for group in report["groups"]:
        assert f"{group['category']}/{group['code']} · {group['stage']}" in text_report
    since = runner.invoke(app, ["errors", "--db", chaos_run, "--since", "1h", "--json"])
    assert json.loads(since.stdout)["calls"] == calls and json.loads(since.stdout)["run_id"] is None
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    assert json.loads(runner.invoke(app, ["errors", "--db", chaos_run, "--since", future, "--json"]).stdout)[
        "calls"] == 0


def test_every_call_has_an_id_its_log_lines_share_and_logs_filters_by_item_and_call(chaos_run: str) -> None:
    calls = ledger_rows(chaos_run, "SELECT call_id, attempt, status FROM api_calls")
    ids = [c for c, _, _ in calls]
    assert all(ids) and len(set(ids)) == len(ids)
    assert {a for _, a, _ in calls} >= {1, 2}
    result = runner.invoke(app, ["logs", "--db", chaos_run, "--json", "--item", "학교"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines and all(line["item"] == "학교" and line["run_id"] == 1 for line in lines)
    failed = [c for c, _, status in calls if status != "ok"]
    logged = {line["call_id"] for line in json.loads("[" + ",".join(
        runner.invoke(app, ["logs", "--db", chaos_run, "--json"]).stdout.splitlines()) + "]") if "call_id" in line}
    assert set(failed) <= logged, "every failed call is in the log under its id"
    one = failed[0]
    only = runner.invoke(app, ["logs", "--db", chaos_run, "--call", one])
    assert only.exit_code == 0 and only.stdout and all(f"call={one}" in line for line in only.stdout.splitlines())
    assert runner.invoke(app, ["logs", "--db", chaos_run, "--run", "9"]).exit_code == 2


def test_since_and_percentiles() -> None:
    now = datetime(2026, 1, 31, 12, tzinfo=UTC)
    assert parse_since("24h", now) == now - timedelta(hours=24)
    assert parse_since("2026-01-30T08:00+00:00") == datetime(2026, 1, 30, 8, tzinfo=UTC)
    with pytest.raises(ConfigurationError, match="--since 'soon'"):
        parse_since("soon")
    assert [percentile(list(range(1, 101)), p) for p in (50, 95, 99)] == [50, 95, 99]
    assert percentile([3.0], 99) == 3.0


def test_an_empty_report_for_a_clean_run(tmp_path: Path, sqlite_url: str) -> None:
    source = words(tmp_path, ["1,학교,noun"])
    assert runner.invoke(app, ["process", str(source), "--provider", "simulated", "--db", sqlite_url,
                               "-o", str(tmp_path / "d.jsonl")]).exit_code == 0
    from flashcard_pipeline.storage.db import open_database

    report = error_report(open_database(sqlite_url), run_id=1)
    assert (report.failed_calls, report.groups, report.retries_per_success) == (0, [], 0.0)
    assert "no failed calls" in runner.invoke(app, ["errors", "--db", sqlite_url]).stdout
