"""Database setup: migrations match the models, pool settings, the pool monitor, and the writer."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from flashcard_pipeline.config import DatabaseSettings
from flashcard_pipeline.errors import ConfigurationError
from flashcard_pipeline.models import VocabularyItem
from flashcard_pipeline.storage.db import (
    create_db_engine,
    default_database_path,
    migrate,
    open_database,
    pool_monitor,
    resolve_database_url,
)
from flashcard_pipeline.storage.ledger import Ledger, LedgerWriter, StageStarted
from flashcard_pipeline.storage.pool_monitor import MonitoredQueuePool
from flashcard_pipeline.storage.schema import Base


def test_migrations_produce_exactly_the_models(db_url: str) -> None:
    engine = open_database(db_url)
    migrate(engine)  # a second upgrade is a no-op
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    engine.dispose()


def test_database_url_resolution(tmp_path: Path) -> None:
    env = {"XDG_DATA_HOME": str(tmp_path)}
    assert resolve_database_url(None, env) == f"sqlite:///{tmp_path / 'flashcard-pipeline' / 'flashcards.db'}"
    assert default_database_path({}).name == "flashcards.db"
    assert resolve_database_url("postgresql://u@h/db", env) == "postgresql://u@h/db"
    assert resolve_database_url(None, {**env, "FLASHCARD_DATABASE_URL": "sqlite:///x.db"}) == "sqlite:///x.db"
    assert resolve_database_url(str(tmp_path / "a.db"), env) == f"sqlite:///{tmp_path / 'a.db'}"


def test_bad_urls_are_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not a database URL"):
        create_db_engine("::nonsense::")
    with pytest.raises(ConfigurationError, match=r"cannot use database nonsense://u:\*\*\*@h/x: .*sqlite:///PATH"):
        create_db_engine("nonsense://u:pw@h/x")
    with pytest.raises(ConfigurationError, match="cannot open database") as refused:
        open_database("postgresql+psycopg://nobody:secret@127.0.0.1:1/none?connect_timeout=1")
    message = str(refused.value)
    assert "\n" not in message and "Connection refused" in message, message
    assert "secret" not in message and "sqlalchemy" not in message.lower()


def test_pool_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DB_POOL_SIZE", "7")
    monkeypatch.setenv("DB_MAX_OVERFLOW", "3")
    monkeypatch.setenv("DB_POOL_RECYCLE", "120")
    engine = create_db_engine(f"sqlite:///{tmp_path / 'p.db'}")
    assert isinstance(engine.pool, MonitoredQueuePool)
    assert engine.pool.size() == 7 and engine.pool._max_overflow == 3 and engine.pool._recycle == 120
    assert engine.pool._pre_ping is False, "a SQLite file's connections never go stale: no ping per checkout"
    server = create_db_engine("postgresql+psycopg://u@127.0.0.1:1/x")  # never connected
    assert server.pool._pre_ping is True and server.pool.size() == 7
    server.dispose()
    monkeypatch.setenv("DB_POOL_SIZE", "0")
    with pytest.raises(ValueError, match="pool_size"):
        DatabaseSettings()
    engine.dispose()


def test_sqlite_file_gets_wal_and_busy_timeout(tmp_path: Path) -> None:
    engine = open_database(str(tmp_path / "w.db"))
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30000
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 1  # NORMAL
    engine.dispose()


def test_in_memory_sqlite_is_shared_between_threads() -> None:
    engine = open_database("sqlite://")
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(len(Ledger(engine).failures(1))))
    thread.start()
    thread.join()
    assert result == [0]  # the migrated tables are visible from another thread


def test_pool_monitor_counts_checkouts_waits_and_efficiency(db_url: str) -> None:
    engine = create_db_engine(db_url, DatabaseSettings(pool_size=2, max_overflow=1, pool_timeout=5))
    monitor = pool_monitor(engine)
    assert monitor is not None
    for _ in range(20):
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    snap = monitor.snapshot()
    assert snap.checkouts == 20 and snap.checkins == 20 and snap.connects == 1
    assert snap.served_idle == 19 and snap.efficiency == pytest.approx(0.95)
    assert snap.checked_out == 0 and snap.pool_size == 2

    held = [engine.connect() for _ in range(3)]  # two pooled + one overflow
    during = monitor.snapshot()
    assert during.checked_out == 3 and during.overflow == 1 and during.peak_checked_out == 3
    assert during.connects == 3
    held[0].invalidate()
    for conn in held:
        conn.close()
    after = monitor.snapshot()
    assert after.invalidations == 1 and after.checked_out == 0
    assert after.oldest_connection_age_s >= 0 and after.to_dict()["efficiency"] == round(after.efficiency, 4)
    engine.dispose()


def test_pool_monitor_measures_waiting_for_a_busy_pool(sqlite_url: str) -> None:
    engine = create_db_engine(sqlite_url, DatabaseSettings(pool_size=1, max_overflow=0, pool_timeout=5))
    monitor = pool_monitor(engine)
    first = engine.connect()
    released = threading.Event()

    def borrow() -> None:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        released.set()

    thread = threading.Thread(target=borrow)
    thread.start()
    assert not released.wait(0.05)  # blocked: the only connection is out
    first.close()
    thread.join(5)
    snap = monitor.snapshot()
    assert snap.wait_max_s >= 0.04 and snap.served_idle < snap.checkouts
    engine.dispose()


async def test_writes_are_batched_into_few_transactions(db_url: str) -> None:
    ledger = Ledger(open_database(db_url))
    items = [VocabularyItem(position=i, term=f"낱말{i}") for i in range(1, 4)]
    run = ledger.create_run(run_key="k", input_path="x.csv", input_sha256="0" * 64, provider="p", model="m",
                            settings={}, target_language="Korean", learner_language="English", simulated=False,
                            items=items)
    ids = [pending.id for pending in ledger.pending_items(run.id)]
    async with LedgerWriter(ledger, flush_interval=60.0, max_batch=512) as writer:
        for _ in range(400):  # 1,200 operations, as a busy run makes them
            writer.submit(*(StageStarted(item_id=i, stage="nuance") for i in ids))
    assert writer.batches_written <= 3, "1,200 operations, at most 512 per transaction"
    assert [p.item.term for p in ledger.pending_items(run.id)] == [i.term for i in items]
    with ledger.engine.connect() as connection:
        attempts = connection.execute(text("SELECT nuance_attempts FROM items ORDER BY id")).scalars().all()
    assert attempts == [400, 400, 400], "every operation was applied"
    ledger.engine.dispose()


async def test_a_writer_behind_holds_new_work_back_and_writes_bounded_batches(
        sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``room()`` waits while ``high_water`` operations wait to be written, and no batch holds more than
    ``max_batch``: a slow writer bounds what memory holds and what a crash loses, instead of growing its batch."""
    ledger = Ledger(open_database(sqlite_url))
    items = [VocabularyItem(position=1, term="낱말")]
    run = ledger.create_run(run_key="k", input_path="x.csv", input_sha256="0" * 64, provider="p", model="m",
                            settings={}, target_language="Korean", learner_language="English", simulated=False,
                            items=items)
    item_id = ledger.pending_items(run.id)[0].id
    gate = threading.Event()
    sizes: list[int] = []
    write = ledger.write_batch

    def slow(ops: Any) -> None:
        gate.wait(timeout=5)
        sizes.append(len(ops))
        write(ops)

    monkeypatch.setattr(ledger, "write_batch", slow)
    async with LedgerWriter(ledger, flush_interval=0.01, max_batch=10, high_water=25) as writer:
        writer.submit(*(StageStarted(item_id=item_id, stage="nuance") for _ in range(30)))
        waiting = asyncio.create_task(writer.room())
        for _ in range(20):  # the writer's thread is held at the gate: no amount of waiting lets room() return
            await asyncio.sleep(0)
        assert not waiting.done(), "30 waiting, 25 allowed: the worker waits"
        gate.set()
        await asyncio.wait_for(waiting, timeout=5)
        assert len(writer._pending) < 25
        await writer.room()  # below the mark: at once
    assert sum(sizes) == 30 and max(sizes) == 10
    with ledger.engine.connect() as connection:
        assert connection.execute(text("SELECT nuance_attempts FROM items")).scalar() == 30
    ledger.engine.dispose()


