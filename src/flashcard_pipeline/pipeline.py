"""The pipeline: pending items flow through stage 1 and stage 2 on a bounded pool of tasks.

Each stage answer is looked up in the content-addressed cache first; a miss becomes one
provider call wrapped by the :class:`~flashcard_pipeline.resilience.CallPolicy` (where retry,
circuit breaker and rate limiter plug in). Every attempt is recorded in the ledger, and an item
is done only when its cards are committed, so a killed run resumes without paying twice for
anything it had finished.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeVar

from pydantic import BaseModel

from flashcard_pipeline import checks
from flashcard_pipeline.cache.backends import DatabaseCacheBackend
from flashcard_pipeline.cache.compressed_cache import CacheRecord, CompressedCache
from flashcard_pipeline.checks import check_analysis, check_cards
from flashcard_pipeline.errors import (
    APIError,
    BudgetExceededError,
    ContentCheckError,
    InvalidResponseError,
    MalformedJSONError,
    SchemaViolationError,
    StructuredError,
    TruncatedOutputError,
)
from flashcard_pipeline.hooks import NO_HOOKS, NOTE, LeaseLost, Note, RunHooks
from flashcard_pipeline.llm.types import ChatMessage, ChatRequest, ChatResponse
from flashcard_pipeline.logging_config import bind, bound, new_call_id
from flashcard_pipeline.models import FlashcardSet, TermAnalysis
from flashcard_pipeline.recovery import RecoveryPlan, Strategy
from flashcard_pipeline.resilience import CallContext, CallPolicy, DirectPolicy, ProviderAnswer
from flashcard_pipeline.stages import (
    CARDS,
    NUANCE,
    StageRequest,
    StageSettings,
    build_cards_request,
    build_nuance_request,
    parse_cards,
    parse_nuance,
)
from flashcard_pipeline.storage.ledger import (
    CallRecorded,
    FailedItem,
    FlaggedItem,
    Ledger,
    LedgerWriter,
    PendingItem,
    QuarantinedItem,
    RunRecord,
    StageCompleted,
    StageFailed,
    StageStarted,
)
from flashcard_pipeline.storage.schema import RunStatus

log = logging.getLogger(__name__)
recovery_log = logging.getLogger("flashcard_pipeline.recovery")
T = TypeVar("T", bound=BaseModel)
R = TypeVar("R")
Check = Callable[[T], list[str]]
#: Answers that fail validation: re-asked with their errors, quarantined when that does not help.
INVALID_ANSWERS = (MalformedJSONError, SchemaViolationError)

#: Seconds after the run's first paid call before the content checks' model loads in a thread: the first requests
#: are on the wire by then, and the load (which holds the GIL) overlaps the wait for their answers.
WARM_AFTER = 0.1
CONTENT_HEADING = "Your answer failed these checks:"
VALIDATION_HEADING = "Your answer was rejected: it is not a JSON object that follows the schema. The validator said:"


def reask_message(problems: list[str], heading: str = CONTENT_HEADING) -> str:
    """What the model is told when its answer failed the content checks, or validation (``heading``)."""
    listed = "\n".join(f"- {problem}" for problem in problems)
    return (f"{heading}\n{listed}\nAnswer again with the whole JSON object, following the "
            "schema, with these problems fixed.")


def validation_problems(error: StructuredError) -> list[str]:
    """What the validator said about an invalid answer, to quote back to the model."""
    errors = error.details.get("errors")
    if isinstance(errors, list) and errors:
        return [str(e) for e in errors]
    return [error.message]


@dataclass
class _Reask:
    """What a stage request carries from one attempt to the next: the failed answer and what was wrong with it
    (content problems, or validation errors), sent back with the request; a larger output budget after a cut-off
    answer; the attempt count and the last answer (kept when the item is quarantined)."""

    messages: tuple[ChatMessage, ...] = ()
    #: The strategy that put ``messages`` there: ``content_check`` or ``reask_with_errors``.
    kind: str | None = None
    content_reasked: bool = False
    max_tokens: int | None = None
    attempts: int = 0
    last_answer: str | None = None
    #: A fallback model answers this request.
    fallback: bool = False

    @property
    def recovery(self) -> str | None:
        """The strategy that shapes the next call, for its ``api_calls`` row."""
        if self.messages:
            return self.kind
        if self.max_tokens is not None:
            return Strategy.LARGER_BUDGET.value
        return Strategy.FALLBACK_MODEL.value if self.fallback else None


class _Quarantined(Exception):
    """An item whose answers kept failing validation, with the last of them."""

    def __init__(self, error: StructuredError, last_answer: str | None) -> None:
        super().__init__(str(error))
        self.error = error
        self.last_answer = last_answer


@dataclass(frozen=True)
class _CallMark:
    """One attempt's identity in the ledger and the logs."""

    id: str
    attempt: int
    recovery: str | None


