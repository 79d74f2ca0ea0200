"""The compressed answer cache: codec, TTL jitter, LRU, single flight, counters, database and Redis backends."""

from __future__ import annotations

import asyncio
import gc
import json
import random
import sqlite3
import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import create_engine, event, update
from sqlalchemy.orm import Session

from flashcard_pipeline.cache.backends import DatabaseCacheBackend, RedisCacheBackend, make_cache
from flashcard_pipeline.cache.codec import IDENTITY, ZLIB, ZLIB_DICT, Codec, CodecError
from flashcard_pipeline.cache.compressed_cache import (
    CacheRecord,
    CompressedCache,
    MemoryCacheBackend,
    StoredEntry,
    StoredValue,
)
from flashcard_pipeline.config import CacheSettings
from flashcard_pipeline.simulator.content import analysis_for, cards_for
from flashcard_pipeline.storage.db import close_local_reader, local_reader, open_database
from flashcard_pipeline.storage.ledger import Ledger
from flashcard_pipeline.storage.schema import CacheEntry
from tests.conftest import REDIS_URL, require_service

ANALYSIS = analysis_for("학교", type="noun", hints={"Definition": "school", "Usage_Hint": "Used for any school."})
ANSWER = ANALYSIS.model_dump_json().encode()
CARDS = cards_for("학교", ANALYSIS).model_dump_json().encode()


def record(key: str = "k1", value: bytes = ANSWER, cache_type: str = "nuance") -> CacheRecord:
    return CacheRecord(key=key, cache_type=cache_type, value=value, provider="p", model="m", prompt_version="v1",
                       tokens_in=10, tokens_out=20, cost_usd=0.001)


# --- codec ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("payload", [ANSWER, CARDS, json.dumps({"x": "가" * 500}).encode()])
def test_codec_round_trips_and_the_dictionary_beats_plain_zlib(payload: bytes) -> None:
    plain = Codec(use_dictionary=False)
    with_dict = Codec()
    name, stored = with_dict.encode(payload)
    assert name == ZLIB_DICT and Codec.decode(name, stored) == payload
    plain_name, plain_stored = plain.encode(payload)
    assert plain_name == ZLIB and Codec.decode(plain_name, plain_stored) == payload
    assert len(stored) < len(plain_stored) < len(payload)


def test_codec_bytes_are_a_fresh_dictionary_compressor_s() -> None:
    """Values compress with copies of one primed compressor: the stored bytes are what a compressor made for each
    value writes, call after call (entries written before stay byte-identical)."""
    import zlib

    from flashcard_pipeline.cache.codec import DICTIONARY_NAME, _dictionary

    for level in (1, 6, 9):
        for payload in (ANSWER, CARDS, ANSWER):
            fresh = zlib.compressobj(level, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY,
                                     _dictionary(DICTIONARY_NAME))
            assert Codec(level=level).encode(payload) == (ZLIB_DICT, fresh.compress(payload) + fresh.flush())


def test_codec_leaves_small_values_and_disabled_compression_alone() -> None:
    assert Codec(min_bytes=1024).encode(b"x" * 1000) == (IDENTITY, b"x" * 1000)
    assert Codec(enabled=False).encode(ANSWER) == (IDENTITY, ANSWER)
    incompressible = random.Random(1).randbytes(600)
    assert Codec(use_dictionary=False).encode(incompressible)[0] == IDENTITY  # never stored larger


@pytest.mark.parametrize(("name", "data"), [("zstd", b"abc"), (ZLIB, b"not zlib"), ("zlib+nope", b"x")])
def test_undecodable_values_raise_codec_error(name: str, data: bytes) -> None:
    with pytest.raises(CodecError):
        Codec.decode(name, data)


# --- the cache ------------------------------------------------------------------------------------

