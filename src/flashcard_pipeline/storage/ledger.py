"""The ledger: runs, items and their per-stage state, stage results, cards and every API call.

Reads are plain synchronous queries (the pipeline runs them in a worker thread). Writes go
through :class:`LedgerWriter`, which batches them into one transaction per flush so that the
database never limits throughput; a stage counts as done only once its batch has committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, Row, bindparam, func, insert, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from flashcard_pipeline.hooks import NO_HOOKS, RunHooks
from flashcard_pipeline.models import Flashcard, TermAnalysis, TermResult, VocabularyItem
from flashcard_pipeline.storage.records import RUN_COLUMNS, run_record
from flashcard_pipeline.storage.records import FailedItem as FailedItem
from flashcard_pipeline.storage.records import QuarantinedItem as QuarantinedItem
from flashcard_pipeline.storage.records import RunRecord as RunRecord
from flashcard_pipeline.storage.records import RunSummary as RunSummary
from flashcard_pipeline.storage.records import errors_by_code as count_error_codes
from flashcard_pipeline.storage.schema import (
    ApiCall,
    CacheCounter,
    CacheEntry,
    Card,
    Item,
    Run,
    RunStatus,
    StageResult,
    StageState,
    Worker,
    utcnow,
)

NUANCE = "nuance"
CARDS = "cards"
#: Core tables for the writer's executemany statements (ORM updates given a parameter list mean something else).
_ITEMS = Item.__table__
_ENTRIES = CacheEntry.__table__
_RESULTS = StageResult.__table__
#: The reads every cache miss makes, built once: building a statement costs more than running it on SQLite.
_CACHE_ENTRY = select(_ENTRIES.c.codec, _ENTRIES.c.value, _ENTRIES.c.expires_at).where(
    _ENTRIES.c.key == bindparam("key"))
_COUNT_HITS = (update(_ENTRIES).where(_ENTRIES.c.key == bindparam("b_key"))
               .values(hit_count=_ENTRIES.c.hit_count + bindparam("b_n"), last_hit_at=bindparam("b_now")))
_STORED_ANSWER = (select(_RESULTS.c.payload)
                  .where(_RESULTS.c.cache_key == bindparam("key"), _RESULTS.c.created_at > bindparam("after"))
                  .order_by(_RESULTS.c.id.desc()).limit(1))
#: A miss that may restore: the entry if there is one, else the answer a run stored, in one statement (one
#: row, from a one-row table joined to the entry; a traced run pays a span per statement).
_ONE_ROW = select(literal(1).label("one")).subquery("one_row")
_CACHE_ENTRY_OR_STORED = (select(_ENTRIES.c.codec, _ENTRIES.c.value, _ENTRIES.c.expires_at,
                                 _STORED_ANSWER.scalar_subquery().label("payload"))
                          .select_from(_ONE_ROW.outerjoin(_ENTRIES, _ENTRIES.c.key == bindparam("key"))))
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Keys per IN list: well under every driver's limit on bound parameters.
_IN_CHUNK = 500
STAGES = (NUANCE, CARDS)
_INGEST_BATCH = 500
#: How much of a quarantined item's last answer is kept.
LAST_ANSWER_CHARS = 20_000
#: Items that are not set aside: what a resume and the producer consider.
_NOT_QUARANTINED = (Item.nuance_state != StageState.QUARANTINED) & (Item.cards_state != StageState.QUARANTINED)


@functools.cache
def _driver_statement(statement: Any, dialect: Any) -> tuple[str, tuple[str, ...], dict[str, Any]]:
    """``statement`` compiled once for ``dialect``: its SQL, its parameters' order, their fixed values."""
    compiled = statement.compile(dialect=dialect)
    return str(compiled), tuple(compiled.positiontup or ()), compiled.construct_params({"key": None, "after": None})


@functools.cache
def _datetime_processors(dialect: Any) -> tuple[Any, Any]:
    """SQLAlchemy's own conversions of a datetime to and from what the dialect stores (SQLite: text)."""
    kind = _ENTRIES.c.expires_at.type.dialect_impl(dialect)
    return kind.bind_processor(dialect), kind.result_processor(dialect, None)


