"""The recovery registry against the simulator: a re-ask that quotes the validation errors, a larger budget after a
cut-off answer, a fallback model through a full outage of the primary, quarantine and ``--retry-failed``, and the
registry's settings."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from flashcard_pipeline.cli.app import app
from flashcard_pipeline.config import recovery_plan
from flashcard_pipeline.errors import ConfigurationError, SchemaViolationError
from flashcard_pipeline.llm.client import LLMClient
from flashcard_pipeline.llm.providers import ProviderName, resolve_provider
from flashcard_pipeline.llm.types import ChatRequest, ChatResponse
from flashcard_pipeline.models import VocabularyItem
from flashcard_pipeline.pipeline import VALIDATION_HEADING, Pipeline
from flashcard_pipeline.recovery import RecoveryPlan, Strategy, parse_strategies
from flashcard_pipeline.resilience import CircuitBreakerConfig, RetryConfig
from flashcard_pipeline.resilience.retry import RetryPolicy
from flashcard_pipeline.resilience.testing import FakeClock
from flashcard_pipeline.runner import ProcessOptions, process
from flashcard_pipeline.simulator import SimulatorConfig, run_simulator
from flashcard_pipeline.stages import NUANCE, StageSettings, parse_nuance
from flashcard_pipeline.storage.db import open_database
from flashcard_pipeline.storage.ledger import Ledger, RunRecord
from flashcard_pipeline.storage.schema import Item, RunStatus, StageResult, StageState
from tests.test_cli_e2e import words

TERMS = ["학교", "먹다", "빨리", "바다"]
FAST_RETRY = RetryConfig(max_attempts=2, initial_delay=0.001, max_delay=0.002, jitter_enabled=False)


class Recording:
    """The real client, keeping every request it sent."""

    def __init__(self, client: LLMClient) -> None:
        self.client = client
        self.requests: list[ChatRequest] = []

    async def complete(self, request: ChatRequest) -> ChatResponse:
        self.requests.append(request)
        return await self.client.complete(request)


def new_run(ledger: Ledger, terms: list[str] = TERMS) -> RunRecord:
    return ledger.create_run(run_key="r", input_path="x.csv", input_sha256="0" * 64, provider="simulated",
                             model="simulated/flashcard-sim", settings={}, target_language="Korean",
                             learner_language="English", simulated=True,
                             items=[VocabularyItem(position=i + 1, term=t) for i, t in enumerate(terms)])


async def run_against(config: SimulatorConfig, ledger: Ledger, run: RunRecord, plan: RecoveryPlan,
                      settings: StageSettings | None = None, only: frozenset[int] | None = None) -> tuple[Any, Any]:
    async with run_simulator(config) as simulator:
        provider = resolve_provider(ProviderName.SIMULATED, base_url=simulator.base_url, env={})
        async with LLMClient(provider) as client:
            recording = Recording(client)
            policy = RetryPolicy(RetryConfig(max_attempts=3, max_reasks=2), clock=FakeClock())
            pipeline = Pipeline(ledger=ledger, client=recording, policy=policy, flush_interval=0.01, recovery=plan,
                                settings=settings or StageSettings(provider="simulated",
                                                                   model="simulated/flashcard-sim"),
                                only=only)
            return await pipeline.run(run), recording


def nuance_requests(recording: Recording, term: str) -> list[ChatRequest]:
    return [r for r in recording.requests if r.response_format
            and r.response_format["json_schema"]["name"] == "term_analysis"
            and f'"term": "{term}"' in r.messages[1].content]


async def test_a_reask_quotes_the_validation_errors_and_repairs_the_answer(db_url: str) -> None:
    """Every first answer breaks the schema; the simulator answers a re-ask that sends the answer back with a message
    about it (as a model that reads the errors would). Each second request really quotes the validator's errors."""
    ledger = Ledger(open_database(db_url))
    run = new_run(ledger)
    outcome, recording = await run_against(SimulatorConfig(schema_invalid_rate=1.0, heeds_feedback=True), ledger, run,
                                           RecoveryPlan())
    assert outcome.status is RunStatus.COMPLETED and outcome.quarantined == [] and outcome.failures == []
    for term in TERMS:
        first, second = nuance_requests(recording, term)
        assert len(first.messages) == 2 and len(second.messages) == 4
        rejected, feedback = second.messages[2:]
        assert rejected.role == "assistant" and feedback.role == "user"
        with pytest.raises(SchemaViolationError) as invalid:
            parse_nuance(rejected.content, VocabularyItem(position=1, term=term))
        errors = invalid.value.details["errors"]
        assert errors and feedback.content.startswith(VALIDATION_HEADING)
        assert all(f"- {error}" in feedback.content for error in errors), feedback.content
    calls = ledger.api_calls(run.id)
    assert Counter((c.status, c.error_code, c.recovery) for c in calls if c.stage == NUANCE) == {
        ("error", "schema_violation", None): 4, ("ok", None, "reask_with_errors"): 4}
    assert outcome.stats.recoveries == {"reask_with_errors": 8}  # both stages of four items