class ChatClient(Protocol):
    async def complete(self, request: ChatRequest) -> ChatResponse: ...


#: Whether this process may still pay for the item's answers (a worker: it still holds the item's lease).
ItemGuard = Callable[[PendingItem], Awaitable[bool]]


class ItemSource(Protocol):
    """Where items come from instead of the ledger's pending list: a worker's leases (:mod:`..leasing`)."""

    async def next_page(self, want: int) -> list[PendingItem]:
        """Up to ``want`` items to process next; an empty list when the run has nothing left for this process."""
        ...


@dataclass
class RunStats:
    """Live counters that the progress display reads; only the event loop writes them."""

    total: int = 0
    done: int = 0
    failed: int = 0
    in_flight: int = 0
    requests: int = 0
    api_errors: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    cache_hits: int = 0
    already_done: int = 0
    #: Items whose answers still failed a content check after the re-ask (kept, flagged for review).
    flagged: int = 0
    #: Items set aside because their answers kept failing validation (counted in ``failed`` too).
    quarantined: int = 0
    #: Items dropped before a paid call because another worker took them over (neither done nor failed here).
    handed_over: int = 0
    #: Recovery strategies applied, by name.
    recoveries: dict[str, int] = field(default_factory=dict)
    started_at: float = field(default_factory=time.monotonic)
    pause_reason: str | None = None
    rate_limited: int = 0
    rate_limit_label: str | None = None
    rate_limit_until: float = 0.0
    #: The requests limit and why it is what it is (``480/min, 429s are not rate-related``), or None.
    limit_status: str | None = None
    #: The simulated provider spends no money: its cost is what the named model would have cost.
    simulated: bool = False

    def note_rate_limit(self, label: str, seconds: float, now: float | None = None) -> None:
        """A 429 made every caller of ``label``'s limits wait ``seconds``."""
        self.rate_limited += 1
        until = (time.monotonic() if now is None else now) + seconds
        if until > self.rate_limit_until:
            self.rate_limit_label, self.rate_limit_until = label, until

    def rate_limit_wait(self, now: float | None = None) -> float:
        """Seconds until calls paused by the last 429 go on (0 when none are paused)."""
        return max(0.0, self.rate_limit_until - (time.monotonic() if now is None else now))

    def requests_per_minute(self, now: float | None = None) -> float:
        elapsed = (time.monotonic() if now is None else now) - self.started_at
        return self.requests * 60.0 / elapsed if elapsed > 0 else 0.0


@dataclass(frozen=True)
class RunOutcome:
    run_id: int
    status: RunStatus
    stats: RunStats
    failures: list[FailedItem]
    abort_reason: str | None = None
    flagged: list[FlaggedItem] = field(default_factory=list)
    quarantined: list[QuarantinedItem] = field(default_factory=list)


class _Abort(Exception):
    def __init__(self, error: StructuredError) -> None:
        super().__init__(str(error))
        self.error = error


