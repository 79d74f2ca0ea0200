"""What the status commands read from the database, as plain records, and how a row becomes one.

Both readers build them here: the SQLAlchemy stores (ledger, breaker store, lease store) and the stdlib reader of
``storage/status_reader.py`` that lets ``runs``, ``breaker status``, ``ratelimit status`` and ``monitor`` start
without loading SQLAlchemy. So this module imports nothing heavy, and one row means one record on either path.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, overload


def utcnow() -> datetime:
    return datetime.now(UTC)


@overload
def aware(value: datetime) -> datetime: ...
@overload
def aware(value: datetime | None) -> datetime | None: ...
def aware(value: datetime | None) -> datetime | None:
    """SQLite hands back the UTC times it stores without their zone."""
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


class RunStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    ABORTED = "aborted"


class StageState(StrEnum):
    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    DONE = "done"
    FAILED = "failed"
    #: Set aside: its answers kept failing validation (the last one is in ``items.last_answer``); only
    #: ``process --retry-failed`` tries it again.
    QUARANTINED = "quarantined"


# --- runs ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunRecord:
    id: int
    run_key: str
    status: str
    total_items: int
    simulated: bool
    provider: str
    model: str
    target_language: str
    learner_language: str
    created_at: datetime
    settings: dict[str, Any] = field(default_factory=dict)
    input_path: str = ""
    input_sha256: str = ""
    updated_at: datetime | None = None
    finished_at: datetime | None = None


#: The ``runs`` columns a :class:`RunRecord` is made of.
RUN_COLUMNS = ("id", "run_key", "status", "total_items", "simulated", "provider", "model", "target_language",
               "learner_language", "created_at", "settings_json", "input_path", "input_sha256", "updated_at",
               "finished_at")


def run_record(row: Mapping[str, Any]) -> RunRecord:
    return RunRecord(id=row["id"], run_key=row["run_key"], status=row["status"], total_items=row["total_items"],
                     simulated=bool(row["simulated"]), provider=row["provider"], model=row["model"],
                     target_language=row["target_language"], learner_language=row["learner_language"],
                     created_at=aware(row["created_at"]), settings=json.loads(row["settings_json"] or "{}"),
                     input_path=row["input_path"], input_sha256=row["input_sha256"],
                     updated_at=aware(row["updated_at"]), finished_at=aware(row["finished_at"]))


@dataclass(frozen=True)
class FailedItem:
    position: int
    term: str
    stage: str | None
    category: str | None
    code: str | None
    message: str | None


@dataclass(frozen=True)
class QuarantinedItem:
    """An item set aside because its answers kept failing validation, with the last of them."""

    position: int
    term: str
    stage: str | None
    code: str | None
    message: str | None
    last_answer: str | None


@dataclass
class RunSummary:
    total: int = 0
    done: int = 0
    #: Failed items, quarantined ones included.
    failed: int = 0
    pending: int = 0
    quarantined: int = 0
    api_calls: int = 0
    api_errors: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    cached_stages: int = 0
    by_error: dict[str, int] = field(default_factory=dict)

    def count_items(self, nuance: str, cards: str, count: int) -> None:
        """Add ``count`` items whose stages are in these states."""
        self.total += count
        if cards == StageState.DONE:
            self.done += count
        elif StageState.QUARANTINED in (nuance, cards):
            self.failed += count
            self.quarantined += count
        elif StageState.FAILED in (nuance, cards):
            self.failed += count
        else:
            self.pending += count

    def count_calls(self, status: str, category: str | None, count: int, tokens_in: Any, tokens_out: Any,
                    cost: Any, *, by_error: bool = True) -> None:
        """Add ``count`` calls of one status (and error category): their tokens and cost (the sums a database
        returns: PostgreSQL's are Decimals)."""
        self.api_calls += count
        self.tokens_in += int(tokens_in)
        self.tokens_out += int(tokens_out)
        self.cost_usd += float(cost)
        if status != "ok":
            self.api_errors += count
            if by_error:
                self.by_error[category or "unknown"] = self.by_error.get(category or "unknown", 0) + count


def errors_by_code(rows: Iterable[tuple[str | None, str | None, int]]) -> dict[str, int]:
    """``category/code -> count`` from (category, code, count) rows, most frequent first."""
    return {f"{category or 'unknown'}/{code or 'unknown'}": count
            for category, code, count in sorted(rows, key=lambda r: -r[2])}


# --- circuit breakers ---------------------------------------------------------------------------------------------

#: A process that has not refreshed its circuit snapshot for this long is shown as stale (killed, or hung).
CIRCUIT_STALE_AFTER = timedelta(seconds=30)


@dataclass(frozen=True)
class BreakerCommand:
    id: int
    circuit: str
    action: str
    reason: str
    requested_by: str
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "created_at": self.created_at.isoformat()}


COMMAND_COLUMNS = ("id", "circuit", "action", "reason", "requested_by", "created_at")


def command_record(row: Mapping[str, Any]) -> BreakerCommand:
    return BreakerCommand(id=row["id"], circuit=row["circuit"], action=row["action"], reason=row["reason"],
                          requested_by=row["requested_by"], created_at=aware(row["created_at"]) or utcnow())