async def test_blind_reasks_quarantine_and_retry_failed_takes_only_those_back(db_url: str) -> None:
    """Without the errors quoted (the registry says quarantine only) every re-ask fails again: the items are
    quarantined with their last answer; ``retry_failed`` then takes back exactly them, not an unfinished item."""
    ledger = Ledger(open_database(db_url))
    run = new_run(ledger)
    blind = RecoveryPlan.with_overrides({"schema_violation": (Strategy.QUARANTINE,)})
    config = SimulatorConfig(schema_invalid_rate=1.0, heeds_feedback=True)
    outcome, recording = await run_against(config, ledger, run, blind)
    assert outcome.status is RunStatus.FAILED and outcome.failures == []
    assert [q.term for q in outcome.quarantined] == TERMS
    for item in outcome.quarantined:
        assert (item.stage, item.code) == (NUANCE, "schema_violation")
        assert item.last_answer
        with pytest.raises(SchemaViolationError):
            parse_nuance(item.last_answer or "", VocabularyItem(position=1, term=item.term))
    assert all(len(nuance_requests(recording, t)) == 3 and len(nuance_requests(recording, t)[-1].messages) == 2
               for t in TERMS), "blind re-asks send the question again, nothing more"
    assert ledger.summary(run.id).quarantined == 4 and ledger.prepare_resume(run.id) == 0, \
        "a plain resume leaves quarantined items aside"
    with Session(ledger.engine) as session, session.begin():  # one item is left unfinished, as a killed run leaves it
        unfinished = session.scalar(select(Item.id).where(Item.run_id == run.id, Item.term == "바다"))
        session.execute(update(Item).where(Item.id == unfinished).values(nuance_state=StageState.PENDING,
                                                                         last_answer=None))
    again = ledger.retry_failed(run.id)
    assert len(again) == 3 and unfinished not in again
    outcome, recording = await run_against(config, ledger, run, RecoveryPlan(), only=frozenset(again))
    assert {t for t in ("학교", "먹다", "빨리", "바다") if nuance_requests(recording, t)} == {"학교", "먹다", "빨리"}
    assert ledger.summary(run.id).done == 3 and ledger.summary(run.id).pending == 1
    assert outcome.quarantined == []


