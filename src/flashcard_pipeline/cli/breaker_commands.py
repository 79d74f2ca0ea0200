"""``flashcard-pipeline breaker status|isolate|close|reset``: look at and steer the circuit breakers of
running ``process`` commands through the database (so a second terminal can do it)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flashcard_pipeline.cli.options import DbOption, JsonOption
from flashcard_pipeline.cli.output import command_group, fail
from flashcard_pipeline.cli.root import app
from flashcard_pipeline.errors import ConfigurationError

if TYPE_CHECKING:
    from flashcard_pipeline.storage.breaker_store import BreakerStore
    from flashcard_pipeline.storage.records import CircuitSnapshotRecord

breaker_app = command_group("Circuit breakers: state and history; isolate or close a circuit, also while a "
                            "process runs.")
app.add_typer(breaker_app, name="breaker")

CircuitArgument = Annotated[str | None, typer.Argument(
    metavar="CIRCUIT", help="provider/model, e.g. openrouter/openai/gpt-4o-mini (may be left out when only one "
                              "circuit is known).", show_default=False)]
ReasonOption = Annotated[str, typer.Option("--reason", "-r", metavar="WHY",
                                           help="Why (recorded with the action; required).")]
AllOption = Annotated[bool, typer.Option("--all", help="Every known circuit.")]


def _store(db: str | None, *, create: bool = False) -> BreakerStore:
    """The breaker tables; only an isolation of a ``--new`` circuit may be the first thing a database holds."""
    from flashcard_pipeline.storage.breaker_store import BreakerStore
    from flashcard_pipeline.storage.db import open_database

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
    as_json: JsonOption = False,
    history: Annotated[int, typer.Option(metavar="N", help="How many recent transitions to show.", min=0,
                                         max=1000)] = 10,
    every: Annotated[bool, typer.Option("--all", help="Every process's view, not only the running ones' (or "
                                                      "the last one's).")] = False,
) -> None:
    """Each circuit as running processes report it, standing isolations, and the latest transitions."""
    from flashcard_pipeline import quick_settings
    from flashcard_pipeline.storage.status_reader import open_status

    store = open_status(db, quick_settings.read())
    try:
        now = datetime.now(UTC)
        snapshots = store.snapshots()
        if not every:
            snapshots = _current(snapshots, now)
        events = store.events(limit=history) if history else []
        latest = store.latest_commands()
        commands = store.recent_commands(limit=history) if history else []
    finally:
        store.close()
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
    from rich.console import Console

    console = Console()
    if not snapshots and not isolated:
        console.print("no circuit reported yet (a `process` run reports its circuits while it runs)")
    if snapshots:
        console.print("[bold]circuits[/]")
        for snapshot in snapshots:
            print_circuit(console, snapshot, now)
    for name, command in isolated.items():
        console.print(f"[yellow]{name} is isolated[/] since {_when(command.created_at)} by {command.requested_by}: "
                      f"{command.reason} (command #{command.id}; `breaker close {name} -r ...` releases it)",
                      highlight=False)
    if events:
        console.print(f"[bold]last {len(events)} transitions[/]")
        for e in events:
            manual = " (manual)" if e.manual else ""
            console.print(f"  {_when(e.created_at)}  {e.circuit}  {e.from_state} -> {e.to_state}{manual}: "
                          f"{e.reason} (by {e.source or e.owner})", highlight=False, markup=False)
    elif history and commands:
        console.print(f"{len(commands)} command(s) recorded, none applied by a running process yet")


def print_circuit(console: Any, snapshot: CircuitSnapshotRecord, now: datetime) -> None:
    """A circuit on two lines: its name whole on the first (it is what `breaker isolate` takes, so no width may
    cut it), its state and counters on the second, wrapped between words."""
    from rich.padding import Padding
    from rich.text import Text

    window = snapshot.stats.get("window") or {}
    state = snapshot.state + (f" until {_when(snapshot.open_until)}" if snapshot.open_until else "")
    console.print(f"  {snapshot.circuit}", highlight=False, markup=False, soft_wrap=True)
    console.print(Padding(Text(f"{state} since {_when(snapshot.since)} · window {window.get('failures', 0)} failed "
                               f"of {window.get('throughput', 0)} calls · ok {snapshot.success_count}, failed "
                               f"{snapshot.failure_count}, refused {snapshot.rejected_count} · {snapshot.owner} "
                               f"({_liveness(snapshot, now)})"), (0, 0, 0, 6)))


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
    from flashcard_pipeline.storage.ledger import Ledger

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
    from flashcard_pipeline.config import CircuitBreakerSettings, read_settings

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
        now = datetime.now(UTC)
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