async def test_get_put_and_memory_lru() -> None:
    backend = MemoryCacheBackend()
    cache = CompressedCache(backend, CacheSettings(memory_entries=2))
    assert await cache.get("k1", "nuance") is None
    entry = await cache.put(record("k1"))
    assert entry.codec == ZLIB_DICT and entry.stored_bytes < entry.raw_bytes
    assert backend.entries["k1"].data == entry.data
    assert await cache.get("k1", "nuance") == ANSWER
    await cache.put(record("k2", CARDS, "cards"))
    await cache.put(record("k3", CARDS, "cards"))
    assert list(cache._memory) == ["k2", "k3"]  # k1 evicted from memory...
    assert await cache.get("k1", "nuance") == ANSWER  # ...but still in the backend
    stats = cache.stats()
    assert stats["nuance"]["misses"] == 1 and stats["nuance"]["hits"] == 2 and stats["nuance"]["hits_memory"] == 1
    assert stats["cards"]["puts"] == 2 and stats["cards"]["compression_ratio"] < 0.6


async def test_corrupt_backend_value_is_a_miss() -> None:
    backend = MemoryCacheBackend()
    cache = CompressedCache(backend, CacheSettings(memory_entries=0))
    entry = await cache.put(record())
    backend.entries["k1"] = type(entry)(entry.record, ZLIB_DICT, b"garbage", None)
    assert await cache.get("k1", "nuance") is None
    assert cache.metrics["nuance"].decode_errors == 1


def test_ttl_jitter_stays_within_bounds_and_spreads() -> None:
    cache = CompressedCache(MemoryCacheBackend(), CacheSettings(ttl_cards=1000, ttl_jitter=0.1),
                            rng=random.Random(7))
    ttls = [cache.ttl("cards") for _ in range(2000)]
    assert all(900 <= t <= 1100 for t in ttls)
    assert min(ttls) < 920 and max(ttls) > 1080  # really spread, not constant
    assert abs(sum(ttls) / len(ttls) - 1000) < 10
    assert cache.ttl("nuance") is None  # paid answers never expire by default


def test_expiry_is_set_from_the_jittered_ttl() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    cache = CompressedCache(MemoryCacheBackend(), CacheSettings(ttl_nuance=3600, ttl_jitter=0.1),
                            rng=random.Random(1), now=lambda: now)
    expires = cache.encode(record()).expires_at
    assert expires is not None and timedelta(seconds=3240) <= expires - now <= timedelta(seconds=3960)


async def test_single_flight_makes_one_call_for_concurrent_misses() -> None:
    cache = CompressedCache(MemoryCacheBackend())
    calls = 0

    async def fetch() -> bytes:
        nonlocal calls
        if (value := await cache.get("k", "nuance")) is not None:
            return value
        async with cache.single_flight("k"):
            if (value := await cache.get("k", "nuance")) is not None:
                return value
            calls += 1
            await asyncio.sleep(0)
            await cache.put(record("k"))
            return ANSWER

    results = await asyncio.gather(*(fetch() for _ in range(20)))
    assert calls == 1 and all(r == ANSWER for r in results)
    assert cache._flights == {}  # nothing left behind


class DeferredBackend(MemoryCacheBackend):
    """Like the database backend with a ledger writer attached: a put is queued, invisible until flushed."""

    def __init__(self) -> None:
        super().__init__()
        self.queued: list[StoredEntry] = []

    async def get(self, key: str, *, count: bool = True, restore: bool = True,
                  stored_after: Any = None) -> StoredValue | None:
        await asyncio.sleep(0)  # a real read yields (to a thread): let the other tasks interleave
        return await super().get(key, count=count)

    async def put(self, entry: StoredEntry) -> None:
        self.queued.append(entry)

    def flush(self) -> None:
        for entry in self.queued:
            self.entries[entry.record.key] = entry
        self.queued.clear()


