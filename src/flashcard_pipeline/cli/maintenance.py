"""``flashcard-pipeline db ...`` and ``flashcard-pipeline cache ...``: look after the ledger and the cache."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flashcard_pipeline.choices import ProviderName
from flashcard_pipeline.cli.options import DbOption, JsonOption, ModelKindOption, ParamOption
from flashcard_pipeline.cli.output import command_group, fail
from flashcard_pipeline.cli.root import app
from flashcard_pipeline.errors import ConfigurationError

if TYPE_CHECKING:
    from flashcard_pipeline.cache.backends import CacheTypeStats
    from flashcard_pipeline.cache.compressed_cache import CompressedCache
    from flashcard_pipeline.ingest import VocabularyReader
    from flashcard_pipeline.stages import StageRequest, StageSettings
    from flashcard_pipeline.storage.ledger import Ledger

db_app = command_group("The ledger database: connection pool statistics.")
cache_app = command_group("The answer cache: statistics, clearing, vacuuming, warming.")
app.add_typer(db_app, name="db")
app.add_typer(cache_app, name="cache")

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*$", re.IGNORECASE)
_UNITS = {**dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1),
          **dict.fromkeys(("min", "mins", "minute", "minutes"), 60),
          **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600),
          **dict.fromkeys(("d", "day", "days"), 86400),
          **dict.fromkeys(("w", "week", "weeks"), 604800)}
#: Below this a bare ``m`` could as well mean months (``1m``, ``6m``, ``18m``); from it on only minutes make sense.
_UNAMBIGUOUS_MINUTES = 60


def parse_age(text: str) -> timedelta:
    """'30d', '12h', '90m', '45s', '2w' -> timedelta. The unit is required, and ``m`` under 60 is refused: a
    user who means one month must not delete everything older than one minute."""
    match = _AGE.match(text)
    if not match:
        raise ConfigurationError(f"not an age: {text!r}; give a number and a unit: 30d, 12h, 90min, 45s, 2w")
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit == "m":
        if number < _UNAMBIGUOUS_MINUTES:
            raise ConfigurationError(f"ambiguous age {text!r}: minutes or months? write {match.group(1)}min for "
                                     f"minutes, or the age in days (e.g. 30d) for months")
        unit = "min"
    if unit in ("mo", "month", "months"):
        raise ConfigurationError(f"months differ in length; give the age {text!r} in days, e.g. 30d")
    if unit not in _UNITS:
        raise ConfigurationError(f"unknown unit {match.group(2)!r} in {text!r}; use s, min, h, d or w "
                                 "(30d, 12h, 90min)")
    return timedelta(seconds=number * _UNITS[unit])


def human_bytes(count: int) -> str:
    """1,234,567 -> '1.2 MB' (decimal units, as file managers show them)."""
    size = float(count)
    for unit in ("bytes", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{count:,} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")  # pragma: no cover


def _open(db: str | None) -> Ledger:
    from flashcard_pipeline.storage.db import open_database
    from flashcard_pipeline.storage.ledger import Ledger

    return Ledger(open_database(db, must_exist=True))


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


@db_app.command("stats")
def db_stats(db: DbOption = None,
             run: Annotated[int | None, typer.Option(metavar="ID", help="Run id (default: newest).")] = None,
             as_json: JsonOption = False) -> None:
    """Pool settings and the pool statistics recorded by a run (checkouts, waits, efficiency, ages)."""
    from rich.console import Console
    from rich.table import Table

    from flashcard_pipeline.config import DatabaseSettings, read_settings
    from flashcard_pipeline.storage.db import pool_monitor

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
        table.add_row(key, _figure(pool.get(key)))
    console.print(table)


def _figure(value: Any) -> str:
    """A pool figure for people: four significant digits (a wait of 0.01901 s, not 0.01901411099993311)."""
    if isinstance(value, float):
        return f"{value:,.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)


def _stats_rows(stats: list[CacheTypeStats]) -> list[dict[str, Any]]:
    return [s.to_dict() for s in stats]


def _backend(db: str | None) -> tuple[Ledger, CompressedCache]:
    from flashcard_pipeline.cache.backends import make_cache
    from flashcard_pipeline.config import CacheSettings, read_settings
    from flashcard_pipeline.services import check_redis

    settings = read_settings(CacheSettings)
    if settings.backend == "redis":
        check_redis(settings.redis_url, "CACHE_BACKEND=redis")
    ledger = _open(db)
    return ledger, make_cache(ledger, settings)


def _on_backend(db: str | None, operation: Callable[[Any], Any]) -> Any:
    """``operation(backend)`` on the configured cache backend (awaited when the backend is Redis's)."""
    import asyncio
    import inspect

    ledger, cache = _backend(db)

    async def run() -> Any:
        try:
            result = operation(cache.backend)
            return await result if inspect.isawaitable(result) else result
        finally:
            await cache.aclose()

    try:
        return asyncio.run(run())
    finally:
        ledger.engine.dispose()


@cache_app.command("stats")
def cache_stats(db: DbOption = None, as_json: JsonOption = False) -> None:
    """Entries, raw and stored bytes, hits, misses and hit rate per cache type."""
    from rich.console import Console
    from rich.table import Table

    from flashcard_pipeline.config import CacheSettings, read_settings

    rows = _stats_rows(_on_backend(db, lambda backend: backend.stats()))
    backend_name = read_settings(CacheSettings).backend
    if as_json:
        _print_json({"backend": backend_name, "types": rows})
        return
    table = Table(title=f"answer cache ({backend_name})")
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
    cache_type: Annotated[str | None, typer.Option("--type", metavar="nuance|cards",
                                                   help="Only this type (stage).")] = None,
    older_than: Annotated[str | None, typer.Option(metavar="AGE", help="Only entries older than this: a number "
                                                                       "and a unit (45s, 90min, 12h, 30d, 2w; a "
                                                                       "bare m under 60 is refused as "
                                                                       "ambiguous).")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete cached answers (all, by type, or by age), after showing how many and how many bytes. Answers stored
    with runs are kept."""
    from flashcard_pipeline.stages import CARDS, NUANCE

    age = parse_age(older_than) if older_than else None
    if cache_type is not None and cache_type not in (NUANCE, CARDS):
        raise fail(f"unknown cache type {cache_type!r}; use {NUANCE} or {CARDS}")
    selection = _on_backend(db, lambda backend: backend.matching(cache_type, age))
    what = " ".join(filter(None, ["cached answers", f"of type {cache_type}" if cache_type else "",
                                  f"older than {older_than}" if older_than else ""]))
    if selection.entries == 0:
        typer.echo(f"no {what}: nothing deleted")
        return
    typer.echo(f"{selection.entries:,} {what} ({human_bytes(selection.stored_bytes)} stored). Answers stored with "
               "runs stay and are reused; --force asks the provider again, at a cost.")
    if not yes and not typer.confirm("Delete them?", default=False):
        typer.echo("nothing deleted")
        raise typer.Exit(1)
    removed = _on_backend(db, lambda backend: backend.clear(cache_type, age))
    typer.echo(f"removed {removed:,} cached answers")


@cache_app.command("vacuum")
def cache_vacuum(db: DbOption = None) -> None:
    """Drop expired entries and compact the database file."""
    from flashcard_pipeline.cache.backends import DatabaseCacheBackend

    ledger = _open(db)
    removed = DatabaseCacheBackend(ledger).vacuum()
    ledger.engine.dispose()
    typer.echo(f"removed {removed} expired entries; database compacted")


@cache_app.command("warm")
def cache_warm(
    input_path: Annotated[Path, typer.Argument(metavar="INPUT", help="Vocabulary list whose answers to load.",
                                               show_default=False)],
    db: DbOption = None,
    provider: Annotated[ProviderName, typer.Option(help="Provider the answers were made with.")]
    = ProviderName.OPENROUTER,
    model: Annotated[str | None, typer.Option(metavar="NAME", help="Model (default as for process).")] = None,
    language: Annotated[str, typer.Option(metavar="LANG", help="Language of the terms.")] = "ko",
    learner_language: Annotated[str, typer.Option(metavar="LANG", help="Language of explanations.")] = "en",
    encoding: Annotated[str, typer.Option(metavar="NAME", help="Text encoding of INPUT.")] = "utf-8",
    param: ParamOption = None,
    model_kind: ModelKindOption = None,
    as_json: JsonOption = False,
) -> None:
    """Fill the cache for INPUT from answers already paid for (stored run results, or the database cache when
    the cache lives in Redis). Never calls a provider; reports what would still need a call."""
    import asyncio

    from flashcard_pipeline.ingest import VocabularyReader
    from flashcard_pipeline.runner import DEFAULT_MODELS, model_kind_setting
    from flashcard_pipeline.stages import StageSettings, language_name, parse_params

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
    import asyncio

    from flashcard_pipeline.cache.backends import DatabaseCacheBackend
    from flashcard_pipeline.cache.compressed_cache import CacheRecord
    from flashcard_pipeline.errors import InvalidResponseError
    from flashcard_pipeline.stages import build_cards_request, build_nuance_request, parse_nuance

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
        await cache.aclose()
    return counts
