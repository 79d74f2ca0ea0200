"""`process` end to end against the simulator: in-process, as a subprocess, with faults, killed and resumed."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from rich.console import Console
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool
from typer.testing import CliRunner

from flashcard_pipeline.cli.app import app
from flashcard_pipeline.cli.progress import ConsoleReporter, describe
from flashcard_pipeline.export.jsonl import read_jsonl
from flashcard_pipeline.ingest import RowProblem, read_vocabulary
from flashcard_pipeline.pipeline import RunStats
from flashcard_pipeline.resilience.ratelimit import RateLimits
from flashcard_pipeline.runner import ProcessOptions, default_policy
from flashcard_pipeline.simulator import SimulatorConfig
from flashcard_pipeline.storage.db import open_database
from flashcard_pipeline.storage.ledger import Ledger
from flashcard_pipeline.storage.schema import Base
from tests.conftest import json_server, shared_file

runner = CliRunner()


def run_cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def words(tmp_path: Path, rows: list[str], name: str = "words.csv") -> Path:
    path = tmp_path / name
    path.write_text("position,term,type\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def assert_cards_for_every_term(output: Path, terms: list[str], *, simulated: bool = True) -> None:
    records = list(read_jsonl(output))
    by_term: dict[str, int] = {}
    for record in records:
        by_term[record.term] = by_term.get(record.term, 0) + 1
        assert record.analysis.term == record.term
        assert ("source:simulated" in record.card.tags) is simulated
    assert sorted(by_term) == sorted(terms)
    assert all(2 <= n <= 4 for n in by_term.values())
    positions = [r.position for r in records]
    assert positions == sorted(positions), "output follows input order"


def test_offline_run_writes_cards_and_a_second_run_is_free(tmp_path: Path, db_url: str) -> None:
    source = words(tmp_path, ["1,학교,noun", "2,먹다,verb", "3,빨리,adverb", "4,학교,noun", "5,,noun"])
    out = tmp_path / "cards.jsonl"
    code, stdout, stderr = run_cli("process", str(source), "--provider", "simulated", "-o", str(out), "--db", db_url)
    assert code == 0, stderr
    assert "skipped row 5" in stderr and "duplicate" in stderr  # 학교 again
    assert "skipped row 6" in stderr and "empty term" in stderr
    assert "6 API calls" in stdout
    assert_cards_for_every_term(out, ["학교", "먹다", "빨리"])

    out.unlink()
    code, stdout, _ = run_cli("process", str(source), "--provider", "simulated", "-o", str(out), "--db", db_url)
    assert code == 0 and "0 API calls" in stdout and "3 before this run" in stdout
    assert_cards_for_every_term(out, ["학교", "먹다", "빨리"])


def test_subprocess_run_on_the_rich_file(tmp_path: Path, db_url: str) -> None:
    source = shared_file("korean_5_rich.csv")
    out = tmp_path / "rich.jsonl"
    proc = subprocess.run([sys.executable, "-m", "flashcard_pipeline", "process", str(source), "--provider",
                           "simulated", "-o", str(out), "--db", db_url], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    terms = [item.term for item in read_vocabulary(source)[0]]
    assert_cards_for_every_term(out, terms)
    definitions = {r.term: r.analysis.primary_meaning for r in read_jsonl(out)}
    assert definitions["내가"] == "I"  # the Definition hint reached the model


def test_faults_are_recorded_and_the_run_finishes(tmp_path: Path, db_url: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETRY_INITIAL_DELAY", "0")  # retries happen, but without real waiting
    monkeypatch.setenv("CB_ENABLED", "false")  # nor real-time circuit breaker pauses
    monkeypatch.setenv("RETRY_MAX_ATTEMPTS", "3")  # few enough that some items fail: the failure path is under test
    source = words(tmp_path, [f"{i},단어{i},noun" for i in range(1, 41)])
    out = tmp_path / "cards.jsonl"
    code, stdout, stderr = run_cli(
        "process", str(source), "--provider", "simulated", "-o", str(out), "--db", db_url,
        "--sim", "server_error_rate=0.15", "--sim", "schema_invalid_rate=0.1", "--sim", "malformed_json_rate=0.05",
        "--sim", "error_in_body_rate=0.05", "--sim", "truncated_rate=0.05", "--sim", "seed=7")
    assert code == 1, stdout + stderr
    assert "Traceback" not in stderr and "items failed" in stderr
    ledger = Ledger(open_database(db_url))
    run = ledger.get_run()
    summary = ledger.summary(run.id)
    assert summary.failed > 0 and summary.done > 0 and summary.done + summary.failed == 40
    assert {"external_service", "invalid_response"} <= set(summary.by_error)
    assert len(list(read_jsonl(out))) >= 2 * summary.done  # every finished item was exported
    failed_codes = {f.code for f in ledger.failures(run.id)}
    assert failed_codes <= {"server_error", "schema_violation", "malformed_json", "provider_error",
                            "truncated_output"}


@pytest.mark.parametrize(("content", "expected"), [
    (b"", "file is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a text file"),
    (b"alpha,beta\n1,2\n", "no term column"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, content: bytes, expected: str, db_url: str) -> None:
    path = tmp_path / "input.csv"
    path.write_bytes(content)
    code, _, stderr = run_cli("process", str(path), "--provider", "simulated", "--db", db_url)
    assert code == 2
    assert expected in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_missing_file_is_exit_2(tmp_path: Path, db_url: str) -> None:
    code, _, stderr = run_cli("process", str(tmp_path / "nope.csv"), "--provider", "simulated", "--db", db_url)
    assert code == 2 and "not found" in stderr


def test_real_provider_without_a_key_says_how_to_fix_it(tmp_path: Path, db_url: str) -> None:
    code, _, stderr = run_cli("process", str(words(tmp_path, ["1,학교,noun"])), "--db", db_url)
    assert code == 2
    assert "OPENROUTER_API_KEY" in stderr and "--provider simulated" in stderr


def test_dry_run_estimates_and_calls_nothing(tmp_path: Path, db_url: str) -> None:
    source = words(tmp_path, ["1,학교,noun", "2,먹다,verb"])
    code, stdout, _ = run_cli("process", str(source), "--dry-run", "--db", db_url)
    assert code == 0, "a dry run sends nothing, so it needs no API key"
    assert "requests" in stdout and "4 (0 stage answers already cached)" in stdout and "$" in stdout
    ledger = Ledger(open_database(db_url))
    assert ledger.get_run() is None

    run_cli("process", str(source), "--provider", "simulated", "--db", db_url, "-o", str(tmp_path / "o.jsonl"))
    code, stdout, _ = run_cli("process", str(source), "--provider", "simulated", "--dry-run", "--db", db_url)
    assert "0 (4 stage answers already cached)" in stdout


@pytest.mark.parametrize(("args", "says"), [
    (["process", "w.csv", "--limit", "0"], "Invalid value for '--limit': Input should be greater than or equal to 1"),
    (["process", "w.csv", "--provider", "bogus"], "Invalid value for '--provider': 'bogus' is not one of"),
    (["process"], "Missing argument 'INPUT'."),
    (["push", "--run", "x"], "Invalid value for '--run'"),
    (["nope"], "No such command 'nope'."),
    (["--bogus"], "No such option: --bogus"),
])
def test_a_bad_option_is_one_error_line_with_where_to_look(args: list[str], says: str) -> None:
    code, stdout, stderr = run_cli(*args)
    assert code == 2 and stdout == ""
    (line,) = stderr.strip().splitlines()
    assert line.startswith(f"error: {says}") and line.endswith(" --help`)"), line


def test_an_interrupted_force_run_resumes_and_a_finished_one_starts_afresh(tmp_path: Path, sqlite_url: str) -> None:
    source = words(tmp_path, [f"{i},낱말{i},noun" for i in range(1, 9)])
    base = ["process", str(source), "--provider", "simulated", "--db", sqlite_url, "-o", str(tmp_path / "o.jsonl"),
            "--concurrency", "1"]
    assert run_cli(*base)[0] == 0
    code, stdout, _ = run_cli(*base, "--force", "--max-cost", "0.002")
    assert code == 3 and "run 2: aborted" in stdout, "a budget stop stands for any interruption"
    done_before = int(re.search(r"(\d+)/8 items done", stdout).group(1))  # type: ignore[union-attr]
    code, stdout, _ = run_cli(*base, "--force")
    assert code == 0 and "run 2: completed" in stdout, "the same --force command resumed run 2"
    assert f"({done_before} before this run)" in stdout and "0 cache hits" in stdout, "still ignoring the cache"
    code, stdout, _ = run_cli(*base, "--force")
    assert code == 0 and "run 3: completed" in stdout and "16 API calls" in stdout, "a finished one is not reused"
    code, stdout, _ = run_cli(*base, "--force", "--max-attempts", "1", "--sim", "server_error_rate=1")
    assert code == 1 and "run 4: failed" in stdout
    code, stdout, _ = run_cli(*base, "--force")
    assert code == 0 and "run 5: completed" in stdout, "a run that ended with failures is finished, not interrupted"


def test_a_list_in_another_encoding_is_read_with_encoding(tmp_path: Path, sqlite_url: str) -> None:
    source = tmp_path / "euc.csv"
    source.write_bytes("position,term,type\n1,학교,noun\n2,먹다,verb\n".encode("euc-kr"))
    out = tmp_path / "o.jsonl"
    code, _, stderr = run_cli("process", str(source), "--provider", "simulated", "--db", sqlite_url, "-o", str(out))
    assert code == 2 and "pass --encoding" in stderr and len(stderr.strip().splitlines()) == 1
    code, _, stderr = run_cli("process", str(source), "--provider", "simulated", "--db", sqlite_url, "-o", str(out),
                              "--encoding", "latin-1")
    assert code == 0, "latin-1 decodes any bytes: the terms are garbage, but nothing can tell"
    code, stdout, stderr = run_cli("process", str(source), "--provider", "simulated", "--db", sqlite_url,
                                   "-o", str(out), "--encoding", "euc-kr")
    assert code == 0 and "run 2: completed" in stdout, "another encoding is another run, not a resume"
    assert_cards_for_every_term(out, ["학교", "먹다"])
    code, _, stderr = run_cli("process", str(source), "--provider", "simulated", "--encoding", "klingon")
    assert code == 2 and "unknown text encoding 'klingon'" in stderr


@pytest.mark.parametrize("group", ["db", "cache", "breaker", "ratelimit"])
def test_a_command_group_alone_shows_its_help_and_no_error(group: str) -> None:
    _, stdout, stderr = run_cli(group)
    assert "Usage:" in stdout and "error" not in stderr, stderr


def test_a_hung_call_times_out_after_timeout_seconds(tmp_path: Path, sqlite_url: str) -> None:
    source = words(tmp_path, ["1,학교,noun"])
    started = time.monotonic()
    code, _, stderr = run_cli("process", str(source), "--provider", "simulated", "--db", sqlite_url,
                              "--sim", "hang_rate=1", "--sim", "hang_seconds=30", "--timeout", "0.3",
                              "--max-attempts", "1", "-o", str(tmp_path / "o.jsonl"))
    assert code == 1 and "timeout/read_timeout" in stderr, stderr
    assert time.monotonic() - started < 20, "it gave up at the timeout, not when the hang ended"


@pytest.fixture
def refusing_server() -> Iterator[str]:
    refusal = {"error": {"code": 401, "message": "No auth credentials found"}}
    with json_server(lambda request: (401, refusal)) as url:
        yield url + "/v1"


def test_refused_key_aborts_with_exit_3_and_never_leaks_it(tmp_path: Path, db_url: str,
                                                            refusing_server: str) -> None:
    secret = "sk-secret-abcdef123456"
    code, stdout, stderr = run_cli("process", str(words(tmp_path, ["1,학교,noun", "2,먹다,verb"])),
                                   "--provider", "openai-compatible", "--base-url", refusing_server,
                                   "--api-key", secret, "--db", db_url, "-o", str(tmp_path / "o.jsonl"))
    assert code == 3, stdout + stderr
    assert "aborted" in stderr and secret not in stdout + stderr
    assert_secret_not_stored(db_url, secret)


def assert_secret_not_stored(db_url: str, secret: str) -> None:
    """Every text and binary column of every table, searched for the key."""
    engine = open_database(db_url)
    with engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            for row in conn.execute(table.select()):
                assert secret not in repr(tuple(row)), f"the key leaked into {table.name}"
    engine.dispose()


@pytest.mark.slow
def test_killed_run_resumes_without_losing_or_repeating_work(tmp_path: Path, db_url: str) -> None:
    source = shared_file("korean_1000_terms.csv")
    out = tmp_path / "deck.jsonl"
    command = [sys.executable, "-m", "flashcard_pipeline", "process", str(source), "--provider", "simulated",
               "--limit", "120", "--concurrency", "4", "--sim", "latency=0.02", "--db", db_url, "-o", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    watcher = create_engine(db_url, poolclass=NullPool)

    def query(sql: str, **params: object) -> list[tuple]:
        with watcher.connect() as conn:
            return [tuple(row) for row in conn.execute(text(sql), params)]

    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            time.sleep(0.1)
            try:
                done = query("SELECT COUNT(*) FROM items WHERE cards_state='done'")[0][0]
            except DBAPIError:
                continue  # not migrated yet
            if done >= 20:
                break
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    done_at_kill = {row[0] for row in query("SELECT id FROM items WHERE cards_state='done'")}
    last_call = query("SELECT COALESCE(MAX(id), 0) FROM api_calls")[0][0]
    assert 20 <= len(done_at_kill) < 120

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming run" in resumed.stderr
    later_items = {row[0] for row in query("SELECT item_id FROM api_calls WHERE id > :last", last=last_call)}
    assert later_items, "the resumed run made calls for the unfinished items"
    assert not later_items & done_at_kill, "an item finished before the kill was requested again"
    assert query("SELECT COUNT(*) FROM runs")[0][0] == 1
    watcher.dispose()
    expected = [item.term for item in read_vocabulary(source)[0][:120]]
    assert_cards_for_every_term(out, expected)


def test_simulate_serves_a_separate_process_run(tmp_path: Path, sqlite_url: str) -> None:
    server = subprocess.Popen([sys.executable, "-m", "flashcard_pipeline", "simulate", "--port", "0",
                               "--sim", "seed=3"], stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "COLUMNS": "200"})
    try:
        line = server.stderr.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+/v1)", line)
        assert match, line
        base_url = match.group(1)
        out = tmp_path / "cards.jsonl"
        secret = "sk-live-0123456789abcdef"
        proc = subprocess.run([sys.executable, "-m", "flashcard_pipeline", "process",
                               str(words(tmp_path, ["1,학교,noun", "2,먹다,verb"])), "--provider",
                               "openai-compatible", "--base-url", base_url, "--api-key", secret,
                               "--db", sqlite_url, "-o", str(out)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert_cards_for_every_term(out, ["학교", "먹다"], simulated=False)
        # A successful run with a key stores answers, cache entries and cards: none of them may hold it.
        assert secret not in proc.stdout + proc.stderr
        assert_secret_not_stored(sqlite_url, secret)
        for name in ("deck.apkg", "deck.tsv", "deck.csv"):
            assert run_cli("export", "--db", sqlite_url, "-o", str(tmp_path / name))[0] == 0
            assert secret.encode() not in (tmp_path / name).read_bytes()
        assert secret.encode() not in out.read_bytes()
        stats = httpx.get(base_url.removesuffix("/v1") + "/stats", timeout=5).json()
        assert stats["total"] == 4 and stats["term_successes"] == {"학교": 2, "먹다": 2}
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=10) == 0


def test_progress_display_on_a_terminal_and_in_a_log() -> None:
    stats = RunStats(total=10, done=4, failed=1, in_flight=2, requests=9, tokens_in=100, tokens_out=50,
                     cost_usd=0.0123, cache_hits=3, pause_reason="circuit open (retry in 12 s)")
    line = describe(stats)
    for part in ("done 4/10", "failed 1", "in flight 2", "tokens 150", "$0.0123", "cache hits 3", "paused: circuit"):
        assert part in line
    assert "API errors 0" in line
    stats.note_rate_limit("openrouter/some-model", 12.0, now=100.0)
    stats.note_rate_limit("openrouter/some-model", 3.0, now=101.0)  # an earlier end never shortens the wait
    assert stats.rate_limited == 2
    assert ("paused: circuit open (retry in 12 s); openrouter/some-model answered 429 (rate limit), every call "
            "waits 7 s") in describe(stats, 105.0)
    assert "429" not in describe(stats, 112.0), "once the pause is over nothing is shown"
    stats.rate_limit_until = 0.0
    stats.api_errors = 5
    assert "API errors 5" in describe(stats)
    stats.api_errors = 0

    async def show(console: Console) -> str:
        reporter = ConsoleReporter(console, plain_interval=0.0)
        async with reporter.live(stats):
            stats.done = 7
            await asyncio.sleep(0.6)
        return console.export_text()

    plain = asyncio.run(show(Console(record=True, force_terminal=False, width=200)))
    assert "done 7/10" in plain and "\x1b" not in plain
    live = asyncio.run(show(Console(record=True, force_terminal=True, width=200)))
    assert "done 7/10" in live and "cards" in live
    narrow = asyncio.run(show(Console(record=True, force_terminal=True, width=60)))
    assert "8/10" in narrow, "the bar's count (done + failed) survives a narrow terminal"
    assert "cache hits 3" in narrow.replace("\n", " ") and "paused: circuit open" in narrow.replace("\n", " ")


def test_a_list_with_nothing_to_process_is_a_usage_error_not_an_empty_success(tmp_path: Path, sqlite_url: str) -> None:
    source = words(tmp_path, ["1,학교,noun", "2,먹다,verb"])
    code, stdout, stderr = run_cli("process", str(source), "--provider", "simulated", "--db", sqlite_url,
                                   "--start-from", "3", "-o", str(tmp_path / "o.jsonl"))
    assert code == 2 and "nothing to process: no term at position 3 or after it" in stderr, stdout + stderr
    assert not (tmp_path / "o.jsonl").exists()
    assert run_cli("process", str(source), "--provider", "simulated", "--db", sqlite_url, "--start-from", "3",
                   "-o", str(tmp_path / "o.jsonl"))[0] == 2, "and again when the same command is repeated"
    assert Ledger(open_database(sqlite_url)).get_run() is None, "no empty run is left for export to pick"
    empty = words(tmp_path, ["1,,noun", "2,,verb"], name="blank.csv")
    code, _, stderr = run_cli("process", str(empty), "--provider", "simulated", "--db", sqlite_url)
    assert code == 2 and "skipped row 3: empty term" in stderr
    for _ in range(2):  # the same reason every time: nothing was stored that could change it
        code, _, stderr = run_cli("process", str(empty), "--provider", "simulated", "--db", sqlite_url)
        assert code == 2 and stderr.strip().splitlines()[-1] == \
            f"error: {empty}: nothing to process: every row was skipped (2, listed above)"


def test_each_skipped_row_is_one_line_even_when_its_term_holds_a_newline() -> None:
    console = Console(record=True, force_terminal=False, width=200)
    ConsoleReporter(console).problems([RowProblem(2, "term contains a control character (U+000A)", "학\n교"),
                                       RowProblem(4, "empty term")])
    assert console.export_text().splitlines() == [
        "skipped row 2 (학\\n교): term contains a control character (U+000A)", "skipped row 4: empty term"]


def test_every_skipped_row_reaches_a_log_and_a_terminal_sees_the_first_20() -> None:
    problems = [RowProblem(row, "empty term") for row in range(2, 32)]
    log = Console(record=True, force_terminal=False, width=200)
    ConsoleReporter(log).problems(problems)
    assert log.export_text().splitlines() == [f"skipped row {row}: empty term" for row in range(2, 32)]
    terminal = Console(record=True, force_terminal=True, width=200)
    ConsoleReporter(terminal).problems(problems)
    lines = terminal.export_text().splitlines()
    assert len(lines) == 21 and lines[-1].startswith("… and 10 more skipped rows") and "2> skipped.txt" in lines[-1]


def test_the_simulators_limits_are_known_not_discovered(tmp_path: Path) -> None:
    def limiter(options: ProcessOptions) -> RateLimits:
        engine = default_policy(options)
        assert engine.ratelimit is not None
        return engine.ratelimit

    source = tmp_path / "w.csv"
    free = limiter(ProcessOptions(input_path=source, provider="simulated"))
    assert free.settings.adaptive is False and free.settings.requests_per_minute is None
    limited = limiter(ProcessOptions(input_path=source, provider="simulated",
                                     simulator=SimulatorConfig(requests_per_minute=600, tokens_per_minute=90_000)))
    assert (limited.settings.requests_per_minute, limited.settings.tokens_per_minute) == (600, 90_000)
    assert limiter(ProcessOptions(input_path=source, provider="simulated", rpm=100)).settings.requests_per_minute == 100
    real = limiter(ProcessOptions(input_path=source, provider="openrouter"))
    assert real.settings.adaptive is True and real.settings.requests_per_minute is None  # unknown: discovered


async def test_the_progress_line_says_the_limit_is_being_found_and_takes_it_from_headers() -> None:
    from flashcard_pipeline.llm.types import ChatResponse, Usage
    from flashcard_pipeline.observers import ProgressObserver
    from flashcard_pipeline.resilience import CallContext, ProviderAnswer, RateLimitSettings, Resilience
    from flashcard_pipeline.resilience.testing import FakeClock

    async def line_after(headers: dict[str, str]) -> str:
        engine = Resilience(ratelimit=RateLimitSettings(), clock=FakeClock())
        stats = RunStats(total=1)
        ProgressObserver(stats).attach(engine.events)
        ctx = CallContext(stage="nuance", item_key="k", provider="p", model="m", estimated_tokens=100)

        async def answered() -> str:
            answer = ChatResponse(content="{}", finish_reason="stop", usage=Usage(10, 10), model="m",
                                  response_id=None, latency_s=0.1, status_code=200, headers=headers)
            ctx.report(ProviderAnswer(answer.usage.total_tokens, answer.headers))
            return "ok"

        await engine.execute(answered, ctx)
        return describe(stats)

    assert "(limit 60/min, finding the provider's limit (--rpm N skips this))" in await line_after({})
    assert "(limit 3,000/min, headers)" in await line_after({"x-ratelimit-limit-requests": "3000"}), \
        "the first answer's headers end the search"