async def test_a_waiting_worker_sees_the_writers_failure(sqlite_url: str) -> None:
    ledger = Ledger(open_database(sqlite_url))
    writer = LedgerWriter(ledger, flush_interval=0.01, max_batch=2, high_water=2)
    with pytest.raises(RuntimeError, match="ledger write failed"):
        async with writer:
            writer.submit(*(StageStarted(item_id=1, stage="no-such-stage") for _ in range(3)))
            await writer.room()
    ledger.engine.dispose()


async def test_writer_surfaces_a_failed_commit(sqlite_url: str) -> None:
    ledger = Ledger(open_database(sqlite_url))
    writer = LedgerWriter(ledger, flush_interval=0.01)
    with pytest.raises(Exception):  # noqa: B017 - any database error
        async with writer:
            writer.submit(StageStarted(item_id=1, stage="no-such-stage"))
            await writer.flush()
    with pytest.raises(RuntimeError, match="ledger write failed"):
        writer.submit(StageStarted(item_id=1, stage="nuance"))
    ledger.engine.dispose()


def test_the_head_revision_is_alembics_and_a_current_schema_opens_without_alembic(
        db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from flashcard_pipeline.storage.db import head_revision

    config = Config()
    config.set_main_option("script_location", "flashcard_pipeline.storage:migrations")
    assert head_revision() == ScriptDirectory.from_config(config).get_current_head()
    open_database(db_url).dispose()  # creates the schema through Alembic
    calls: list[str] = []
    monkeypatch.setattr(command, "upgrade", lambda *args, **kwargs: calls.append("upgrade"))
    engine = open_database(db_url)
    assert calls == [], "a schema at head is opened with one query, not Alembic's start-up"
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0001'"))
    engine.dispose()
    open_database(db_url).dispose()
    assert calls == ["upgrade"], "an older schema is still migrated"


@pytest.mark.slow
def test_processes_opening_a_new_database_at_once_all_get_it(db_url: str) -> None:
    """`monitor` started beside the `process` that creates the database (or two workers starting together): one
    creates the tables, the others wait for it instead of creating them again and failing."""
    import subprocess
    import sys

    script = "import sys; from flashcard_pipeline.storage.db import open_database; open_database(sys.argv[1]).dispose()"
    workers = [subprocess.Popen([sys.executable, "-c", script, db_url], stderr=subprocess.PIPE, text=True)
               for _ in range(6)]
    failures = [worker.stderr.read() for worker in workers if worker.wait(timeout=120) != 0]  # type: ignore[union-attr]
    assert not failures, failures[0]
    engine = open_database(db_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
    engine.dispose()


def _ledger_state(engine: Any) -> dict[str, list[tuple[Any, ...]]]:
    """Every row that batched writes touch, without ids and timestamps."""
    queries = {
        "items": "select position, nuance_state, nuance_attempts, cards_state, cards_attempts, error_stage, "
                 "error_category, error_code, error_message from items order by position",
        "results": "select i.position, r.stage, r.cache_key, r.payload, r.from_cache from stage_results r "
                   "join items i on i.id = r.item_id order by i.position, r.stage",
        "cards": "select i.position, c.ordinal, c.card_type, c.front from cards c join items i on i.id = c.item_id "
                 "order by i.position, c.ordinal",
        "cache": "select key, stage, codec, value, hit_count from cache_entries order by key",
        "calls": "select stage, status, tokens_in from api_calls order by id",
    }
    with engine.connect() as conn:
        return {name: [tuple(row) for row in conn.execute(text(sql))] for name, sql in queries.items()}


def test_a_batch_written_at_once_ends_as_the_same_operations_applied_one_by_one(db_url: str) -> None:
    from flashcard_pipeline.models import CardType, Flashcard
    from flashcard_pipeline.storage.ledger import CacheHit, CachePut, CallRecorded, StageCompleted, StageFailed

    def card(front: str) -> Flashcard:
        return Flashcard(card_type=CardType.SCENE, front=front, back="back")

    engine = open_database(db_url)
    ledger = Ledger(engine)

    def run(key: str) -> tuple[int, list[int]]:
        record = ledger.create_run(run_key=key, input_path="x", input_sha256="0" * 64, provider="p", model="m",
                                   settings={}, target_language="Korean", learner_language="English",
                                   simulated=False, items=[VocabularyItem(position=i, term=f"t{i}")
                                                           for i in range(1, 5)])
        return record.id, [p.id for p in ledger.pending_items(record.id)]

    def ops(made: tuple[int, list[int]], tag: str) -> list[Any]:
        run_id, (a, b, c, d) = made
        put = CachePut(key=f"{tag}-k1", stage="nuance", provider="p", model="m", prompt_version="v", value=b"x")
        return [
            StageStarted(a, "nuance"), StageStarted(b, "nuance"), put,
            StageCompleted(a, "nuance", f"{tag}-k1", '{"a": 1}', False, None), CacheHit(f"{tag}-k1"),
            StageStarted(a, "cards"), StageFailed(b, "nuance", "server", "http_500", "boom"),
            CallRecorded(None, a, "nuance", "p", "m", f"{tag}-k1", "ok", tokens_in=3),
            StageCompleted(a, "cards", f"{tag}-k2", "{}", False, run_id, (card("one"), card("two"))),
            StageStarted(c, "nuance"), CacheHit(f"{tag}-k1"), StageCompleted(c, "nuance", f"{tag}-k1", '{"c": 1}',
                                                                             True, None),
            put, StageStarted(d, "nuance"), StageStarted(c, "cards"),
            StageCompleted(c, "cards", f"{tag}-k3", "{}", False, run_id, (card("three"),)), CacheHit(f"{tag}-k1"),
        ]

    ledger.write_batch(ops(run("together"), "t"))
    together = _ledger_state(engine)
    with engine.begin() as conn:
        for table in ("cards", "stage_results", "api_calls", "cache_entries", "items", "runs"):
            conn.execute(text(f"delete from {table}"))
    for op in ops(run("one-by-one"), "t"):
        ledger.write_batch([op])
    assert _ledger_state(engine) == together
    assert [row[1:5] for row in together["items"]] == [
        ("done", 1, "done", 1), ("failed", 1, "pending", 0), ("done", 1, "done", 1), ("in_flight", 1, "pending", 0)]
    assert [row[4] for row in together["cache"]] == [1], "a put starts its entry's hits afresh"
    assert len(together["cards"]) == 3
    engine.dispose()
