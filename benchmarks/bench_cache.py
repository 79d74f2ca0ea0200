"""Cache benchmark: stored bytes per 1,000 cached words, compression ratio, codec cost and hit latency.

    python benchmarks/bench_cache.py            # zstd rows need: pip install -e '.[bench]'

Payloads are realistic stage answers whose text comes from the first half of
../shared/data/korean_10k.csv (see cache_payloads.py); the shipped zlib dictionary and the zstd
dictionary below are trained on the second half only. Prints one table per measurement.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache_payloads import split_payloads

from flashcard_pipeline.cache.backends import DatabaseCacheBackend, RedisCacheBackend
from flashcard_pipeline.cache.codec import Codec
from flashcard_pipeline.cache.compressed_cache import CacheRecord, CompressedCache
from flashcard_pipeline.config import CacheSettings
from flashcard_pipeline.storage.db import open_database
from flashcard_pipeline.storage.ledger import Ledger, LedgerWriter


def codec_rows(training: list[bytes], measured: list[bytes]) -> list[tuple[str, int, Callable[[bytes], bytes],
                                                                         Callable[[bytes], bytes] | None]]:
    """(name, min_bytes, encode, decode) for every codec compared."""
    rows: list[tuple[str, int, Callable[[bytes], bytes], Callable[[bytes], bytes] | None]] = [
        ("none", 1 << 30, lambda v: v, None)]
    for level in (1, 6, 9):
        rows.append((f"zlib-{level} (values > 1 KB, the plan)", 1024,
                     lambda v, lv=level: zlib.compress(v, lv), zlib.decompress))
    for level in (1, 6, 9):
        rows.append((f"zlib-{level} (values > 256 B)", 256, lambda v, lv=level: zlib.compress(v, lv), zlib.decompress))
    for level in (1, 6, 9):
        codec = Codec(level=level, min_bytes=256)
        rows.append((f"zlib-{level} + shipped dictionary (ours)", 256,
                     lambda v, c=codec: c.encode(v)[1], lambda s: Codec.decode("zlib+stage-v1", s)))
    try:
        import zstandard
    except ImportError:
        print("(zstandard not installed: zstd rows skipped)")
        return rows
    dictionary = zstandard.train_dictionary(32 * 1024, training)
    for level in (3, 19):
        compressor = zstandard.ZstdCompressor(level=level, dict_data=dictionary)
        decompressor = zstandard.ZstdDecompressor(dict_data=dictionary)
        rows.append((f"zstd-{level} + trained dictionary", 256, compressor.compress, decompressor.decompress))
    return rows


def measure_codecs(training: list[bytes], measured: list[bytes]) -> None:
    raw = sum(map(len, measured))
    words = len(measured) // 2
    print(f"\n{words} words, {len(measured)} stage answers, {raw:,} raw bytes "
          f"(mean {raw / len(measured):.0f} B per answer)")
    print(f"{'codec':44} {'stored/1000 words':>18} {'ratio':>7} {'encode µs':>10} {'decode µs':>10}")
    for name, min_bytes, encode, decode in codec_rows(training, measured):
        stored_values = []
        started = time.perf_counter()
        for value in measured:
            stored = encode(value) if len(value) >= min_bytes else value
            stored_values.append(stored if len(stored) < len(value) else value)
        encode_us = (time.perf_counter() - started) * 1e6 / len(measured)
        decode_us = 0.0
        if decode is not None:
            started = time.perf_counter()
            for value, stored in zip(measured, stored_values, strict=True):
                if stored is not value:
                    decode(stored)
            decode_us = (time.perf_counter() - started) * 1e6 / len(measured)
        total = sum(map(len, stored_values))
        print(f"{name:44} {total * 1000 / words / 1e6:>15.3f} MB {total / raw:>7.3f} {encode_us:>10.1f} "
              f"{decode_us:>10.1f}")


async def measure_database(measured: list[bytes]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cache.db"
        ledger = Ledger(open_database(str(path)))
        DatabaseCacheBackend(ledger).vacuum()
        empty = path.stat().st_size

        backend = DatabaseCacheBackend(ledger)
        cache = CompressedCache(backend, CacheSettings())
        for i, value in enumerate(measured):
            await cache.put(CacheRecord(key=f"{i:064d}", cache_type="nuance" if i % 2 == 0 else "cards", value=value,
                                        provider="openrouter", model="openai/gpt-4o-mini", prompt_version="v1"))
        backend.vacuum()
        ledger.engine.dispose()
        words = len(measured) // 2
        size = path.stat().st_size - empty
        print(f"\nSQLite file growth for {words} cached words (both stages, after VACUUM): "
              f"{size / 1e6:.3f} MB = {size * 1000 / words / 1e6:.3f} MB per 1,000 words")


async def measure_hits(measured: list[bytes]) -> None:
    print(f"\n{'hit path':34} {'median µs':>10} {'p95 µs':>10}")
    sample = measured[:400]

    async def timed(cache: CompressedCache, label: str, from_memory: bool,
                    settle: Callable[[], Awaitable[None]] | None = None) -> None:
        for i, value in enumerate(sample):
            await cache.put(CacheRecord(key=f"k{i}", cache_type="nuance", value=value))
        if settle is not None:
            await settle()
        durations = []
        for _ in range(3):
            for i in range(len(sample)):
                if not from_memory:
                    cache.forget(f"k{i}")
                started = time.perf_counter()
                found = await cache.get(f"k{i}", "nuance")
                durations.append((time.perf_counter() - started) * 1e6)
                assert found == sample[i]
        durations.sort()
        print(f"{label:34} {statistics.median(durations):>10.1f} {durations[int(len(durations) * 0.95)]:>10.1f}")

    with tempfile.TemporaryDirectory() as folder:
        ledger = Ledger(open_database(str(Path(folder) / "hits.db")))
        async with LedgerWriter(ledger) as writer:  # as in a run: hit counts are batched, not written per hit
            backend = DatabaseCacheBackend(ledger)
            backend.attach(writer.submit)
            await writer.flush()
            await timed(CompressedCache(backend, CacheSettings()), "memory LRU", True, writer.flush)
            await timed(CompressedCache(backend, CacheSettings()), "SQLite (decode included)", False, writer.flush)
            await backend.aclose()
        ledger.engine.dispose()
    try:
        redis_backend = RedisCacheBackend("redis://127.0.0.1:6379/15", prefix="bench:cache:")
        await redis_backend.client.ping()
    except Exception as exc:
        print(f"{'Redis':34} skipped ({type(exc).__name__})")
        return
    await timed(CompressedCache(redis_backend, CacheSettings()), "Redis (decode included)", False)
    await redis_backend.clear()
    await redis_backend.aclose()


def main() -> None:
    training, measured = split_payloads()
    measure_codecs(training, measured)
    asyncio.run(measure_database(measured))
    asyncio.run(measure_hits(measured))


if __name__ == "__main__":
    main()
