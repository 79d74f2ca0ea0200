"""``flashcard-pipeline ratelimit status``: each limit's rate, tokens available, waits and refunds.

A running ``process`` publishes its limiter's snapshot into its run's metrics every
``RL_PUBLISH_INTERVAL`` seconds (and once at the end), so this works from a second terminal against
the newest run by default. With ``RL_BACKEND=redis`` it also reads the live shared buckets, which
every process using that Redis sees.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flashcard_pipeline.cli.options import DbOption, JsonOption
from flashcard_pipeline.cli.output import ExitCode, command_group, fail
from flashcard_pipeline.cli.root import app

if TYPE_CHECKING:
    from rich.console import Console

    from flashcard_pipeline.resilience.ratelimit import RateLimitSettings

ratelimit_app = command_group("The provider rate limiter: limits, tokens available, waits.")
app.add_typer(ratelimit_app, name="ratelimit")

_SUFFIXES = (":used", ":adaptive")


async def live_redis_state(settings: RateLimitSettings) -> list[dict[str, Any]]:
    """The state of every bucket under ``RL_REDIS_PREFIX``, straight from Redis."""
    from flashcard_pipeline.resilience.ratelimit import RedisLimits

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


#: (row label, dimension key, sub-dictionary or None, digits) of the published figures, one row each.
_ROWS = (("mode", "mode", None, None), ("why", "reason", None, None), ("planned/min", "planned_per_minute", None, 0),
         ("rate/min", "rate_per_minute", None, 0), ("burst", "burst", None, 1), ("available", "available", None, 1),
         ("paused s", "paused_for", None, 2), ("acquired", "acquired", "acquire", 1),
         ("waited", "waited", "acquire", 1), ("wait s", "wait_time", "acquire", 2),
         ("refunded", "refunded", "acquire", 0))


def _print_published(console: Console, run_id: int, status: str, published: dict[str, Any] | None) -> None:
    """One block per limit group: its name whole on a line of its own, then a three-column table (figure,
    requests, tokens) that fits an 80-column terminal."""
    from rich.table import Table

    if not published:
        console.print(f"run {run_id} ({status}) has published no rate-limiter state (it is saved every few "
                      "seconds while `process` runs with the limiter enabled)")
        return
    console.print(f"run {run_id} ({status}) · backend {published.get('backend')} · algorithm "
                  f"{published.get('algorithm')} · shards {published.get('shards')} · updated "
                  f"{_age(published.get('updated_at'))}", highlight=False)
    for label, group in (published.get("limits") or {}).items():
        console.print(f"[bold]{label}[/]", highlight=False, soft_wrap=True)
        console.print(f"  {group.get('rate_limited', 0)} 429s · paused {group.get('paused_total_s', 0)} s in total · "
                      f"{group.get('waiting', 0)} waiting", highlight=False)
        if group.get("verdict") == "noise":
            console.print(f"  429s are not rate-related: {group.get('rate_limited_not_rate_related', 0)} of them "
                          f"neither paused nor cut (about {group.get('share_429_not_rate_related', 0):.1%} of calls "
                          "get one whatever the rate)", highlight=False)
        table = Table(box=None, padding=(0, 2), pad_edge=True)
        table.add_column("")
        table.add_column("requests", justify="right")
        table.add_column("tokens", justify="right")
        dims = [group.get(name) or {} for name in ("requests", "tokens")]
        for label_text, key, sub, digits in _ROWS:
            cells = []
            for dim in dims:
                value = (dim.get(sub) or {}).get(key) if sub else dim.get(key)
                if key == "burst" and dim.get("mode") == "unlimited":
                    value = None  # an unlimited bucket's burst means nothing
                if key == "reason" and value == dim.get("mode"):
                    value = None  # "unlimited" twice says nothing more
                cells.append(str(value if value is not None else "-") if digits is None else _number(value, digits))
            table.add_row(label_text, *cells)
        console.print(table)


def _print_live(console: Console, live: list[dict[str, Any]]) -> None:
    if not live:
        console.print("no limits in Redis under this prefix")
        return
    console.print("[bold]live in Redis[/] (every process sharing these limits)")
    for state in live:
        console.print(f"  {state['key']}", highlight=False, markup=False, soft_wrap=True)
        console.print(f"      rate/min {_number(state.get('rate_per_minute'), 0)} · burst {_number(state.get('burst'))}"
                      f" · available {_number(state.get('available'))} · paused s "
                      f"{_number(state.get('paused_for'), 2)} · used last minute "
                      f"{_number(state.get('used_last_minute_all_processes'), 0)}", highlight=False)


@ratelimit_app.command("status")
def ratelimit_status(
    db: DbOption = None,
    run: Annotated[int | None, typer.Option(metavar="ID", help="Run id (default: newest).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Each limit's rate, tokens available, waits and refunds, as the running process last published
    them (and the live Redis buckets with RL_BACKEND=redis)."""
    from rich.console import Console

    from flashcard_pipeline import quick_settings
    from flashcard_pipeline.storage.status_reader import open_status

    quick = quick_settings.read()
    settings = None  # quick settings: no RL_* setting is set, so the limits are not in Redis
    if quick is None:
        from flashcard_pipeline.config import rate_limit_settings

        settings = rate_limit_settings()
    source = open_status(db, quick)
    try:
        record = source.get_run(run)
        if run is not None and record is None:
            raise fail(f"no run {run}", ExitCode.USAGE)
        published = (source.run_metrics(record.id) or {}).get("ratelimit") if record else None
    finally:
        source.close()
    live = None
    if settings is not None and settings.backend == "redis":
        import asyncio

        from redis.exceptions import RedisError

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