def _driver_cache_get(connection: Connection, key: str, with_results: bool,
                      results_newer_than: datetime | None) -> CachedValue | None:
    """:meth:`Ledger._cache_get` run on the driver's connection, SQLAlchemy's statement and conversions with none
    of its per-statement work (142-269 against 62-92 us a read in a run, docs/benchmarks.md). Only where nothing
    listens to the engine's statements: a tracer gets them all. No transaction is opened (the driver's reads
    outside one each see the latest commit)."""
    dialect = connection.dialect
    sql, names, fixed = _driver_statement(_CACHE_ENTRY_OR_STORED if with_results else _CACHE_ENTRY, dialect)
    to_text, from_text = _datetime_processors(dialect)
    values = {**fixed, "key": key, "after": to_text(results_newer_than or _EPOCH)}
    driver = connection.connection.dbapi_connection
    assert driver is not None
    try:
        cursor = driver.execute(sql, tuple(values[name] for name in names))
        try:
            row = cursor.fetchone()
        finally:
            cursor.close()
    except dialect.loaded_dbapi.OperationalError as error:
        raise OperationalError(sql, values, error) from error
    if row is None:
        return None
    return _found(row[0], row[1], from_text(row[2]) if row[2] is not None else None,
                  row[3] if with_results else None)


def _found(codec: str | None, value: bytes, expires: datetime | None, payload: str | None = None) -> CachedValue | None:
    """What a cache read found: the entry unless it has expired; without an entry (``codec`` None), the answer a
    run stored for the same request (``payload``), if any."""
    if codec is None:
        return None if payload is None else CachedValue("identity", payload.encode("utf-8"), restored=True)
    if expires is not None:
        if expires.tzinfo is None:
            expires = expires.replace(tzinfo=UTC)
        if expires <= utcnow():
            return None
    return CachedValue(codec, value, expires)


# --- write operations -------------------------------------------------------------------------


@dataclass(frozen=True)
class StageStarted:
    item_id: int
    stage: str


@dataclass(frozen=True)
class StageCompleted:
    item_id: int
    stage: str
    cache_key: str
    payload: str
    from_cache: bool
    run_id: int | None = None
    cards: tuple[Flashcard, ...] = ()
    #: Content checks the answer still fails (kept for review); empty when it passes.
    flags: tuple[str, ...] = ()
    #: The model that answered (a fallback's name when one took over); None: unknown.
    model: str | None = None


@dataclass(frozen=True)
class StageFailed:
    item_id: int
    stage: str
    category: str
    code: str
    message: str
    #: Set the item aside (its answers kept failing validation) instead of failing it; ``last_answer`` is kept.
    quarantined: bool = False
    last_answer: str | None = None


@dataclass(frozen=True)
class CallRecorded:
    run_id: int | None
    item_id: int | None
    stage: str
    provider: str
    model: str
    cache_key: str | None
    status: str
    http_status: int | None = None
    error_category: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float | None = None
    latency_ms: float = 0.0
    response_id: str | None = None
    call_id: str | None = None
    attempt: int | None = None
    recovery: str | None = None


@dataclass(frozen=True)
class CachePut:
    key: str
    stage: str
    provider: str
    model: str
    prompt_version: str
    value: bytes
    codec: str = "identity"
    raw_bytes: int = 0
    stored_bytes: int = 0
    expires_at: datetime | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float | None = None
    #: The stored (codec, bytes), computed by the writer: ``value`` is then the raw answer, and compressing it
    #: happens in the writer's thread, not the event loop's.
    encoded: Callable[[], tuple[str, bytes]] | None = field(default=None, compare=False, repr=False)


def _put_row(op: CachePut, now: datetime) -> dict[str, Any]:
    row = {**op.__dict__, "created_at": now, "hit_count": 0, "last_hit_at": None}
    if (encoded := row.pop("encoded")) is not None:
        row["codec"], row["value"] = encoded()
        row["stored_bytes"] = len(row["value"])
    return row


@dataclass(frozen=True)
class CacheHit:
    key: str


@dataclass(frozen=True)
class CacheCounts:
    """Hits and misses per cache type to add to the persistent counters."""

    counts: tuple[tuple[str, int, int], ...]


LedgerOp = StageStarted | StageCompleted | StageFailed | CallRecorded | CachePut | CacheHit | CacheCounts


# --- read models ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CachedValue:
    codec: str
    value: bytes
    expires_at: datetime | None = None
    #: Not a cache entry: the answer a run stored for the same request (see :meth:`Ledger.cache_get`).
    restored: bool = False


@dataclass(frozen=True)
class PendingItem:
    id: int
    item: VocabularyItem
    nuance_done: bool


@dataclass(frozen=True)
class FlaggedItem:
    """An item kept with answers that failed a content check after the re-ask: ``stage: problem`` lines."""

    position: int
    term: str
    flags: tuple[str, ...]


def _flags(stage: str, raw: str | None) -> list[str]:
    return [f"{stage}: {problem}" for problem in json.loads(raw)] if raw else []


#: What :meth:`Ledger.results` reads of an item and of a card.
_RESULT_ITEM = (Item.id, Item.position, Item.term, Item.type, Item.hints_json, Item.source_row, Item.frequency_rank)
_RESULT_CARD = (Card.item_id, Card.card_type, Card.front, Card.back, Card.tags_json, Card.honorific_level)


