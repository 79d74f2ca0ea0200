"""``flashcard-pipeline breaker status|isolate|close|reset``: look at and steer the circuit breakers of
running ``process`` commands through the database (so a second terminal can do it)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from flashcard_pipeline.cli.output import fail
from flashcard_pipeline.config import CircuitBreakerSettings, read_settings
from flashcard_pipeline.errors import ConfigurationError
from flashcard_pipeline.storage.breaker_store import BreakerStore, CircuitSnapshotRecord
from flashcard_pipeline.storage.db import open_database
from flashcard_pipeline.storage.ledger import Ledger
from flashcard_pipeline.storage.schema import utcnow

breaker_app = typer.Typer(help="Circuit breakers: state and history; isolate or close a circuit, also while a "
                               "process runs.", no_args_is_help=True)

DbOption = Annotated[str | None, typer.Option("--db", help="Database URL or SQLite file (default as for process).")]
CircuitArgument = Annotated[str | None, typer.Argument(
    metavar="CIRCUIT", help="provider/model, e.g. openrouter/openai/gpt-4o-mini (may be left out when only one "
                              "circuit is known).", show_default=False)]
ReasonOption = Annotated[str, typer.Option("--reason", "-r", help="Why (recorded with the action; required).")]
AllOption = Annotated[bool, typer.Option("--all", help="Every known circuit.")]


def _store(db: str | None, *, create: bool = False) -> BreakerStore:
    """The breaker tables; only an isolation of a ``--new`` circuit may be the first thing a database holds."""
    return BreakerStore(open_database(db, must_exist=not create))


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _liveness(snapshot: CircuitSnapshotRecord, now: datetime) -> str:
    if snapshot.live(now):
        return "running"
    return "stale" if snapshot.active else "stopped"


@breaker_app.command("status")
def status(
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    history: Annotated[int, typer.Option(help="How many recent transitions to show.", min=0, max=1000)] = 10,
    every: Annotated[bool, typer.Option("--all", help="Every process's view, not only the running ones' (or "
                                                      "the last one's).")] = False,
) -> None:
    """Each circuit as running processes report it, standing isolations, and the latest transitions."""
    store = _store(db)
    try:
        now = utcnow()
        snapshots = store.snapshots()
        if not every:
            snapshots = _current(snapshots, now)
        events = store.events(limit=history) if history else []
        latest = store.latest_commands()
        commands = store.recent_commands(limit=history) if history else []
    finally:
        store.engine.dispose()
    isolated = {name: command for name, command in latest.items() if command.action == "isolate"}
    if as_json:
        data: dict[str, Any] = {
            "circuits": [s.to_dict(now) for s in snapshots],
            "isolated": {name: command.to_dict() for name, command in isolated.items()},
            "transitions": [e.to_dict() for e in events],
            "commands": [c.to_dict() for c in commands],
        }
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    console = Console(soft_wrap=True)
    if not snapshots and not isolated:
        console.print("no circuit reported yet (a `process` run reports its circuits while it runs)")
    if snapshots:
        table = Table(title="circuits")
        for column in ("circuit", "state", "since", "window failed/calls", "ok / failed / refused", "process"):
            table.add_column(column)
        for s in snapshots:
            window = s.stats.get("window") or {}
            state = s.state + (f" until {_when(s.open_until)}" if s.open_until else "")
            failed = f"{window.get('failures', 0)}/{window.get('throughput', 0)}"
            totals = f"{s.success_count} / {s.failure_count} / {s.rejected_count}"
            table.add_row(s.circuit, state, _when(s.since), failed, totals, f"{s.owner} ({_liveness(s, now)})")
        console.print(table)
    for name, command in isolated.items():
        console.print(f"[yellow]{name} is isolated[/] since {_when(command.created_at)} by {command.requested_by}: "
                      f"{command.reason} (command #{command.id}; `breaker close {name} -r ...` releases it)",
                      highlight=False)
    if events:
        table = Table(title=f"last {len(events)} transitions")
        for column in ("when", "circuit", "change", "why", "by"):
            table.add_column(column)
        for e in events:
            change = f"{e.from_state} -> {e.to_state}" + (" (manual)" if e.manual else "")
            table.add_row(_when(e.created_at), e.circuit, change, e.reason, e.source or e.owner)
        console.print(table)
    elif history and commands:
        console.print(f"{len(commands)} command(s) recorded, none applied by a running process yet")


def _current(snapshots: list[CircuitSnapshotRecord], now: datetime) -> list[CircuitSnapshotRecord]:
    """Per circuit: the running processes' views, or else the most recent one."""
    kept: list[CircuitSnapshotRecord] = []
    for name in dict.fromkeys(s.circuit for s in snapshots):
        mine = [s for s in snapshots if s.circuit == name]
        live = [s for s in mine if s.live(now)]
        kept.extend(live or [max(mine, key=lambda s: s.updated_at)])
    return kept


