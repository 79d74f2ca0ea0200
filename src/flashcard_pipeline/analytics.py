"""Error analytics from the ledger: failed calls grouped by what went wrong and where, latency percentiles, retries,
429s and breaker trips (``flashcard-pipeline errors``). Everything is read from ``api_calls``, ``items`` and
``circuit_breaker_events``: the report says what the ledger says, for one run or for every run since a moment."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from flashcard_pipeline.storage.schema import ApiCall, CircuitBreakerEvent, Item, StageState

#: Affected items listed per group (the count is always complete).
ITEMS_SHOWN = 10
PERCENTILES = (50, 95, 99)


@dataclass(frozen=True)
class ErrorGroup:
    """Failed calls that share category, code, stage and model."""

    category: str
    code: str
    stage: str
    model: str
    count: int
    #: Of every failed call in the report.
    share: float
    first_seen: datetime
    last_seen: datetime
    example: str | None
    example_call_id: str | None
    example_run_id: int | None
    #: Distinct affected terms, in the order they first failed (at most ITEMS_SHOWN).
    items: list[str]
    items_total: int


@dataclass(frozen=True)
class LatencyRow:
    stage: str
    model: str
    calls: int
    p50_ms: float
    p95_ms: float
    p99_ms: float


@dataclass(frozen=True)
class ErrorReport:
    run_id: int | None
    since: datetime | None
    calls: int
    failed_calls: int
    successes: int
    #: Calls made again for the same request (attempt 2 and later): retries and re-asks.
    retries: int
    rate_limited: int
    breaker_trips: int
    items_failed: int
    items_quarantined: int
    groups: list[ErrorGroup] = field(default_factory=list)
    latency: list[LatencyRow] = field(default_factory=list)

    @property
    def retries_per_success(self) -> float | None:
        return self.retries / self.successes if self.successes else None

    @property
    def share_429(self) -> float:
        return self.rate_limited / self.calls if self.calls else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["since"] = self.since.isoformat() if self.since else None
        for group in data["groups"]:
            group["first_seen"] = group["first_seen"].isoformat()
            group["last_seen"] = group["last_seen"].isoformat()
        data["retries_per_success"] = self.retries_per_success
        data["share_429"] = self.share_429
        return data


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list (p in (0, 100]): a latency some call really had."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def error_report(engine: Engine, *, run_id: int | None = None, since: datetime | None = None) -> ErrorReport:
    """The report for one run (``run_id``), every call since ``since``, or both filters at once."""
    where = []
    if run_id is not None:
        where.append(ApiCall.run_id == run_id)
    if since is not None:
        where.append(ApiCall.created_at >= since)
    with Session(engine) as session:
        rows = session.execute(
            select(ApiCall.stage, ApiCall.model, ApiCall.status, ApiCall.http_status, ApiCall.error_category,
                   ApiCall.error_code, ApiCall.error_message, ApiCall.latency_ms, ApiCall.attempt,
                   ApiCall.created_at, ApiCall.call_id, ApiCall.run_id, Item.term)
            .outerjoin(Item, Item.id == ApiCall.item_id).where(*where).order_by(ApiCall.id)).all()
        trips = select(func.count()).select_from(CircuitBreakerEvent).where(CircuitBreakerEvent.to_state == "open")
        if run_id is not None:
            trips = trips.where(CircuitBreakerEvent.run_id == run_id)
        if since is not None:
            trips = trips.where(CircuitBreakerEvent.created_at >= since)
        breaker_trips = session.scalar(trips) or 0
        failed_items = quarantined_items = 0
        if run_id is not None:
            states = session.execute(select(Item.nuance_state, Item.cards_state).where(Item.run_id == run_id)).all()
            quarantined_items = sum(StageState.QUARANTINED in pair for pair in states)
            failed_items = sum(StageState.FAILED in pair for pair in states)

    failed = [row for row in rows if row.status != "ok"]
    builders: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for row in failed:
        key = (row.error_category or "unknown", row.error_code or "unknown", row.stage, row.model)
        group = builders.get(key)
        if group is None:
            group = builders[key] = {"count": 0, "first": row.created_at, "last": row.created_at,
                                     "example": row.error_message, "call_id": row.call_id, "run_id": row.run_id,
                                     "items": {}}
        group["count"] += 1
        group["last"] = row.created_at
        if row.term is not None:
            group["items"].setdefault(row.term, None)
    groups = [ErrorGroup(category=c, code=k, stage=s, model=m, count=g["count"], share=g["count"] / len(failed),
                         first_seen=_aware(g["first"]), last_seen=_aware(g["last"]), example=g["example"],
                         example_call_id=g["call_id"], example_run_id=g["run_id"],
                         items=list(g["items"])[:ITEMS_SHOWN], items_total=len(g["items"]))
              for (c, k, s, m), g in builders.items()]
    groups.sort(key=lambda g: (-g.count, g.category, g.code, g.stage, g.model))

    latencies: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        latencies.setdefault((row.stage, row.model), []).append(float(row.latency_ms or 0.0))
    latency = []
    for (stage, model), values in sorted(latencies.items()):
        values.sort()
        p50, p95, p99 = (percentile(values, p) for p in PERCENTILES)
        latency.append(LatencyRow(stage, model, len(values), round(p50, 1), round(p95, 1), round(p99, 1)))

    return ErrorReport(
        run_id=run_id, since=since, calls=len(rows), failed_calls=len(failed),
        successes=len(rows) - len(failed), retries=sum(1 for row in rows if (row.attempt or 1) > 1),
        rate_limited=sum(1 for row in rows if row.http_status == 429), breaker_trips=breaker_trips,
        items_failed=failed_items, items_quarantined=quarantined_items, groups=groups, latency=latency)


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value