def _item_to_model(row: Item | Row[Any]) -> VocabularyItem:
    return VocabularyItem(position=row.position, term=row.term, type=row.type,
                          hints=json.loads(row.hints_json or "{}"), source_row=row.source_row,
                          frequency_rank=row.frequency_rank)


#: The vocabulary item an ``items`` row holds (for the lease store's claims).
item_model = _item_to_model


class Ledger:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # runs -------------------------------------------------------------------------------------

    def find_run(self, run_key: str) -> RunRecord | None:
        with Session(self.engine) as session:
            row = session.scalars(select(Run).where(Run.run_key == run_key).order_by(Run.id.desc())).first()
            return None if row is None else self._run_record(row)

    def get_run(self, run_id: int | None = None) -> RunRecord | None:
        """The run with ``run_id``, or the newest run when ``run_id`` is None."""
        with Session(self.engine) as session:
            query = select(Run).order_by(Run.id.desc())
            if run_id is not None:
                query = query.where(Run.id == run_id)
            row = session.scalars(query).first()
            return None if row is None else self._run_record(row)

    def create_run(self, *, run_key: str, input_path: str, input_sha256: str, provider: str, model: str,
                   settings: dict[str, Any], target_language: str, learner_language: str,
                   simulated: bool, items: Iterable[VocabularyItem]) -> RunRecord:
        """Create a run and its items in one transaction, so a run never exists half-ingested."""
        with Session(self.engine) as session, session.begin():
            run = Run(run_key=run_key, input_path=input_path, input_sha256=input_sha256, provider=provider,
                      model=model, settings_json=json.dumps(settings, sort_keys=True),
                      target_language=target_language, learner_language=learner_language,
                      simulated=simulated, status=RunStatus.RUNNING)
            session.add(run)
            session.flush()
            total = 0
            batch: list[dict[str, Any]] = []
            for item in items:
                batch.append({"run_id": run.id, "position": item.position, "term": item.term, "type": item.type,
                              "hints_json": json.dumps(item.hints, ensure_ascii=False),
                              "frequency_rank": item.frequency_rank,
                              "source_row": item.source_row})
                if len(batch) >= _INGEST_BATCH:
                    session.execute(insert(Item), batch)
                    total += len(batch)
                    batch = []
            if batch:
                session.execute(insert(Item), batch)
                total += len(batch)
            run.total_items = total
            session.flush()
            return self._run_record(run)

    def models_used(self) -> list[tuple[str, str]]:
        """Every (provider, model) some run was made with."""
        with Session(self.engine) as session:
            return [(p, m) for p, m in session.execute(select(Run.provider, Run.model).distinct())]

    def set_run_status(self, run_id: int, status: RunStatus) -> None:
        finished = None if status == RunStatus.RUNNING else utcnow()
        with Session(self.engine) as session, session.begin():
            session.execute(update(Run).where(Run.id == run_id).values(status=status, finished_at=finished,
                                                                       updated_at=utcnow()))

    def merge_run_metrics(self, run_id: int, metrics: dict[str, Any]) -> None:
        """Set these top-level keys of the run's metrics (others stay), so several components can publish."""
        with Session(self.engine) as session, session.begin():
            raw = session.scalar(select(Run.metrics_json).where(Run.id == run_id).with_for_update())
            merged = {**(json.loads(raw) if raw else {}), **metrics}
            session.execute(update(Run).where(Run.id == run_id).values(metrics_json=json.dumps(merged)))

    def run_metrics(self, run_id: int) -> dict[str, Any] | None:
        with Session(self.engine) as session:
            raw = session.scalar(select(Run.metrics_json).where(Run.id == run_id))
            return None if raw is None else json.loads(raw)

    def prepare_resume(self, run_id: int) -> int:
        """Return interrupted and failed stages to pending; answers already stored are kept, quarantined items
        stay aside (:meth:`retry_failed` takes them back).

        Returns how many items will be processed again.
        """
        with Session(self.engine) as session, session.begin():
            for state_col in (Item.nuance_state, Item.cards_state):
                session.execute(update(Item).where(Item.run_id == run_id,
                                                   state_col.in_([StageState.IN_FLIGHT, StageState.FAILED]))
                                .values({state_col: StageState.PENDING}))
            session.execute(update(Item).where(Item.run_id == run_id, Item.cards_state != StageState.DONE,
                                               _NOT_QUARANTINED)
                            .values(error_stage=None, error_category=None, error_code=None, error_message=None))
            return session.scalar(select(func.count()).select_from(Item).where(
                Item.run_id == run_id, Item.cards_state != StageState.DONE, _NOT_QUARANTINED)) or 0

    def retry_failed(self, run_id: int) -> list[int]:
        """Return the failed and quarantined stages of the run to pending (``process --retry-failed``); the ids of
        those items, the only ones that run processes."""
        again = [StageState.FAILED, StageState.QUARANTINED]
        with Session(self.engine) as session, session.begin():
            ids = list(session.scalars(select(Item.id).where(
                Item.run_id == run_id, Item.nuance_state.in_(again) | Item.cards_state.in_(again))
                .order_by(Item.position)))
            for state_col in (Item.nuance_state, Item.cards_state):
                session.execute(update(Item).where(Item.run_id == run_id, state_col.in_(again))
                                .values({state_col: StageState.PENDING}))
            if ids:
                for start in range(0, len(ids), _IN_CHUNK):
                    session.execute(update(Item).where(Item.id.in_(ids[start:start + _IN_CHUNK])).values(
                        error_stage=None, error_category=None, error_code=None, error_message=None,
                        last_answer=None))
            return ids

    # items ------------------------------------------------------------------------------------

    def pending_items(self, run_id: int, *, after_position: int = 0, limit: int = 200) -> list[PendingItem]:
        with Session(self.engine) as session:
            rows = session.scalars(
                select(Item).where(Item.run_id == run_id, Item.position > after_position,
                                   Item.cards_state != StageState.DONE, _NOT_QUARANTINED)
                .order_by(Item.position).limit(limit)).all()
            return [PendingItem(id=r.id, item=_item_to_model(r), nuance_done=r.nuance_state == StageState.DONE)
                    for r in rows]

    def stage_payload(self, item_id: int, stage: str) -> str | None:
        with Session(self.engine) as session:
            return session.scalar(select(StageResult.payload).where(StageResult.item_id == item_id,
                                                                    StageResult.stage == stage))

    def payload_for_cache_key(self, cache_key: str, *, newer_than: datetime | None = None) -> str | None:
        """A stored stage answer made by the request with this cache key, from any run (``newer_than``: only
        one stored after that instant, so an answer the cache's TTL has retired is not brought back)."""
        query = select(StageResult.payload).where(StageResult.cache_key == cache_key)
        if newer_than is not None:
            query = query.where(StageResult.created_at > newer_than)
        with Session(self.engine) as session:
            return session.scalars(query.order_by(StageResult.id.desc()).limit(1)).first()

    def results(self, run_id: int, *, page: int = 500) -> Iterator[TermResult]:
        """Every completed item of the run, in input order, streamed page by page. Core rows, not ORM objects:
        an export reads every item and card of the run once, and the ORM's bookkeeping was most of that read."""
        after = 0
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    select(*_RESULT_ITEM, StageResult.payload, StageResult.flags)
                    .join(StageResult, (StageResult.item_id == Item.id) & (StageResult.stage == NUANCE))
                    .where(Item.run_id == run_id, Item.cards_state == StageState.DONE, Item.position > after)
                    .order_by(Item.position).limit(page)).all()
                if not rows:
                    return
                ids = [row.id for row in rows]
                card_flags = dict(conn.execute(select(StageResult.item_id, StageResult.flags).where(
                    StageResult.item_id.in_(ids), StageResult.stage == CARDS, StageResult.flags.is_not(None))).all())
                cards: dict[int, list[Flashcard]] = {}
                for card in conn.execute(select(*_RESULT_CARD).where(Card.item_id.in_(ids))
                                         .order_by(Card.item_id, Card.ordinal)):
                    cards.setdefault(card.item_id, []).append(Flashcard(
                        card_type=card.card_type, front=card.front, back=card.back,
                        tags=json.loads(card.tags_json), honorific_level=card.honorific_level))
                for row in rows:
                    yield TermResult(item=_item_to_model(row), analysis=TermAnalysis.model_validate_json(row.payload),
                                     cards=cards.get(row.id, []),
                                     flags=_flags(NUANCE, row.flags) + _flags(CARDS, card_flags.get(row.id)))
                after = rows[-1].position

    def _items_in(self, run_id: int, state: StageState) -> list[Item]:
        """The run's items with a stage in ``state``, in input order."""
        with Session(self.engine) as session:
            return list(session.scalars(select(Item).where(
                Item.run_id == run_id, (Item.nuance_state == state) | (Item.cards_state == state))
                .order_by(Item.position)))

    def failures(self, run_id: int) -> list[FailedItem]:
        return [FailedItem(r.position, r.term, r.error_stage, r.error_category, r.error_code, r.error_message)
                for r in self._items_in(run_id, StageState.FAILED)]

    def quarantined(self, run_id: int) -> list[QuarantinedItem]:
        """The run's quarantined items, in input order, with their last answers."""
        return [QuarantinedItem(r.position, r.term, r.error_stage, r.error_code, r.error_message, r.last_answer)
                for r in self._items_in(run_id, StageState.QUARANTINED)]

    def flagged(self, run_id: int) -> list[FlaggedItem]:
        """The run's items whose stored answers failed content checks, in input order."""
        with Session(self.engine) as session:
            rows = session.execute(
                select(Item.position, Item.term, StageResult.stage, StageResult.flags)
                .join(StageResult, StageResult.item_id == Item.id)
                .where(Item.run_id == run_id, StageResult.flags.is_not(None))
                .order_by(Item.position, StageResult.stage.desc())).all()
        found: dict[int, FlaggedItem] = {}
        for position, term, stage, raw in rows:
            previous = found.get(position)
            flags = (*(previous.flags if previous else ()), *_flags(stage, raw))
            found[position] = FlaggedItem(position, term, flags)
        return list(found.values())

    def summary(self, run_id: int) -> RunSummary:
        with Session(self.engine) as session:
            s = RunSummary()
            states = session.execute(select(Item.nuance_state, Item.cards_state, func.count())
                                     .where(Item.run_id == run_id)
                                     .group_by(Item.nuance_state, Item.cards_state)).all()
            for nuance, cards, count in states:
                s.count_items(nuance, cards, count)
            calls = session.execute(select(ApiCall.status, ApiCall.error_category, func.count(),
                                           func.coalesce(func.sum(ApiCall.tokens_in), 0),
                                           func.coalesce(func.sum(ApiCall.tokens_out), 0),
                                           func.coalesce(func.sum(ApiCall.cost_usd), 0.0))
                                    .where(ApiCall.run_id == run_id)
                                    .group_by(ApiCall.status, ApiCall.error_category)).all()
            for status, category, count, tin, tout, cost in calls:
                s.count_calls(status, category, count, tin, tout, cost)
            s.cached_stages = session.scalar(
                select(func.count()).select_from(StageResult).join(Item, Item.id == StageResult.item_id)
                .where(Item.run_id == run_id, StageResult.from_cache.is_(True))) or 0
            return s

    def runs(self, limit: int | None = None) -> list[RunRecord]:
        """Every run, newest first."""
        with Session(self.engine) as session:
            return [self._run_record(row) for row in session.scalars(select(Run).order_by(Run.id.desc())
                                                                     .limit(limit))]

    def summaries(self, run_ids: Sequence[int]) -> dict[int, RunSummary]:
        """Item counts, calls, tokens and cost of several runs in two queries (no per-error detail)."""
        found = {run_id: RunSummary() for run_id in run_ids}
        if not found:
            return found
        with Session(self.engine) as session:
            for run_id, nuance, cards, count in session.execute(
                    select(Item.run_id, Item.nuance_state, Item.cards_state, func.count())
                    .where(Item.run_id.in_(found)).group_by(Item.run_id, Item.nuance_state, Item.cards_state)):
                found[run_id].count_items(nuance, cards, count)
            for run_id, status, count, tin, tout, cost in session.execute(
                    select(ApiCall.run_id, ApiCall.status, func.count(), func.coalesce(func.sum(ApiCall.tokens_in), 0),
                           func.coalesce(func.sum(ApiCall.tokens_out), 0),
                           func.coalesce(func.sum(ApiCall.cost_usd), 0.0))
                    .where(ApiCall.run_id.in_(found)).group_by(ApiCall.run_id, ApiCall.status)):
                found[run_id].count_calls(status, None, count, tin, tout, cost, by_error=False)
        return found

    def recent_activity(self, run_id: int, since: datetime) -> tuple[int, int]:
        """(API calls made, items finished) by the run since ``since``: its current pace."""
        with Session(self.engine) as session:
            calls = session.scalar(select(func.count()).select_from(ApiCall).where(
                ApiCall.run_id == run_id, ApiCall.created_at >= since)) or 0
            items = session.scalar(select(func.count()).select_from(Item).where(
                Item.run_id == run_id, Item.cards_state == StageState.DONE, Item.updated_at >= since)) or 0
        return calls, items

    def errors_by_code(self, run_id: int) -> dict[str, int]:
        """Failed calls of the run by ``category/code``, most frequent first."""
        with Session(self.engine) as session:
            rows = session.execute(select(ApiCall.error_category, ApiCall.error_code, func.count())
                                   .where(ApiCall.run_id == run_id, ApiCall.status != "ok")
                                   .group_by(ApiCall.error_category, ApiCall.error_code)).all()
        return count_error_codes([(category, code, count) for category, code, count in rows])

    def delete_run(self, run_id: int) -> bool:
        """Delete the run with its items, stage results and cards; its API calls stay in the call log (their run
        becomes unknown) and the cache keeps its answers. False when there is no such run."""
        with Session(self.engine) as session, session.begin():
            item_ids = select(Item.id).where(Item.run_id == run_id).scalar_subquery()
            # Explicit, not only ON DELETE CASCADE: a SQLite connection without foreign keys would keep orphans.
            session.execute(update(ApiCall).where(ApiCall.run_id == run_id).values(run_id=None, item_id=None))
            session.execute(Card.__table__.delete().where(Card.run_id == run_id))
            session.execute(StageResult.__table__.delete().where(StageResult.item_id.in_(item_ids)))
            session.execute(Item.__table__.delete().where(Item.run_id == run_id))
            session.execute(Worker.__table__.delete().where(Worker.run_id == run_id))
            return bool(session.execute(Run.__table__.delete().where(Run.id == run_id)).rowcount)

    def api_calls(self, run_id: int) -> list[ApiCall]:
        with Session(self.engine, expire_on_commit=False) as session:
            return list(session.scalars(select(ApiCall).where(ApiCall.run_id == run_id).order_by(ApiCall.id)))

    # cache ------------------------------------------------------------------------------------

    def cache_get(self, key: str, *, with_results: bool = False, results_newer_than: datetime | None = None,
                  connection: Connection | None = None) -> CachedValue | None:
        """The stored (encoded) value for ``key``, unless it has expired. Core, not ORM: this is the hot path.

        ``with_results``: when there is no entry, the answer a run stored for the same request (newer than
        ``results_newer_than``, so a TTL still retires it), read on the same connection: a paid answer whose
        cache copy was lost or cleared is found by the one read a miss costs.
        ``connection``: read on it (a :func:`~flashcard_pipeline.storage.db.local_reader`), so that its next read
        sees what was committed meanwhile (on the driver, or through SQLAlchemy ending its transaction after);
        else on a connection from the pool.
        """
        if connection is not None:
            if not connection.dispatch.before_cursor_execute:
                return _driver_cache_get(connection, key, with_results, results_newer_than)
            try:  # something watches the statements (the tracer): it sees this one too
                return self._cache_get(connection, key, with_results, results_newer_than)
            finally:
                connection.rollback()
        with self.engine.connect() as conn:
            return self._cache_get(conn, key, with_results, results_newer_than)

    @staticmethod
    def _cache_get(conn: Connection, key: str, with_results: bool,
                   results_newer_than: datetime | None) -> CachedValue | None:
        if with_results:
            row = conn.execute(_CACHE_ENTRY_OR_STORED, {"key": key, "after": results_newer_than or _EPOCH}).one()
            return _found(row.codec, row.value, row.expires_at, row.payload)
        row = conn.execute(_CACHE_ENTRY, {"key": key}).first()
        return None if row is None else _found(row.codec, row.value, row.expires_at)

    def cache_get_many(self, keys: Sequence[str], *, with_results: bool = False,
                       results_newer_than: datetime | None = None) -> dict[str, CachedValue]:
        """:meth:`cache_get` for many keys at once (those found), a few statements for a whole page of items."""
        found: dict[str, CachedValue] = {}
        now = utcnow()
        with self.engine.connect() as conn:
            for start in range(0, len(keys), _IN_CHUNK):
                chunk = list(keys[start:start + _IN_CHUNK])
                for row in conn.execute(select(_ENTRIES.c.key, _ENTRIES.c.codec, _ENTRIES.c.value,
                                               _ENTRIES.c.expires_at).where(_ENTRIES.c.key.in_(chunk))):
                    expires = row.expires_at
                    if expires is not None and expires.tzinfo is None:
                        expires = expires.replace(tzinfo=UTC)
                    if expires is None or expires > now:
                        found[row.key] = CachedValue(row.codec, row.value, expires)
                missing = [key for key in chunk if key not in found]
                if not with_results or not missing:
                    continue
                for key, payload in conn.execute(
                        select(_RESULTS.c.cache_key, _RESULTS.c.payload)
                        .where(_RESULTS.c.cache_key.in_(missing),
                               _RESULTS.c.created_at > (results_newer_than or _EPOCH))
                        .order_by(_RESULTS.c.id.desc())):
                    found.setdefault(key, CachedValue("identity", payload.encode("utf-8"), restored=True))
        return found

    # writes -----------------------------------------------------------------------------------

    def write_batch(self, ops: Sequence[LedgerOp]) -> None:
        """Apply ``ops`` in one transaction, one statement per kind of operation (executemany or multi-row), not
        one per operation: the writer's thread competes with the event loop for the GIL.

        Grouping by kind keeps the outcome of applying them in order, because within a batch each (item, stage)
        is started before it completes or fails; cache hits are counted after the last put of their entry.
        """
        if not ops:
            return
        dialect = self.engine.dialect.name
        now = utcnow()
        groups: dict[type, list[Any]] = {}
        hits: dict[str, int] = {}
        for op in ops:
            groups.setdefault(type(op), []).append(op)
            if isinstance(op, CachePut):
                hits.pop(op.key, None)  # a put writes the entry afresh, with no hits
            elif isinstance(op, CacheHit):
                hits[op.key] = hits.get(op.key, 0) + 1
        with self.engine.begin() as conn:  # Core: the ORM session's bookkeeping was a third of a batch's time
            for started in _by_stage(groups.get(StageStarted, ())):
                conn.execute(_stage_update(started[0].stage, StageState.IN_FLIGHT),
                             [{"b_id": op.item_id, "b_now": now} for op in started])
            if puts := groups.get(CachePut):
                last = {op.key: op for op in puts}  # the last put of a key wins, as in order
                rows = [_put_row(op, now) for op in last.values()]
                _upsert_many(conn, dialect, CacheEntry.__table__, rows, ("key",))
            if completed := groups.get(StageCompleted):
                self._complete_stages(conn, dialect, completed, now)
            for failed in _by_stage(groups.get(StageFailed, ())):
                conn.execute(_stage_update(failed[0].stage, StageState.FAILED), [
                    {"b_id": op.item_id, "b_now": now, "b_cat": op.category, "b_code": op.code,
                     "b_msg": op.message[:2000],
                     "b_state": StageState.QUARANTINED if op.quarantined else StageState.FAILED,
                     "b_answer": op.last_answer[:LAST_ANSWER_CHARS] if op.last_answer is not None else None}
                    for op in failed])
            if hits:
                conn.execute(_COUNT_HITS, [{"b_key": key, "b_n": n, "b_now": now} for key, n in hits.items()])
            for op in groups.get(CacheCounts, ()):
                for cache_type, hits_n, misses in op.counts:
                    self._add_counts(conn, dialect, cache_type, hits_n, misses)
            if calls := groups.get(CallRecorded):
                conn.execute(insert(ApiCall.__table__), [{**op.__dict__, "created_at": now} for op in calls])

    @staticmethod
    def _add_counts(conn: Connection, dialect: str, cache_type: str, hits: int, misses: int) -> None:
        module = postgresql if dialect == "postgresql" else sqlite
        table = CacheCounter.__table__
        stmt = module.insert(table).values(cache_type=cache_type, hits=hits, misses=misses)
        conn.execute(stmt.on_conflict_do_update(
            index_elements=["cache_type"],
            set_={"hits": table.c.hits + hits, "misses": table.c.misses + misses}))

    @staticmethod
    def _complete_stages(conn: Connection, dialect: str, ops: list[StageCompleted], now: datetime) -> None:
        results = {(op.item_id, op.stage): {
            "item_id": op.item_id, "stage": op.stage, "cache_key": op.cache_key, "payload": op.payload,
            "from_cache": op.from_cache, "created_at": now, "model": op.model,
            "flags": json.dumps(list(op.flags), ensure_ascii=False) if op.flags else None} for op in ops}
        _upsert_many(conn, dialect, StageResult.__table__, list(results.values()), ("item_id", "stage"))
        carded = {op.item_id: op for op in ops if op.stage == CARDS}  # the last answer of an item wins
        if carded:
            conn.execute(Card.__table__.delete().where(Card.item_id.in_(list(carded))))
            cards = [{"run_id": op.run_id, "item_id": op.item_id, "ordinal": i, "card_type": card.card_type.value,
                      "front": card.front, "back": card.back, "tags_json": json.dumps(card.tags, ensure_ascii=False),
                      "honorific_level": card.honorific_level.value}
                     for op in carded.values() for i, card in enumerate(op.cards, start=1)]
            if cards:
                conn.execute(insert(Card.__table__), cards)
        for done in _by_stage(ops):
            conn.execute(_stage_update(done[0].stage, StageState.DONE),
                         [{"b_id": item_id, "b_now": now} for item_id in dict.fromkeys(op.item_id for op in done)])

    @staticmethod
    def _run_record(row: Run) -> RunRecord:
        return run_record({column: getattr(row, column) for column in RUN_COLUMNS})


