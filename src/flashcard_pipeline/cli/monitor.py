"""``flashcard-pipeline monitor``: watch a run from any terminal (progress, pace, cost, ETA, errors, circuits,
limits), read from the database (and Redis when the limits live there); it exits when the run ends."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flashcard_pipeline.cli.options import DbOption
from flashcard_pipeline.cli.output import ExitCode, duration, fail, label_grid, money
from flashcard_pipeline.cli.root import app

if TYPE_CHECKING:
    from collections.abc import Callable

    from rich.console import Console, RenderableType

    from flashcard_pipeline.monitoring import RunSnapshot
    from flashcard_pipeline.storage.status_reader import StatusSource

#: The exit code `monitor` ends with, like the watched `process`'s.
_EXIT = {"completed": ExitCode.OK, "failed": ExitCode.FAILED_ITEMS, "aborted": ExitCode.ABORTED,
         "interrupted": ExitCode.FAILED_ITEMS}


def _snapshot(source: StatusSource, run_id: int, *, redis: bool) -> RunSnapshot:
    """The run as it is now; ``redis``: the limits may live in Redis (the quick settings saw no RL_* setting
    when False), so read them there too."""
    from flashcard_pipeline.monitoring import take_snapshot

    run = source.get_run(run_id)
    assert run is not None
    snapshot = take_snapshot(source, run)
    if redis:
        snapshot.redis = _redis_limits()
    return snapshot


def _redis_limits() -> list[dict[str, Any]] | None:
    """The live buckets when RL_BACKEND=redis (shared by every process), else None."""
    from flashcard_pipeline.config import rate_limit_settings

    settings = rate_limit_settings()
    if settings.backend != "redis":
        return None
    import asyncio

    from redis.exceptions import RedisError

    from flashcard_pipeline.cli.ratelimit_commands import live_redis_state

    try:
        return asyncio.run(live_redis_state(settings))
    except (OSError, RedisError) as exc:
        raise fail(f"cannot reach Redis at {settings.redis_url} (RL_BACKEND=redis): {exc}") from None


def _limits_text(limits: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(group, one line) per limit group the process published."""
    found = []
    for label, group in ((limits or {}).get("limits") or {}).items():
        parts = []
        for name in ("requests", "tokens"):
            dim = group.get(name) or {}
            planned = dim.get("planned_per_minute")
            said = dim.get("reason")
            reason = f" ({said})" if said and said != dim.get("mode") else ""  # not "unlimited (unlimited)"
            level = "" if planned is None else f" {planned:,.0f}/min"
            parts.append(f"{name} {dim.get('mode', '-')}{level}{reason}")
        parts.append(f"{group.get('rate_limited', 0)} 429s, {group.get('waiting', 0)} waiting")
        found.append((label, " · ".join(parts)))
    return found


def render(snapshot: RunSnapshot) -> RenderableType:
    """The snapshot as label/value rows that wrap to any width; names (input, circuits) get lines of their own."""
    rows = [("run", f"{snapshot.run_id} · {snapshot.state} · {snapshot.provider}/{snapshot.model}"),
            ("input", snapshot.input_path),
            ("items", f"{snapshot.done}/{snapshot.total} done · {snapshot.failed} failed · {snapshot.pending} pending "
                      f"· {snapshot.in_flight} in flight")]
    eta = "-" if snapshot.eta_seconds is None else duration(snapshot.eta_seconds)
    rows.append(("pace", f"{snapshot.calls_per_minute:.0f} calls/min · {snapshot.items_per_minute:.0f} items/min · "
                         f"ETA {eta}"))
    rows.append(("cost", f"{money(snapshot.cost_usd, simulated=snapshot.simulated)} · {snapshot.tokens:,} tokens · "
                         f"{snapshot.api_calls} API calls"))
    errors = ", ".join(f"{code} {count}" for code, count in snapshot.errors_by_code.items())
    rows.append(("errors", f"{snapshot.api_errors}" + (f": {errors}" if errors else "")))
    if snapshot.paused:
        rows.append(("paused", snapshot.paused))
    for circuit in snapshot.circuits:
        window = (circuit.get("stats") or {}).get("window") or {}
        until = f" until {circuit['open_until']}" if circuit.get("open_until") else ""
        rows += [("circuit", circuit["circuit"]),
                 ("", f"{circuit['state']}{until} · window {window.get('failures', 0)} failed of "
                      f"{window.get('throughput', 0)} calls · refused {circuit.get('rejected_count', 0)}")]
    rows += [("isolated", f"{name} (`breaker close {name} -r ...` releases it)") for name in snapshot.isolated]
    for label, text in _limits_text(snapshot.limits):
        rows += [("limits", label), ("", text)]
    for state in snapshot.redis or []:
        rows += [("redis", state["key"]),
                 ("", f"{state.get('rate_per_minute') or 0:,.0f}/min · available {state.get('available') or 0:,.1f} · "
                      f"used last minute {state.get('used_last_minute_all_processes') or 0:,.0f}")]
    rows += worker_rows(snapshot.workers)
    if snapshot.heartbeat_age_s is not None:
        rows.append(("updated", f"{snapshot.heartbeat_age_s:.0f} s ago by {snapshot.owner}"))
    return label_grid(rows)