async def test_single_flight_does_not_need_the_memory_lru() -> None:
    backend = DeferredBackend()
    cache = CompressedCache(backend, CacheSettings(memory_entries=0))
    tasks = 10
    missed = 0
    all_missed = asyncio.Event()
    calls = 0

    async def stage() -> bytes:
        """The pipeline's pattern: look up, then under the flight re-check uncounted, call, put."""
        nonlocal missed, calls
        if (value := await cache.get("k", "nuance")) is not None:
            return value
        missed += 1
        if missed == tasks:
            all_missed.set()
        async with cache.single_flight("k"):
            if (value := await cache.get("k", "nuance", count=False)) is not None:
                return value
            calls += 1
            await all_missed.wait()  # every task has missed and queued on the flight
            await cache.put(record("k"))
            return ANSWER

    results = await asyncio.gather(*(stage() for _ in range(tasks)))
    assert calls == 1 and results == [ANSWER] * tasks
    assert len(backend.queued) == 1 and backend.entries == {}  # the waiters were served by the flight
    assert cache.stats()["nuance"]["misses"] == tasks  # re-checks are not counted
    assert cache._flights == {}
    assert await cache.get("k", "nuance") is None  # the flight let go of the value: no LRU by the back door
    backend.flush()
    assert await cache.get("k", "nuance") == ANSWER


async def test_forget_drops_the_value_an_open_flight_holds() -> None:
    cache = CompressedCache(DeferredBackend(), CacheSettings(memory_entries=0))
    async with cache.single_flight("k"):
        await cache.put(record("k"))
        assert await cache.get("k", "nuance", count=False) == ANSWER
        cache.forget("k")  # e.g. the value did not parse
        assert await cache.get("k", "nuance", count=False) is None


async def test_memory_entries_expire_with_their_backend_entry() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    backend = MemoryCacheBackend(now=lambda: now)
    cache = CompressedCache(backend, CacheSettings(ttl_nuance=60, ttl_jitter=0.0), now=lambda: now)
    await cache.put(record("k"))
    backend.entries.clear()  # only memory knows the value now
    now += timedelta(seconds=59)
    assert await cache.get("k", "nuance") == ANSWER and cache.metrics["nuance"].hits_memory == 1
    now += timedelta(seconds=1)
    assert await cache.get("k", "nuance") is None  # expired: a miss, not a stale answer
    assert "k" not in cache._memory


async def test_a_backend_read_is_kept_in_memory_no_longer_than_it_lives() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    backend = MemoryCacheBackend(now=lambda: now)
    writer = CompressedCache(backend, CacheSettings(ttl_nuance=60, ttl_jitter=0.0), now=lambda: now)
    await writer.put(record("k"))
    now += timedelta(seconds=50)  # 10 s of life left when the reader loads it
    reader = CompressedCache(backend, CacheSettings(ttl_nuance=60, ttl_jitter=0.0), now=lambda: now)
    assert await reader.get("k", "nuance") == ANSWER
    backend.entries.clear()
    now += timedelta(seconds=9)
    assert await reader.get("k", "nuance") == ANSWER and reader.metrics["nuance"].hits_memory == 1
    now += timedelta(seconds=1)
    assert await reader.get("k", "nuance") is None


async def test_memory_is_bounded_by_the_type_ttl_when_the_backend_reports_no_expiry() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    backend = MemoryCacheBackend(now=lambda: now)
    await CompressedCache(backend, CacheSettings(), now=lambda: now).put(record("k"))  # written without a TTL
    cache = CompressedCache(backend, CacheSettings(ttl_nuance=60, ttl_jitter=0.0), now=lambda: now)
    assert await cache.get("k", "nuance") == ANSWER
    backend.entries.clear()
    now += timedelta(seconds=60)
    assert await cache.get("k", "nuance") is None


async def test_counts_are_flushed_to_the_backend() -> None:
    backend = MemoryCacheBackend()
    cache = CompressedCache(backend)
    await cache.get("a", "nuance")
    await cache.put(record("a"))
    await cache.get("a", "nuance")
    await cache.flush_counts()
    await cache.flush_counts()  # nothing new: no double counting
    assert backend.counts == {"nuance": [1, 1]}


# --- database backend -------------------------------------------------------------------------------