@dataclass(frozen=True)
class BreakerEventRecord:
    id: int
    circuit: str
    from_state: str
    to_state: str
    manual: bool
    reason: str
    source: str | None
    failure_count: int
    throughput: int
    failure_ratio: float
    break_duration: float | None
    half_open_attempts: int
    owner: str
    run_id: int | None
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "created_at": self.created_at.isoformat()}


EVENT_COLUMNS = ("id", "circuit", "from_state", "to_state", "manual", "reason", "source", "failure_count",
                 "throughput", "failure_ratio", "break_duration", "half_open_attempts", "owner", "run_id",
                 "created_at")


def event_record(row: Mapping[str, Any]) -> BreakerEventRecord:
    return BreakerEventRecord(
        id=row["id"], circuit=row["circuit"], from_state=row["from_state"], to_state=row["to_state"],
        manual=bool(row["manual"]), reason=row["reason"], source=row["source"], failure_count=row["failure_count"],
        throughput=row["throughput"], failure_ratio=row["failure_ratio"], break_duration=row["break_duration"],
        half_open_attempts=row["half_open_attempts"], owner=row["owner"], run_id=row["run_id"],
        created_at=aware(row["created_at"]) or utcnow())


@dataclass(frozen=True)
class CircuitSnapshotRecord:
    circuit: str
    owner: str
    run_id: int | None
    state: str
    active: bool
    since: datetime
    open_until: datetime | None
    failure_count: int
    success_count: int
    rejected_count: int
    stats: dict[str, Any]
    updated_at: datetime

    def live(self, now: datetime | None = None) -> bool:
        """Reported by a process that is still running (stopped cleanly: not live; silent too long: stale)."""
        return self.active and (now or utcnow()) - self.updated_at < CIRCUIT_STALE_AFTER

    def to_dict(self, now: datetime | None = None) -> dict[str, Any]:
        data = asdict(self)
        for key in ("since", "open_until", "updated_at"):
            value = data[key]
            data[key] = None if value is None else value.isoformat()
        data["live"] = self.live(now)
        return data


SNAPSHOT_COLUMNS = ("circuit", "owner", "run_id", "state", "active", "since", "open_until", "failure_count",
                    "success_count", "rejected_count", "stats_json", "updated_at")


def snapshot_record(row: Mapping[str, Any]) -> CircuitSnapshotRecord:
    return CircuitSnapshotRecord(
        circuit=row["circuit"], owner=row["owner"], run_id=row["run_id"], state=row["state"],
        active=bool(row["active"]), since=aware(row["since"]) or utcnow(), open_until=aware(row["open_until"]),
        failure_count=row["failure_count"], success_count=row["success_count"],
        rejected_count=row["rejected_count"], stats=json.loads(row["stats_json"]),
        updated_at=aware(row["updated_at"]) or utcnow())


# --- workers ------------------------------------------------------------------------------------------------------

WORKER_RUNNING = "running"
WORKER_STOPPED = "stopped"


@dataclass(frozen=True)
class WorkerRecord:
    """One worker of a run as ``runs show`` and ``monitor`` list it."""

    id: int
    run_id: int
    host: str
    pid: int
    status: str
    concurrency: int
    lease_seconds: float
    items_done: int
    items_failed: int
    in_flight: int
    started_at: datetime
    last_heartbeat: datetime
    stopped_at: datetime | None

    def state(self, now: datetime) -> str:
        """``running``, ``stopped``, or ``lost`` (marked running, but its heartbeat is older than its lease: its
        items go to the others)."""
        if self.status != WORKER_RUNNING:
            return self.status
        return WORKER_RUNNING if now - self.last_heartbeat < timedelta(seconds=self.lease_seconds) else "lost"

    def to_dict(self, now: datetime) -> dict[str, object]:
        return {"id": self.id, "host": self.host, "pid": self.pid, "state": self.state(now),
                "concurrency": self.concurrency, "items_done": self.items_done, "items_failed": self.items_failed,
                "in_flight": self.in_flight, "started_at": self.started_at.isoformat(),
                "last_heartbeat": self.last_heartbeat.isoformat(),
                "heartbeat_age_s": round((now - self.last_heartbeat).total_seconds(), 1),
                "stopped_at": None if self.stopped_at is None else self.stopped_at.isoformat()}


WORKER_COLUMNS = ("id", "run_id", "host", "pid", "status", "concurrency", "lease_seconds", "items_done",
                  "items_failed", "in_flight", "started_at", "last_heartbeat", "stopped_at")


def worker_record(row: Mapping[str, Any]) -> WorkerRecord:
    return WorkerRecord(
        id=row["id"], run_id=row["run_id"], host=row["host"], pid=row["pid"], status=row["status"],
        concurrency=row["concurrency"], lease_seconds=row["lease_seconds"], items_done=row["items_done"],
        items_failed=row["items_failed"], in_flight=row["in_flight"],
        started_at=aware(row["started_at"]), last_heartbeat=aware(row["last_heartbeat"]),
        stopped_at=aware(row["stopped_at"]))
