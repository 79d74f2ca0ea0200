"""The ledger's tables. Alembic migrations (storage/migrations) create them; this module is the
ORM view the code uses. Column sizes stay portable between SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# The enums and the clock live in records.py (which loads without SQLAlchemy); the models use them from here.
from flashcard_pipeline.storage.records import RunStatus as RunStatus
from flashcard_pipeline.storage.records import StageState as StageState
from flashcard_pipeline.storage.records import utcnow as utcnow


class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_key: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), default=RunStatus.RUNNING)
    input_path: Mapped[str] = mapped_column(Text)
    input_sha256: Mapped[str] = mapped_column(String(64))
    provider: Mapped[str] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(200))
    settings_json: Mapped[str] = mapped_column(Text, default="{}")
    target_language: Mapped[str] = mapped_column(String(60))
    learner_language: Mapped[str] = mapped_column(String(60))
    simulated: Mapped[bool] = mapped_column(Boolean, default=False)
    total_items: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    metrics_json: Mapped[str | None] = mapped_column(Text, nullable=True)


class Item(Base):
    """One vocabulary item of a run, with its state in each stage."""

    __tablename__ = "items"
    __table_args__ = (UniqueConstraint("run_id", "position", name="uq_items_run_position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    term: Mapped[str] = mapped_column(Text)
    type: Mapped[str | None] = mapped_column(String(40), nullable=True)
    hints_json: Mapped[str] = mapped_column(Text, default="{}")
    source_row: Mapped[int | None] = mapped_column(Integer, nullable=True)
    frequency_rank: Mapped[int | None] = mapped_column(Integer, nullable=True)
    nuance_state: Mapped[str] = mapped_column(String(16), default=StageState.PENDING, index=True)
    nuance_attempts: Mapped[int] = mapped_column(Integer, default=0)
    cards_state: Mapped[str] = mapped_column(String(16), default=StageState.PENDING, index=True)
    cards_attempts: Mapped[int] = mapped_column(Integer, default=0)
    error_stage: Mapped[str | None] = mapped_column(String(16), nullable=True)
    error_category: Mapped[str | None] = mapped_column(String(32), nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: The last (invalid) answer of a quarantined item, as the model sent it (bounded).
    last_answer: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: The worker (``workers.id``) holding the item while it works on it, until ``lease_expires_at``; then any
    #: worker of the run may take it over. NULL: nobody holds it (always so for a single ``process``).
    lease_owner: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class Worker(Base):
    """One ``worker`` process on a run (host, pid), with its heartbeat: ``runs show`` and ``monitor`` list them."""

    __tablename__ = "workers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    #: ``running`` until it stops (``stopped``); a running worker whose heartbeat is older than its lease is gone.
    status: Mapped[str] = mapped_column(String(16), default="running")
    concurrency: Mapped[int] = mapped_column(Integer, default=1)
    lease_seconds: Mapped[float] = mapped_column(Float)
    items_done: Mapped[int] = mapped_column(Integer, default=0)
    items_failed: Mapped[int] = mapped_column(Integer, default=0)
    in_flight: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_heartbeat: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class StageResult(Base):
    """A validated stage answer that belongs to a run's item (durable even if the cache is cleared)."""

    __tablename__ = "stage_results"
    __table_args__ = (UniqueConstraint("item_id", "stage", name="uq_stage_results_item_stage"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    stage: Mapped[str] = mapped_column(String(16))
    cache_key: Mapped[str] = mapped_column(String(64), index=True)
    payload: Mapped[str] = mapped_column(Text)
    from_cache: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: JSON list of the content checks the answer failed after its re-ask (kept for review); NULL when it passed.
    flags: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: The model that answered (a fallback model's name when one took the item over); NULL before migration 0004.
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)


class Card(Base):
    __tablename__ = "cards"
    __table_args__ = (UniqueConstraint("item_id", "ordinal", name="uq_cards_item_ordinal"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    ordinal: Mapped[int] = mapped_column(Integer)
    card_type: Mapped[str] = mapped_column(String(32))
    front: Mapped[str] = mapped_column(Text)
    back: Mapped[str] = mapped_column(Text)
    tags_json: Mapped[str] = mapped_column(Text, default="[]")
    honorific_level: Mapped[str] = mapped_column(String(16))


class ApiCall(Base):
    """Every request sent to a provider, successful or not: the basis of cost and error reports."""

    __tablename__ = "api_calls"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"), index=True,
                                                nullable=True)
    item_id: Mapped[int | None] = mapped_column(ForeignKey("items.id", ondelete="SET NULL"), nullable=True)
    stage: Mapped[str] = mapped_column(String(16))
    provider: Mapped[str] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(200))
    cache_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    status: Mapped[str] = mapped_column(String(8))
    http_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error_category: Mapped[str | None] = mapped_column(String(32), nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    tokens_in: Mapped[int] = mapped_column(Integer, default=0)
    tokens_out: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_ms: Mapped[float] = mapped_column(Float, default=0.0)
    response_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    #: The attempt's id, also in its log lines and its error (``details.call_id``).
    call_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    #: 1 for a request's first call, 2 for its first retry or re-ask, ...
    attempt: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: The recovery strategy that shaped this call (reask_with_errors, larger_budget, fallback_model), if any.
    recovery: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CacheEntry(Base):
    """A paid answer, addressed by the hash of everything that shaped it."""

    __tablename__ = "cache_entries"
    # Keyed by a hash: without a rowid SQLite keeps the key once instead of in the table and an index.
    __table_args__: ClassVar[dict[str, Any]] = {"sqlite_with_rowid": False}

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    stage: Mapped[str] = mapped_column(String(16))
    provider: Mapped[str] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(200))
    prompt_version: Mapped[str] = mapped_column(String(40))
    codec: Mapped[str] = mapped_column(String(32), default="identity")
    value: Mapped[bytes] = mapped_column(LargeBinary)
    raw_bytes: Mapped[int] = mapped_column(Integer, default=0)
    stored_bytes: Mapped[int] = mapped_column(Integer, default=0)
    tokens_in: Mapped[int] = mapped_column(Integer, default=0)
    tokens_out: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[float | None] = mapped_column(Float, nullable=True)
    hit_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_hit_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class CacheCounter(Base):
    """Hits and misses per cache type, summed over every run (for ``cache stats``)."""

    __tablename__ = "cache_counters"

    cache_type: Mapped[str] = mapped_column(String(16), primary_key=True)
    hits: Mapped[int] = mapped_column(Integer, default=0)
    misses: Mapped[int] = mapped_column(Integer, default=0)


class CircuitBreakerCommand(Base):
    """An operator's `breaker isolate|close|reset`, read by every running process (a broadcast log)."""

    __tablename__ = "circuit_breaker_commands"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    circuit: Mapped[str] = mapped_column(String(240), index=True)
    action: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    requested_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CircuitBreakerEvent(Base):
    """One transition or manual action of a circuit in some process."""

    __tablename__ = "circuit_breaker_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    circuit: Mapped[str] = mapped_column(String(240), index=True)
    from_state: Mapped[str] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    manual: Mapped[bool] = mapped_column(Boolean, default=False)
    reason: Mapped[str] = mapped_column(Text)
    source: Mapped[str | None] = mapped_column(String(200), nullable=True)
    failure_count: Mapped[int] = mapped_column(Integer, default=0)
    throughput: Mapped[int] = mapped_column(Integer, default=0)
    failure_ratio: Mapped[float] = mapped_column(Float, default=0.0)
    break_duration: Mapped[float | None] = mapped_column(Float, nullable=True)
    half_open_attempts: Mapped[int] = mapped_column(Integer, default=0)
    owner: Mapped[str] = mapped_column(String(200))
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CircuitBreakerSnapshot(Base):
    """The latest state of a circuit as one process sees it, refreshed while it runs (its heartbeat)."""

    __tablename__ = "circuit_breaker_states"

    circuit: Mapped[str] = mapped_column(String(240), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200), primary_key=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"), nullable=True)
    state: Mapped[str] = mapped_column(String(16))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    since: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    open_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    failure_count: Mapped[int] = mapped_column(Integer, default=0)
    success_count: Mapped[int] = mapped_column(Integer, default=0)
    rejected_count: Mapped[int] = mapped_column(Integer, default=0)
    stats_json: Mapped[str] = mapped_column(Text, default="{}")
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
