"""The collector's settings for a long run: entered by `process` and `worker`, undone after them."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
from typer.testing import CliRunner

import flashcard_pipeline.cli.app as cli_app
from flashcard_pipeline.cli.app import app
from flashcard_pipeline.errors import ConfigurationError
from flashcard_pipeline.gc_tuning import RUN_THRESHOLDS, long_run_gc


def _tracked(obj: object) -> bool:
    """In one of the collector's three generations (a frozen object is in none of them)."""
    return any(o is obj for o in gc.get_objects())


@pytest.fixture(autouse=True)
def _nothing_frozen() -> None:
    assert gc.get_freeze_count() == 0, "these tests expect a process that froze nothing"


def test_what_exists_is_frozen_and_passes_come_less_often_within_the_block() -> None:
    before = gc.get_threshold()
    assert before != RUN_THRESHOLDS
    old = [object()]
    with long_run_gc():
        assert gc.get_threshold() == RUN_THRESHOLDS
        assert not _tracked(old) and gc.get_freeze_count() > 0
        young = [object()]
        assert _tracked(young), "what the run makes is collected as usual"
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0 and _tracked(old)


def test_an_error_in_the_block_still_undoes_it() -> None:
    before = gc.get_threshold()
    with pytest.raises(RuntimeError), long_run_gc():
        raise RuntimeError("the run failed")
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_a_freeze_the_application_made_stays() -> None:
    gc.freeze()
    try:
        theirs = gc.get_freeze_count()
        with long_run_gc():
            pass
        assert gc.get_freeze_count() >= theirs > 0
    finally:
        gc.unfreeze()


def test_process_runs_with_the_long_run_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, int, int]] = []
    real = cli_app._run_async

    def recording(coro: object) -> object:
        seen.append(gc.get_threshold())
        return real(coro)

    monkeypatch.setattr(cli_app, "_run_async", recording)
    source = tmp_path / "words.csv"
    source.write_text("term\n학교\n", encoding="utf-8")
    before = gc.get_threshold()
    result = CliRunner().invoke(app, ["process", str(source), "--provider", "simulated", "-o",
                                      str(tmp_path / "cards.jsonl"), "--db", str(tmp_path / "ledger.db")])
    assert result.exit_code == 0, result.stderr
    assert seen == [RUN_THRESHOLDS]
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_a_worker_runs_with_the_long_run_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    import flashcard_pipeline.worker as worker_module

    seen: list[tuple[int, int, int]] = []

    async def refusing(options: object) -> object:
        seen.append(gc.get_threshold())
        raise ConfigurationError("no such run")

    monkeypatch.setattr(worker_module, "run_worker", refusing)
    before = gc.get_threshold()
    result = CliRunner().invoke(app, ["worker", "--run", "1", "--db", "postgresql://127.0.0.1:9/none"])
    assert result.exit_code == 2 and "no such run" in result.stderr
    assert seen == [RUN_THRESHOLDS] and gc.get_threshold() == before
