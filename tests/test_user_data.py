"""The user's data is never lost or silently misplaced: the input list, the database, finished runs' statistics,
partial decks, unreachable services, and what a simulated run costs."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flashcard_pipeline.cache.compressed_cache import CompressedCache
from flashcard_pipeline.cli.app import app
from flashcard_pipeline.config import CacheSettings
from flashcard_pipeline.storage.db import open_database, resolve_database_url
from flashcard_pipeline.storage.ledger import Ledger
from tests.conftest import REDIS_URL, json_server, require_service

runner = CliRunner()
#: Nothing listens here, so a Redis URL pointing at it is unreachable at once.
NO_REDIS = "redis://127.0.0.1:9/0"


def run_cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def words(tmp_path: Path, n: int = 3, name: str = "words.csv") -> Path:
    path = tmp_path / name
    path.write_text("position,term,type\n" + "".join(f"{i},낱말{i},noun\n" for i in range(1, n + 1)), encoding="utf-8")
    return path


def simulated(source: Path, db: str, out: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli("process", str(source), "--provider", "simulated", "--db", db, "-o", str(out), *extra)


@pytest.mark.parametrize("output", ["words.csv", "./sub/../words.csv"])
def test_an_output_that_is_the_input_is_refused_and_the_list_is_untouched(tmp_path: Path, sqlite_url: str,
                                                                          output: str) -> None:
    source = words(tmp_path)
    before = source.read_bytes()
    (tmp_path / "sub").mkdir()
    code, _, stderr = simulated(source, sqlite_url, tmp_path / output, "--format", "csv")
    assert code == 2 and "is the input list" in stderr and len(stderr.strip().splitlines()) == 1
    assert source.read_bytes() == before


@pytest.mark.parametrize("db", ["postgresql:/user@localhost/db", "not a url", "flashcards", "sqlite:relative.db"])
def test_a_mistyped_database_is_a_usage_error_and_creates_no_file(tmp_path: Path, db: str) -> None:
    code, _, stderr = simulated(words(tmp_path), db, tmp_path / "o.jsonl")
    assert code == 2 and "neither a database URL nor a SQLite file" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in Path.cwd().iterdir()) == [], "nothing was created in the working folder"


def test_database_names_that_are_meant_are_accepted(tmp_path: Path) -> None:
    assert resolve_database_url("cards.db", env={}) == f"sqlite:///{(Path.cwd() / 'cards.db').resolve()}"
    assert resolve_database_url("Cards.SQLITE3", env={}).endswith("Cards.SQLITE3")
    existing = tmp_path / "ledger"  # an existing file of any name is a SQLite file
    existing.write_bytes(b"")
    assert resolve_database_url(str(existing), env={}) == f"sqlite:///{existing}"
    assert resolve_database_url("postgresql://u@h/db", env={}) == "postgresql://u@h/db"
    with pytest.raises(Exception, match="FLASHCARD_DATABASE_URL"):
        resolve_database_url(None, env={"FLASHCARD_DATABASE_URL": "postgres:/h/db"})


def test_every_run_says_which_database_it_uses(tmp_path: Path) -> None:
    code, _, stderr = simulated(words(tmp_path), "my.db", tmp_path / "o.jsonl")
    assert code == 0 and f"database sqlite:///{Path.cwd() / 'my.db'}" in stderr
    code, stdout, _ = run_cli("process", str(words(tmp_path)), "--dry-run", "--db", "my.db")
    assert code == 0 and "my.db" in stdout


def test_a_finished_run_run_again_keeps_the_statistics_of_the_run_that_did_the_work(tmp_path: Path,
                                                                                      sqlite_url: str) -> None:
    source = words(tmp_path, 4)
    assert simulated(source, sqlite_url, tmp_path / "a.jsonl")[0] == 0
    ledger = Ledger(open_database(sqlite_url))
    run = ledger.get_run()
    assert run is not None
    before = ledger.run_metrics(run.id)
    assert before is not None and before["pool"]["checkouts"] > 0
    assert before["ratelimit"]["limits"], "the limiter published what it did"

    code, stdout, _ = simulated(source, sqlite_url, tmp_path / "b.jsonl")
    assert code == 0 and "0 API calls" in stdout and "4 before this run" in stdout
    assert ledger.run_metrics(run.id) == before
    assert json.loads(run_cli("db", "stats", "--db", sqlite_url, "--json")[1])["pool"] == before["pool"]
    status = json.loads(run_cli("ratelimit", "status", "--db", sqlite_url, "--json")[1])
    assert status["published"] == before["ratelimit"] and status["run_status"] == "completed"
    assert len(list((tmp_path / "b.jsonl").open())) == len(list((tmp_path / "a.jsonl").open()))


def test_a_run_aborted_by_its_budget_says_how_partial_the_deck_is(tmp_path: Path, sqlite_url: str) -> None:
    out = tmp_path / "deck.jsonl"
    code, stdout, stderr = simulated(words(tmp_path, 6), sqlite_url, out, "--max-cost", "0.0015", "--concurrency",
                                     "1")
    assert code == 3 and "budget" in stderr
    done = int(stdout.split(" items done")[0].rsplit(" ", 1)[-1].split("/")[0])
    assert 0 < done < 6
    assert f"the deck is partial: {done} of 6 terms ({6 - done} missing" in stderr
    assert len({json.loads(line)["term"] for line in out.open()}) == done


def test_a_run_where_everything_failed_writes_no_deck_and_says_so(tmp_path: Path, sqlite_url: str) -> None:
    out = tmp_path / "deck.apkg"
    code, stdout, stderr = simulated(words(tmp_path), sqlite_url, out, "--sim", "server_error_rate=1",
                                     "--max-attempts", "1")
    assert code == 1 and "0/3 items done" in stdout
    assert not out.exists() and "wrote" not in stdout
    assert "no deck written: none of the run's 3 terms has cards yet" in stderr


@pytest.mark.parametrize("variable", ["CACHE_BACKEND", "RL_BACKEND"])
def test_an_unreachable_redis_is_one_line_before_any_work(tmp_path: Path, sqlite_url: str, variable: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(variable, "redis")
    monkeypatch.setenv(variable.replace("BACKEND", "REDIS_URL"), NO_REDIS)
    code, stdout, stderr = simulated(words(tmp_path, 10), sqlite_url, tmp_path / "o.jsonl")
    assert code == 2 and stdout == ""
    (line,) = stderr.strip().splitlines()
    assert line.startswith("error: cannot reach Redis at redis://127.0.0.1:9/0") and f"{variable}=redis" in line
    if variable == "CACHE_BACKEND":
        for command in (("cache", "stats"), ("cache", "clear", "-y"), ("cache", "warm", str(words(tmp_path)))):
            code, _, stderr = run_cli(*command, "--db", sqlite_url)
            assert code == 2 and stderr.startswith("error: cannot reach Redis"), (command, stderr)
            assert "internal error" not in stderr


def test_a_redis_password_never_reaches_the_message(tmp_path: Path, sqlite_url: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHE_BACKEND", "redis")
    monkeypatch.setenv("CACHE_REDIS_URL", "redis://me:hunter2@127.0.0.1:9/0")
    code, _, stderr = simulated(words(tmp_path), sqlite_url, tmp_path / "o.jsonl")
    assert code == 2 and "hunter2" not in stderr and "me:***@127.0.0.1:9" in stderr


async def test_a_cache_that_fails_to_read_is_a_miss_not_a_failed_item() -> None:
    class Broken:
        def attach(self, sink: object) -> None:
            pass

        restores = False

        async def get(self, key: str, *, count: bool = True, restore: bool = True, stored_after: Any = None) -> None:
            raise ConnectionError("gone")

    cache = CompressedCache(Broken(), CacheSettings())  # type: ignore[arg-type]
    assert await cache.get("k", "nuance") is None
    assert cache.stats()["nuance"]["read_errors"] == 1 and cache.stats()["nuance"]["misses"] == 1


def test_dry_run_reads_the_redis_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_service("127.0.0.1", 6379, "Redis")
    monkeypatch.setenv("CACHE_BACKEND", "redis")
    monkeypatch.setenv("CACHE_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("CACHE_REDIS_PREFIX", f"fp-test-{tmp_path.name}:")
    source = words(tmp_path, 3)
    try:
        assert simulated(source, f"sqlite:///{tmp_path / 'a.db'}", tmp_path / "o.jsonl")[0] == 0
        # Another database, the same Redis: only the Redis cache knows these answers.
        code, stdout, _ = run_cli("process", str(source), "--provider", "simulated", "--dry-run",
                                  "--db", f"sqlite:///{tmp_path / 'b.db'}")
        assert code == 0 and "0 (6 stage answers already cached)" in stdout
        stats = json.loads(run_cli("cache", "stats", "--db", f"sqlite:///{tmp_path / 'a.db'}", "--json")[1])
        assert {t["cache_type"]: t["hits"] for t in stats["types"]} == {"cards": 0, "nuance": 0}, \
            "a dry run's reads count no hits"
    finally:
        run_cli("cache", "clear", "-y", "--db", f"sqlite:///{tmp_path / 'a.db'}")


def test_sim_settings_joined_by_commas_say_to_repeat_sim(tmp_path: Path, sqlite_url: str) -> None:
    code, _, stderr = simulated(words(tmp_path), sqlite_url, tmp_path / "o.jsonl", "--sim",
                                "latency=0.01,server_error_rate=0.2")
    assert code == 2 and "repeat --sim" in stderr and "internal error" not in stderr
    code, _, stderr = simulated(words(tmp_path), sqlite_url, tmp_path / "o.jsonl", "--sim", "latency=fast,slow")
    assert code == 2 and "range of numbers" in stderr


def test_a_simulated_run_says_it_spent_no_money(tmp_path: Path, sqlite_url: str) -> None:
    code, stdout, stderr = simulated(words(tmp_path), sqlite_url, tmp_path / "o.jsonl")
    assert code == 0
    assert "what simulated/flashcard-sim would have cost (simulated: no money spent)" in stdout
    assert "est. (simulated: no money spent)" in stderr, "the progress line says it too"
    code, stdout, _ = run_cli("process", str(words(tmp_path, 5)), "--provider", "simulated", "--dry-run",
                              "--db", sqlite_url)
    assert "no money spent" in stdout
    # The budget still applies to the simulated figure, so budgets stay testable offline.
    code, _, stderr = simulated(words(tmp_path, 8, "more.csv"), sqlite_url, tmp_path / "p.jsonl",
                                "--max-cost", "0.001")
    assert code == 3 and "budget" in stderr


def _answering(bodies: list[dict]) -> Callable[[Any], tuple[int, Any]]:
    """An OpenAI-compatible provider that records every request body and answers like a good model."""
    from flashcard_pipeline.models import TermAnalysis
    from flashcard_pipeline.simulator.content import analysis_for, cards_for

    def answer(body: Any) -> tuple[int, Any]:
        bodies.append(body)
        data = json.loads(re.search(r"<input>\s*(.*?)\s*</input>", body["messages"][-1]["content"], re.S).group(1))
        if "analysis" in data:
            content = cards_for(data["term"], TermAnalysis.model_validate(data["analysis"])).model_dump_json()
        else:
            content = analysis_for(data["term"]).model_dump_json()
        return 200, {"id": "x", "model": body["model"], "usage": {"prompt_tokens": 10, "completion_tokens": 10},
                     "choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}

    return answer


def test_param_and_model_kind_reach_the_wire_and_the_run_and_cache_keys(tmp_path: Path, sqlite_url: str) -> None:
    source = words(tmp_path, 2)
    bodies: list[dict] = []
    with json_server(_answering(bodies)) as url:
        base = ["process", str(source), "--provider", "openai-compatible", "--base-url", url, "--model", "my-model",
                "--db", sqlite_url, "-o", str(tmp_path / "o.jsonl")]
        code, stdout, stderr = run_cli(*base, "--param", "seed=7", "--param", 'reasoning={"effort": "low"}',
                                       "--model-kind", "reasoning")
        assert code == 0, stderr
        assert len(bodies) == 4 and {b["seed"] for b in bodies} == {7}
        assert all(b["reasoning"] == {"effort": "low"} and "temperature" not in b and "max_tokens" not in b
                   and b["max_completion_tokens"] > 0 for b in bodies)
        assert run_cli(*base, "--param", 'reasoning={"effort":"low"}', "--param", "seed=7",
                       "--model-kind", "reasoning")[1].count("0 API calls") == 1, "the same settings resume the run"
        code, stdout, _ = run_cli(*base, "--param", "seed=8", "--model-kind", "reasoning")
        assert code == 0 and "run 2" in stdout and "4 API calls" in stdout, "other params are another run"
        code, stdout, _ = run_cli(*base)
        assert "run 3" in stdout and "4 API calls" in stdout and all(
            "temperature" in b and "max_tokens" in b for b in bodies[-4:]), "a chat model by its name"
        code, stdout, _ = run_cli("cache", "warm", str(source), "--provider", "openai-compatible", "--model",
                                  "my-model", "--param", "seed=8", "--model-kind", "reasoning", "--db", sqlite_url,
                                  "--json")
        assert code == 0 and json.loads(stdout)["already_cached"] == 4, "cache warm addresses the same answers"
    code, _, stderr = run_cli(*base, "--param", "noequals")
    assert code == 2 and "--param" in stderr and len(stderr.strip().splitlines()) == 1