def _by_stage(ops: Iterable[Any]) -> list[list[Any]]:
    """Operations grouped by their stage (each group is one statement), in a fixed order."""
    groups: dict[str, list[Any]] = {}
    for op in ops:
        groups.setdefault(op.stage, []).append(op)
    return [groups[stage] for stage in sorted(groups)]


@functools.cache
def _upsert_statement(dialect: str, table: Any, columns: tuple[str, ...], keys: tuple[str, ...]) -> Any:
    """INSERT .. ON CONFLICT DO UPDATE (every column but the keys takes the new row's value), made once per shape
    so SQLAlchemy compiles it once: a multi-row VALUES statement is compiled anew for every batch size."""
    module = postgresql if dialect == "postgresql" else sqlite
    stmt = module.insert(table)
    return stmt.on_conflict_do_update(index_elements=list(keys),
                                      set_={c: stmt.excluded[c] for c in columns if c not in keys})


def _upsert_many(conn: Connection, dialect: str, table: Any, rows: list[dict[str, Any]],
                 keys: tuple[str, ...]) -> None:
    """Upsert ``rows`` (all with the same columns) with one executemany."""
    conn.execute(_upsert_statement(dialect, table, tuple(rows[0]), keys), rows)


@functools.cache
def _stage_update(stage: str, state: StageState) -> Any:
    """The executemany UPDATE that moves a stage of items to ``state`` (IN_FLIGHT: started, DONE, FAILED: failed
    or quarantined as ``b_state`` says; only DONE moves a stage that is done), made once: building and
    cache-keying a statement per batch cost more than running it. Parameters: ``b_id``, ``b_now``, and for a
    failure its error's."""
    column, attempts = _stage_columns(stage)
    values: dict[str, Any] = {"updated_at": bindparam("b_now")}
    if state is StageState.IN_FLIGHT:
        values.update({column.key: StageState.IN_FLIGHT, attempts.key: attempts + 1})
    elif state is StageState.DONE:
        values[column.key] = StageState.DONE
        if stage == CARDS:
            values.update(error_stage=None, error_category=None, error_code=None, error_message=None,
                          last_answer=None)
    else:
        values.update({column.key: bindparam("b_state"), "error_stage": stage, "error_category": bindparam("b_cat"),
                       "error_code": bindparam("b_code"), "error_message": bindparam("b_msg"),
                       "last_answer": bindparam("b_answer")})
    statement = update(_ITEMS).where(_ITEMS.c.id == bindparam("b_id"))
    if state is not StageState.DONE:
        # A stage once done stays done: a late write of a worker that lost the item (it started or failed the
        # stage before a pause; another worker finished it meanwhile) must not reopen it.
        statement = statement.where(_ITEMS.c[column.key] != StageState.DONE)
    return statement.values(values)