async def test_a_cut_off_answer_is_asked_again_once_with_a_larger_budget(db_url: str) -> None:
    ledger = Ledger(open_database(db_url))
    run = new_run(ledger, ["학교"])
    settings = StageSettings(provider="simulated", model="simulated/flashcard-sim")
    settings = replace(settings, nuance_prompt=replace(settings.nuance_prompt, max_tokens=120))
    plan = RecoveryPlan(budget_factor=16.0)
    outcome, recording = await run_against(SimulatorConfig(), ledger, run, plan, settings)
    assert outcome.status is RunStatus.COMPLETED
    first, second = nuance_requests(recording, "학교")
    assert (first.max_tokens, second.max_tokens) == (120, plan.larger_budget(120)) == (120, 1920)
    calls = [c for c in ledger.api_calls(run.id) if c.stage == NUANCE]
    assert [(c.error_code, c.recovery, c.attempt) for c in calls] == [("truncated_output", None, 1),
                                                                      (None, "larger_budget", 2)]
    # Once: a larger budget that is still too small is not grown again; the retries keep it, then the item fails.
    again = new_run(ledger, ["먹다"])
    outcome, recording = await run_against(SimulatorConfig(), ledger, again, RecoveryPlan(budget_factor=1.5),
                                           settings)
    assert [r.max_tokens for r in nuance_requests(recording, "먹다")] == [120, 180, 180]
    assert [(f.term, f.code) for f in outcome.failures] == [("먹다", "truncated_output")]


def process_options(tmp_path: Path, db: str, terms: list[str], name: str, **kwargs: Any) -> ProcessOptions:
    rows = [f"{i},{t},noun" for i, t in enumerate(terms, start=1)]
    return ProcessOptions(input_path=words(tmp_path, rows, name), output=tmp_path / f"{name}.jsonl",
                          provider="simulated", db_url=db, concurrency=2, retry=FAST_RETRY, **kwargs)


