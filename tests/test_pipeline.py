"""The pipeline against a scripted client: resume, cache, failures, aborts, budget, policy seam."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import text

from flashcard_pipeline.errors import (
    AuthenticationError,
    ServerError,
    StructuredError,
    TruncatedOutputError,
)
from flashcard_pipeline.llm.types import ChatRequest, ChatResponse, Usage
from flashcard_pipeline.models import TermAnalysis, VocabularyItem
from flashcard_pipeline.pipeline import Pipeline
from flashcard_pipeline.resilience import CallContext
from flashcard_pipeline.resilience.retry import RetryConfig, RetryPolicy
from flashcard_pipeline.resilience.testing import FakeClock
from flashcard_pipeline.simulator.content import analysis_for, cards_for
from flashcard_pipeline.stages import StageSettings
from flashcard_pipeline.storage.db import open_database
from flashcard_pipeline.storage.ledger import Ledger, RunRecord
from flashcard_pipeline.storage.schema import RunStatus

TERMS = ["내가", "그", "학교", "먹다", "빨리", "는", "사람", "예쁘다"]


def payload(request: ChatRequest) -> dict[str, Any]:
    match = re.search(r"<input>\s*(.*?)\s*</input>", request.messages[-1].content, re.S)
    assert match, "every stage request carries its input block"
    return json.loads(match.group(1))


class ScriptedClient:
    """Answers like a good model unless ``faults`` says otherwise for a (term, stage)."""

    def __init__(self, faults: dict[tuple[str, str], Callable[[], Any]] | None = None,
                 cost: float = 0.001, delay: float = 0.0, delays: dict[str, float] | None = None) -> None:
        self.faults = faults or {}
        self.calls: list[tuple[str, str]] = []
        self.cost = cost
        self.delay = delay
        self.delays = delays or {}
        self.active = 0
        self.max_active = 0

    async def complete(self, request: ChatRequest) -> ChatResponse:
        data = payload(request)
        stage = "cards" if "analysis" in data else "nuance"
        term = data["term"]
        self.calls.append((term, stage))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(self.delays.get(term, self.delay))
        finally:
            self.active -= 1
        fault = self.faults.get((term, stage))
        if fault is not None:
            result = fault()
            if isinstance(result, str):
                return self._response(result)
        if stage == "nuance":
            content = analysis_for(term, type=data.get("type"), hints=data.get("hints")).model_dump_json()
        else:
            analysis = TermAnalysis.model_validate(data["analysis"])
            content = cards_for(term, analysis).model_dump_json()
        return self._response(content)

    def _response(self, content: str) -> ChatResponse:
        return ChatResponse(content=content, finish_reason="stop", usage=Usage(100, 200, self.cost), model="m",
                            response_id="gen-1", latency_s=0.01, status_code=200, headers={})


def raise_(error: Exception) -> Callable[[], Any]:
    def fault() -> Any:
        raise error
    return fault


@pytest.fixture
def ledger(db_url: str) -> Ledger:
    return Ledger(open_database(db_url))


SETTINGS = StageSettings(provider="openrouter", model="openai/gpt-4o-mini")


def new_run(ledger: Ledger, terms: list[str] = TERMS, *, key: str = "run-a", first_position: int = 1) -> RunRecord:
    items = [VocabularyItem(position=first_position + i, term=t) for i, t in enumerate(terms)]
    return ledger.create_run(run_key=key, input_path="x.csv", input_sha256="0" * 64, provider="openrouter",
                             model="openai/gpt-4o-mini", settings={}, target_language="Korean",
                             learner_language="English", simulated=False, items=items)


def pipeline(ledger: Ledger, client: ScriptedClient, **kw: Any) -> Pipeline:
    return Pipeline(ledger=ledger, client=client, settings=SETTINGS, flush_interval=0.01, **kw)


async def test_every_item_gets_cards_in_input_order(ledger: Ledger) -> None:
    run = new_run(ledger)
    # Earlier terms answer slower, so they finish after later ones.
    slow = {term: 0.004 * (len(TERMS) - index) for index, term in enumerate(TERMS)}
    client = ScriptedClient(delays=slow)
    outcome = await pipeline(ledger, client, concurrency=4).run(run)
    assert outcome.status is RunStatus.COMPLETED
    finished = [c for c in sorted(ledger.api_calls(run.id), key=lambda c: c.id) if c.stage == "cards"]
    assert [c.item_id for c in finished] != sorted(c.item_id for c in finished), "completion order differed"
    assert min(c.latency_ms for c in ledger.api_calls(run.id)) >= 1000 * min(slow.values()), "latency is recorded"
    results = list(ledger.results(run.id))
    assert [r.item.term for r in results] == TERMS
    assert all(2 <= len(r.cards) <= 4 for r in results)
    assert Counter(stage for _, stage in client.calls) == {"nuance": len(TERMS), "cards": len(TERMS)}
    calls = ledger.api_calls(run.id)
    assert len(calls) == 2 * len(TERMS) and {c.status for c in calls} == {"ok"}
    summary = ledger.summary(run.id)
    assert summary.done == len(TERMS) and summary.tokens_in == 100 * len(calls)
    assert summary.cost_usd == pytest.approx(0.001 * len(calls))


async def test_concurrency_is_bounded(ledger: Ledger) -> None:
    run = new_run(ledger)
    client = ScriptedClient(delay=0.005)
    await pipeline(ledger, client, concurrency=3).run(run)
    assert 1 < client.max_active <= 3


async def test_finished_run_makes_no_calls_and_same_terms_elsewhere_hit_the_cache(ledger: Ledger) -> None:
    run = new_run(ledger)
    await pipeline(ledger, ScriptedClient()).run(run)

    again = ScriptedClient()
    ledger.prepare_resume(run.id)
    await pipeline(ledger, again).run(run)
    assert again.calls == []

    moved = new_run(ledger, list(reversed(TERMS)), key="run-b", first_position=100)
    cached = ScriptedClient()
    outcome = await pipeline(ledger, cached).run(moved)
    assert cached.calls == [] and outcome.stats.cache_hits == 2 * len(TERMS)
    results = list(ledger.results(moved.id))
    assert [r.item.position for r in results] == list(range(100, 100 + len(TERMS)))
    assert [r.item.term for r in results] == list(reversed(TERMS))
    assert ledger.summary(moved.id).cached_stages == 2 * len(TERMS)


async def test_force_ignores_the_cache(ledger: Ledger) -> None:
    await pipeline(ledger, ScriptedClient()).run(new_run(ledger))
    forced = ScriptedClient()
    await pipeline(ledger, forced, force=True).run(new_run(ledger, key="run-b"))
    assert len(forced.calls) == 2 * len(TERMS)


async def test_bad_answer_fails_one_item_and_the_run_goes_on(ledger: Ledger) -> None:
    run = new_run(ledger)
    client = ScriptedClient(faults={("학교", "cards"): lambda: '{"cards": []}',
                                    ("그", "nuance"): raise_(ServerError("upstream 503", status_code=503))})
    outcome = await pipeline(ledger, client).run(run)
    assert outcome.status is RunStatus.FAILED
    failed = {f.term: f for f in outcome.failures}
    assert set(failed) == {"그"}
    # An answer that fails validation sets its item aside with that answer (the recovery registry's default).
    [quarantined] = outcome.quarantined
    assert (quarantined.term, quarantined.stage, quarantined.code, quarantined.last_answer) == (
        "학교", "cards", "schema_violation", '{"cards": []}')
    assert ledger.summary(run.id).quarantined == 1 and ledger.summary(run.id).failed == 2
    assert (failed["그"].stage, failed["그"].category, failed["그"].code) == ("nuance", "external_service",
                                                                             "server_error")
    assert len(list(ledger.results(run.id))) == len(TERMS) - 2
    errors = [c for c in ledger.api_calls(run.id) if c.status == "error"]
    assert {(c.error_category, c.error_code, c.http_status) for c in errors} == {
        ("invalid_response", "schema_violation", 200), ("external_service", "server_error", 503)}


async def test_resume_retries_failures_without_repeating_finished_stages(ledger: Ledger) -> None:
    run = new_run(ledger)
    await pipeline(ledger, ScriptedClient(faults={("학교", "cards"): raise_(ServerError("down", status_code=503))})
                   ).run(run)
    assert ledger.prepare_resume(run.id) == 1
    second = ScriptedClient()
    outcome = await pipeline(ledger, second).run(run)
    assert second.calls == [("학교", "cards")]  # its analysis was kept
    assert outcome.status is RunStatus.COMPLETED and outcome.failures == []


async def test_authentication_refusal_aborts_and_leaves_the_rest_resumable(ledger: Ledger) -> None:
    run = new_run(ledger)
    refused = raise_(AuthenticationError("invalid key", status_code=401))
    client = ScriptedClient(faults={(t, "nuance"): refused for t in TERMS[2:]})
    outcome = await pipeline(ledger, client, concurrency=1).run(run)
    assert outcome.status is RunStatus.ABORTED and "invalid key" in (outcome.abort_reason or "")
    assert ledger.summary(run.id).done == 2
    ledger.prepare_resume(run.id)
    outcome = await pipeline(ledger, ScriptedClient()).run(run)
    assert outcome.status is RunStatus.COMPLETED


async def test_budget_stops_new_calls_but_keeps_paid_answers(ledger: Ledger) -> None:
    run = new_run(ledger)
    client = ScriptedClient(cost=0.01)
    outcome = await pipeline(ledger, client, concurrency=1, max_cost=0.035).run(run)
    assert outcome.status is RunStatus.ABORTED and "budget" in (outcome.abort_reason or "")
    assert len(client.calls) == 4  # the 4th call crossed the line; no 5th was started
    assert ledger.summary(run.id).done == 2  # both items whose calls were paid are stored


async def test_the_budget_is_the_runs_across_invocations_and_checked_before_every_retry(ledger: Ledger) -> None:
    run = new_run(ledger)
    outcome = await pipeline(ledger, ScriptedClient(cost=0.01), concurrency=1, max_cost=0.035).run(run)
    assert outcome.status is RunStatus.ABORTED
    again = ScriptedClient(cost=0.01)
    ledger.prepare_resume(run.id)
    outcome = await pipeline(ledger, again, concurrency=1, max_cost=0.035).run(run)
    assert outcome.status is RunStatus.ABORTED and again.calls == [], "the earlier invocation spent the budget"
    assert "this run has spent $0.0400" in (outcome.abort_reason or "")
    assert outcome.stats.in_flight == 0

    billed = TruncatedOutputError("cut", details={"usage": {"prompt_tokens": 100, "completion_tokens": 900,
                                                            "cost_usd": 0.02}, "http_status": 200})
    client = ScriptedClient(faults={("새말", "nuance"): raise_(billed)})
    other = new_run(ledger, ["새말"], key="run-b")
    retry = RetryPolicy(RetryConfig(max_attempts=100), clock=FakeClock())
    outcome = await pipeline(ledger, client, policy=retry, max_cost=0.05).run(other)
    assert outcome.status is RunStatus.ABORTED and len(client.calls) == 3, "paid failures count against it"
    assert retry.stats.attempts == 3, "the refused retry was never started"
    calls = ledger.api_calls(other.id)
    assert [(c.tokens_in, c.tokens_out, c.cost_usd, c.http_status) for c in calls] == [(100, 900, 0.02, 200)] * 3
    assert ledger.summary(other.id).cost_usd == pytest.approx(0.06)


async def test_unexpected_bug_costs_one_item(ledger: Ledger) -> None:
    run = new_run(ledger)
    outcome = await pipeline(ledger, ScriptedClient(faults={("그", "nuance"): raise_(KeyError("boom"))})).run(run)
    assert [(f.term, f.category) for f in outcome.failures] == [("그", "internal")]
    assert outcome.stats.done == len(TERMS) - 1


async def test_every_call_goes_through_the_policy(ledger: Ledger) -> None:
    seen: list[CallContext] = []

    class Recording:
        async def execute(self, call: Callable[[], Awaitable[Any]], context: CallContext) -> Any:
            seen.append(context)
            return await call()

    await pipeline(ledger, ScriptedClient(), policy=Recording()).run(new_run(ledger))
    assert Counter(c.stage for c in seen) == {"nuance": len(TERMS), "cards": len(TERMS)}
    assert all(c.estimated_tokens > 1000 and c.model == "openai/gpt-4o-mini" for c in seen)


async def test_a_policy_may_retry_and_every_attempt_is_recorded(ledger: Ledger) -> None:
    attempts = Counter()

    def flaky() -> Any:
        attempts["그"] += 1
        if attempts["그"] < 3:
            raise ServerError("try again", status_code=502)
        return None

    class RetryThrice:
        async def execute(self, call: Callable[[], Awaitable[Any]], context: CallContext) -> Any:
            for attempt in range(3):
                try:
                    return await call()
                except StructuredError:
                    if attempt == 2:
                        raise
            raise AssertionError

    run = new_run(ledger)
    outcome = await pipeline(ledger, ScriptedClient(faults={("그", "nuance"): flaky}), policy=RetryThrice()).run(run)
    assert outcome.status is RunStatus.COMPLETED
    statuses = [c.status for c in ledger.api_calls(run.id) if c.stage == "nuance" and c.item_id == 2]
    assert statuses == ["error", "error", "ok"]


class RefusingBackend:
    """A cache backend whose writes fail (Redis gone, a codec file missing) while reads find nothing."""

    def __init__(self) -> None:
        self.puts = 0

    def attach(self, sink: Any) -> None:
        pass

    restores = False

    async def get(self, key: str, *, count: bool = True, restore: bool = True, stored_after: Any = None) -> None:
        return None

    async def put(self, entry: Any) -> None:
        self.puts += 1
        raise ConnectionError("cache server went away")

    async def record_counts(self, counts: Any) -> None:
        pass


async def test_a_failed_cache_write_keeps_the_paid_answer_and_the_next_run_does_not_pay_again(
        ledger: Ledger, caplog: pytest.LogCaptureFixture) -> None:
    from flashcard_pipeline.cache.compressed_cache import CompressedCache
    from flashcard_pipeline.config import CacheSettings

    backend = RefusingBackend()
    cache = CompressedCache(backend, CacheSettings())
    run = new_run(ledger)
    client = ScriptedClient()
    with caplog.at_level("WARNING", logger="flashcard_pipeline.cache"):
        outcome = await pipeline(ledger, client, cache=cache).run(run)
    assert outcome.status is RunStatus.COMPLETED and outcome.failures == []
    assert [r.item.term for r in ledger.results(run.id)] == TERMS
    assert backend.puts == 2 * len(TERMS)
    assert {t: m["write_errors"] for t, m in cache.stats().items()} == {"nuance": len(TERMS), "cards": len(TERMS)}
    assert "cache write failed" in caplog.text and "kept in the ledger" in caplog.text

    # Another run over the same terms, with the cache still refusing: the answers come from the ledger.
    again = ScriptedClient()
    other = new_run(ledger, list(reversed(TERMS)), key="run-b", first_position=50)
    second = await pipeline(ledger, again, cache=CompressedCache(RefusingBackend(), CacheSettings())).run(other)
    assert again.calls == [] and second.stats.cache_hits == 2 * len(TERMS)
    assert [r.item.term for r in ledger.results(other.id)] == list(reversed(TERMS))
    assert ledger.summary(other.id).api_calls == 0


async def test_an_answer_the_cache_ttl_retired_is_not_brought_back_from_the_ledger(ledger: Ledger) -> None:
    from flashcard_pipeline.cache.compressed_cache import CompressedCache
    from flashcard_pipeline.config import CacheSettings

    await pipeline(ledger, ScriptedClient(), cache=CompressedCache(RefusingBackend(), CacheSettings())).run(
        new_run(ledger))
    await asyncio.sleep(0.05)
    expiring = CacheSettings(ttl_nuance=0.01, ttl_cards=0.01)
    again = ScriptedClient()
    await pipeline(ledger, again, cache=CompressedCache(RefusingBackend(), expiring)).run(
        new_run(ledger, key="run-b", first_position=50))
    assert len(again.calls) == 2 * len(TERMS)


async def test_a_miss_costs_one_database_read_and_a_cleared_cache_costs_no_call(ledger: Ledger) -> None:
    from unittest import mock

    reads: list[str] = []
    pages: list[list[str]] = []
    single, many = ledger.cache_get, ledger.cache_get_many

    def one(key: str, **kwargs: Any) -> Any:
        reads.append(key)
        return single(key, **kwargs)

    def page(keys: list[str], **kwargs: Any) -> Any:
        pages.append(list(keys))
        return many(keys, **kwargs)

    with mock.patch.object(ledger, "cache_get", side_effect=one), \
            mock.patch.object(ledger, "cache_get_many", side_effect=page), \
            mock.patch.object(ledger, "payload_for_cache_key", side_effect=AssertionError("a second read")):
        await pipeline(ledger, ScriptedClient()).run(new_run(ledger))
        assert [len(keys) for keys in pages] == [len(TERMS)], "the page's first stage in one read"
        assert len(reads) == len(TERMS) and len(set(reads)) == len(TERMS), "one read per second-stage miss"

        with ledger.engine.begin() as conn:  # `cache clear`: the answers stay with their run
            conn.execute(text("delete from cache_entries"))
        again = ScriptedClient()
        reads.clear()
        pages.clear()
        outcome = await pipeline(ledger, again).run(new_run(ledger, key="run-b", first_position=50))
    assert again.calls == [] and outcome.stats.cache_hits == 2 * len(TERMS)
    assert len(pages) == 1 and len(reads) == len(TERMS), "restored from the stored results by the same reads"


async def test_the_database_backend_restores_only_answers_younger_than_the_ttl(ledger: Ledger) -> None:
    from flashcard_pipeline.cache.backends import DatabaseCacheBackend
    from flashcard_pipeline.cache.compressed_cache import CompressedCache
    from flashcard_pipeline.config import CacheSettings

    await pipeline(ledger, ScriptedClient()).run(new_run(ledger))
    with ledger.engine.begin() as conn:
        conn.execute(text("delete from cache_entries"))
    young = ScriptedClient()
    cache = CompressedCache(DatabaseCacheBackend(ledger), CacheSettings(ttl_nuance=3600, ttl_cards=3600))
    await pipeline(ledger, young, cache=cache).run(new_run(ledger, key="run-b", first_position=50))
    assert young.calls == [], "stored an hour ago at most: restored"
    with ledger.engine.begin() as conn:
        conn.execute(text("delete from cache_entries"))
    await asyncio.sleep(0.05)
    old = ScriptedClient()
    cache = CompressedCache(DatabaseCacheBackend(ledger), CacheSettings(ttl_nuance=0.01, ttl_cards=0.01))
    await pipeline(ledger, old, cache=cache).run(new_run(ledger, key="run-c", first_position=100))
    assert len(old.calls) == 2 * len(TERMS), "past the TTL: asked again"


async def test_the_content_checks_warm_up_while_the_first_paid_calls_are_out(
        ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    """The analyser's load (seconds that hold the GIL) starts once, a moment after the first paid call, and only
    when a call is paid for: a run answered from the cache never loads it for nothing."""
    import flashcard_pipeline.pipeline as pipeline_module

    warmed: list[tuple[str, int]] = []
    client = ScriptedClient()
    monkeypatch.setattr(pipeline_module, "WARM_AFTER", 0.0)
    monkeypatch.setattr(pipeline_module.checks, "warm", lambda language: warmed.append((language, len(client.calls))))
    run = new_run(ledger)
    await pipeline(ledger, client, concurrency=2).run(run)
    assert len(client.calls) == 2 * len(TERMS)
    assert len(warmed) == 1 and warmed[0][0] == SETTINGS.language
    assert warmed[0][1] >= 1, "after the first call was sent, not before"

    warmed.clear()
    moved = new_run(ledger, key="run-b", first_position=100)
    cached = ScriptedClient()
    await pipeline(ledger, cached).run(moved)
    assert cached.calls == [] and warmed == [], "every answer from the cache: nothing to warm up for"


async def test_a_run_that_ends_before_the_warm_up_is_due_does_not_start_it(
        ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    import flashcard_pipeline.pipeline as pipeline_module

    warmed: list[str] = []
    monkeypatch.setattr(pipeline_module, "WARM_AFTER", 3600.0)
    monkeypatch.setattr(pipeline_module.checks, "warm", warmed.append)
    await pipeline(ledger, ScriptedClient()).run(new_run(ledger, TERMS[:1]))
    assert warmed == [], "cancelled while it waited"
