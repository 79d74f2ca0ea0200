"""``flashcard-pipeline errors``: what failed, where, how often and how slow, from the ledger."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated

import typer

from flashcard_pipeline.cli.options import DbOption, JsonOption
from flashcard_pipeline.cli.output import fail
from flashcard_pipeline.cli.root import app
from flashcard_pipeline.errors import ConfigurationError

if TYPE_CHECKING:
    from flashcard_pipeline.analytics import ErrorReport


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``24h``, ``30min``, ``7d`` (that long ago) or an ISO date or time (``2026-01-31``, ``2026-01-31T12:00``,
    local time unless it names its zone)."""
    from flashcard_pipeline.cli.maintenance import parse_age

    now = now or datetime.now(UTC)
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        try:
            return now - parse_age(text)
        except ConfigurationError:
            raise ConfigurationError(f"--since {text!r}: give an age (24h, 90min, 7d) or a date or time "
                                     "(2026-01-31, 2026-01-31T12:00)") from None
    return when.astimezone(UTC) if when.tzinfo is None else when


@app.command("errors")
def errors_command(
    run: Annotated[int | None, typer.Option("--run", metavar="ID", help="One run (default: the newest, unless "
                                                                        "--since is given).")] = None,
    since: Annotated[str | None, typer.Option("--since", metavar="WHEN", help="Only calls since then: an age "
                                                                              "(24h, 90min, 7d) or a date or time "
                                                                              "(2026-01-31T12:00); without --run, "
                                                                              "every run's.")] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Failed calls grouped by category, code, stage and model (count, share, first and last seen, an example, the
    items), latency percentiles per stage and model, retries per success, the 429 share and breaker trips."""
    from flashcard_pipeline.analytics import error_report
    from flashcard_pipeline.storage.db import open_database
    from flashcard_pipeline.storage.ledger import Ledger

    moment = parse_since(since) if since else None
    engine = open_database(db, must_exist=True)
    try:
        if run is None and moment is None:
            newest = Ledger(engine).get_run()
            if newest is None:
                raise fail("no runs yet (`flashcard-pipeline process INPUT` makes one)")
            run = newest.id
        elif run is not None and Ledger(engine).get_run(run) is None:
            raise fail(f"no run {run} in this database (`flashcard-pipeline runs list` shows them)")
        report = error_report(engine, run_id=run, since=moment)
    finally:
        engine.dispose()
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
        return
    _print(report)


def _print(report: ErrorReport) -> None:
    """A block per group (it reads at any width, unlike a nine-column table), then the latency table."""
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    say = lambda text: console.print(text, highlight=False, markup=False)  # noqa: E731
    scope = " · ".join(part for part in (f"run {report.run_id}" if report.run_id is not None else "every run",
                                         f"since {report.since.astimezone():%Y-%m-%d %H:%M}" if report.since else "")
                       if part)
    per_success = report.retries_per_success
    say(f"{scope}: {report.calls} calls · {report.failed_calls} failed · {report.retries} retries "
        f"({'-' if per_success is None else f'{per_success:.2f}'} per success) · 429s {report.rate_limited} "
        f"({report.share_429:.1%}) · breaker trips {report.breaker_trips}"
        + (f" · items failed {report.items_failed}, quarantined {report.items_quarantined}"
           if report.run_id is not None else ""))
    if not report.groups:
        say("no failed calls")
    for g in report.groups:
        say("")
        say(f"{g.category}/{g.code} · {g.stage} · {g.model}: {g.count} calls ({g.share:.1%}), "
            f"{g.first_seen.astimezone():%Y-%m-%d %H:%M:%S} – {g.last_seen.astimezone():%H:%M:%S}")
        if g.items:
            more = f" and {g.items_total - len(g.items)} more" if g.items_total > len(g.items) else ""
            say(f"  items ({g.items_total}): {', '.join(g.items)}{more}")
        say(f"  e.g. call {g.example_call_id or '?'}" + (f" of run {g.example_run_id}" if report.run_id is None
                                                         else "") + f": {g.example or ''}")
    if report.latency:
        table = Table(title="latency (ms)", title_justify="left")
        for column in ("stage", "model", "calls", "p50", "p95", "p99"):
            table.add_column(column, justify="right" if column not in ("stage", "model") else "left")
        for row in report.latency:
            table.add_row(row.stage, row.model, str(row.calls), f"{row.p50_ms:,.0f}", f"{row.p95_ms:,.0f}",
                          f"{row.p99_ms:,.0f}")
        console.print()
        console.print(table)
