"""``flashcard-pipeline db ...`` and ``flashcard-pipeline cache ...``: look after the ledger and the cache."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from flashcard_pipeline.cache.backends import CacheTypeStats, DatabaseCacheBackend, RedisCacheBackend, make_cache
from flashcard_pipeline.cache.compressed_cache import CacheRecord, CompressedCache
from flashcard_pipeline.cli.options import ModelKindOption, ParamOption
from flashcard_pipeline.cli.output import fail
from flashcard_pipeline.config import CacheSettings, DatabaseSettings, read_settings
from flashcard_pipeline.errors import ConfigurationError, InvalidResponseError
from flashcard_pipeline.ingest import VocabularyReader
from flashcard_pipeline.llm.providers import ProviderName
from flashcard_pipeline.runner import DEFAULT_MODELS, model_kind_setting
from flashcard_pipeline.services import check_redis
from flashcard_pipeline.stages import (
    CARDS,
    NUANCE,
    StageRequest,
    StageSettings,
    build_cards_request,
    build_nuance_request,
    language_name,
    parse_nuance,
    parse_params,
)
from flashcard_pipeline.storage.db import open_database, pool_monitor
from flashcard_pipeline.storage.ledger import Ledger

db_app = typer.Typer(help="The ledger database: connection pool statistics.", no_args_is_help=True)
cache_app = typer.Typer(help="The answer cache: statistics, clearing, vacuuming, warming.", no_args_is_help=True)

DbOption = Annotated[str | None, typer.Option("--db", help="Database URL or SQLite file (default as for process).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_age(text: str) -> timedelta:
    """'30d', '12h', '90m', '45s', '2w' -> timedelta."""
    match = _AGE.match(text)
    if not match:
        raise ConfigurationError(f"not an age: {text!r} (use e.g. 30d, 12h, 90m)")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def _open(db: str | None) -> Ledger:
    return Ledger(open_database(db, must_exist=True))


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


@db_app.command("stats")
def db_stats(db: DbOption = None, run: Annotated[int | None, typer.Option(help="Run id (default: newest).")] = None,
             as_json: JsonOption = False) -> None:
    """Pool settings and the pool statistics recorded by a run (checkouts, waits, efficiency, ages)."""
    ledger = _open(db)
    settings = read_settings(DatabaseSettings)
    record = ledger.get_run(run)
    if run is not None and record is None:
        raise fail(f"no run {run}")
    monitor = pool_monitor(ledger.engine)
    data = {
        "database": ledger.engine.url.render_as_string(hide_password=True),
        "dialect": ledger.engine.dialect.name,
        "settings": settings.model_dump(),
        "run": None if record is None else record.id,
        "pool": (ledger.run_metrics(record.id) or {}).get("pool") if record else None,
        "this_process": monitor.snapshot().to_dict() if monitor else None,
    }
    ledger.engine.dispose()
    if as_json:
        _print_json(data)
        return
    console = Console()
    console.print(f"{data['database']} ({data['dialect']}) · pool_size {settings.pool_size}, max_overflow "
                  f"{settings.max_overflow}, recycle {settings.pool_recycle}s, pre_ping {settings.pool_pre_ping}",
                  highlight=False)
    pool = data["pool"]
    if not pool:
        console.print("no pool statistics recorded yet (they are saved at the end of each process run)")
        return
    table = Table(title=f"connection pool during run {data['run']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("checkouts", "served_idle", "efficiency", "connects", "peak_checked_out", "overflow",
                "wait_mean_ms", "wait_max_s", "invalidations", "oldest_connection_age_s"):
        table.add_row(key, str(pool.get(key)))
    console.print(table)


def _stats_rows(stats: list[CacheTypeStats]) -> list[dict[str, Any]]:
    return [s.to_dict() for s in stats]


def _backend(db: str | None) -> tuple[Ledger, CompressedCache]:
    settings = read_settings(CacheSettings)
    if settings.backend == "redis":
        check_redis(settings.redis_url, "CACHE_BACKEND=redis")
    ledger = _open(db)
    return ledger, make_cache(ledger, settings)


async def _close(cache: CompressedCache) -> None:
    await cache.aclose()


@cache_app.command("stats")
def cache_stats(db: DbOption = None, as_json: JsonOption = False) -> None:
    """Entries, raw and stored bytes, hits, misses and hit rate per cache type."""
    ledger, cache = _backend(db)
    backend = cache.backend

    async def collect() -> list[CacheTypeStats]:
        try:
            if isinstance(backend, RedisCacheBackend):
                return await backend.stats()
            assert isinstance(backend, DatabaseCacheBackend)
            return backend.stats()
        finally:
            await _close(cache)

    rows = _stats_rows(asyncio.run(collect()))
    ledger.engine.dispose()
    if as_json:
        _print_json({"backend": read_settings(CacheSettings).backend, "types": rows})
        return
    table = Table(title=f"answer cache ({read_settings(CacheSettings).backend})")
    for column in ("type", "entries", "raw bytes", "stored bytes", "ratio", "hits", "misses", "hit rate"):
        table.add_column(column, justify="left" if column == "type" else "right")
    for r in rows:
        ratio = "-" if r["compression_ratio"] is None else f"{r['compression_ratio']:.2f}"
        table.add_row(r["cache_type"], f"{r['entries']:,}", f"{r['raw_bytes']:,}", f"{r['stored_bytes']:,}", ratio,
                      f"{r['hits']:,}", f"{r['misses']:,}", f"{r['hit_rate']:.1%}")
    Console().print(table)


@cache_app.command("clear")
def cache_clear(
    db: DbOption = None,
    cache_type: Annotated[str | None, typer.Option("--type", help="Only this type (nuance, cards).")] = None,
    older_than: Annotated[str | None, typer.Option(help="Only entries older than this (30d, 12h).")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete cached answers (all, by type, or by age). Stored run results are kept."""
    age = parse_age(older_than) if older_than else None
    if cache_type is not None and cache_type not in (NUANCE, CARDS):
        raise fail(f"unknown cache type {cache_type!r}; use {NUANCE} or {CARDS}")
    if not yes and not typer.confirm("Delete these cached answers? Answers stored with runs stay and are reused "
                                     "(--force asks the provider again, at a cost)", default=False):
        raise typer.Exit(1)
    ledger, cache = _backend(db)
    backend = cache.backend

    async def clear() -> int:
        try:
            if isinstance(backend, RedisCacheBackend):
                return await backend.clear(cache_type, age)
            assert isinstance(backend, DatabaseCacheBackend)
            return backend.clear(cache_type, age)
        finally:
            await _close(cache)

    removed = asyncio.run(clear())
    ledger.engine.dispose()
    typer.echo(f"removed {removed} cached answers")