def worker_rows(workers: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """One row per worker of the run: where it runs, what it did, when it last reported."""
    return [("worker", f"{w['id']} · {w['host']} pid {w['pid']} · {w['state']} · {w['items_done']} items done, "
                       f"{w['items_failed']} failed, {w['in_flight']} in flight · last heartbeat "
                       f"{w['heartbeat_age_s']:.0f} s ago") for w in workers]


def _final(console: Console, snapshot: RunSnapshot) -> typer.Exit:
    console.print(render(snapshot))
    console.print(f"run {snapshot.run_id} ended: {snapshot.state}" + (
        " (its process stopped without finishing; run the same command again to resume)"
        if snapshot.state == "interrupted" else ""), highlight=False)
    return typer.Exit(int(_EXIT.get(snapshot.state, ExitCode.OK)))


@app.command("monitor")
def monitor_command(
    run: Annotated[int | None, typer.Option("--run", metavar="ID", help="The run to watch (default: the newest "
                                                                         "running one, else the newest).", min=1)]
    = None,
    once: Annotated[bool, typer.Option("--once", help="Print one snapshot and exit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON: one snapshot, or with no --once one line per "
                                                         "interval (JSON Lines).")] = False,
    interval: Annotated[float, typer.Option(metavar="SECONDS", help="Seconds between two looks.", min=0.1)] = 1.0,
    db: DbOption = None,
) -> None:
    """Watch a run from any terminal: progress, pace, cost, ETA, errors by category, circuit breakers and rate
    limits. Exits when the run ends, with the exit code its `process` has (0 done, 1 failed items, 3 aborted)."""
    from rich.console import Console

    from flashcard_pipeline import quick_settings
    from flashcard_pipeline.monitoring import newest_watchable_run
    from flashcard_pipeline.storage.status_reader import open_status

    quick = quick_settings.read()
    source = open_status(db, quick)
    console = Console()
    try:
        record = source.get_run(run) if run is not None else newest_watchable_run(source)
        if record is None:
            raise fail(f"there is no run {run} in the database" if run is not None
                       else "the database has no runs yet; start one with `flashcard-pipeline process`")
        run_id = record.id

        def look() -> RunSnapshot:
            return _snapshot(source, run_id, redis=quick is None)

        snapshot = look()
        if once:
            if as_json:
                typer.echo(json.dumps(snapshot.to_dict(), indent=2, ensure_ascii=False))
            else:
                console.print(render(snapshot))
            return
        if as_json:
            _follow_json(look, snapshot, interval)
        elif console.is_terminal:
            _follow_live(console, look, snapshot, interval)
        else:
            _follow_plain(console, look, snapshot, interval)
    except KeyboardInterrupt:
        raise fail("stopped watching (the run goes on)", ExitCode.INTERRUPTED) from None
    finally:
        source.close()


def _follow_json(look: Callable[[], RunSnapshot], snapshot: RunSnapshot, interval: float) -> None:
    while True:
        typer.echo(json.dumps(snapshot.to_dict(), ensure_ascii=False))
        if snapshot.ended:
            raise typer.Exit(int(_EXIT.get(snapshot.state, ExitCode.OK)))
        time.sleep(interval)
        snapshot = look()


def _follow_live(console: Console, look: Callable[[], RunSnapshot], snapshot: RunSnapshot,
                 interval: float) -> None:
    from rich.live import Live

    with Live(render(snapshot), console=console, refresh_per_second=4, transient=True) as live:
        while not snapshot.ended:
            time.sleep(interval)
            snapshot = look()
            live.update(render(snapshot))
    raise _final(console, snapshot)


def _follow_plain(console: Console, look: Callable[[], RunSnapshot], snapshot: RunSnapshot,
                  interval: float) -> None:
    """Into a pipe or a log: one line per look, with what changes (items, errors, pause)."""
    while not snapshot.ended:
        eta = "-" if snapshot.eta_seconds is None else duration(snapshot.eta_seconds)
        console.print(f"run {snapshot.run_id} {snapshot.state} · done {snapshot.done}/{snapshot.total} · failed "
                      f"{snapshot.failed} · API errors {snapshot.api_errors}"
                      + (f" · paused: {snapshot.paused}" if snapshot.paused else "")
                      + f" · {snapshot.calls_per_minute:.0f} calls/min · ETA {eta} · "
                      f"{money(snapshot.cost_usd, simulated=snapshot.simulated)} · {Path(snapshot.input_path).name}",
                      highlight=False, markup=False, soft_wrap=True)
        time.sleep(interval)
        snapshot = look()
    raise _final(console, snapshot)