def _stage_columns(stage: str) -> tuple[Any, Any]:
    if stage == NUANCE:
        return Item.nuance_state, Item.nuance_attempts
    if stage == CARDS:
        return Item.cards_state, Item.cards_attempts
    raise ValueError(f"unknown stage {stage!r}")


class LedgerWriter:
    """Collects ledger writes and commits them in batches from a worker thread.

    ``submit`` never blocks the event loop. A batch is committed every ``flush_interval``
    seconds or as soon as ``max_batch`` operations wait, whichever comes first, and holds at most
    ``max_batch`` operations; ``flush`` waits until everything submitted so far is durable. A failed
    commit is re-raised to the next caller of ``submit`` or ``flush`` rather than lost.

    ``room`` is the backpressure: it waits while ``high_water`` operations are waiting. A writer that
    falls behind a busy event loop (its thread needs the GIL back after every statement) would otherwise
    let them pile up: at 32 in flight, a 10,000-word run once wrote batches of 40,000 operations,
    80 MB more at its peak, and that much work a crash would lose.
    """

    def __init__(self, ledger: Ledger, *, flush_interval: float = 0.1, max_batch: int = 512,
                 high_water: int = 4096, hooks: RunHooks = NO_HOOKS) -> None:
        self.ledger = ledger
        self.hooks = hooks
        self.flush_interval = flush_interval
        self.max_batch = max_batch
        self.high_water = max(high_water, max_batch)
        self._pending: list[LedgerOp] = []
        self._written = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._lock = asyncio.Lock()
        self._closing = False
        self.batches_written = 0

    async def __aenter__(self) -> LedgerWriter:
        self._task = asyncio.create_task(self._run(), name="ledger-writer")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        await self.flush()

    def submit(self, *ops: LedgerOp) -> None:
        self._raise_if_failed()
        self._pending.extend(ops)
        if len(self._pending) >= self.max_batch:
            self._wake.set()

    async def room(self) -> None:
        """Return once fewer than ``high_water`` operations wait to be written (at once, mostly)."""
        while len(self._pending) >= self.high_water:
            self._raise_if_failed()
            self._wake.set()
            self._written.clear()
            await self._written.wait()
        self._raise_if_failed()

    async def flush(self) -> None:
        async with self._lock:
            self._raise_if_failed()
            while self._pending:
                batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
                try:
                    with self.hooks.ledger_batch(len(batch)):
                        await asyncio.to_thread(self.ledger.write_batch, batch)
                except Exception as exc:
                    self._error = exc
                    self._written.set()  # a waiter in room() sees the error
                    raise
                self.batches_written += 1
                self._written.set()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"ledger write failed: {self._error}") from self._error

    async def _run(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_interval)
            self._wake.clear()
            try:
                await self.flush()
            except Exception:
                return