class Pipeline:
    def __init__(self, *, ledger: Ledger, client: ChatClient, settings: StageSettings,
                 policy: CallPolicy | None = None, cache: CompressedCache | None = None,
                 concurrency: int = 8, force: bool = False,
                 max_cost: float | None = None, flush_interval: float = 0.1,
                 clock: Callable[[], float] = time.perf_counter, recovery: RecoveryPlan | None = None,
                 only: frozenset[int] | None = None, hooks: RunHooks = NO_HOOKS,
                 source: ItemSource | None = None, durable: bool = False, guard: ItemGuard | None = None) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.ledger = ledger
        self.client = client
        self.settings = settings
        self.policy = policy or DirectPolicy()
        self.cache = cache or CompressedCache(DatabaseCacheBackend(ledger))
        self.concurrency = concurrency
        self.force = force
        self.max_cost = max_cost
        self.flush_interval = flush_interval
        self.clock = clock
        #: Told of every item, stage, attempt and ledger batch (telemetry; nothing by default).
        self.hooks = hooks
        self.recovery = recovery or RecoveryPlan()
        #: Process only these items (``--retry-failed``); None: every pending item.
        self.only = only
        #: Items from here instead of the ledger's pending list (a worker's leases).
        self.source = source
        #: Commit each paid answer before its task makes another call: a process killed mid-run then loses only
        #: the answers of the calls it had in flight (workers, whose items another worker takes over).
        self.durable = durable
        #: Asked before every paid call, retries and re-asks included (a worker: does it still hold the lease?);
        #: an item it refuses is dropped without the call. None (a lone ``process``): nothing to ask.
        self.guard = guard
        self._warming: asyncio.Task[None] | None = None
        self.stats = RunStats()
        self._by_model: dict[str, StageSettings] = {settings.model: settings}
        #: First-stage requests the producer built for its cache prefetch, taken by the item's worker.
        self._prebuilt: dict[int, StageRequest] = {}
        self._writer: LedgerWriter | None = None
        self._run_id = 0
        self._spent_before = 0.0

    async def run(self, run: RunRecord) -> RunOutcome:
        self._run_id = run.id
        summary = await asyncio.to_thread(self.ledger.summary, run.id)
        self.stats.total = summary.total
        self.stats.already_done = summary.done
        self.stats.done = summary.done
        self._spent_before = summary.cost_usd  # --max-cost is the run's budget, resumed or not
        abort: StructuredError | None = None
        async with LedgerWriter(self.ledger, flush_interval=self.flush_interval, hooks=self.hooks) as writer:
            self._writer = writer
            self.cache.backend.attach(writer.submit)
            queue: asyncio.Queue[PendingItem | None] = asyncio.Queue(
                maxsize=1 if self.source is not None else self.concurrency * 2)
            workers = [asyncio.create_task(self._worker(queue), name=f"worker-{i}") for i in range(self.concurrency)]
            producer = asyncio.create_task(self._produce(queue), name="producer")
            try:
                await asyncio.gather(producer, *workers)
            except _Abort as exc:
                abort = exc.error
            finally:
                # On an abort or Ctrl-C, stop every worker and let each leave its item (and the in-flight
                # count) in order before the ledger's last batch is written.
                for task in (producer, *workers):
                    task.cancel()
                await asyncio.gather(producer, *workers, return_exceptions=True)
                await self.cache.flush_counts()
                self.cache.backend.attach(None)
                if self._warming is not None:
                    self._warming.cancel()  # still sleeping: nothing was loaded; loading: it finishes on its own
                    await asyncio.gather(self._warming, return_exceptions=True)
        failures = await asyncio.to_thread(self.ledger.failures, run.id)
        flagged = await asyncio.to_thread(self.ledger.flagged, run.id)
        quarantined = await asyncio.to_thread(self.ledger.quarantined, run.id)
        final = await asyncio.to_thread(self.ledger.summary, run.id)
        if abort is not None:
            status = RunStatus.ABORTED
        elif final.pending == 0 and final.failed == 0:
            status = RunStatus.COMPLETED
        else:
            status = RunStatus.FAILED
        await asyncio.to_thread(self.ledger.set_run_status, run.id, status)
        return RunOutcome(run_id=run.id, status=status, stats=self.stats, failures=failures,
                          abort_reason=None if abort is None else str(abort), flagged=flagged,
                          quarantined=quarantined)

    async def _pages(self, queue: asyncio.Queue[PendingItem | None]) -> AsyncIterator[list[PendingItem]]:
        if self.source is not None:
            # Only as many as idle tasks can start now: what a process takes, the others cannot (a late worker
            # finds its share).
            while page := await self.source.next_page(max(1, self.concurrency - self.stats.in_flight
                                                          - queue.qsize())):
                yield page
            return
        after = 0
        while page := await asyncio.to_thread(self.ledger.pending_items, self._run_id, after_position=after,
                                              limit=200):
            after = page[-1].item.position
            yield page if self.only is None else [p for p in page if p.id in self.only]

    async def _produce(self, queue: asyncio.Queue[PendingItem | None]) -> None:
        async for page in self._pages(queue):
            built = {p.id: build_nuance_request(p.item, self.settings) for p in page if not p.nuance_done}
            self._prebuilt.update(built)
            if not self.force:  # the page's first-stage answers in one read, not one read per item
                await self.cache.prefetch([staged.cache_key for staged in built.values()], NUANCE)
            for pending in page:
                await queue.put(pending)
        for _ in range(self.concurrency):
            await queue.put(None)

    async def _worker(self, queue: asyncio.Queue[PendingItem | None]) -> None:
        assert self._writer is not None
        writer = self._writer
        while (pending := await queue.get()) is not None:
            await writer.room()  # no new item while the ledger is far behind
            self.stats.in_flight += 1
            try:
                await self._process(pending)
            finally:
                self.stats.in_flight -= 1

    async def _process(self, pending: PendingItem) -> None:
        with bound(item=pending.item.term), self.hooks.item(pending.item) as note:
            await self._process_item(pending, note)

    async def _process_item(self, pending: PendingItem, note: Note) -> None:
        item = pending.item
        stage = NUANCE
        try:
            analysis: TermAnalysis | None = None
            if pending.nuance_done:
                payload = await asyncio.to_thread(self.ledger.stage_payload, pending.id, NUANCE)
                if payload is not None:
                    analysis = TermAnalysis.model_validate_json(payload)
            language = self.settings.language
            flagged = False
            if analysis is None:
                staged = self._prebuilt.pop(pending.id, None) or build_nuance_request(item, self.settings)
                analysis, problems = await self._stage(
                    pending, staged, lambda content: parse_nuance(content, item),
                    lambda answer: check_analysis(answer, term=item.term, language=language),
                    lambda settings: build_nuance_request(item, settings))
                flagged = bool(problems)
            stage = CARDS
            final_analysis = analysis
            _, problems = await self._stage(
                pending, build_cards_request(item, analysis, self.settings),
                lambda content: parse_cards(content, final_analysis),
                lambda cards: check_cards(cards, final_analysis, term=item.term, language=language),
                lambda settings: build_cards_request(item, final_analysis, settings))
            self.stats.done += 1
            if flagged or problems:
                self.stats.flagged += 1
        except _Abort:
            raise
        except LeaseLost:
            self.stats.handed_over += 1
            note.handed_over()
            log.warning("%s of %r dropped without a call: this worker no longer holds its lease (another worker "
                        "finishes it)", stage, item.term)
        except _Quarantined as quarantined:
            self._fail(pending, stage, quarantined.error, last_answer=quarantined.last_answer)
            note.failed(quarantined.error)
        except StructuredError as error:
            if error.aborts_run:
                raise _Abort(error) from error
            self._fail(pending, stage, error)
            note.failed(error)
        except Exception as error:  # a bug must cost one item, not the run
            log.exception("unexpected error on %r (%s)", item.term, stage)
            internal = StructuredError(f"internal error: {type(error).__name__}: {error}")
            self._fail(pending, stage, internal)
            note.failed(internal)

    def _fail(self, pending: PendingItem, stage: str, error: StructuredError, *,
              last_answer: str | None = None) -> None:
        """Fail the item's stage; with ``last_answer``, quarantine it (its answers kept failing validation)."""
        assert self._writer is not None
        self.stats.failed += 1
        quarantined = last_answer is not None
        with bound(stage=stage):
            if quarantined:
                self.stats.quarantined += 1
                self._recovered(Strategy.QUARANTINE, "%s of %r quarantined: its answers kept failing validation "
                                "(%s)", stage, pending.item.term, error.code)
            else:
                # INFO: the end of the run lists failed items; the log file keeps each with its error.
                log.info("%s of %r failed", stage, pending.item.term, exc_info=error)
        self._writer.submit(StageFailed(pending.id, stage, error.category.value, error.code, error.message,
                                        quarantined=quarantined, last_answer=last_answer))

    def _recovered(self, strategy: Strategy, message: str, *args: object) -> None:
        """Count and log one application of a recovery strategy."""
        self.stats.recoveries[strategy.value] = self.stats.recoveries.get(strategy.value, 0) + 1
        level = logging.WARNING if strategy is Strategy.FALLBACK_MODEL else logging.INFO
        recovery_log.log(level, f"recovery {strategy.value}: {message}", *args, extra={"strategy": strategy.value})

    def _settings_for(self, model: str) -> StageSettings:
        found = self._by_model.get(model)
        if found is None:
            found = self._by_model[model] = replace(self.settings, model=model)
        return found

    @property
    def models(self) -> tuple[str, ...]:
        """The run's model, then the fallback chain."""
        primary = self.settings.model
        return (primary, *dict.fromkeys(m for m in self.recovery.fallback_models if m != primary))

    async def _stage(self, pending: PendingItem, staged: StageRequest, parse: Callable[[str], T],
                     check: Check[T], rebuild: Callable[[StageSettings], StageRequest]) -> tuple[T, list[str]]:
        """The stage's answer and the content checks it still fails (empty when it passes).

        A fresh answer that fails a check is re-asked once, with the problems, through the policy's re-ask
        budget (:class:`ContentCheckError` is a schema violation); the answer after that is kept as it is. A
        cached or recorded answer is checked again but never re-asked (that would pay for it every run).

        When the run's model gives up (its retries spent, its circuit open too long) the next model of the fallback
        chain takes the request over (``rebuild`` makes it for that model: its own cache key); an item whose
        answers keep failing validation is quarantined."""
        with self.hooks.stage(staged.stage, pending.item) as note:
            result, problems = await self._answer(pending, staged, parse, check, rebuild, note)
            if problems:
                note.flagged(problems)
            return result, problems

    async def _answer(self, pending: PendingItem, staged: StageRequest, parse: Callable[[str], T], check: Check[T],
                      rebuild: Callable[[StageSettings], StageRequest], note: Note) -> tuple[T, list[str]]:
        writer = self._writer
        assert writer is not None
        writer.submit(StageStarted(pending.id, staged.stage))
        if not self.force and (cached := await self._cached(pending, staged, parse, check)) is not None:
            note.cache_hit("cache")
            return cached
        async with self.cache.single_flight(staged.cache_key):
            # A concurrent task may have paid for this very answer while we waited: it is in this process.
            if not self.force and (held := self.cache.held(staged.cache_key)) is not None \
                    and (cached := self._accept(pending, staged, parse, check, held)) is not None:
                note.cache_hit("in_flight")
                return cached
            if not self.force and not self.cache.backend.restores \
                    and (recorded := await self._recorded(pending, staged, parse, check)) is not None:
                note.cache_hit("ledger")
                return recorded
            if not self.force:
                note.cache_miss()
            models = self.models
            for index, model in enumerate(models):
                if index:
                    staged = rebuild(self._settings_for(model))
                    if not self.force and (cached := await self._cached(pending, staged, parse, check)) is not None:
                        note.cache_hit("cache")
                        return cached
                reask = _Reask(fallback=index > 0)
                try:
                    return await self._ask(pending, staged, parse, check, reask)
                except StructuredError as error:
                    if error.aborts_run:
                        raise
                    if index + 1 < len(models) and self.recovery.wants(Strategy.FALLBACK_MODEL, error):
                        self._recovered(Strategy.FALLBACK_MODEL, "%s of %r goes to %s: %s gave up (%s/%s)",
                                        staged.stage, pending.item.term, models[index + 1], model,
                                        error.category.value, error.code)
                        continue
                    if isinstance(error, INVALID_ANSWERS) and reask.last_answer is not None \
                            and self.recovery.wants(Strategy.QUARANTINE, error):
                        raise _Quarantined(error, reask.last_answer) from error
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _ask(self, pending: PendingItem, staged: StageRequest, parse: Callable[[str], T], check: Check[T],
                   reask: _Reask) -> tuple[T, list[str]]:
        """Ask ``staged``'s model through the policy, store the answer and return it with its content problems."""
        writer = self._writer
        assert writer is not None
        self._check_budget()  # not even a rate-limit slot once the budget is spent
        if self._warming is None:
            self._warming = asyncio.create_task(self._warm_checks(), name="warm-checks")
        model = staged.request.model
        context = CallContext(stage=staged.stage, item_key=pending.item.term, provider=self.settings.provider,
                              model=model, estimated_tokens=staged.estimated_tokens,
                              before_retry=self._check_budget)

        def checked(content: str) -> tuple[T, list[str]]:
            reask.last_answer = content
            try:
                result = parse(content)
            except INVALID_ANSWERS as error:
                if self.recovery.wants(Strategy.REASK_WITH_ERRORS, error):
                    problems = validation_problems(error)
                    reask.messages = (ChatMessage("assistant", content),
                                      ChatMessage("user", reask_message(problems, VALIDATION_HEADING)))
                    reask.kind = Strategy.REASK_WITH_ERRORS.value
                    self._recovered(Strategy.REASK_WITH_ERRORS, "%s of %r: the next call quotes %d validation "
                                    "errors: %s", staged.stage, pending.item.term, len(problems), "; ".join(problems))
                raise
            problems = check(result)
            if problems and not reask.content_reasked:
                reask.content_reasked = True
                reask.messages = (ChatMessage("assistant", content), ChatMessage("user", reask_message(problems)))
                reask.kind = "content_check"
                raise ContentCheckError(f"{staged.stage}: the answer failed content checks: {'; '.join(problems)}",
                                        value=result, details={"stage": staged.stage, "problems": problems})
            return result, problems

        async def attempt() -> tuple[tuple[T, list[str]], ChatResponse]:
            # Here, inside the policy: after any wait for a rate-limit slot, a circuit or a back-off, just before
            # the money is spent. Not a structured error: no retry, no breaker verdict.
            if self.guard is not None and not await self.guard(pending):
                raise LeaseLost
            request = staged.request
            if reask.messages:
                request = replace(request, messages=(*request.messages, *reask.messages))
            if reask.max_tokens is not None:
                request = replace(request, max_tokens=reask.max_tokens)
            try:
                with self.hooks.attempt(context, request, reask.attempts + 1) as call_note:
                    answer = await self._call(pending, staged, checked, request, reask, call_note)
            except TruncatedOutputError as error:
                if reask.max_tokens is None and self.recovery.wants(Strategy.LARGER_BUDGET, error):
                    reask.max_tokens = self.recovery.larger_budget(request.max_tokens)
                    context.estimated_tokens += reask.max_tokens - request.max_tokens
                    self._recovered(Strategy.LARGER_BUDGET, "%s of %r was cut off at max_tokens=%d; the next call "
                                    "may use %d", staged.stage, pending.item.term, request.max_tokens,
                                    reask.max_tokens)
                raise
            # What the provider counted and said about its limits, for the rate limiter.
            context.report(ProviderAnswer(answer[1].usage.total_tokens, answer[1].headers))
            return answer

        with bound(stage=staged.stage, provider=self.settings.provider, model=model):
            response: ChatResponse | None
            try:
                (result, problems), response = await self.policy.execute(attempt, context)
            except ContentCheckError as error:  # no re-ask left in the policy: keep the answer, flagged
                result, problems, response = error.value, error.problems, None
            if problems:
                log.warning("%s of %r still fails content checks, kept for review: %s", staged.stage,
                            pending.item.term, "; ".join(problems))
            # The ledger gets the answer first; the cache copy is best effort (a failed write is counted).
            payload = result.model_dump_json()  # one serialisation for the ledger and the cache
            writer.submit(self._completed(pending, staged, result, False, problems, payload))
            await self.cache.put(self._cache_record(staged, payload.encode("utf-8"), response))
            if self.durable:
                await writer.flush()
        return result, problems

    async def _warm_checks(self) -> None:
        """Load what the content checks load (the Korean analyser: about three seconds that hold the GIL) while the
        run's first paid calls are out, rather than when their answers arrive and wait for it."""
        await asyncio.sleep(WARM_AFTER)
        await asyncio.to_thread(checks.warm, self.settings.language)

    async def _cached(self, pending: PendingItem, staged: StageRequest, parse: Callable[[str], T],
                      check: Check[T]) -> tuple[T, list[str]] | None:
        value = await self.cache.get(staged.cache_key, staged.stage)
        return None if value is None else self._accept(pending, staged, parse, check, value)

    def _accept(self, pending: PendingItem, staged: StageRequest, parse: Callable[[str], T], check: Check[T],
                value: bytes) -> tuple[T, list[str]] | None:
        """A cached answer as the stage's result (with its content problems), or None (and forgotten) when it is
        unusable."""
        assert self._writer is not None
        try:
            result = parse(value.decode("utf-8"))
        except (InvalidResponseError, UnicodeDecodeError):
            log.warning("ignoring an unusable cache entry %s", staged.cache_key[:12])
            self.cache.forget(staged.cache_key)
            return None
        self.stats.cache_hits += 1
        problems = check(result)
        self._writer.submit(self._completed(pending, staged, result, True, problems))
        return result, problems

    async def _recorded(self, pending: PendingItem, staged: StageRequest, parse: Callable[[str], T],
                        check: Check[T]) -> tuple[T, list[str]] | None:
        """An answer some run already paid for whose cache copy is missing (the cache write failed, or it lives
        in a Redis that lost it): taken from the ledger and put back in the cache. The database backend does this
        in its own read."""
        assert self._writer is not None
        payload = await asyncio.to_thread(self.ledger.payload_for_cache_key, staged.cache_key,
                                          newer_than=self.cache.retired_before(staged.stage))
        if payload is None:
            return None
        try:
            result = parse(payload)
        except InvalidResponseError:
            return None
        self.stats.cache_hits += 1
        await self.cache.put(self._cache_record(staged, payload.encode("utf-8")))
        problems = check(result)
        self._writer.submit(self._completed(pending, staged, result, True, problems))
        return result, problems

    def _cache_record(self, staged: StageRequest, value: bytes, response: ChatResponse | None = None) -> CacheRecord:
        usage = response.usage if response is not None else None
        return CacheRecord(key=staged.cache_key, cache_type=staged.stage, value=value,
                           provider=self.settings.provider, model=staged.request.model,
                           prompt_version=staged.prompt_version,
                           tokens_in=usage.prompt_tokens if usage else 0,
                           tokens_out=usage.completion_tokens if usage else 0,
                           cost_usd=usage.cost_usd if usage else None)

    def _completed(self, pending: PendingItem, staged: StageRequest, result: BaseModel,
                   from_cache: bool, flags: list[str], payload: str | None = None) -> StageCompleted:
        cards = tuple(result.cards) if isinstance(result, FlashcardSet) else ()
        return StageCompleted(item_id=pending.id, stage=staged.stage, cache_key=staged.cache_key,
                              payload=payload if payload is not None else result.model_dump_json(),
                              from_cache=from_cache, run_id=self._run_id,
                              cards=cards, flags=tuple(flags), model=staged.request.model)

    async def _call(self, pending: PendingItem, staged: StageRequest, parse: Callable[[str], R],
                    request: ChatRequest | None = None, reask: _Reask | None = None,
                    note: Note = NOTE) -> tuple[R, ChatResponse]:
        """One provider call: send, record, validate. Raises the structured error of a failed attempt.

        The call gets an id, bound to the task's log context until the stage ends (so the retry policy's line about
        this call carries it too), stored with its ``api_calls`` row and put in its error's details."""
        assert self._writer is not None
        reask = reask or _Reask()
        reask.attempts += 1
        call = _CallMark(new_call_id(), reask.attempts, reask.recovery)
        bind(call_id=call.id, attempt=call.attempt)
        request = request or staged.request
        self.stats.requests += 1
        started = self.clock()
        response: ChatResponse | None = None
        try:
            response = await self.client.complete(request)
            note.answered(response)
            result = parse(response.content)
        except StructuredError as error:
            self.stats.api_errors += 1
            error.details.setdefault("run_id", self._run_id)
            error.details.setdefault("call_id", call.id)
            self._record(pending, staged, request, response, started, error, call)
            raise
        self._record(pending, staged, request, response, started, None, call)
        return result, response

    def _record(self, pending: PendingItem, staged: StageRequest, request: ChatRequest, response: ChatResponse | None,
                started: float, error: StructuredError | None, call: _CallMark) -> None:
        assert self._writer is not None
        if response is not None:
            tokens_in, tokens_out = response.usage.prompt_tokens, response.usage.completion_tokens
            cost: float | None = response.usage.cost_usd
            http_status: int | None = response.status_code
        else:
            # A failed answer can still be billed (cut off, empty, an error in a 200 body): count what it cost.
            details = error.details if error is not None else {}
            billed = details.get("usage") if isinstance(details.get("usage"), dict) else {}
            tokens_in, tokens_out = int(billed.get("prompt_tokens") or 0), int(billed.get("completion_tokens") or 0)
            cost = billed.get("cost_usd")
            http_status = error.status_code if isinstance(error, APIError) else None
            if http_status is None and isinstance(details.get("http_status", details.get("status_code")), int):
                http_status = details.get("http_status", details.get("status_code"))
        self.stats.tokens_in += tokens_in
        self.stats.tokens_out += tokens_out
        self.stats.cost_usd += cost or 0.0
        self._writer.submit(CallRecorded(
            run_id=self._run_id, item_id=pending.id, stage=staged.stage, provider=self.settings.provider,
            model=request.model, cache_key=staged.cache_key, status="ok" if error is None else "error",
            http_status=http_status, error_category=None if error is None else error.category.value,
            error_code=None if error is None else error.code,
            error_message=None if error is None else error.message[:500],
            tokens_in=tokens_in, tokens_out=tokens_out, cost_usd=cost,
            latency_ms=(self.clock() - started) * 1000.0,
            response_id=response.response_id if response else None, call_id=call.id, attempt=call.attempt,
            recovery=call.recovery))

    @property
    def spent(self) -> float:
        """Dollars the run has spent, earlier invocations included: what ``max_cost`` is measured against."""
        return self._spent_before + self.stats.cost_usd

    def note_run_spending(self, total: float) -> None:
        """What the whole run has spent, as the ledger says (workers: the others' spending too), so that
        ``max_cost`` holds for the run and not for each worker: overshoot is bounded by one heartbeat's spending."""
        self._spent_before = max(self._spent_before, total - self.stats.cost_usd)

    def _check_budget(self) -> None:
        """Stop before a call that would start beyond the budget; answers already paid for are kept. The
        error aborts the run, and as a non-retryable error it leaves every policy's loop at once."""
        spent = self.spent
        if self.max_cost is not None and spent >= self.max_cost:
            raise BudgetExceededError(
                f"budget of ${self.max_cost:.4f} reached (this run has spent ${spent:.4f}); "
                "run the same command again with a higher --max-cost to continue")