def _targets(store: BreakerStore, circuit: str | None, every: bool, new: bool = False) -> list[str]:
    """The circuits to act on. A name no process, command or run has used is refused (exit 2) unless ``new``
    says it is meant: a typo must not be stored as an isolation that waits for a circuit that never comes."""
    known = sorted({*store.known_circuits(),
                    *(f"{provider}/{model}" for provider, model in Ledger(store.engine).models_used())})
    if every:
        if circuit is not None:
            raise fail("give a circuit or --all, not both")
        if not known:
            raise fail("no circuit is known yet; name one (provider/model)")
        return known
    if circuit is None:
        if len(known) == 1:
            return known
        listed = ", ".join(known) if known else "none yet"
        raise fail(f"name the circuit (provider/model) or use --all; known circuits: {listed}")
    provider, _, model = circuit.partition("/")
    if not provider or not model:
        raise fail(f"a circuit is named provider/model (e.g. openrouter/openai/gpt-4o-mini), got {circuit!r}")
    if circuit not in known and not new:
        listed = ", ".join(known) if known else "none yet"
        hint = "; to isolate a model before its first run, add --new" if new is not None else ""
        raise fail(f"unknown circuit {circuit!r}; known circuits: {listed}{hint}")
    return [circuit]


def _poll_interval() -> float:
    try:
        return read_settings(CircuitBreakerSettings).poll_interval
    except ConfigurationError:
        return CircuitBreakerSettings.model_fields["poll_interval"].default


def _command(action: str, circuit: str | None, reason: str, every: bool, db: str | None,
             new: bool | None = None) -> None:
    if not reason.strip():
        raise fail("--reason must not be empty")
    store = _store(db, create=bool(new))
    try:
        targets = _targets(store, circuit, every, new)
        now = utcnow()
        running = {s.circuit for s in store.snapshots() if s.live(now)}
        for name in targets:
            command = store.add_command(name, action, reason)
            typer.echo(f"{action} {name}: recorded as command #{command.id}", nl=False)
            if name in running:
                typer.echo(f"; running processes apply it within {_poll_interval():g} s")
            elif action == "isolate":
                typer.echo("; no running process uses this circuit now, it is isolated from its first call "
                           "(also in later runs)")
            else:
                typer.echo("; no running process uses this circuit now")
    finally:
        store.engine.dispose()


@breaker_app.command("isolate")
def isolate(circuit: CircuitArgument = None, reason: ReasonOption = ..., every: AllOption = False,
            new: Annotated[bool, typer.Option("--new", help="The circuit is one no run has used yet (without "
                                                            "it an unknown name is refused as a typo).")] = False,
            db: DbOption = None) -> None:
    """Hold a circuit open: its calls wait (up to CB_MAX_WAIT) until `breaker close`, also in later runs."""
    _command("isolate", circuit, reason, every, db, new)


@breaker_app.command("close")
def close(circuit: CircuitArgument = None, reason: ReasonOption = ..., every: AllOption = False,
          db: DbOption = None) -> None:
    """Close a circuit (ends an isolation or a break) and clear its failure window."""
    _command("close", circuit, reason, every, db)


@breaker_app.command("reset")
def reset(circuit: CircuitArgument = None, reason: ReasonOption = ..., every: AllOption = False,
          db: DbOption = None) -> None:
    """Like close, and also zero the circuit's counters."""
    _command("reset", circuit, reason, every, db)
