"""The builder and registry: one pipeline per provider and model, one clock, one event hub; configuration read
only at the edge; what the run subscribes to the engine's events."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from flashcard_pipeline.config import breaker_config, rate_limit_settings, retry_config
from flashcard_pipeline.errors import RateLimitError, ServerError
from flashcard_pipeline.observers import EventTally, ProgressObserver
from flashcard_pipeline.pipeline import RunStats
from flashcard_pipeline.resilience import (
    BreakerPause,
    CallContext,
    CallRefused,
    CircuitBreaker,
    CircuitBreakerConfig,
    CircuitState,
    CircuitTransition,
    CircuitWaitExceededError,
    DirectPolicy,
    LimitCut,
    LimitGroup,
    LimitPause,
    PolicyPipeline,
    ProbeEvent,
    ProviderAnswer,
    RateLimitSettings,
    Resilience,
    ResilienceEvent,
    RetryConfig,
    RetryEvent,
    RetryPolicy,
)
from flashcard_pipeline.resilience.testing import FakeClock
from flashcard_pipeline.runner import ProcessOptions, process
from flashcard_pipeline.simulator import SimulatorConfig
from flashcard_pipeline.storage.db import open_database
from flashcard_pipeline.storage.ledger import Ledger


def context(model: str = "m", key: str = "k") -> CallContext:
    return CallContext(stage="nuance", item_key=key, provider="p", model=model, estimated_tokens=1000)


def engine(clock: FakeClock | None = None, **layers: object) -> Resilience:
    defaults: dict[str, object] = {
        "retry": RetryConfig(max_attempts=3, max_elapsed=None, jitter_enabled=False),
        "breaker": CircuitBreakerConfig(min_throughput=2, break_duration=5.0, max_break_duration=5.0, max_wait=0.0),
        "ratelimit": RateLimitSettings(requests_per_minute=6000, tokens_per_minute=1_000_000)}
    return Resilience(**{**defaults, **layers}, clock=clock or FakeClock(), rng=random.Random(1))  # type: ignore[arg-type]


async def ok() -> str:
    return "ok"


def test_one_pipeline_per_provider_and_model_retry_outermost_limits_innermost() -> None:
    made = engine()
    first = made.pipeline("p", "m")
    assert made.pipeline("p", "m") is first, "made once, then kept"
    assert isinstance(first.policy, PolicyPipeline)
    retry, breaker, limits = first.policy.policies
    assert isinstance(retry, RetryPolicy) and isinstance(breaker, CircuitBreaker) and isinstance(limits, LimitGroup)
    other = made.pipeline("p", "n")
    assert other.policy.policies[0] is retry, "one retry policy: its counters are the run's"  # type: ignore[attr-defined]
    assert other.breaker is not breaker and other.limits is not limits, "each pair has its own circuit and limits"
    assert {b.clock for b in made.breakers.values()} == {made.clock}, "one clock"
    assert {b.events for b in made.breakers.values()} == {made.events} and limits.events is made.events
    assert set(made.breakers) == {"p/m", "p/n"} and made.limit_groups == [limits, other.limits]
    assert made.breaker_named("p/m") is breaker and made.limit_group("p", "n") is other.limits
    with pytest.raises(ValueError, match="provider/model"):
        made.breaker_named("no-model")


def test_a_layer_left_out_is_not_built() -> None:
    only_limits = Resilience(ratelimit=RateLimitSettings())
    assert isinstance(only_limits.pipeline("p", "m").policy, LimitGroup), "a single layer is the pipeline"
    assert only_limits.retry is None and only_limits.breakers == {}
    with pytest.raises(LookupError, match="no circuit breaker"):
        only_limits.breaker("p", "m")
    with pytest.raises(LookupError, match="no rate limiter"):
        Resilience(retry=RetryConfig()).limit_group("p", "m")
    assert isinstance(Resilience().pipeline("p", "m").policy, PolicyPipeline), "no layer: the call is made as is"


def test_the_engine_is_found_wherever_it_sits_in_a_pipeline() -> None:
    made = engine()
    assert Resilience.find(made) is made
    assert Resilience.find(PolicyPipeline([DirectPolicy(), PolicyPipeline([made])])) is made
    assert Resilience.find(DirectPolicy()) is None and Resilience.find(None) is None


async def test_every_layer_reports_to_the_one_hub() -> None:
    clock = FakeClock()
    made = engine(clock)
    seen: list[ResilienceEvent] = []
    made.events.subscribe(ResilienceEvent, seen.append)

    async def down() -> str:
        raise ServerError("503", status_code=503)

    with pytest.raises(CircuitWaitExceededError):
        await made.execute(down, context())  # 2 failures trip the circuit; the 3rd attempt is refused
    kinds = [type(e) for e in seen]
    assert RetryEvent in kinds and CircuitTransition in kinds and CallRefused in kinds
    assert made.breaker("p", "m").state_provider.state is CircuitState.OPEN

    async def limited() -> str:
        raise RateLimitError("429", status_code=429, retry_after=2.0)

    seen.clear()
    with pytest.raises(RateLimitError):
        # A configured limit: its first 429 pauses and cuts (an unknown one waits for more evidence first).
        await Resilience(ratelimit=RateLimitSettings(requests_per_minute=60), clock=clock,
                         events=made.events).execute(limited, context())
    pause, cut = (next(e for e in seen if isinstance(e, kind)) for kind in (LimitPause, LimitCut))
    assert (pause.group, pause.seconds) == ("p/m", 2.0)
    assert (cut.dimension, cut.before, cut.after, cut.cause) == ("requests", 60, 30, "rate_limited")

    seen.clear()
    clock.advance(5.0)
    assert await made.execute(ok, context()) == "ok"
    assert [e.outcome for e in seen if isinstance(e, ProbeEvent)] == ["admitted", "succeeded"]


async def test_the_answer_an_attempt_reports_settles_the_tokens_limit() -> None:
    made = engine(retry=None, breaker=None)
    ctx = context()

    async def answered() -> str:
        ctx.report(ProviderAnswer(300))
        return "ok"

    assert await made.execute(answered, ctx) == "ok"
    assert made.limit_group("p", "m").tokens.limiter.metrics.refunded == pytest.approx(700)
    ctx2 = context()
    assert await made.execute(ok, ctx2) == "ok"
    assert made.limit_group("p", "m").tokens.limiter.metrics.refunded == pytest.approx(700), \
        "no report, nothing settled (the attempt of the request before does not count)"


# -- configuration at the edge ------------------------------------------------------------------------------

def test_configuration_built_in_code_ignores_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("RL_BACKEND", "redis"), ("RL_REQUESTS_PER_MINUTE", "7"), ("RETRY_MAX_ATTEMPTS", "9"),
                        ("CB_MIN_THROUGHPUT", "99")):
        monkeypatch.setenv(name, value)
    assert RateLimitSettings().backend == "memory" and RateLimitSettings().requests_per_minute is None
    assert RetryConfig().max_attempts == 8 and CircuitBreakerConfig().min_throughput == 10
    assert Resilience(ratelimit=RateLimitSettings()).ratelimit.backend.name == "memory"  # type: ignore[union-attr]
    assert rate_limit_settings().backend == "redis" and rate_limit_settings().requests_per_minute == 7
    assert retry_config().max_attempts == 9 and breaker_config().min_throughput == 99, "config.py reads them"


# -- what the run subscribes ---------------------------------------------------------------------------------

def test_the_progress_display_and_the_tally_subscribe_to_the_events() -> None:
    made = engine()
    stats = RunStats(pause_reason="another component's reason")
    ProgressObserver(stats).attach(made.events)
    tally = EventTally()
    tally.attach(made.events)
    made.events.emit(BreakerPause("circuit p/m open until 12:00:00 (provider failing); 1 call waiting"))
    assert stats.pause_reason is not None and stats.pause_reason.startswith("circuit p/m open")
    made.events.emit(BreakerPause(None))
    assert stats.pause_reason is None
    stats.pause_reason = "the cache is warming"
    made.events.emit(BreakerPause(None))
    assert stats.pause_reason == "the cache is warming", "a reason the breakers did not set stays"
    made.events.emit(LimitPause("p/m", 3.0))
    assert stats.rate_limited == 1 and stats.rate_limit_label == "p/m" and stats.rate_limit_wait() > 2.0
    assert tally.to_dict() == {"breaker_pause": 3, "limit_pause": 1, "limit_wait_s": 0.0}


async def test_a_run_stores_what_its_engine_did(tmp_path: Path) -> None:
    words = tmp_path / "words.txt"
    words.write_text("".join(f"낱말{i}\n" for i in range(10)), encoding="utf-8")
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    options = ProcessOptions(input_path=words, output=tmp_path / "out.jsonl", provider="simulated", db_url=db,
                             simulator=SimulatorConfig(server_error_rate=0.3, seed=4))
    clock = FakeClock()
    made = Resilience(retry=RetryConfig(max_attempts=10, max_elapsed=None), clock=clock, rng=random.Random(3))
    result = await process(options, policy=made)
    assert result.outcome is not None and result.outcome.stats.done == 10
    ledger = Ledger(open_database(db))
    stored = (ledger.run_metrics(result.outcome.run_id) or {})["resilience_events"]
    ledger.engine.dispose()
    assert made.retry is not None and stored["retry"] == made.retry.stats.retries > 0
