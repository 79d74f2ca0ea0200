"""Circuit breakers in the database, so that ``flashcard-pipeline breaker status|isolate|close`` works
from a second terminal against a running ``process`` (or several, sharing one PostgreSQL database).

* ``circuit_breaker_commands`` is a broadcast log of operator commands. Every running process polls
  it (every ``CB_POLL_INTERVAL`` seconds, 1 by default) and applies each new command to its own
  breaker of that name, if it has one: a command never makes a circuit, so a process reports only
  the circuits it calls. Isolation holds until someone closes the circuit, so a circuit whose latest
  command is ``isolate`` is isolated the moment a process makes it (at start or at its first call).
* ``circuit_breaker_events`` keeps every transition and manual action with its reason.
* ``circuit_breaker_states`` holds each process's latest view of each circuit, refreshed on every
  transition and every few seconds while it runs, so ``status`` can tell live from stale.

The breakers themselves never touch the database: :class:`BreakerSync` is the adapter between an engine and
the tables. It subscribes to the engine's events on the event loop (transitions, circuits being made) and does
the I/O in a worker thread, batching what happened since its last poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal, Self, get_args

from sqlalchemy import Engine, delete, func, insert, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from flashcard_pipeline.errors import brief
from flashcard_pipeline.resilience import (
    CircuitBreaker,
    CircuitCreated,
    CircuitTransition,
    Clock,
    Resilience,
    SystemClock,
)
from flashcard_pipeline.storage.records import (
    CIRCUIT_STALE_AFTER,
    COMMAND_COLUMNS,
    EVENT_COLUMNS,
    SNAPSHOT_COLUMNS,
    BreakerCommand,
    BreakerEventRecord,
    CircuitSnapshotRecord,
    aware,
    command_record,
    event_record,
    snapshot_record,
)
from flashcard_pipeline.storage.schema import (
    CircuitBreakerCommand,
    CircuitBreakerEvent,
    CircuitBreakerSnapshot,
    utcnow,
)

__all__ = [
    "ACTIONS",
    "Action",
    "BreakerCommand",
    "BreakerEventRecord",
    "BreakerStore",
    "BreakerSync",
    "CircuitSnapshotRecord",
    "process_owner",
    "requester",
]

log = logging.getLogger("flashcard_pipeline.storage.breaker_store")

Action = Literal["isolate", "close", "reset"]
ACTIONS: tuple[str, ...] = get_args(Action)
#: A process that has not refreshed its snapshot for this long is shown as stale (killed, or hung).
STALE_AFTER = CIRCUIT_STALE_AFTER
#: The source of a transition that followed another process's trip (``peer:<owner>``).
PEER = "peer:"


def process_owner() -> str:
    """``host:pid`` of this process: whose view of a circuit a snapshot or event is."""
    return f"{socket.gethostname()}:{os.getpid()}"


def requester() -> str:
    """``user@host`` for the command log."""
    try:
        user = getpass.getuser()
    except Exception:  # no login name in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _parse(value: str | None) -> datetime | None:
    return None if value is None else aware(datetime.fromisoformat(value))


class BreakerStore:
    """Synchronous reads and writes of the three tables (call them from a worker thread in async code)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- commands -------------------------------------------------------------------------------------

    def add_command(self, circuit: str, action: str, reason: str, requested_by: str | None = None) -> BreakerCommand:
        if action not in ACTIONS:
            raise ValueError(f"unknown breaker action {action!r} (expected one of {', '.join(ACTIONS)})")
        if not reason.strip():
            raise ValueError("a breaker command needs a reason")
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            row = CircuitBreakerCommand(circuit=circuit, action=action, reason=reason.strip(),
                                        requested_by=requested_by or requester(), created_at=utcnow())
            session.add(row)
            session.flush()
            return self._command(row)

    def last_command_id(self) -> int:
        with Session(self.engine) as session:
            return session.scalar(select(func.max(CircuitBreakerCommand.id))) or 0

    def commands_after(self, command_id: int, limit: int = 500) -> list[BreakerCommand]:
        with Session(self.engine) as session:
            rows = session.scalars(select(CircuitBreakerCommand).where(CircuitBreakerCommand.id > command_id)
                                   .order_by(CircuitBreakerCommand.id).limit(limit))
            return [self._command(row) for row in rows]

    def latest_commands(self) -> dict[str, BreakerCommand]:
        """The newest command of each circuit: a circuit whose newest is ``isolate`` is held open."""
        newest = (select(func.max(CircuitBreakerCommand.id)).group_by(CircuitBreakerCommand.circuit)
                  .scalar_subquery())
        with Session(self.engine) as session:
            rows = session.scalars(select(CircuitBreakerCommand).where(CircuitBreakerCommand.id.in_(newest)))
            return {row.circuit: self._command(row) for row in rows}

    def recent_commands(self, limit: int = 20) -> list[BreakerCommand]:
        with Session(self.engine) as session:
            rows = session.scalars(select(CircuitBreakerCommand).order_by(CircuitBreakerCommand.id.desc())
                                   .limit(limit))
            return [self._command(row) for row in rows][::-1]

    # -- what processes report ------------------------------------------------------------------------

    def write(self, transitions: Sequence[CircuitTransition], snapshots: Sequence[Mapping[str, Any]], *,
              owner: str, run_id: int | None = None, active: bool = True) -> None:
        """Append ``transitions`` and replace ``owner``'s snapshot of each circuit, in one transaction."""
        now = utcnow()
        with Session(self.engine) as session, session.begin():
            if transitions:
                session.execute(insert(CircuitBreakerEvent), [
                    {"circuit": t.circuit, "from_state": t.from_state.value, "to_state": t.to_state.value,
                     "manual": t.manual, "reason": t.reason, "source": (t.source or None) and t.source[:200],
                     "failure_count": t.failure_count, "throughput": t.throughput,
                     "failure_ratio": t.failure_ratio, "break_duration": t.break_duration,
                     "half_open_attempts": t.half_open_attempts, "owner": owner, "run_id": run_id,
                     "created_at": t.wall} for t in transitions])
            for stats in snapshots:
                values = {
                    "circuit": stats["circuit"], "owner": owner, "run_id": run_id, "state": stats["state"],
                    "active": active, "since": _parse(stats["since"]), "open_until": _parse(stats["open_until"]),
                    "failure_count": stats["failure_count"], "success_count": stats["success_count"],
                    "rejected_count": stats["rejected_count"], "stats_json": json.dumps(stats, sort_keys=True),
                    "updated_at": now,
                }
                session.execute(_upsert(self.engine.dialect.name, values))

    def last_event_id(self) -> int:
        with Session(self.engine) as session:
            return int(session.scalar(select(func.max(CircuitBreakerEvent.id))) or 0)

    def trips_after(self, event_id: int, *, owner: str) -> list[BreakerEventRecord]:
        """Circuits other processes opened by themselves since ``event_id``: what a peer follows.

        A trip that was itself a follow (its source is a peer) is left out, so a trip travels one hop, never back.
        """
        query = (select(CircuitBreakerEvent)
                 .where(CircuitBreakerEvent.id > event_id, CircuitBreakerEvent.to_state == "open",
                        CircuitBreakerEvent.manual.is_(False), CircuitBreakerEvent.owner != owner,
                        or_(CircuitBreakerEvent.source.is_(None), ~CircuitBreakerEvent.source.startswith(PEER)))
                 .order_by(CircuitBreakerEvent.id))
        with Session(self.engine) as session:
            return [self._event(r) for r in session.scalars(query)]

    def snapshots(self) -> list[CircuitSnapshotRecord]:
        with Session(self.engine) as session:
            rows = session.scalars(select(CircuitBreakerSnapshot).order_by(CircuitBreakerSnapshot.circuit,
                                                                           CircuitBreakerSnapshot.updated_at.desc()))
            return [snapshot_record({c: getattr(r, c) for c in SNAPSHOT_COLUMNS}) for r in rows]

    def events(self, limit: int = 20, circuit: str | None = None) -> list[BreakerEventRecord]:
        """The newest ``limit`` transitions and manual actions, oldest first."""
        query = select(CircuitBreakerEvent).order_by(CircuitBreakerEvent.id.desc()).limit(limit)
        if circuit is not None:
            query = query.where(CircuitBreakerEvent.circuit == circuit)
        with Session(self.engine) as session:
            return [self._event(r) for r in session.scalars(query)][::-1]

    @staticmethod
    def _event(r: CircuitBreakerEvent) -> BreakerEventRecord:
        return event_record({c: getattr(r, c) for c in EVENT_COLUMNS})

    def known_circuits(self) -> list[str]:
        """Every circuit some process has reported or some command has named."""
        with Session(self.engine) as session:
            names = set(session.scalars(select(CircuitBreakerSnapshot.circuit).distinct()))
            names.update(session.scalars(select(CircuitBreakerCommand.circuit).distinct()))
        return sorted(names)

    def forget_stopped(self) -> int:
        """Drop the snapshots of processes that stopped cleanly (the events stay)."""
        with Session(self.engine) as session, session.begin():
            result = session.execute(delete(CircuitBreakerSnapshot).where(CircuitBreakerSnapshot.active.is_(False)))
            return int(getattr(result, "rowcount", 0) or 0)

    @staticmethod
    def _command(row: CircuitBreakerCommand) -> BreakerCommand:
        return command_record({c: getattr(row, c) for c in COMMAND_COLUMNS})