@cache_app.command("vacuum")
def cache_vacuum(db: DbOption = None) -> None:
    """Drop expired entries and compact the database file."""
    ledger = _open(db)
    removed = DatabaseCacheBackend(ledger).vacuum()
    ledger.engine.dispose()
    typer.echo(f"removed {removed} expired entries; database compacted")


@cache_app.command("warm")
def cache_warm(
    input_path: Annotated[Path, typer.Argument(metavar="INPUT", help="Vocabulary list whose answers to load.")],
    db: DbOption = None,
    provider: Annotated[ProviderName, typer.Option(help="Provider the answers were made with.")]
    = ProviderName.OPENROUTER,
    model: Annotated[str | None, typer.Option(help="Model (default as for process).")] = None,
    language: Annotated[str, typer.Option()] = "ko",
    learner_language: Annotated[str, typer.Option()] = "en",
    encoding: Annotated[str, typer.Option(help="Text encoding of INPUT.")] = "utf-8",
    param: ParamOption = None,
    model_kind: ModelKindOption = None,
    as_json: JsonOption = False,
) -> None:
    """Fill the cache for INPUT from answers already paid for (stored run results, or the database cache when
    the cache lives in Redis). Never calls a provider; reports what would still need a call."""
    reader = VocabularyReader(input_path, encoding=encoding)
    reader.detect()
    settings = StageSettings(provider=provider.value, model=model or DEFAULT_MODELS[provider],
                             language=language_name(language), learner_language=language_name(learner_language),
                             params=parse_params(param or []), model_kind=model_kind_setting(model_kind))
    ledger, cache = _backend(db)
    report = asyncio.run(_warm(reader, settings, ledger, cache))
    ledger.engine.dispose()
    if as_json:
        _print_json(report)
    else:
        typer.echo(f"{report['items']} items: {report['already_cached']} stage answers already cached, "
                   f"{report['restored']} restored without a call, {report['missing']} would need an API call")


async def _warm(reader: VocabularyReader, settings: StageSettings, ledger: Ledger,
                cache: CompressedCache) -> dict[str, int]:
    database = DatabaseCacheBackend(ledger)
    counts = {"items": 0, "already_cached": 0, "restored": 0, "missing": 0}

    async def answer(staged: StageRequest) -> str | None:
        value = await cache.get(staged.cache_key, staged.stage, restore=False)
        if value is not None:
            counts["already_cached"] += 1
            return value.decode("utf-8")
        source: bytes | None = None
        if not isinstance(cache.backend, DatabaseCacheBackend):
            stored = await database.get(staged.cache_key)
            if stored is not None:
                source = cache.codec.decode(stored.codec, stored.data)
        if source is None:
            payload = await asyncio.to_thread(ledger.payload_for_cache_key, staged.cache_key)
            source = None if payload is None else payload.encode("utf-8")
        if source is None:
            counts["missing"] += 1
            return None
        await cache.put(CacheRecord(key=staged.cache_key, cache_type=staged.stage, value=source,
                                    provider=settings.provider, model=settings.model,
                                    prompt_version=staged.prompt_version))
        counts["restored"] += 1
        return source.decode("utf-8")

    try:
        for item in reader:
            counts["items"] += 1
            nuance = await answer(build_nuance_request(item, settings))
            if nuance is None:
                counts["missing"] += 1  # stage 2 cannot even be addressed without stage 1
                continue
            try:
                analysis = parse_nuance(nuance, item)
            except InvalidResponseError:
                counts["missing"] += 1
                continue
            await answer(build_cards_request(item, analysis, settings))
    finally:
        await _close(cache)
    return counts
