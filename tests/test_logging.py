"""Logging at the CLI's edge: levels and flags, per-module levels, text and JSON lines with their context, the run's
log file, `logs`, redaction (a canary key found nowhere), trace ids, and log lines above the live display."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from rich.progress import Progress
from typer.testing import CliRunner

from flashcard_pipeline.cli.app import app
from flashcard_pipeline.config import log_options, run_log_options
from flashcard_pipeline.errors import ConfigurationError, ServerError
from flashcard_pipeline.logging_config import (
    LogOptions,
    ThresholdFilter,
    bound,
    log_context,
    logging_configured,
    parse_levels,
    read_log_lines,
    run_log,
    run_log_files,
)
from tests.test_cli_e2e import assert_secret_not_stored, words

runner = CliRunner()
CANARY = "canary-7f3a9c-0123456789-not-a-real-key"


def test_flags_beat_the_environment_which_beats_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "flashcard-pipeline.toml").write_text('[logging]\nlevel = "ERROR"\nformat = "json"\n')
    monkeypatch.chdir(tmp_path)
    assert (log_options().level, log_options().format) == (logging.ERROR, "json")
    monkeypatch.setenv("LOG_LEVEL", "info")
    assert log_options().level == logging.INFO
    assert log_options(verbosity=2).level == logging.DEBUG
    assert log_options(verbosity=-1).level == logging.ERROR
    assert log_options(level="warning", verbosity=2).level == logging.WARNING
    assert log_options(format="text").format == "text"
    with pytest.raises(ConfigurationError, match="--log-level: 'loud' is not a level"):
        log_options(level="loud")
    monkeypatch.setenv("LOG_LEVELS", "flashcard_pipeline.resilience=DEBUG, httpx=INFO")
    assert log_options().levels == {"flashcard_pipeline.resilience": logging.DEBUG, "httpx": logging.INFO}
    monkeypatch.setenv("LOG_FILE", "false")
    assert run_log_options() is None


def test_a_bad_log_setting_is_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_LEVELS", "flashcard_pipeline=LOUD")
    result = runner.invoke(app, ["runs", "list"])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error: invalid LOG_LEVELS"), result.stderr
    # `config validate` is how one finds it: it still runs and names the variable.
    validate = runner.invoke(app, ["config", "validate"])
    assert validate.exit_code == 2 and "LOG_LEVELS" in validate.stdout + validate.stderr


def test_per_module_levels_apply_to_the_subtree_and_nothing_else() -> None:
    threshold = ThresholdFilter(logging.WARNING, parse_levels("flashcard_pipeline.resilience=DEBUG,httpx=ERROR"))
    assert threshold.threshold("flashcard_pipeline.resilience.retry") == logging.DEBUG
    assert threshold.threshold("flashcard_pipeline.resilience") == logging.DEBUG
    assert threshold.threshold("flashcard_pipeline.resiliencex") == logging.WARNING
    assert threshold.threshold("flashcard_pipeline.pipeline") == logging.WARNING
    assert threshold.threshold("httpx") == logging.ERROR
    with pytest.raises(ValueError, match="expected LOGGER=LEVEL"):
        parse_levels("flashcard_pipeline")


def _capture(options: LogOptions, emit: callable) -> str:  # type: ignore[valid-type]
    buffer = io.StringIO()
    saved = sys.stderr
    sys.stderr = buffer
    try:
        with logging_configured(options):
            emit()
    finally:
        sys.stderr = saved
    return buffer.getvalue()


def test_json_lines_carry_the_context_and_errors_through_to_dict() -> None:
    error = ServerError("upstream 503", status_code=503, details={"call_id": "c1"})

    def emit() -> None:
        with bound(run_id=7, item="학교", stage="nuance"), bound(call_id="c1", attempt=2):
            logging.getLogger("flashcard_pipeline.resilience.retry").debug("not shown at INFO")
            logging.getLogger("flashcard_pipeline.resilience.retry").info("retrying %s", "학교",
                                                                          extra={"delay": 0.5})
            logging.getLogger("flashcard_pipeline.pipeline").warning("failed", exc_info=error)
        logging.getLogger("flashcard_pipeline.pipeline").warning("outside a run")

    lines = [json.loads(line) for line in _capture(LogOptions(level=logging.INFO, format="json"), emit).splitlines()]
    assert [line["message"] for line in lines] == ["retrying 학교", "failed", "outside a run"]
    first = lines[0]
    assert list(first)[:4] == ["time", "level", "logger", "message"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert (first["level"], first["logger"], first["delay"]) == ("INFO", "flashcard_pipeline.resilience.retry", 0.5)
    assert {k: first[k] for k in ("run_id", "item", "stage", "call_id", "attempt")} == {
        "run_id": 7, "item": "학교", "stage": "nuance", "call_id": "c1", "attempt": 2}
    assert lines[1]["error"] == error.to_dict()
    assert "run_id" not in lines[2] and log_context() == {}


def test_text_lines_name_level_logger_context_and_the_error_code() -> None:
    def emit() -> None:
        with bound(run_id=3, item="먹다"):
            logging.getLogger("flashcard_pipeline.pipeline").warning(
                "nuance of %r failed", "먹다", exc_info=ServerError("down", status_code=503))

    text = _capture(LogOptions(level=logging.WARNING), emit)
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} WARNING flashcard_pipeline\.pipeline: nuance of '먹다' "
                    r"failed \[run=3 item=먹다\] \(external_service/server_error: down\)$", text.strip()), text


def test_secrets_are_redacted_in_every_form() -> None:
    escaped = json.dumps(CANARY)[1:-1]

    def emit() -> None:
        log = logging.getLogger("flashcard_pipeline.llm")
        log.warning("key %s, header Bearer %s", CANARY, CANARY)
        log.warning("in a field", extra={"body": {"authorization": f"Bearer {CANARY}"}})
        log.warning("error", exc_info=ServerError(f"echoed {escaped}"))
        log.warning("an unknown key sk-or-v1-%s", "a" * 40)

    for kind, redactions in (("json", 5), ("text", 4)):  # text lines leave extra fields out
        out = _capture(LogOptions(level=logging.INFO, format=kind, secrets=(CANARY,)), emit)  # type: ignore[arg-type]
        assert CANARY not in out and escaped not in out and "a" * 40 not in out, out
        assert out.count("***") == redactions, out


def test_log_lines_print_above_the_live_display_not_through_it() -> None:
    """Rich's live display redirects stderr while it runs; a log line written meanwhile lands whole on a line of its
    own above the display, and the display is redrawn below it."""
    buffer = io.StringIO()
    # Soft wrap, as stderr_console(): a long line stays one line.
    console = Console(file=buffer, force_terminal=True, width=80, color_system=None, soft_wrap=True)
    with logging_configured(LogOptions(level=logging.INFO)), \
            Progress(console=console, transient=False, auto_refresh=False) as progress:
        task = progress.add_task("cards", total=10)
        progress.update(task, completed=3)
        progress.refresh()
        logging.getLogger("flashcard_pipeline.pipeline").info("a line while the bar is live")
        progress.refresh()
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "\n", buffer.getvalue())
    lines = [line for line in screen.splitlines() if "a line while the bar is live" in line]
    assert lines and all(re.match(r"^\d{4}-\d\d-\d\d [\d:.]+ INFO +flashcard_pipeline\.pipeline: a line while the "
                                  r"bar is live$", line) for line in lines), screen
    last = [line for line in screen.splitlines() if line.strip()][-1]
    assert "cards" in last and "30%" in last, screen


def test_trace_and_span_ids_come_from_the_active_span() -> None:
    trace = pytest.importorskip("opentelemetry.trace")
    context = trace.SpanContext(trace_id=0x1234, span_id=0xABCD, is_remote=False)

    def emit() -> None:
        with trace.use_span(trace.NonRecordingSpan(context)):
            logging.getLogger("flashcard_pipeline.pipeline").warning("in a span")
        logging.getLogger("flashcard_pipeline.pipeline").warning("outside")

    inside, outside = (json.loads(line) for line in _capture(LogOptions(format="json"), emit).splitlines())
    assert (inside["trace_id"], inside["span_id"]) == (f"{0x1234:032x}", f"{0xABCD:016x}")
    assert "trace_id" not in outside


def test_the_run_log_file_rotates_and_restores_the_levels(tmp_path: Path) -> None:
    from flashcard_pipeline.logging_config import RunLogOptions

    package = logging.getLogger("flashcard_pipeline")
    before = package.level
    options = RunLogOptions(directory=tmp_path / "logs", max_bytes=2048, backups=2)
    with run_log(options, 5) as path:
        assert path is not None and path.name == f"run-5-{os.getpid()}.log"
        for n in range(100):
            logging.getLogger("flashcard_pipeline.pipeline").info("line %d %s", n, "x" * 40)
    assert package.level == before
    files = run_log_files(tmp_path / "logs", 5)
    assert [f.name.removeprefix(f"run-5-{os.getpid()}") for f in files] == [".log.2", ".log.1", ".log"]
    lines = list(read_log_lines(files))
    assert lines and all(line["run_id"] == 5 for line in lines)
    assert lines[-1]["message"].startswith("line 99")


@pytest.mark.slow
def test_a_chaos_run_logs_parseable_json_with_its_run_id_and_never_the_key(tmp_path: Path, sqlite_url: str) -> None:
    """A separate simulator with every kind of fault; `process` with the key on the command line, DEBUG logs as JSON
    on stderr (httpx's request lines too) and in the run's file: every JSON line parses and carries the run id,
    and the canary key is in no output, no log file, no table and no deck."""
    server = subprocess.Popen([sys.executable, "-m", "flashcard_pipeline", "simulate", "--port", "0",
                               "--sim", "seed=5", "--sim", "server_error_rate=0.15", "--sim", "rate_limit_rate=0.05",
                               "--sim", "schema_invalid_rate=0.1", "--sim", "malformed_json_rate=0.05",
                               "--sim", "error_in_body_rate=0.05", "--sim", "empty_content_rate=0.05",
                               "--sim", "truncated_rate=0.05", "--sim", "heeds_feedback=true"],
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
    try:
        match = re.search(r"(http://127\.0\.0\.1:\d+/v1)", server.stderr.readline())
        assert match
        out = tmp_path / "deck.jsonl"
        source = words(tmp_path, ["1,학교,noun", "2,먹다,verb", "3,빨리,adverb", "4,바다,noun", "5,하늘,noun",
                                  "6,사랑,noun"])
        env = {**os.environ, "RETRY_INITIAL_DELAY": "0.01", "RETRY_MAX_DELAY": "0.05", "RETRY_MAX_ATTEMPTS": "6",
               "CB_BREAK_DURATION": "0.1", "CB_MAX_BREAK_DURATION": "0.2", "RL_REQUESTS_PER_MINUTE": "6000",
               "RL_ADAPTIVE": "false",
               "LOG_LEVELS": "httpx=DEBUG,flashcard_pipeline=DEBUG", "LOG_FILE_LEVEL": "DEBUG"}
        proc = subprocess.run([sys.executable, "-m", "flashcard_pipeline", "-vv", "--log-format", "json", "process",
                               str(source), "--provider", "openai-compatible", "--base-url", match.group(1),
                               "--api-key", CANARY, "--db", sqlite_url, "-o", str(out)],
                              capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode in (0, 1), proc.stderr
        run_id = int(re.search(r"^run (\d+):", proc.stdout, re.MULTILINE).group(1))  # type: ignore[union-attr]
        started = proc.stderr.index("starting run")
        console = [json.loads(line) for line in proc.stderr[started:].splitlines() if line.startswith("{")]
        assert len(console) > 20 and all(line["run_id"] == run_id for line in console)
        assert any(line["logger"] == "httpx" for line in console), "LOG_LEVELS let httpx's lines through"
        assert any(line["logger"] == "flashcard_pipeline.resilience.retry" for line in console)
        log_file = Path(re.search(r"^log: (.+)$", proc.stderr, re.MULTILINE).group(1))  # type: ignore[union-attr]
        raw = log_file.read_text(encoding="utf-8").splitlines()
        stored = [json.loads(line) for line in raw]
        assert len(stored) == len(raw) > 20 and all(line["run_id"] == run_id for line in stored)
        calls = {line["call_id"] for line in stored if "call_id" in line}
        assert calls, "lines about a call name it"
        for line in stored:
            if isinstance(line.get("error"), dict) and "call_id" in line.get("error", {}).get("details", {}):
                assert line["error"]["details"]["call_id"] == line["call_id"]
        assert CANARY not in proc.stdout + proc.stderr
        assert all(CANARY not in path.read_text(encoding="utf-8") for path in log_file.parent.iterdir())
        assert_secret_not_stored(sqlite_url, CANARY)
        if out.exists():
            assert CANARY.encode() not in out.read_bytes()
        listed = runner.invoke(app, ["logs", "--db", sqlite_url, "--json"])
        assert listed.exit_code == 0 and CANARY not in listed.stdout
        assert len(listed.stdout.splitlines()) == len(stored)
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=10) == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX only")
def test_call_ids_are_distinct_whatever_seeds_random_and_in_a_forked_child() -> None:
    import random

    from flashcard_pipeline.logging_config import new_call_id

    random.seed(7)
    first = [new_call_id() for _ in range(1000)]
    random.seed(7)
    again = [new_call_id() for _ in range(1000)]
    assert all(re.fullmatch(r"[0-9a-f]{16}", call_id) for call_id in first)
    assert len(set(first + again)) == 2000, "an application's random.seed does not repeat the ids"
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe and leaves at once
        os.write(write, new_call_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    childs = os.read(read, 64).decode()
    os.close(read)
    assert re.fullmatch(r"[0-9a-f]{16}", childs) and childs != new_call_id()
