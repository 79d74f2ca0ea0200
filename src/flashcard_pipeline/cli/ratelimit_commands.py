"""``flashcard-pipeline ratelimit status``: each limit's rate, tokens available, waits and refunds.

A running ``process`` publishes its limiter's snapshot into its run's metrics every
``RL_PUBLISH_INTERVAL`` seconds (and once at the end), so this works from a second terminal against
the newest run by default. With ``RL_BACKEND=redis`` it also reads the live shared buckets, which
every process using that Redis sees.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from redis.exceptions import RedisError
from rich.console import Console
from rich.table import Table

from flashcard_pipeline.cli.output import ExitCode, fail
from flashcard_pipeline.config import rate_limit_settings
from flashcard_pipeline.resilience.ratelimit import RateLimitSettings, RedisLimits
from flashcard_pipeline.storage.db import open_database
from flashcard_pipeline.storage.ledger import Ledger

ratelimit_app = typer.Typer(help="The provider rate limiter: limits, tokens available, waits.", no_args_is_help=True)

_SUFFIXES = (":used", ":adaptive")


async def live_redis_state(settings: RateLimitSettings) -> list[dict[str, Any]]:
    """The state of every bucket under ``RL_REDIS_PREFIX``, straight from Redis."""
    limits = RedisLimits(settings.redis_url, prefix=settings.redis_prefix)
    try:
        found: list[dict[str, Any]] = []
        keys = sorted([key.decode() if isinstance(key, bytes) else key
                       async for key in limits.client.scan_iter(match=f"{settings.redis_prefix}*")])
        for key in keys:
            if key.endswith(_SUFFIXES):
                continue
            rest = key[len(settings.redis_prefix):]
            if not (rest.startswith("{") and "}:" in rest):
                continue
            tag, leaf = rest[1:].split("}:", 1)
            state = await limits.make(f"{tag}:{leaf}", 0.0, 0.0).state()
            for local in ("acquire",):
                state.pop(local, None)  # this command's own (empty) counters, not the workers'
            found.append(state)
        return found
    finally:
        await limits.aclose()


def _number(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _age(stamp: str | None) -> str:
    if not stamp:
        return "unknown"
    try:
        seconds = (datetime.now(UTC) - datetime.fromisoformat(stamp)).total_seconds()
    except ValueError:
        return stamp
    return f"{stamp} ({max(0.0, seconds):.0f}s ago)"


def _print_published(console: Console, run_id: int, status: str, published: dict[str, Any] | None) -> None:
    if not published:
        console.print(f"run {run_id} ({status}) has published no rate-limiter state (it is saved every few "
                      "seconds while `process` runs with the limiter enabled)")
        return
    console.print(f"run {run_id} ({status}) · backend {published.get('backend')} · algorithm "
                  f"{published.get('algorithm')} · shards {published.get('shards')} · updated "
                  f"{_age(published.get('updated_at'))}", highlight=False)
    for label, group in (published.get("limits") or {}).items():
        table = Table(title=f"{label}: {group.get('rate_limited', 0)} 429s, paused {group.get('paused_total_s', 0)}s "
                            f"in total, {group.get('waiting', 0)} waiting")
        for column in ("limit", "mode", "planned/min", "rate/min", "burst", "available", "paused s", "acquired",
                       "waited", "wait s", "refunded"):
            table.add_column(column, justify="left" if column in ("limit", "mode") else "right")
        for name in ("requests", "tokens"):
            dim = group.get(name) or {}
            acquire = dim.get("acquire") or {}
            table.add_row(
                name, str(dim.get("mode", "-")), _number(dim.get("planned_per_minute"), 0),
                _number(dim.get("rate_per_minute"), 0), _number(dim.get("burst")), _number(dim.get("available")),
                _number(dim.get("paused_for"), 2), _number(acquire.get("acquired")), _number(acquire.get("waited")),
                _number(acquire.get("wait_time"), 2), _number(acquire.get("refunded"), 0))
        console.print(table)


def _print_live(console: Console, live: list[dict[str, Any]]) -> None:
    table = Table(title="live in Redis (every process sharing these limits)")
    for column in ("key", "rate/min", "burst", "available", "paused s", "used last minute"):
        table.add_column(column, justify="left" if column == "key" else "right")
    for state in live:
        table.add_row(state["key"], _number(state.get("rate_per_minute"), 0), _number(state.get("burst")),
                      _number(state.get("available")), _number(state.get("paused_for"), 2),
                      _number(state.get("used_last_minute_all_processes"), 0))
    console.print(table if live else "no limits in Redis under this prefix")


@ratelimit_app.command("status")
def ratelimit_status(
    db: Annotated[str | None, typer.Option("--db", help="Database URL or SQLite file (default as for process).")]
    = None,
    run: Annotated[int | None, typer.Option(help="Run id (default: newest).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Each limit's rate, tokens available, waits and refunds, as the running process last published
    them (and the live Redis buckets with RL_BACKEND=redis)."""
    settings = rate_limit_settings()
    ledger = Ledger(open_database(db, must_exist=True))
    try:
        record = ledger.get_run(run)
        if run is not None and record is None:
            raise fail(f"no run {run}", ExitCode.USAGE)
        published = (ledger.run_metrics(record.id) or {}).get("ratelimit") if record else None
    finally:
        ledger.engine.dispose()
    live = None
    if settings.backend == "redis":
        try:
            live = asyncio.run(live_redis_state(settings))
        except (OSError, RedisError) as exc:
            raise fail(f"cannot reach Redis at {settings.redis_url}: {exc}", ExitCode.USAGE) from None
    data = {"run": None if record is None else record.id,
            "run_status": None if record is None else str(record.status),
            "published": published, "redis": live}
    if as_json:
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))
        return
    console = Console()
    if record is None:
        console.print("no run yet")
    else:
        _print_published(console, record.id, str(record.status), published)
    if live is not None:
        _print_live(console, live)
