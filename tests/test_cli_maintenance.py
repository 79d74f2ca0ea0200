"""`db stats` and `cache stats|clear|vacuum|warm`, and a cache shared by two workers through Redis."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flashcard_pipeline.cli.app import app
from flashcard_pipeline.cli.maintenance import human_bytes, parse_age
from flashcard_pipeline.errors import ConfigurationError
from tests.conftest import REDIS_URL, require_service

runner = CliRunner()


def cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def words(tmp_path: Path, n: int = 6) -> Path:
    path = tmp_path / "words.csv"
    path.write_text("position,term,type\n" + "".join(f"{i},낱말{i},noun\n" for i in range(1, n + 1)), encoding="utf-8")
    return path


def process(source: Path, db: str, out: Path) -> str:
    code, stdout, stderr = cli("process", str(source), "--provider", "simulated", "--db", db, "-o", str(out))
    assert code == 0, stderr
    return stdout


def test_db_stats_reports_the_pool_of_the_last_run(tmp_path: Path, db_url: str) -> None:
    code, stdout, stderr = cli("db", "stats", "--db", db_url)
    if db_url.startswith("sqlite"):  # a file no run made is a typo, not a new empty database
        assert code == 2 and "no database at" in stderr and not (tmp_path / "ledger.db").exists()
    else:
        assert code == 0 and "no pool statistics recorded yet" in stdout
    process(words(tmp_path), db_url, tmp_path / "o.jsonl")
    code, stdout, _ = cli("db", "stats", "--db", db_url, "--json")
    data = json.loads(stdout)
    assert code == 0 and data["run"] == 1 and data["settings"]["pool_size"] == 20
    pool = data["pool"]
    assert pool["checkouts"] > 10 and pool["checked_out"] == 0
    assert pool["efficiency"] == round(pool["served_idle"] / pool["checkouts"], 4)
    assert pool["connects"] < pool["checkouts"] / 3  # connections are reused, not opened per query
    code, stdout, _ = cli("db", "stats", "--db", db_url)
    assert "efficiency" in stdout
    shown = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in stdout.splitlines()
             if line.count("│") == 3}
    assert shown["checkouts"] == f"{pool['checkouts']:,}"
    assert shown["wait_max_s"] == f"{pool['wait_max_s']:.4g}", "four significant digits, not a float's repr"
    assert cli("db", "stats", "--db", db_url, "--run", "99")[0] == 2


def test_cache_stats_clear_and_warm(tmp_path: Path, db_url: str) -> None:
    source = words(tmp_path)
    process(source, db_url, tmp_path / "o.jsonl")
    code, stdout, _ = cli("cache", "stats", "--db", db_url, "--json")
    types = {t["cache_type"]: t for t in json.loads(stdout)["types"]}
    assert code == 0 and types["nuance"]["entries"] == 6 and types["cards"]["entries"] == 6
    assert types["nuance"]["misses"] == 6 and types["nuance"]["hits"] == 0
    assert types["cards"]["stored_bytes"] < 0.6 * types["cards"]["raw_bytes"]

    code, stdout, _ = cli("cache", "clear", "--db", db_url, "--type", "cards", "-y")
    assert code == 0 and stdout.startswith("6 cached answers of type cards (")
    assert stdout.strip().splitlines()[-1] == "removed 6 cached answers"
    code, stdout, _ = cli("cache", "warm", str(source), "--provider", "simulated", "--db", db_url, "--json")
    assert code == 0
    assert json.loads(stdout) == {"items": 6, "already_cached": 6, "restored": 6, "missing": 0}

    assert cli("cache", "clear", "--db", db_url, "-y")[0] == 0
    code, stdout, _ = cli("cache", "warm", str(source), "--provider", "openrouter", "--db", db_url, "--json")
    assert json.loads(stdout)["missing"] == 12  # other provider: nothing was ever paid for, nothing is made up

    # a fresh run of the same list in another order is now free
    reordered = tmp_path / "again.csv"
    reordered.write_text("type,term\n" + "".join(f"noun,낱말{i}\n" for i in range(6, 0, -1)), encoding="utf-8")
    cli("cache", "warm", str(source), "--provider", "simulated", "--db", db_url)
    assert "0 API calls" in process(reordered, db_url, tmp_path / "again.jsonl")
    code, stdout, _ = cli("cache", "stats", "--db", db_url)
    assert code == 0 and "nuance" in stdout


def test_cache_vacuum_and_bad_age(tmp_path: Path, sqlite_url: str) -> None:
    process(words(tmp_path, 2), sqlite_url, tmp_path / "o.jsonl")
    code, stdout, _ = cli("cache", "vacuum", "--db", sqlite_url)
    assert code == 0 and "removed 0 expired entries" in stdout
    code, _, stderr = cli("cache", "clear", "--db", sqlite_url, "--older-than", "soon", "-y")
    assert code == 2 and "not an age" in stderr
    code, _, stderr = cli("cache", "clear", "--db", sqlite_url, "--type", "nuances")
    assert code == 2 and "unknown cache type 'nuances'; use nuance or cards" in stderr


def test_cache_clear_shows_what_it_deletes_and_deletes_nothing_on_no(tmp_path: Path, sqlite_url: str) -> None:
    process(words(tmp_path, 3), sqlite_url, tmp_path / "o.jsonl")

    def nuance() -> dict[str, int]:
        stats = json.loads(cli("cache", "stats", "--db", sqlite_url, "--json")[1])["types"]
        return next(t for t in stats if t["cache_type"] == "nuance")

    before = nuance()
    result = runner.invoke(app, ["cache", "clear", "--db", sqlite_url, "--type", "nuance"], input="n\n")
    assert result.exit_code == 1
    assert result.stdout.startswith(f"3 cached answers of type nuance ({human_bytes(before['stored_bytes'])} "
                                    "stored). Answers stored with runs stay")
    assert result.stdout.strip().endswith("nothing deleted") and nuance()["entries"] == 3
    code, stdout, _ = cli("cache", "clear", "--db", sqlite_url, "--older-than", "30d")
    assert code == 0 and stdout.strip() == "no cached answers older than 30d: nothing deleted"
    code, _, stderr = cli("cache", "clear", "--db", sqlite_url, "--older-than", "1m", "-y")
    assert code == 2 and "ambiguous age '1m': minutes or months?" in stderr and nuance()["entries"] == 3
    result = runner.invoke(app, ["cache", "clear", "--db", sqlite_url, "--type", "nuance"], input="y\n")
    assert result.exit_code == 0 and result.stdout.strip().endswith("removed 3 cached answers")
    assert nuance()["entries"] == 0


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (0, 999, 1000, 1_234_567, 5 * 10**12)] == \
        ["0 bytes", "999 bytes", "1.0 kB", "1.2 MB", "5000.0 GB"]


def test_parse_age() -> None:
    assert parse_age("30d").days == 30 and parse_age("12h").total_seconds() == 43200
    assert parse_age("90m").total_seconds() == 5400 and parse_age(" 1.5 min ").total_seconds() == 90
    assert parse_age("3 days").days == 3 and parse_age("2w").days == 14 and parse_age("45s").total_seconds() == 45
    for ambiguous in ("1m", "6m", "18m", "59m"):  # a month meant, everything older than a minute deleted
        with pytest.raises(ConfigurationError, match=r"ambiguous.*minutes or months"):
            parse_age(ambiguous)
    for bad, why in (("30", "give a number and a unit"), ("2mo", "in days"), ("3y", "unknown unit"),
                     ("-1d", "not an age"), ("soon", "not an age")):
        with pytest.raises(ConfigurationError, match=why):
            parse_age(bad)


def test_redis_cache_is_shared_by_two_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_service("127.0.0.1", 6379, "Redis")
    prefix = f"test:{uuid.uuid4().hex}:"
    monkeypatch.setenv("CACHE_BACKEND", "redis")
    monkeypatch.setenv("CACHE_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("CACHE_REDIS_PREFIX", prefix)
    source = words(tmp_path, 4)
    first = process(source, f"sqlite:///{tmp_path / 'worker1.db'}", tmp_path / "1.jsonl")
    assert "8 API calls" in first
    second = process(source, f"sqlite:///{tmp_path / 'worker2.db'}", tmp_path / "2.jsonl")
    assert "0 API calls" in second and "8 cache hits" in second
    code, stdout, _ = cli("cache", "stats", "--db", f"sqlite:///{tmp_path / 'worker1.db'}", "--json")
    types = {t["cache_type"]: t for t in json.loads(stdout)["types"]}
    assert code == 0 and types["nuance"]["entries"] == 4 and types["nuance"]["hits"] == 4
    code, stdout, _ = cli("cache", "clear", "--db", f"sqlite:///{tmp_path / 'worker1.db'}", "-y")
    assert stdout.startswith("8 cached answers (") and stdout.strip().endswith("removed 8 cached answers")


ENGINE_SETTINGS = [
    ("CB_BREAK_DURATION", "-1", "invalid CB_BREAK_DURATION: Input should be greater than 0"),
    ("RETRY_JITTER_ENABLED", "maybe", "invalid RETRY_JITTER_ENABLED: Input should be a valid boolean"),
    ("RL_SHARDS", "0", "invalid RL_SHARDS: Input should be greater than or equal to 1"),
]
STORAGE_SETTINGS = [
    ("DB_POOL_SIZE", "many", "invalid DB_POOL_SIZE: Input should be a valid integer"),
    ("CACHE_TTL_JITTER", "5", "invalid CACHE_TTL_JITTER: Input should be less than 1"),
]
PROCESS = ("process", "{words}", "--provider", "simulated")


@pytest.mark.parametrize(("command", "variable", "value", "says"), [
    *[(PROCESS, *case) for case in ENGINE_SETTINGS + STORAGE_SETTINGS],
    *[(command, *case) for command in (("cache", "stats"), ("cache", "warm", "{words}"))
      for case in STORAGE_SETTINGS],
    (("db", "stats"), *STORAGE_SETTINGS[0]),
])
def test_a_bad_setting_is_one_line_naming_the_variable(tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch,
                                                       command: tuple[str, ...], variable: str, value: str,
                                                       says: str) -> None:
    """Whichever command reads it, and however deep: exit 2, one line, no traceback."""
    monkeypatch.setenv(variable, value)
    args = [part.format(words=words(tmp_path, 2)) for part in command]
    code, stdout, stderr = cli(*args, "--db", sqlite_url)
    assert code == 2, stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {says}"), stderr
    assert "errors.pydantic.dev" not in stderr
