"""The answer cache: an in-process LRU in front of a shared backend, values compressed, TTLs jittered,
and concurrent misses for one key collapsed into one call (single flight)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from flashcard_pipeline.cache.codec import Codec, CodecError
from flashcard_pipeline.config import CacheSettings, read_settings
from flashcard_pipeline.errors import brief

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheRecord:
    """A paid answer as the pipeline hands it over (raw, uncompressed)."""

    key: str
    cache_type: str
    value: bytes
    provider: str = ""
    model: str = ""
    prompt_version: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float | None = None


_ENCODED = threading.Lock()


class StoredEntry:
    """A record as a backend keeps it: encoded, with sizes and an optional expiry.

    Given ``encode`` instead of ``codec`` and ``data``, it encodes on first use of either, in whichever thread
    uses it first: the database backend hands the entry to the ledger writer, whose thread compresses it (zlib
    releases the GIL there, and no longer holds up the event loop, where it took about 5% of the loop's thread in a
    py-spy profile of a run)."""

    __slots__ = ("_encode", "_encoded", "_on_encoded", "expires_at", "record")

    def __init__(self, record: CacheRecord, codec: str | None = None, data: bytes | None = None,
                 expires_at: datetime | None = None, *, encode: Callable[[bytes], tuple[str, bytes]] | None = None,
                 on_encoded: Callable[[StoredEntry], None] | None = None) -> None:
        if (codec is None or data is None) and encode is None:
            raise ValueError("a stored entry needs its codec and data, or a way to encode")
        self.record = record
        self.expires_at = expires_at
        self._encoded = (codec, data) if codec is not None and data is not None else None
        self._encode = encode
        self._on_encoded = on_encoded

    def _encoding(self) -> tuple[str, bytes]:
        if self._encoded is None:
            assert self._encode is not None
            encoded = self._encode(self.record.value)
            with _ENCODED:  # two threads may both encode; one result is kept and counted
                if self._encoded is None:
                    self._encoded = encoded
                    if self._on_encoded is not None:
                        self._on_encoded(self)
        return self._encoded

    @property
    def codec(self) -> str:
        return self._encoding()[0]

    @property
    def data(self) -> bytes:
        return self._encoding()[1]

    @property
    def raw_bytes(self) -> int:
        return len(self.record.value)

    @property
    def stored_bytes(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class StoredValue:
    """What a backend read returns; ``expires_at`` when the backend knows it, so memory never outlives it."""

    codec: str
    data: bytes
    expires_at: datetime | None = None


@dataclass(frozen=True)
class _Held:
    """A raw value kept in this process, with the expiry it must not outlive."""

    value: bytes
    expires_at: datetime | None


@dataclass
class _Flight:
    """One key being computed: waiters queue on ``lock``; ``held`` is what was put meanwhile, so a waiter's
    re-check finds it even when the memory LRU is off and the backend's write is still queued."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0
    held: _Held | None = None


class CacheBackend(Protocol):
    #: Whether a miss also looks for an answer stored with a run (``stored_after`` bounds how old).
    restores: bool

    def attach(self, sink: Callable[..., None] | None) -> None:
        """Let a backend route its writes into the ledger writer's batches (None: write directly)."""
        ...

    async def get(self, key: str, *, count: bool = True, restore: bool = True,
                  stored_after: datetime | None = None) -> StoredValue | None:
        """The stored value; ``count=False`` reads without adding to the entry's hit count (a dry run);
        ``restore=False`` finds cache entries only."""
        ...

    async def get_many(self, keys: list[str], *, stored_after: datetime | None = None) -> dict[str, StoredValue]:
        """Those of ``keys`` it holds (restoring as ``get`` does), in one read; each found counts as a hit."""
        ...

    async def put(self, entry: StoredEntry) -> None: ...
    async def record_counts(self, counts: dict[str, tuple[int, int]]) -> None:
        """Add (hits, misses) per cache type to the persistent counters."""
        ...


