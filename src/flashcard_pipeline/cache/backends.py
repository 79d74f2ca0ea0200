"""Where cached answers live: the ledger's database (default) or Redis (shared by several workers).

Both backends also answer the management questions of ``flashcard-pipeline cache``: sizes and
counters per cache type, clearing by type or age, dropping expired entries.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Connection, Engine, delete, func, select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from flashcard_pipeline.cache.codec import IDENTITY
from flashcard_pipeline.cache.compressed_cache import CompressedCache, StoredEntry, StoredValue
from flashcard_pipeline.config import CacheSettings
from flashcard_pipeline.errors import brief
from flashcard_pipeline.storage.db import close_local_reader, local_reader
from flashcard_pipeline.storage.ledger import CacheCounts, CachedValue, CacheHit, CachePut, Ledger, LedgerOp
from flashcard_pipeline.storage.schema import CacheCounter, CacheEntry, utcnow

log = logging.getLogger(__name__)


@dataclass
class CacheTypeStats:
    cache_type: str
    entries: int = 0
    raw_bytes: int = 0
    stored_bytes: int = 0
    hits: int = 0
    misses: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"cache_type": self.cache_type, "entries": self.entries, "raw_bytes": self.raw_bytes,
                "stored_bytes": self.stored_bytes, "hits": self.hits, "misses": self.misses,
                "hit_rate": round(self.hit_rate, 4),
                "compression_ratio": round(self.stored_bytes / self.raw_bytes, 4) if self.raw_bytes else None}


@dataclass(frozen=True)
class CacheSelection:
    """The entries a ``cache clear`` would delete: how many, and the bytes they take in the backend."""

    entries: int
    stored_bytes: int


def _put_op(entry: StoredEntry) -> CachePut:
    """The ledger writer's operation for ``entry``, compressed in the writer's thread (see :class:`StoredEntry`)."""
    r = entry.record

    def encoded() -> tuple[str, bytes]:
        try:
            return entry.codec, entry.data
        except Exception as exc:  # never fail the batch that holds the paid answer over its cache copy's encoding
            log.warning("cache entry %s stored uncompressed: %s", r.key[:12], brief(exc))
            return IDENTITY, r.value

    return CachePut(key=r.key, stage=r.cache_type, provider=r.provider, model=r.model,
                    prompt_version=r.prompt_version, value=r.value, raw_bytes=entry.raw_bytes,
                    expires_at=entry.expires_at, tokens_in=r.tokens_in, tokens_out=r.tokens_out, cost_usd=r.cost_usd,
                    encoded=encoded)


class DatabaseCacheBackend:
    """Reads from ``cache_entries``; writes go through the ledger writer when one is attached, so a
    paid answer is committed in the same transaction as the stage result it belongs to."""

    #: A miss also finds the answer a run stored for the same request (same database, same read).
    restores = True

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._sink: Callable[..., None] | None = None
        #: Reads on the event loop's thread (a SQLite file in WAL mode): opened by the first read, False when the
        #: database must be read from a thread.
        self._reader: Connection | Literal[False] | None = None
        self._opening = asyncio.Lock()
        self._close_reader: Callable[[], Any] = lambda: None

    @property
    def engine(self) -> Engine:
        return self.ledger.engine

    def attach(self, sink: Callable[..., None] | None) -> None:
        """Route writes into ``sink`` (``LedgerWriter.submit``); None writes directly."""
        self._sink = sink

    async def _write(self, *ops: LedgerOp) -> None:
        if self._sink is not None:
            self._sink(*ops)
        else:
            await asyncio.to_thread(self.ledger.write_batch, list(ops))

    async def _read(self, key: str, restore: bool, stored_after: datetime | None) -> CachedValue | None:
        """One key's read: on the event loop's thread where the database allows it (handing it to a thread and back
        cost 12% of a run's time at 8 calls in flight, docs/benchmarks.md), else from a thread."""
        if self._reader is None:
            async with self._opening:  # one reader, however many first reads wait: a second one would leak
                if self._reader is None:
                    self._reader = await asyncio.to_thread(local_reader, self.engine) or False
                    if self._reader:  # closed with the backend if nobody calls aclose (never pooled again)
                        self._close_reader = weakref.finalize(self, close_local_reader, self._reader)
        if self._reader is not False:
            try:
                return self.ledger.cache_get(key, with_results=restore, results_newer_than=stored_after,
                                             connection=self._reader)
            except OperationalError:  # locked, which WAL readers should never be: wait for it in a thread
                log.debug("cache read of %s found the database locked; reading from a thread", key, exc_info=True)
        return await asyncio.to_thread(self.ledger.cache_get, key, with_results=restore,
                                       results_newer_than=stored_after)

    async def get(self, key: str, *, count: bool = True, restore: bool = True,
                  stored_after: datetime | None = None) -> StoredValue | None:
        found = await self._read(key, restore, stored_after)
        if found is None:
            return None
        if count and not found.restored:
            await self._write(CacheHit(key))
        return StoredValue(found.codec, found.value, found.expires_at)  # the expiry, so memory never outlives it

    async def get_many(self, keys: list[str], *, stored_after: datetime | None = None) -> dict[str, StoredValue]:
        found = await asyncio.to_thread(self.ledger.cache_get_many, keys, with_results=True,
                                        results_newer_than=stored_after)
        hits = [CacheHit(key) for key, value in found.items() if not value.restored]
        if hits:
            await self._write(*hits)
        return {key: StoredValue(value.codec, value.value, value.expires_at) for key, value in found.items()}

    async def put(self, entry: StoredEntry) -> None:
        await self._write(_put_op(entry))

    async def record_counts(self, counts: dict[str, tuple[int, int]]) -> None:
        await self._write(CacheCounts(tuple((k, h, m) for k, (h, m) in sorted(counts.items()))))

    async def aclose(self) -> None:
        """Close the connection reads on the event loop's thread use, if one was opened."""
        self._reader = None
        self._close_reader()

    # management (synchronous: used by the CLI) ------------------------------------------------

    def stats(self) -> list[CacheTypeStats]:
        with Session(self.engine) as session:
            rows = session.execute(select(CacheEntry.stage, func.count(), func.coalesce(func.sum(
                CacheEntry.raw_bytes), 0), func.coalesce(func.sum(CacheEntry.stored_bytes), 0))
                .group_by(CacheEntry.stage)).all()
            stats = {stage: CacheTypeStats(stage, count, int(raw), int(stored)) for stage, count, raw, stored in rows}
            for counter in session.scalars(select(CacheCounter)):
                s = stats.setdefault(counter.cache_type, CacheTypeStats(counter.cache_type))
                s.hits, s.misses = counter.hits, counter.misses
            return [stats[k] for k in sorted(stats)]

    @staticmethod
    def _selected(stmt: Any, cache_type: str | None, older_than: timedelta | None) -> Any:
        if cache_type:
            stmt = stmt.where(CacheEntry.stage == cache_type)
        if older_than is not None:
            stmt = stmt.where(CacheEntry.created_at < utcnow() - older_than)
        return stmt

    def matching(self, cache_type: str | None = None, older_than: timedelta | None = None) -> CacheSelection:
        """What :meth:`clear` with the same arguments would delete, deleting nothing."""
        with Session(self.engine) as session:
            count, stored = session.execute(self._selected(
                select(func.count(), func.coalesce(func.sum(CacheEntry.stored_bytes), 0)), cache_type,
                older_than)).one()
        return CacheSelection(int(count), int(stored))

    def clear(self, cache_type: str | None = None, older_than: timedelta | None = None) -> int:
        with Session(self.engine) as session, session.begin():
            removed = session.execute(self._selected(delete(CacheEntry), cache_type, older_than)).rowcount or 0
            if cache_type is None and older_than is None:
                session.execute(update(CacheCounter).values(hits=0, misses=0))
            return removed

    def vacuum(self) -> int:
        """Drop expired entries and give the space back to the file system."""
        with Session(self.engine) as session, session.begin():
            removed = session.execute(delete(CacheEntry).where(CacheEntry.expires_at.is_not(None),
                                                               CacheEntry.expires_at <= utcnow())).rowcount or 0
        if self.engine.dialect.name == "sqlite":
            with self.engine.connect() as conn:
                conn.execute(text("VACUUM"))
        elif self.engine.dialect.name == "postgresql":
            with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("VACUUM (ANALYZE) cache_entries"))
        return removed

    def keys_present(self, keys: list[str]) -> set[str]:
        with Session(self.engine) as session:
            return set(session.scalars(select(CacheEntry.key).where(CacheEntry.key.in_(keys))))