async def test_a_fallback_model_completes_the_items_of_a_primary_in_full_outage(
        tmp_path: Path, sqlite_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """The primary answers every call 503: each item's retries run out (and once its circuit opens, the wait
    passes CB_MAX_WAIT); the fallback model answers every item, is recorded per item and keys its own cache
    entries, while answers the primary gave earlier are still found for the primary."""
    primary, backup = "sim/primary", "sim/backup"
    breaker = CircuitBreakerConfig(min_throughput=4, failure_ratio=0.5, max_wait=0.05, break_duration=60)
    first = await process(process_options(tmp_path, sqlite_url, ["학교", "먹다"], "first", model=primary,
                                          breaker=breaker))
    assert first.outcome is not None and first.outcome.status is RunStatus.COMPLETED

    caplog.set_level(logging.INFO, logger="flashcard_pipeline.recovery")
    terms = ["학교", "먹다", "빨리", "바다", "하늘", "사랑"]
    result = await process(process_options(
        tmp_path, sqlite_url, terms, "outage", model=primary, fallback_models=(backup,), breaker=breaker,
        simulator=SimulatorConfig(down_models=(primary,))))
    outcome = result.outcome
    assert outcome is not None and outcome.status is RunStatus.COMPLETED and result.cards_written > 0
    engine = open_database(sqlite_url)
    with engine.connect() as conn:
        answered = dict(conn.execute(text(
            "SELECT i.term || '/' || s.stage, s.model FROM stage_results s JOIN items i ON i.id = s.item_id "
            "WHERE i.run_id = :run"), {"run": outcome.run_id}).all())
    # The primary's earlier answers are found for the primary (no call); the rest come from the backup.
    assert {key: model for key, model in answered.items() if key.split("/")[0] in ("학교", "먹다")} == {
        f"{t}/{s}": primary for t in ("학교", "먹다") for s in ("nuance", "cards")}
    assert {key: model for key, model in answered.items() if key.split("/")[0] not in ("학교", "먹다")} == {
        f"{t}/{s}": backup for t in terms[2:] for s in ("nuance", "cards")}
    calls = Ledger(engine).api_calls(outcome.run_id)
    assert {(c.model, c.status, c.http_status) for c in calls if c.model == primary} == {(primary, "error", 503)}
    assert all(c.status == "ok" and c.recovery == "fallback_model" for c in calls if c.model == backup)
    assert outcome.stats.recoveries["fallback_model"] == 8
    reasons = " ".join(r.getMessage() for r in caplog.records if "fallback_model" in r.getMessage())
    assert "server_error" in reasons and "circuit_wait_exceeded" in reasons, reasons
    # Which model answered is part of the cache key: each fallback answer sits under the backup's key.
    with Session(engine) as session:
        keys = set(session.scalars(select(StageResult.cache_key).join(Item, Item.id == StageResult.item_id)
                                   .where(Item.run_id == outcome.run_id, StageResult.model == backup)))
        entries = dict(session.execute(text("SELECT key, model FROM cache_entries")).all())
        assert keys and all(entries[key] == backup for key in keys)
        assert not keys & {c.cache_key for c in calls if c.model == primary}
    engine.dispose()


def test_the_registry_is_configurable_and_refuses_what_it_does_not_know(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_strategies("schema_violation=quarantine, timeout=none") == {
        "schema_violation": (Strategy.QUARANTINE,), "timeout": ()}
    with pytest.raises(ValueError, match="the strategies are"):
        parse_strategies("timeout=pray")
    with pytest.raises(ValueError, match="expected CODE_OR_CATEGORY"):
        parse_strategies("timeout")
    monkeypatch.setenv("RECOVERY_STRATEGIES", "server_error=none,invalid_response=quarantine")
    monkeypatch.setenv("RECOVERY_FALLBACK_MODELS", "a, b")
    plan = recovery_plan()
    assert plan.fallback_models == ("a", "b") and recovery_plan(["c"]).fallback_models == ("c",)
    server = SchemaViolationError("x", code="server_error")  # a code's entry wins over its category's
    assert plan.for_error(server) == () and plan.for_error(SchemaViolationError("y")) == (
        Strategy.REASK_WITH_ERRORS, Strategy.QUARANTINE)
    assert plan.for_error(SchemaViolationError("z", code="other")) == (Strategy.QUARANTINE,)
    monkeypatch.setenv("RECOVERY_STRATEGIES", "timeout=pray")
    with pytest.raises(ConfigurationError, match="RECOVERY_STRATEGIES"):
        recovery_plan()
    result = CliRunner().invoke(app, ["process", "x.csv", "--provider", "simulated"])
    assert result.exit_code == 2 and "RECOVERY_STRATEGIES" in result.stderr


def test_quarantined_items_stay_aside_until_retry_failed(tmp_path: Path, sqlite_url: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """On the command line: blind re-asks quarantine both items; the same command again makes no call and still
    fails (exit 1, the items listed); with --retry-failed and a model that reads the errors they are done."""
    runner = CliRunner()
    source = words(tmp_path, ["1,학교,noun", "2,먹다,verb"])
    command = ["process", str(source), "--provider", "simulated", "--db", sqlite_url, "-o", str(tmp_path / "d.jsonl"),
               "--sim", "schema_invalid_rate=1", "--sim", "heeds_feedback=true"]
    assert runner.invoke(app, ["process", str(source), "--provider", "simulated", "--db", sqlite_url,
                               "--retry-failed"]).exit_code == 2, "nothing to retry before a run exists"
    monkeypatch.setenv("RECOVERY_STRATEGIES", "schema_violation=quarantine")
    first = runner.invoke(app, command)
    assert first.exit_code == 1 and "2 items quarantined" in first.stderr and "--retry-failed" in first.stderr
    again = runner.invoke(app, command)
    assert again.exit_code == 1 and "run 1: failed" in again.stdout and " 0 API calls" in again.stdout
    assert "#1 학교: nuance schema_violation" in again.stderr and "with --retry-failed" in again.stderr
    monkeypatch.delenv("RECOVERY_STRATEGIES")
    retried = runner.invoke(app, [*command, "--retry-failed"])
    assert retried.exit_code == 0, retried.output
    assert "run 1: completed · 2/2 items done" in retried.stdout and "reask_with_errors 4" in retried.stderr