@dataclass
class CacheTypeMetrics:
    hits_memory: int = 0
    hits_backend: int = 0
    misses: int = 0
    puts: int = 0
    raw_bytes: int = 0
    stored_bytes: int = 0
    decode_errors: int = 0
    #: Puts the backend refused (Redis down, a codec file missing): the answer lives on in the ledger.
    write_errors: int = 0
    read_errors: int = 0

    @property
    def hits(self) -> int:
        return self.hits_memory + self.hits_backend

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0

    @property
    def compression_ratio(self) -> float:
        """Stored bytes over raw bytes for what this process wrote (lower is better)."""
        return self.stored_bytes / self.raw_bytes if self.raw_bytes else 1.0


class CompressedCache:
    def __init__(self, backend: CacheBackend, settings: CacheSettings | None = None, *,
                 rng: random.Random | None = None, now: Callable[[], datetime] | None = None) -> None:
        self.backend = backend
        self.settings = settings or read_settings(CacheSettings)
        self.codec = Codec(enabled=self.settings.compression_enabled, level=self.settings.compression_level,
                           min_bytes=self.settings.compression_min_bytes,
                           use_dictionary=self.settings.compression_dictionary)
        self._rng = rng or random.Random()
        self._now = now or (lambda: datetime.now(UTC))
        self._memory: OrderedDict[str, _Held] = OrderedDict()
        #: What a prefetch read for keys about to be looked up: the value, or None for a known miss. Each is
        #: used by one lookup (the page's items are pending, so each is asked for once).
        self._prefetched: dict[str, _Held | None] = {}
        self._flights: dict[str, _Flight] = {}
        self._unreported: dict[str, list[int]] = {}
        self._closed = False
        self.metrics: dict[str, CacheTypeMetrics] = {}

    def _metrics(self, cache_type: str) -> CacheTypeMetrics:
        return self.metrics.setdefault(cache_type, CacheTypeMetrics())

    def _count(self, cache_type: str, *, hit: bool) -> None:
        counts = self._unreported.setdefault(cache_type, [0, 0])
        counts[0 if hit else 1] += 1

    async def get(self, key: str, cache_type: str, *, count: bool = True, restore: bool = True) -> bytes | None:
        """The raw value, or None. ``count=False`` for a look that must not count as a lookup; ``restore=False``
        for cache entries only (not an answer a run stored, which a restoring backend finds on a miss)."""
        metrics = self._metrics(cache_type) if count else CacheTypeMetrics()
        held = self._held(key)
        if held is not None:
            metrics.hits_memory += 1
            if count:
                self._count(cache_type, hit=True)
            return held.value
        if count and restore and key in self._prefetched:
            prefetched = self._prefetched.pop(key)
            if prefetched is not None and not self._expired(prefetched):
                metrics.hits_backend += 1
                self._count(cache_type, hit=True)
                self._remember(key, prefetched)
                return prefetched.value
            if prefetched is None:
                metrics.misses += 1
                self._count(cache_type, hit=False)
                return None
        try:
            stored = await self.backend.get(key, count=count, restore=restore,
                                            stored_after=self.retired_before(cache_type))
        except Exception as exc:  # the cache is best effort: an unreachable backend is a miss, not a failed item
            metrics.read_errors += 1
            log.warning("cache read failed for %s (%s): %s", key[:12], cache_type, brief(exc))
            stored = None
        value = None
        if stored is not None:
            try:
                value = self.codec.decode(stored.codec, stored.data)
            except CodecError:
                metrics.decode_errors += 1
        if stored is None or value is None:
            metrics.misses += 1
            if count:
                self._count(cache_type, hit=False)
            return None
        metrics.hits_backend += 1
        if count:
            self._count(cache_type, hit=True)
        self._remember(key, _Held(value, self._read_expiry(cache_type, stored)))
        return value

    async def prefetch(self, keys: list[str], cache_type: str) -> None:
        """Read ``keys`` in one backend call, so the lookups that follow cost no read each: a hit is held for its
        lookup, a miss is known. A failed read only means the lookups read for themselves."""
        wanted = [key for key in keys if self._held(key) is None and key not in self._prefetched]
        if not wanted:
            return
        try:
            found = await self.backend.get_many(wanted, stored_after=self.retired_before(cache_type))
        except Exception as exc:
            log.warning("cache prefetch failed (%s): %s", cache_type, brief(exc))
            return
        for key in wanted:
            self._prefetched[key] = None
            if (stored := found.get(key)) is not None:
                try:
                    value = self.codec.decode(stored.codec, stored.data)
                except CodecError:
                    self._metrics(cache_type).decode_errors += 1
                    continue
                self._prefetched[key] = _Held(value, self._read_expiry(cache_type, stored))

    def held(self, key: str) -> bytes | None:
        """The value this process holds for ``key`` (memory, or what a flight was handed), without a backend read:
        after waiting on a flight, this is where a concurrent task's answer is."""
        held = self._held(key)
        return None if held is None else held.value

    def _expired(self, held: _Held) -> bool:
        return held.expires_at is not None and held.expires_at <= self._now()

    def _held(self, key: str) -> _Held | None:
        """An unexpired value kept in this process: the LRU first, then what an open flight was handed."""
        held = self._memory.get(key)
        if held is not None:
            if not self._expired(held):
                self._memory.move_to_end(key)
                return held
            del self._memory[key]
        flight = self._flights.get(key)
        if flight is not None and flight.held is not None:
            if not self._expired(flight.held):
                return flight.held
            flight.held = None
        return None

    def _read_expiry(self, cache_type: str, stored: StoredValue) -> datetime | None:
        """The backend's expiry when it reports one, capped at the type's TTL from now for backends that do not."""
        bound = self._expiry_from_now(cache_type)
        if stored.expires_at is None:
            return bound
        return stored.expires_at if bound is None else min(stored.expires_at, bound)

    def forget(self, key: str) -> None:
        """Drop a key from memory (e.g. its value turned out unusable)."""
        self._memory.pop(key, None)
        self._prefetched.pop(key, None)
        if (flight := self._flights.get(key)) is not None:
            flight.held = None

    def ttl(self, cache_type: str) -> float | None:
        """The type's TTL with ±jitter, so entries written together do not expire together."""
        base = self.settings.ttl_for(cache_type)
        if base is None:
            return None
        jitter = self.settings.ttl_jitter
        return base * (1.0 + self._rng.uniform(-jitter, jitter))

    def encode(self, record: CacheRecord) -> StoredEntry:
        """``record`` as stored, compressed when first read (see :class:`StoredEntry`); its stored size is counted
        then."""
        metrics = self._metrics(record.cache_type)

        def counted(entry: StoredEntry) -> None:
            metrics.stored_bytes += entry.stored_bytes

        ttl = self.ttl(record.cache_type)
        expires = None if ttl is None else self._now() + timedelta(seconds=ttl)
        return StoredEntry(record, expires_at=expires, encode=self.codec.encode, on_encoded=counted)

    async def put(self, record: CacheRecord) -> StoredEntry | None:
        """Store ``record``; best effort. A failed write is logged and counted, never raised: the caller has
        already recorded the paid answer in the ledger, which later runs fall back on, so losing the cache
        copy must not lose the answer (or fail the item that paid for it). Returns None when it failed."""
        metrics = self._metrics(record.cache_type)
        entry: StoredEntry | None = None
        try:
            entry = self.encode(record)
            await self.backend.put(entry)
        except Exception as exc:
            metrics.write_errors += 1
            log.warning("cache write failed for %s (%s): %s: %s; the answer is kept in the ledger",
                        record.key[:12], record.cache_type, type(exc).__name__, exc)
            entry = None
        else:
            metrics.puts += 1
            metrics.raw_bytes += entry.raw_bytes
        expires = entry.expires_at if entry is not None else self._expiry_from_now(record.cache_type)
        held = _Held(record.value, expires)
        self._prefetched.pop(record.key, None)
        if (flight := self._flights.get(record.key)) is not None:
            flight.held = held
        self._remember(record.key, held)
        return entry

    def retired_before(self, cache_type: str) -> datetime | None:
        """Answers of this type stored before this instant are past their TTL (None: they never expire)."""
        base = self.settings.ttl_for(cache_type)
        return None if base is None else self._now() - timedelta(seconds=base)

    def _expiry_from_now(self, cache_type: str) -> datetime | None:
        base = self.settings.ttl_for(cache_type)
        return None if base is None else self._now() + timedelta(seconds=base)

    def _remember(self, key: str, held: _Held) -> None:
        if self.settings.memory_entries <= 0:
            return
        self._memory[key] = held
        self._memory.move_to_end(key)
        while len(self._memory) > self.settings.memory_entries:
            self._memory.popitem(last=False)

    @contextlib.asynccontextmanager
    async def single_flight(self, key: str) -> AsyncIterator[None]:
        """Hold while computing ``key``: a concurrent miss for the same key waits, then finds it cached.

        A value ``put`` meanwhile stays with the flight until its last user leaves, so the waiters find it
        whatever the LRU size and however late the backend makes the write visible."""
        flight = self._flights.setdefault(key, _Flight())
        flight.users += 1
        try:
            async with flight.lock:
                yield
        finally:
            flight.users -= 1
            if flight.users == 0:
                del self._flights[key]

    async def aclose(self) -> None:
        """Release the backend's connections (a Redis client, the database backend's reader on the loop's thread);
        once, however often it is called."""
        close = getattr(self.backend, "aclose", None)
        if close is not None and not self._closed:
            self._closed = True
            await close()

    async def flush_counts(self) -> None:
        """Persist the hits and misses counted since the last flush."""
        if not self._unreported:
            return
        counts = {k: (v[0], v[1]) for k, v in self._unreported.items()}
        self._unreported = {}
        await self.backend.record_counts(counts)

    def stats(self) -> dict[str, Any]:
        return {cache_type: {"hits": m.hits, "hits_memory": m.hits_memory, "misses": m.misses,
                             "hit_rate": round(m.hit_rate, 4), "puts": m.puts, "raw_bytes": m.raw_bytes,
                             "stored_bytes": m.stored_bytes, "compression_ratio": round(m.compression_ratio, 4),
                             "decode_errors": m.decode_errors, "write_errors": m.write_errors,
                             "read_errors": m.read_errors}
                for cache_type, m in sorted(self.metrics.items())}


@dataclass
class MemoryCacheBackend:
    """A backend that keeps everything in a dict: for tests and throwaway runs."""

    entries: dict[str, StoredEntry] = field(default_factory=dict)
    counts: dict[str, list[int]] = field(default_factory=dict)
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))

    def attach(self, sink: Callable[..., None] | None) -> None:
        pass

    restores = False

    async def get(self, key: str, *, count: bool = True, restore: bool = True,
                  stored_after: datetime | None = None) -> StoredValue | None:
        entry = self.entries.get(key)
        if entry is None or (entry.expires_at is not None and entry.expires_at <= self.now()):
            return None
        return StoredValue(entry.codec, entry.data, entry.expires_at)

    async def get_many(self, keys: list[str], *, stored_after: datetime | None = None) -> dict[str, StoredValue]:
        found = {key: await self.get(key) for key in keys}
        return {key: value for key, value in found.items() if value is not None}

    async def put(self, entry: StoredEntry) -> None:
        self.entries[entry.record.key] = entry

    async def record_counts(self, counts: dict[str, tuple[int, int]]) -> None:
        for cache_type, (hits, misses) in counts.items():
            total = self.counts.setdefault(cache_type, [0, 0])
            total[0] += hits
            total[1] += misses