async def test_database_backend_round_trip_stats_clear_and_vacuum(db_url: str) -> None:
    ledger = Ledger(open_database(db_url))
    backend = DatabaseCacheBackend(ledger)
    cache = CompressedCache(backend, CacheSettings(memory_entries=0))
    await cache.put(record("a"))
    await cache.put(record("b", CARDS, "cards"))
    assert await cache.get("a", "nuance") == ANSWER
    assert await cache.get("zzz", "cards") is None
    await cache.flush_counts()

    stats = {s.cache_type: s for s in backend.stats()}
    assert stats["nuance"].entries == 1 and stats["nuance"].hits == 1
    assert stats["cards"].misses == 1 and 0 < stats["cards"].stored_bytes < stats["cards"].raw_bytes
    with Session(ledger.engine) as session:
        assert session.get(CacheEntry, "a").hit_count == 1

    with Session(ledger.engine) as session, session.begin():
        session.execute(update(CacheEntry).where(CacheEntry.key == "b")
                        .values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    assert await cache.get("b", "cards") is None  # expired entries are misses
    assert backend.vacuum() == 1

    with Session(ledger.engine) as session, session.begin():
        session.execute(update(CacheEntry).where(CacheEntry.key == "a")
                        .values(created_at=datetime.now(UTC) - timedelta(days=40)))
    await cache.put(record("c"))
    assert backend.clear(older_than=timedelta(days=30)) == 1
    assert backend.keys_present(["a", "c"]) == {"c"}
    assert backend.clear(cache_type="cards") == 0
    assert backend.clear() == 1
    assert all(s.hits == 0 and s.misses == 0 for s in backend.stats())
    ledger.engine.dispose()


async def test_database_backend_reports_the_expiry_it_read(db_url: str) -> None:
    ledger = Ledger(open_database(db_url))
    backend = DatabaseCacheBackend(ledger)
    cache = CompressedCache(backend, CacheSettings(memory_entries=0, ttl_cards=60, ttl_jitter=0.0))
    await cache.put(record("a"))
    entry = await cache.put(record("b", CARDS, "cards"))
    forever, expiring = await backend.get("a"), await backend.get("b")
    assert forever is not None and forever.expires_at is None
    assert expiring is not None and expiring.expires_at == entry.expires_at  # same instant, timezone-aware
    with Session(ledger.engine) as session, session.begin():
        session.execute(update(CacheEntry).where(CacheEntry.key == "b")
                        .values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    assert await backend.get("b") is None
    ledger.engine.dispose()


async def test_database_backend_reads_a_miss_in_one_statement(db_url: str) -> None:
    """A miss also looks for a stored answer to restore, in the same statement: each statement is a database
    round trip, and a span when the run is traced."""
    ledger = Ledger(open_database(db_url))
    backend = DatabaseCacheBackend(ledger)
    await CompressedCache(backend, CacheSettings(memory_entries=0)).put(record("a"))
    assert await backend.get("other", count=False) is None  # the first read also sets up SQLite's reader
    statements: list[str] = []
    event.listen(ledger.engine, "before_cursor_execute",
                 lambda _conn, _cursor, statement, *_: statements.append(statement))
    assert await backend.get("missing", count=False) is None
    assert len(statements) == 1 and "stage_results" in statements[0]
    found = await backend.get("a", count=False)
    assert found is not None and found.data != b"" and len(statements) == 2
    with Session(ledger.engine) as session, session.begin():
        session.execute(update(CacheEntry).where(CacheEntry.key == "a")
                        .values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    assert await backend.get("a", count=False) is None  # an expired entry is not replaced by a stored answer
    await backend.aclose()
    ledger.engine.dispose()


def _statement_threads(engine: Any) -> list[int]:
    """The thread each statement on ``engine`` runs in, from now on."""
    threads: list[int] = []
    event.listen(engine, "before_cursor_execute", lambda *_: threads.append(threading.get_ident()))
    return threads


async def test_database_backend_reads_a_sqlite_file_on_the_loop_thread_and_sees_later_writes(sqlite_url: str) -> None:
    """A SQLite file in WAL mode is read on the event loop's thread (no hand-over to a thread and back), on one
    connection that ends its transaction after each read: an entry the writer commits later is found."""
    ledger = Ledger(open_database(sqlite_url))
    backend = DatabaseCacheBackend(ledger)
    cache = CompressedCache(backend, CacheSettings(memory_entries=0))
    assert await backend.get("a", count=False) is None  # opens the reader
    threads = _statement_threads(ledger.engine)
    assert await backend.get("a", count=False) is None
    await cache.put(record("a"))  # committed by another connection
    found = await backend.get("a", count=False)
    assert found is not None and Codec.decode(found.codec, found.data) == ANSWER
    loop_thread = threading.get_ident()
    reads = [t for t in threads if t == loop_thread]
    assert len(reads) == 2 and len(threads) == 3  # the two reads here; the put's write elsewhere
    assert ledger.engine.pool.checkedout() == 1
    await backend.aclose()
    assert ledger.engine.pool.checkedout() == 0
    await backend.aclose()  # twice is harmless
    ledger.engine.dispose()


async def test_concurrent_first_reads_open_one_reader(sqlite_url: str) -> None:
    """The reader's busy timeout is 0: a second reader opened by a concurrent first read would be left to the
    garbage collector, which hands it back to the pool, and a writer that got it would fail on a lock at once."""
    ledger = Ledger(open_database(sqlite_url))
    backend = DatabaseCacheBackend(ledger)
    assert await asyncio.gather(*(backend.get(f"k{i}", count=False) for i in range(8))) == [None] * 8
    assert ledger.engine.pool.checkedout() == 1
    await backend.aclose()
    with ledger.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    forgotten = DatabaseCacheBackend(ledger)  # never closed: its reader goes with it, not back to the pool
    assert await forgotten.get("k", count=False) is None and ledger.engine.pool.checkedout() == 1
    del forgotten
    gc.collect()
    assert ledger.engine.pool.checkedout() == 0
    ledger.engine.dispose()


async def test_database_backend_reads_a_locked_sqlite_file_from_a_thread(
        sqlite_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """The loop's reader never waits for a lock (its busy timeout is 0): a locked read is read again from a
    thread, which waits for the lock as every other connection does."""
    ledger = Ledger(open_database(sqlite_url))
    backend = DatabaseCacheBackend(ledger)
    await CompressedCache(backend, CacheSettings(memory_entries=0)).put(record("a"))
    assert await backend.get("zzz", count=False) is None
    reader = backend._reader
    assert reader and reader.exec_driver_sql("PRAGMA busy_timeout").scalar() == 0
    reader.rollback()

    def locked(conn: Any, *_: Any) -> None:
        if conn is reader:
            raise sqlite3.OperationalError("database is locked")

    threads = _statement_threads(ledger.engine)
    event.listen(ledger.engine, "before_cursor_execute", locked)
    with caplog.at_level("DEBUG", logger="flashcard_pipeline.cache.backends"):
        found = await backend.get("a", count=False)
    assert found is not None and Codec.decode(found.codec, found.data) == ANSWER
    assert len(threads) == 2 and threads[0] == threading.get_ident() != threads[1]
    assert "found the database locked" in caplog.text
    await backend.aclose()
    ledger.engine.dispose()


def test_a_sqlite_file_that_is_not_in_wal_mode_or_is_locked_is_read_from_threads(tmp_path: Any) -> None:
    """Outside WAL mode writers lock readers out, and a file found locked is not read on the loop either: no
    reader, and nothing left checked out of the pool."""
    plain = create_engine(f"sqlite:///{tmp_path / 'plain.db'}")  # journal_mode stays 'delete'
    assert local_reader(plain) is None and plain.pool.checkedout() == 0
    plain.dispose()
    engine = open_database(f"sqlite:///{tmp_path / 'wal.db'}")

    def locked(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement == "PRAGMA journal_mode":
            raise sqlite3.OperationalError("database is locked")

    event.listen(engine, "before_cursor_execute", locked)
    assert local_reader(engine) is None and engine.pool.checkedout() == 0
    event.remove(engine, "before_cursor_execute", locked)
    reader = local_reader(engine)
    assert reader is not None and engine.pool.checkedout() == 1
    close_local_reader(reader)
    engine.dispose()


@pytest.mark.parametrize("url", ["sqlite://", "postgres"])
async def test_database_backend_reads_memory_sqlite_and_servers_from_a_thread(
        url: str, request: pytest.FixtureRequest) -> None:
    """An in-memory database shares one connection with the writer's thread, and a server's read is a round
    trip: both stay off the event loop's thread."""
    ledger = Ledger(open_database(request.getfixturevalue("postgres_url") if url == "postgres" else url))
    assert local_reader(ledger.engine) is None
    backend = DatabaseCacheBackend(ledger)
    await CompressedCache(backend, CacheSettings(memory_entries=0)).put(record("a"))
    threads = _statement_threads(ledger.engine)
    assert await backend.get("a", count=False) is not None
    assert len(threads) == 1 and threads[0] != threading.get_ident()
    await backend.aclose()
    ledger.engine.dispose()


# --- redis backend ----------------------------------------------------------------------------------

@pytest.fixture
async def redis_backend():
    require_service("127.0.0.1", 6379, "Redis")
    backend = RedisCacheBackend(REDIS_URL, prefix=f"test:{uuid.uuid4().hex}:")
    yield backend
    await backend.clear()
    await backend.aclose()


async def test_redis_backend_shares_answers_between_workers(redis_backend: RedisCacheBackend) -> None:
    first = CompressedCache(redis_backend, CacheSettings(memory_entries=0, ttl_cards=60))
    second = CompressedCache(RedisCacheBackend(REDIS_URL, prefix=redis_backend.prefix),
                             CacheSettings(memory_entries=0))
    await first.put(record("a"))
    await first.put(record("b", CARDS, "cards"))
    assert await second.get("a", "nuance") == ANSWER
    assert await second.get("b", "cards") == CARDS
    assert await second.get("c", "cards") is None
    await second.flush_counts()
    ttl = await redis_backend.client.ttl(f"{redis_backend.prefix}b")
    assert 50 <= ttl <= 66  # 60 s ± 10 %
    assert await redis_backend.client.ttl(f"{redis_backend.prefix}a") == -1  # no expiry
    stats = {s.cache_type: s for s in await redis_backend.stats()}
    assert stats["nuance"].entries == 1 and stats["nuance"].hits == 1
    assert stats["cards"].misses == 1 and stats["cards"].stored_bytes < stats["cards"].raw_bytes
    assert await redis_backend.clear(cache_type="cards") == 1
    assert await second.get("b", "cards") is None
    await second.backend.aclose()


async def test_redis_read_never_recreates_an_entry_that_expired_meanwhile(
        redis_backend: RedisCacheBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = CompressedCache(redis_backend, CacheSettings(memory_entries=0, ttl_nuance=60, ttl_jitter=0.0))
    await cache.put(record("a"))
    name = f"{redis_backend.prefix}a"
    client = redis_backend.client
    execute = client.execute_command
    vanished: list[str] = []

    async def expire_after_the_read(*args: Any, **kwargs: Any) -> Any:
        result = await execute(*args, **kwargs)
        if name in [a.decode() if isinstance(a, bytes) else a for a in args[1:]] and result and not vanished:
            vanished.append(args[0])
            await execute("DEL", name)  # the entry expires right after the command that read it
        return result

    monkeypatch.setattr(client, "execute_command", expire_after_the_read)
    assert await cache.get("a", "nuance") == ANSWER
    monkeypatch.undo()
    assert vanished  # the hook fired
    assert await client.exists(name) == 0  # no orphan without a TTL or a value
    assert "?" not in {s.cache_type for s in await redis_backend.stats()}
    assert await cache.get("zzz", "nuance") is None and await client.exists(f"{redis_backend.prefix}zzz") == 0


async def test_redis_read_counts_the_hit_and_reports_the_expiry(redis_backend: RedisCacheBackend) -> None:
    cache = CompressedCache(redis_backend, CacheSettings(memory_entries=0, ttl_cards=60, ttl_jitter=0.0))
    await cache.put(record("a"))
    await cache.put(record("b", CARDS, "cards"))
    read_at = datetime.now(UTC)
    forever, expiring = await redis_backend.get("a"), await redis_backend.get("b")
    assert forever is not None and forever.expires_at is None
    assert expiring is not None and expiring.expires_at is not None
    assert timedelta(seconds=55) <= expiring.expires_at - read_at <= timedelta(seconds=61)
    assert await redis_backend.client.hget(f"{redis_backend.prefix}a", "hits") == b"1"
    assert 0 < await redis_backend.client.ttl(f"{redis_backend.prefix}b") <= 60  # the read kept the TTL


def test_make_cache_follows_the_settings(sqlite_url: str) -> None:
    ledger = Ledger(open_database(sqlite_url))
    assert isinstance(make_cache(ledger, CacheSettings()).backend, DatabaseCacheBackend)
    redis_cache = make_cache(ledger, CacheSettings(backend="redis", redis_url=REDIS_URL))
    assert isinstance(redis_cache.backend, RedisCacheBackend)
    asyncio.run(redis_cache.backend.aclose())
    ledger.engine.dispose()


def test_cache_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHE_COMPRESSION_ENABLED", "false")
    monkeypatch.setenv("CACHE_TTL_JITTER", "0.2")
    monkeypatch.setenv("CACHE_TTL_CARDS", "86400")
    settings = CacheSettings()
    assert settings.compression_enabled is False and settings.ttl_jitter == 0.2
    assert settings.ttl_for("cards") == 86400 and settings.ttl_for("nuance") is None
    monkeypatch.setenv("CACHE_TTL_JITTER", "1.5")
    with pytest.raises(ValueError, match="ttl_jitter"):
        CacheSettings()


async def test_the_loop_readers_driver_level_read_answers_as_sqlalchemy_does(
        sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing listening to the engine's statements, the loop's reader runs the compiled statement on the
    driver; every case reads as through SQLAlchemy: a hit, its expiry, an expired entry, a miss; and once a
    listener (a tracer) attaches, it sees the read."""
    from flashcard_pipeline.storage import ledger as ledger_module

    ledger = Ledger(open_database(sqlite_url))
    cache = CompressedCache(DatabaseCacheBackend(ledger), CacheSettings(memory_entries=0, ttl_cards=60))
    await cache.put(record("forever"))
    await cache.put(record("expiring", CARDS, "cards"))
    await cache.put(record("expired", CARDS, "cards"))
    with Session(ledger.engine) as session, session.begin():
        session.execute(update(CacheEntry).where(CacheEntry.key == "expired")
                        .values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    reader = local_reader(ledger.engine)
    assert reader is not None
    driver_reads: list[str] = []
    original = ledger_module._driver_cache_get

    def counted(connection: Any, key: str, *args: Any) -> Any:
        driver_reads.append(key)
        return original(connection, key, *args)

    monkeypatch.setattr(ledger_module, "_driver_cache_get", counted)
    for key in ("forever", "expiring", "expired", "missing"):
        for restore in (True, False):
            assert ledger.cache_get(key, with_results=restore, connection=reader) == ledger.cache_get(
                key, with_results=restore), (key, restore)
    assert len(driver_reads) == 8
    found = ledger.cache_get("expiring", connection=reader)
    assert found is not None and found.expires_at is not None and found.expires_at.tzinfo is not None
    statements = _statement_threads(ledger.engine)
    assert ledger.cache_get("forever", connection=reader) is not None
    assert len(driver_reads) == 9 and len(statements) == 1, "a listener sees every read"
    close_local_reader(reader)
    ledger.engine.dispose()


def test_a_locked_file_at_the_driver_is_sqlalchemys_operational_error(sqlite_url: str) -> None:
    """What the backend catches to read again from a thread."""
    from types import SimpleNamespace

    from sqlalchemy.exc import OperationalError

    from flashcard_pipeline.storage.ledger import _driver_cache_get

    engine = open_database(sqlite_url)

    class Locked:
        def execute(self, *_: Any) -> Any:
            raise sqlite3.OperationalError("database is locked")

    connection = SimpleNamespace(dialect=engine.dialect, connection=SimpleNamespace(dbapi_connection=Locked()))
    with pytest.raises(OperationalError, match="database is locked"):
        _driver_cache_get(connection, "k", True, None)  # type: ignore[arg-type]
    engine.dispose()


class _ThreadNoting:
    """A codec that notes the thread each value is compressed in."""

    def __init__(self, fail: bool = False) -> None:
        self.threads: list[int] = []
        self.fail = fail

    def encode(self, raw: bytes) -> tuple[str, bytes]:
        self.threads.append(threading.get_ident())
        if self.fail:
            raise OSError("the dictionary file is gone")
        return Codec().encode(raw)

    def decode(self, name: str, stored: bytes) -> bytes:
        return Codec.decode(name, stored)


@pytest.mark.parametrize("writer", [True, False])
async def test_the_database_backend_compresses_in_the_writers_thread_not_the_event_loops(
        sqlite_url: str, writer: bool) -> None:
    """zlib holds up whichever thread calls it: the loop only hands the raw answer over; the stored bytes, their
    size in the cache's metrics and the read back are as if it had compressed them itself."""
    from flashcard_pipeline.storage.ledger import LedgerWriter

    ledger = Ledger(open_database(sqlite_url))
    backend = DatabaseCacheBackend(ledger)
    cache = CompressedCache(backend, CacheSettings(memory_entries=0))
    codec = _ThreadNoting()
    cache.codec = codec  # type: ignore[assignment]
    if writer:
        async with LedgerWriter(ledger, flush_interval=0.01) as ledger_writer:
            backend.attach(ledger_writer.submit)
            await cache.put(record("a"))
            assert codec.threads == [], "nothing compressed on the loop"
        backend.attach(None)
    else:
        await cache.put(record("a"))
    assert len(codec.threads) == 1 and codec.threads[0] != threading.get_ident()
    stored = await backend.get("a", count=False)
    assert stored is not None and stored.codec == ZLIB_DICT and Codec.decode(stored.codec, stored.data) == ANSWER
    metrics = cache.stats()["nuance"]
    assert metrics["raw_bytes"] == len(ANSWER) and metrics["stored_bytes"] == len(stored.data) < len(ANSWER)
    await backend.aclose()
    ledger.engine.dispose()


async def test_an_answer_the_writer_cannot_compress_is_stored_as_it_is(
        sqlite_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Never the batch that holds the paid answer lost over its cache copy's compression."""
    ledger = Ledger(open_database(sqlite_url))
    backend = DatabaseCacheBackend(ledger)
    cache = CompressedCache(backend, CacheSettings(memory_entries=0))
    cache.codec = _ThreadNoting(fail=True)  # type: ignore[assignment]
    with caplog.at_level("WARNING", logger="flashcard_pipeline.cache"):
        assert await cache.put(record("a")) is not None
    stored = await backend.get("a", count=False)
    assert stored is not None and stored.codec == IDENTITY and stored.data == ANSWER
    assert "stored uncompressed" in caplog.text and "dictionary file is gone" in caplog.text
    await backend.aclose()
    ledger.engine.dispose()


def test_an_entry_two_threads_encode_at_once_is_kept_and_counted_once() -> None:
    barrier = threading.Barrier(2)

    def encode(raw: bytes) -> tuple[str, bytes]:
        barrier.wait(timeout=5)  # both threads are encoding
        return Codec().encode(raw)

    counted: list[StoredEntry] = []
    entry = StoredEntry(record("k"), encode=encode, on_encoded=counted.append)
    seen: list[bytes] = []
    threads = [threading.Thread(target=lambda: seen.append(entry.data)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=5)
    assert counted == [entry] and seen[0] is seen[1] and Codec.decode(entry.codec, entry.data) == ANSWER
    with pytest.raises(ValueError, match="codec and data, or a way to encode"):
        StoredEntry(record("k"))