def _steer(breaker: CircuitBreaker, command: BreakerCommand) -> None:
    source = f"command #{command.id} from {command.requested_by}"
    control = breaker.manual_control
    if command.action == "isolate":
        control.isolate(command.reason, source=source)
    elif command.action == "close":
        control.close(command.reason, source=source)
    else:
        control.reset(command.reason, source=source)


def _upsert(dialect: str, values: dict[str, Any]) -> Any:
    module = postgresql if dialect == "postgresql" else sqlite
    stmt = module.insert(CircuitBreakerSnapshot.__table__).values(**values)
    keys = ("circuit", "owner")
    return stmt.on_conflict_do_update(index_elements=list(keys),
                                      set_={k: v for k, v in values.items() if k not in keys})


class BreakerSync:
    """Connects the breakers of a running engine to the database for as long as the block lasts.

    On entry it applies standing isolations (to circuits made later as they are made); every
    ``poll_interval`` seconds it applies new operator commands and writes the transitions since the last
    poll and the snapshot of any circuit first used since; every ``heartbeat`` seconds it refreshes the
    snapshots even when nothing happened. A database error is logged and retried at the next poll: it
    never stops the run.
    """

    def __init__(self, store: BreakerStore, engine: Resilience, *, run_id: int | None = None,
                 clock: Clock | None = None, poll_interval: float = 1.0, heartbeat: float = 5.0,
                 owner: str | None = None, follow_peers: bool = True) -> None:
        self.store = store
        self.follow_peers = follow_peers
        self.engine = engine
        self.run_id = run_id
        self.clock: Clock = clock or SystemClock()
        self.poll_interval = poll_interval
        self.heartbeat = heartbeat
        self.owner = owner or process_owner()
        self.applied: list[BreakerCommand] = []
        #: The standing isolations by circuit (newest command ``isolate``): applied to a circuit when it is made.
        self._isolations: dict[str, BreakerCommand] = {}
        self._pending: list[CircuitTransition] = []
        self._last_id = 0
        self._last_event = 0
        self._beat = -float("inf")
        self._reported: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        store = self.store
        self._last_id = await asyncio.to_thread(store.last_command_id)
        self._last_event = await asyncio.to_thread(store.last_event_id)
        standing = await asyncio.to_thread(store.latest_commands)
        self.engine.events.subscribe(CircuitTransition, self._record)
        self.engine.events.subscribe(CircuitCreated, self._on_created)
        for command in standing.values():
            if command.action == "isolate":
                self._apply(command)
        await self._flush(force=True)
        self._task = asyncio.create_task(self._loop(), name="breaker-sync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.engine.events.unsubscribe(CircuitTransition, self._record)
        self.engine.events.unsubscribe(CircuitCreated, self._on_created)
        try:
            await self._flush(force=True, active=False)
        except Exception as exc:
            log.warning("could not save the final circuit breaker state: %s", brief(exc))

    async def poll(self) -> list[BreakerCommand]:
        """Apply the commands issued since the last poll and write what changed; returns the commands."""
        commands = await asyncio.to_thread(self.store.commands_after, self._last_id)
        for command in commands:
            self._last_id = max(self._last_id, command.id)
            self._apply(command)
        if self.follow_peers:
            await self._follow()
        await self._flush()
        return commands

    async def _follow(self) -> None:
        """Open the circuits that another process (a worker of the same run, another run on the same provider)
        saw trip: the provider is the same, so its failures are evidence here too."""
        for trip in await asyncio.to_thread(self.store.trips_after, self._last_event, owner=self.owner):
            self._last_event = max(self._last_event, trip.id)
            breaker = self.engine.breakers.get(trip.circuit)
            if breaker is not None:
                breaker.manual_control.trip(f"followed {trip.owner}: {trip.reason}", source=f"{PEER}{trip.owner}")

    async def _loop(self) -> None:
        while True:
            await self.clock.sleep(self.poll_interval)
            try:
                await self.poll()
            except Exception as exc:
                log.warning("circuit breaker database sync failed (retrying in %g s): %s", self.poll_interval,
                            brief(exc))

    def _record(self, transition: CircuitTransition) -> None:
        self._pending.append(transition)

    def _apply(self, command: BreakerCommand) -> None:
        """Apply ``command`` to the circuits of that name this process has; remember an isolation for the rest."""
        if command.action not in ACTIONS:
            log.warning("ignoring breaker command #%d: unknown action %r", command.id, command.action)
            self.applied.append(command)
            return
        if command.action == "isolate":
            self._isolations[command.circuit] = command
        else:
            self._isolations.pop(command.circuit, None)
        breaker = self.engine.breakers.get(command.circuit)
        if breaker is not None:
            _steer(breaker, command)
        self.applied.append(command)

    def _on_created(self, made: CircuitCreated) -> None:
        command = self._isolations.get(made.breaker.name)
        if command is not None:
            _steer(made.breaker, command)

    async def _flush(self, *, force: bool = False, active: bool = True) -> None:
        events, self._pending = self._pending, []
        now = self.clock.monotonic()
        circuits = set(self.engine.breakers)
        if not events and not force and now - self._beat < self.heartbeat and circuits <= self._reported:
            return
        snapshots = list(self.engine.breaker_snapshot().values())
        try:
            await asyncio.to_thread(self.store.write, events, snapshots, owner=self.owner, run_id=self.run_id,
                                    active=active)
        except Exception:
            self._pending[:0] = events
            raise
        self._beat = now
        self._reported |= circuits
