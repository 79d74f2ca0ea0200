"""Every command's --help, --version, shell completion, the generated CLI reference, and output that fits an
80- or 100-column terminal (the progress display, `breaker status`, `ratelimit status`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

import flashcard_pipeline
from flashcard_pipeline.cli.app import app
from flashcard_pipeline.cli.progress import _RunProgress, describe_lines
from flashcard_pipeline.cli.reference import cli_markdown, commands
from flashcard_pipeline.pipeline import RunStats

DOCS = Path(__file__).resolve().parents[1] / "docs"
COMMANDS = [path[1:] for path, _ in commands()]
#: What Typer's boxed help printed beside every option before: types, not meanings.
TYPE_NOISE = re.compile(r"<(str|bool|int|float|path|int range|float range)>|\bTEXT\b|\bINTEGER\b|\bFLOAT\b")

runner = CliRunner()


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "root")
def test_every_command_has_help_without_type_noise(path: tuple[str, ...]) -> None:
    result = runner.invoke(app, [*path, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Usage: flashcard-pipeline")
    options = result.stdout.split("Options:", 1)[-1]
    assert not TYPE_NOISE.search(options), options
    pairs = set(re.findall(r"--no-[\w-]+", options)) - {"--no-update"}  # push --no-update is a choice of its own
    assert not pairs, f"a flag is a flag, not a pair: {pairs}"
    assert "Show this message and exit." in result.stdout


def test_the_root_help_lists_every_command_and_the_operator_tools() -> None:
    text = runner.invoke(app, ["--help"]).stdout
    for name in ("process", "export", "push", "monitor", "runs", "config", "cache", "breaker", "ratelimit", "db"):
        assert re.search(rf"^  {name}\s", text, re.MULTILINE), name
    assert "--install-completion" in text and "--version" in text


@pytest.mark.parametrize("path", [("process",), ("export",)])
def test_format_lists_its_choices_like_subdecks(path: tuple[str, ...]) -> None:
    text = runner.invoke(app, [*path, "--help"], terminal_width=200).stdout
    assert "--format [apkg|tsv|csv|jsonl]" in text.replace("<", "[").replace(">", "]")
    assert "--subdecks [none|pos|level]" in text.replace("<", "[").replace(">", "]")


def test_version_matches_the_package_metadata() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.startswith(f"flashcard-pipeline {flashcard_pipeline.__version__} (Python ")
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert f'version = "{flashcard_pipeline.__version__}"' in pyproject


def test_shell_completion_script_and_completions() -> None:
    script = runner.invoke(app, ["--show-completion", "bash"], prog_name="flashcard-pipeline")
    assert script.exit_code == 0 and "complete -o default -F _flashcard_pipeline_completion flashcard-pipeline" \
        in script.stdout
    # What that script asks the program when the user types `flashcard-pipeline ru<TAB>` and `runs <TAB>`.
    for words, expected in (("flashcard-pipeline ru", ["runs"]), ("flashcard-pipeline runs ", ["list", "show",
                                                                                                   "delete"])):
        result = runner.invoke(app, [], prog_name="flashcard-pipeline", env={
            "_FLASHCARD_PIPELINE_COMPLETE": "complete_bash", "COMP_WORDS": words,
            "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1))})
        assert result.exit_code == 0 and sorted(result.stdout.split()) == sorted(expected), result.output


def test_the_cli_reference_is_current() -> None:
    expected = cli_markdown()
    actual = (DOCS / "cli-reference.md").read_text(encoding="utf-8")
    assert actual == expected, "docs/cli-reference.md is stale: run `python -m flashcard_pipeline.cli.reference docs`"
    for path in COMMANDS:
        assert f"## {' '.join(('flashcard-pipeline', *path))}\n" in actual


@pytest.mark.parametrize("width", [80, 100])
def test_the_progress_display_shows_errors_and_the_pause_reason_at_ordinary_widths(width: int) -> None:
    stats = RunStats(total=12000, done=5400, failed=12, in_flight=8, requests=11000, api_errors=37,
                     tokens_in=1_234_567, tokens_out=2_345_678, cost_usd=12.3456, cache_hits=400, simulated=True)
    stats.pause_reason = ("circuit openrouter/openai/gpt-4o-mini open until 14:02:31 (provider failing); "
                          "8 calls waiting")
    console = Console(width=width, force_terminal=True, record=True)
    progress = _RunProgress(stats, console=console)
    for renderable in progress.get_renderables():
        console.print(renderable)
    lines = console.export_text().splitlines()
    assert all(len(line) <= width for line in lines)
    assert any(line.startswith("done 5400/12000 · failed 12 · API errors 37") for line in lines), lines
    paused = next(i for i, line in enumerate(lines) if line.startswith("paused: circuit"))
    assert " ".join(lines[paused:paused + 2]).startswith("paused: " + stats.pause_reason[:60])
    # In a log every line carries them within its first 100 characters, before pace and cost.
    assert describe_lines(stats)[0].endswith("in flight 8") and len(describe_lines(stats)[0]) < 80


def _published(label: str) -> dict[str, object]:
    dim = {"mode": "configured", "planned_per_minute": 600.0, "rate_per_minute": 579.0, "burst": 12.0,
           "available": 3.5, "paused_for": 0.0, "acquire": {"acquired": 1234, "waited": 56, "wait_time": 7.25,
                                                             "refunded": 9000},
           "reservations": {"made": 1, "executed": 1, "cancelled": 0, "expired": 0}}
    return {"backend": "memory", "algorithm": "token_bucket", "shards": 1, "updated_at": "2026-01-01T00:00:00+00:00",
            "limits": {label: {"requests": dim, "tokens": dim, "rate_limited": 3, "paused_total_s": 4.5,
                               "waiting": 2}}}


@pytest.mark.parametrize("width", [80, 100])
def test_ratelimit_status_fits_and_keeps_names_whole(width: int) -> None:
    from flashcard_pipeline.cli.ratelimit_commands import _print_published

    label = "openrouter/anthropic/claude-3.5-sonnet-20241022-beta"
    console = Console(width=width, record=True)
    _print_published(console, 7, "running", _published(label))
    text = console.export_text()
    assert all(len(line) <= width for line in text.splitlines())
    assert label in text.splitlines(), "the limit's name stands whole on its own line"
    for figure in ("600", "579", "1,234", "7.25", "3 429s"):
        assert figure in text, figure


def test_ratelimit_status_shows_no_burst_for_an_unlimited_bucket() -> None:
    from flashcard_pipeline.cli.ratelimit_commands import _print_published

    published = _published("simulated/flashcard-sim")
    limits = published["limits"]["simulated/flashcard-sim"]  # type: ignore[index]
    limits["requests"] = {**limits["requests"], "mode": "unlimited", "reason": "unlimited", "burst": 1.0,
                          "rate_per_minute": None, "planned_per_minute": None, "available": None}
    console = Console(width=100, record=True)
    _print_published(console, 7, "completed", published)
    rows = {line.split()[0]: line.split()[1:] for line in console.export_text().splitlines() if line.strip()}
    assert rows["burst"] == ["-", "12.0"], "requests unlimited: no burst; tokens limited: its burst"
    assert rows["available"] == ["-", "3.5"]
    assert rows["mode"] == ["unlimited", "configured"] and rows["why"] == ["-", "-"], "a reason only when it adds"


def test_monitor_names_a_limits_reason_only_when_it_adds_to_its_mode() -> None:
    from flashcard_pipeline.cli.monitor import _limits_text

    published = _published("p/m")
    limits = published["limits"]["p/m"]  # type: ignore[index]
    limits["requests"] = {"mode": "unlimited", "reason": "unlimited", "planned_per_minute": None}
    limits["tokens"] = {"mode": "adaptive", "reason": "probing", "planned_per_minute": 60_000.0}
    [(label, line)] = _limits_text(published)
    assert label == "p/m"
    assert line == "requests unlimited · tokens adaptive 60,000/min (probing) · 3 429s, 2 waiting"


@pytest.mark.parametrize("width", [80, 100])
def test_breaker_status_never_cuts_a_circuit_name(tmp_path: Path, width: int) -> None:
    from flashcard_pipeline.storage.breaker_store import BreakerStore
    from flashcard_pipeline.storage.db import open_database

    db = f"sqlite:///{tmp_path / 'b.db'}"
    long_name = "openrouter/meta-llama/llama-3.1-405b-instruct:free-with-a-very-long-suffix"
    store = BreakerStore(open_database(db))
    store.write([], [{"circuit": long_name, "state": "open", "since": "2026-01-01T12:00:00+00:00", "open_until": None,
                      "success_count": 10, "failure_count": 20, "rejected_count": 30,
                      "window": {"failures": 5, "throughput": 9}}], owner="host:1")
    store.engine.dispose()
    result = runner.invoke(app, ["breaker", "status", "--db", db], terminal_width=width, env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert f"  {long_name}" in lines, lines
    assert "5 failed of 9 calls" in " ".join(lines) and "refused 30" in " ".join(lines)
    as_json = json.loads(runner.invoke(app, ["breaker", "status", "--db", db, "--json"]).stdout)
    assert as_json["circuits"][0]["circuit"] == long_name


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["cache", "clear", "--help"], ["process", "--help"]])
def test_help_and_version_load_none_of_the_heavy_libraries(args: list[str]) -> None:
    """What keeps `--help` fast (benchmarks/bench_startup.py measures it): the libraries a command uses are
    imported when it runs, not when the command line is built."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "flashcard_pipeline", *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    loaded = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time")}
    heavy = {"sqlalchemy", "alembic", "httpx", "aiohttp", "genanki", "redis", "pydantic_settings", "kiwipiepy"}
    assert not heavy & loaded, sorted(heavy & loaded)