# The value, its codec and its remaining life in ms (-1: none), counting the hit (ARGV[1] == '1') only on a key
# that exists.
_READ_SCRIPT = """
local found = redis.call('HMGET', KEYS[1], 'codec', 'data')
if not found[1] or not found[2] then
  return false
end
if ARGV[1] == '1' then
  redis.call('HINCRBY', KEYS[1], 'hits', 1)
end
return {found[1], found[2], redis.call('PTTL', KEYS[1])}
"""


class RedisCacheBackend:
    """Entries as Redis hashes under a prefix, expiring natively; counters in one hash."""

    restores = False

    def __init__(self, url: str, prefix: str = "flashcard-pipeline:cache:", client: Any = None) -> None:
        import redis.asyncio as redis_asyncio

        self.prefix = prefix
        self.url = url
        self.client = client or redis_asyncio.from_url(url)
        self._read_script: Any = None

    def attach(self, sink: Callable[..., None] | None) -> None:
        """Writes go straight to Redis; nothing to attach."""

    def _key(self, key: str) -> str:
        return f"{self.prefix}{key}"

    async def get(self, key: str, *, count: bool = True, restore: bool = True,
                  stored_after: datetime | None = None) -> StoredValue | None:
        """Read and count the hit in one script: a key expiring between two commands would otherwise be
        recreated by the hit counter without a TTL and without a value (an orphan of type "?")."""
        if self._read_script is None:
            self._read_script = self.client.register_script(_READ_SCRIPT)
        found = await self._read_script(keys=[self._key(key)], args=["1" if count else "0"])
        if not found:
            return None
        codec, data, pttl = found
        expires = None if pttl < 0 else utcnow() + timedelta(milliseconds=pttl)
        return StoredValue(codec.decode(), data, expires)

    async def get_many(self, keys: list[str], *, stored_after: datetime | None = None) -> dict[str, StoredValue]:
        """The read script for every key, in one round trip."""
        if self._read_script is None:
            self._read_script = self.client.register_script(_READ_SCRIPT)
        async with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                await self._read_script(keys=[self._key(key)], args=["1"], client=pipe)
            answers = await pipe.execute()
        found = {}
        for key, answer in zip(keys, answers, strict=True):
            if answer:
                codec, data, pttl = answer
                expires = None if pttl < 0 else utcnow() + timedelta(milliseconds=pttl)
                found[key] = StoredValue(codec.decode(), data, expires)
        return found

    async def put(self, entry: StoredEntry) -> None:
        r = entry.record
        mapping = {"codec": entry.codec, "data": entry.data, "cache_type": r.cache_type, "provider": r.provider,
                   "model": r.model, "prompt_version": r.prompt_version, "raw_bytes": entry.raw_bytes,
                   "stored_bytes": entry.stored_bytes, "tokens_in": r.tokens_in, "tokens_out": r.tokens_out,
                   "cost_usd": "" if r.cost_usd is None else r.cost_usd, "created_at": utcnow().isoformat(),
                   "hits": 0}
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self._key(r.key), mapping=mapping)
            if entry.expires_at is not None:
                pipe.expireat(self._key(r.key), entry.expires_at)
            else:
                pipe.persist(self._key(r.key))
            await pipe.execute()

    async def record_counts(self, counts: dict[str, tuple[int, int]]) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            for cache_type, (hits, misses) in counts.items():
                pipe.hincrby(f"{self.prefix}counters", f"{cache_type}:hits", hits)
                pipe.hincrby(f"{self.prefix}counters", f"{cache_type}:misses", misses)
            await pipe.execute()

    async def _entries(self) -> list[tuple[str, list[Any]]]:
        found = []
        async for name in self.client.scan_iter(match=f"{self.prefix}*", count=500):
            key = name.decode() if isinstance(name, bytes) else name
            if key == f"{self.prefix}counters":
                continue
            found.append((key, await self.client.hmget(key, "cache_type", "raw_bytes", "stored_bytes",
                                                       "created_at")))
        return found

    async def stats(self) -> list[CacheTypeStats]:
        stats: dict[str, CacheTypeStats] = {}
        for _, (cache_type, raw, stored, _created) in await self._entries():
            name = (cache_type or b"?").decode()
            s = stats.setdefault(name, CacheTypeStats(name))
            s.entries += 1
            s.raw_bytes += int(raw or 0)
            s.stored_bytes += int(stored or 0)
        counters = await self.client.hgetall(f"{self.prefix}counters")
        for field, value in counters.items():
            name, _, kind = field.decode().rpartition(":")
            s = stats.setdefault(name, CacheTypeStats(name))
            setattr(s, kind, int(value))
        return [stats[k] for k in sorted(stats)]

    async def _selected(self, cache_type: str | None, older_than: timedelta | None) -> list[tuple[str, int]]:
        """(key, stored bytes) of the entries of ``cache_type`` older than ``older_than``."""
        cutoff = None if older_than is None else utcnow() - older_than
        chosen = []
        for key, (ctype, _raw, stored, created) in await self._entries():
            if cache_type and (ctype or b"").decode() != cache_type:
                continue
            if cutoff is not None and created and datetime.fromisoformat(created.decode()) >= cutoff:
                continue
            chosen.append((key, int(stored or 0)))
        return chosen

    async def matching(self, cache_type: str | None = None, older_than: timedelta | None = None) -> CacheSelection:
        """What :meth:`clear` with the same arguments would delete, deleting nothing."""
        chosen = await self._selected(cache_type, older_than)
        return CacheSelection(len(chosen), sum(stored for _, stored in chosen))

    async def clear(self, cache_type: str | None = None, older_than: timedelta | None = None) -> int:
        doomed = [key for key, _ in await self._selected(cache_type, older_than)]
        if doomed:
            await self.client.delete(*doomed)
        if cache_type is None and older_than is None:
            await self.client.delete(f"{self.prefix}counters")
        return len(doomed)

    async def aclose(self) -> None:
        await self.client.aclose()


def make_cache(ledger: Ledger, settings: CacheSettings) -> CompressedCache:
    """The cache ``settings`` ask for: the ledger's database by default, Redis when CACHE_BACKEND=redis."""
    if settings.backend == "redis":
        return CompressedCache(RedisCacheBackend(settings.redis_url, settings.redis_prefix), settings)
    return CompressedCache(DatabaseCacheBackend(ledger), settings)
