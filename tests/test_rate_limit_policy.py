"""The rate-limit policy: requests and tokens per provider and model, refunds, pause-all on 429, AIMD,
x-ratelimit-* headers, settings, and the pipeline and CLI around it.

Convergence runs against the simulator's own sliding-window limiter on virtual time (minutes in a
fraction of a second); the end-to-end run uses the real simulator with limits high enough to be quick.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import random
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flashcard_pipeline.cli.app import app
from flashcard_pipeline.config import rate_limit_settings
from flashcard_pipeline.errors import ConfigurationError, RateLimitError, ServerError
from flashcard_pipeline.hooks import LeaseLost
from flashcard_pipeline.llm.types import ChatResponse, Usage
from flashcard_pipeline.resilience import (
    CallContext,
    CircuitBreakerConfig,
    DirectPolicy,
    LimitGroup,
    LimitPause,
    PolicyPipeline,
    ProviderAnswer,
    RateLimitSettings,
    Resilience,
)
from flashcard_pipeline.resilience.ratelimit import LimitBackend, MemoryLimits, RateLimitHeaders, plan_limit
from flashcard_pipeline.resilience.ratelimit.headers import parse_duration
from flashcard_pipeline.resilience.ratelimit.sharded import ShardedRateLimiter
from flashcard_pipeline.resilience.retry import RetryConfig, RetryPolicy
from flashcard_pipeline.resilience.testing import FakeClock, VirtualClock
from flashcard_pipeline.runner import ProcessOptions, default_policy, process
from flashcard_pipeline.simulator import SimulatorConfig
from flashcard_pipeline.simulator.server import _Window
from flashcard_pipeline.storage.db import open_database
from flashcard_pipeline.storage.ledger import Ledger


@pytest.fixture(autouse=True)
def _no_rl_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RL_"):
            monkeypatch.delenv(name)


def response(prompt: int = 100, completion: int = 50, headers: dict[str, str] | None = None) -> ChatResponse:
    return ChatResponse(content="{}", finish_reason="stop", usage=Usage(prompt, completion), model="m",
                        response_id=None, latency_s=0.01, status_code=200, headers=headers or {})


def context(tokens: int = 1000, key: str = "k") -> CallContext:
    return CallContext(stage="nuance", item_key=key, provider="p", model="m", estimated_tokens=tokens)


class Limits:
    """An engine with rate limits only, driven the way these tests do it: a call returns ``(value, response)``
    and, as the pipeline's attempt does, its usage and headers are reported to the call's context."""

    def __init__(self, settings: RateLimitSettings, *, clock: Any = None,
                 limits: LimitBackend[Any] | None = None) -> None:
        self.engine = Resilience(ratelimit=settings, clock=clock, limits=limits)

    async def execute(self, call: Any, ctx: CallContext) -> Any:
        async def attempt() -> Any:
            result = await call()
            if isinstance(result, tuple) and isinstance(result[-1], ChatResponse):
                ctx.report(ProviderAnswer(result[-1].usage.total_tokens, result[-1].headers))
            return result

        return await self.engine.execute(attempt, ctx)

    def group(self, provider: str, model: str) -> LimitGroup:
        return self.engine.limit_group(provider, model)

    @property
    def groups(self) -> list[LimitGroup]:
        return self.engine.limit_groups

    @property
    def limits(self) -> LimitBackend[Any]:
        assert self.engine.ratelimit is not None
        return self.engine.ratelimit.backend


# -- headers and plans ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "seconds"), [
    ("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("2.5", 2.5), ("0s", 0.0),
    ("", None), ("soon", None), ("1s soon", None), ("-3", None), (None, None)])
def test_parse_duration(text: str | None, seconds: float | None) -> None:
    assert parse_duration(text) == (None if seconds is None else pytest.approx(seconds))


def test_headers_openai_style_and_openrouter_reset_in_epoch_milliseconds() -> None:
    parsed = RateLimitHeaders.parse({"X-RateLimit-Limit-Requests": "500", "x-ratelimit-remaining-requests": "0",
                                     "x-ratelimit-reset-requests": "1.5s", "x-ratelimit-limit-tokens": "200000",
                                     "x-ratelimit-remaining-tokens": "1000", "x-ratelimit-reset-tokens": "6m0s"})
    assert parsed.for_dimension("requests") == (500, 0, 1.5)
    assert parsed.for_dimension("tokens") == (200000, 1000, 360)
    now = 1_700_000_000.0
    openrouter = RateLimitHeaders.parse({"X-RateLimit-Limit": "20", "X-RateLimit-Remaining": "0",
                                         "X-RateLimit-Reset": str(int((now + 4) * 1000))}, now)
    assert openrouter.limit_requests is None, "its window is not a minute"
    assert (openrouter.remaining_requests, openrouter.reset_requests) == (0, pytest.approx(4.0))
    assert RateLimitHeaders.parse({"x-ratelimit-limit-requests": "lots"}).limit_requests is None


@pytest.mark.parametrize("per_minute", [10, 600, 90_000])
@pytest.mark.parametrize("algorithm", ["token_bucket", "sliding_window"])
def test_plans_never_put_more_than_the_safe_share_in_a_minute(per_minute: float, algorithm: str) -> None:
    rate, burst = plan_limit(per_minute, algorithm=algorithm, safety=0.985, burst_share=0.02,  # type: ignore[arg-type]
                             min_burst=1)
    assert rate * 60 + (burst if algorithm == "token_bucket" else 0) <= per_minute * 0.985 + 1e-9
    assert rate * 60 >= per_minute * 0.88 if per_minute > 10 else rate > 0
    assert plan_limit(math.inf, algorithm="token_bucket", safety=1, burst_share=0.1, min_burst=5)[0] == math.inf


# -- refunds, burst growth -----------------------------------------------------------------------------

async def test_unused_tokens_go_back_and_excess_is_charged() -> None:
    clock = FakeClock()
    policy = Limits(RateLimitSettings(requests_per_minute=6000, tokens_per_minute=100_000), clock=clock)

    async def answered() -> tuple[str, ChatResponse]:
        return "ok", response(300, 100)

    await policy.execute(answered, context(2000))
    group = policy.group("p", "m")
    tokens = group.tokens.limiter
    assert tokens.metrics.refunded == pytest.approx(1600)
    assert tokens.available() == pytest.approx(tokens.burst - 400, abs=1)

    async def overran() -> tuple[str, ChatResponse]:
        return "ok", response(1500, 1500)

    await policy.execute(overran, context(2000))
    assert tokens.metrics.charged == pytest.approx(1000)


async def test_a_failed_call_with_reported_usage_is_settled_too() -> None:
    policy = Limits(RateLimitSettings(tokens_per_minute=100_000), clock=FakeClock())

    async def failing() -> None:
        raise ServerError("boom", details={"usage": {"prompt_tokens": 200, "completion_tokens": 0}})

    with pytest.raises(ServerError):
        await policy.execute(failing, context(1200))
    assert policy.group("p", "m").tokens.limiter.metrics.refunded == pytest.approx(1000)


@pytest.mark.parametrize("shards", [1, 4])
async def test_a_call_that_decides_not_to_send_gives_its_request_and_tokens_back(shards: int) -> None:
    # A worker that lost its lease while queued for a slot: the slot is the next caller's, not wasted.
    policy = Limits(RateLimitSettings(requests_per_minute=600, tokens_per_minute=100_000, shards=shards),
                    clock=FakeClock())
    sent: list[str] = []

    async def lost() -> None:
        raise LeaseLost

    async def answered() -> tuple[str, ChatResponse]:
        sent.append("call")
        return "ok", response(300, 100)

    group = policy.group("p", "m")
    requests, tokens = group.requests.limiter, group.tokens.limiter
    full_requests, full_tokens = requests.available(), tokens.available()
    for _ in range(3):
        with pytest.raises(LeaseLost):
            await policy.execute(lost, context(2000))
    assert requests.available() == pytest.approx(full_requests)
    assert tokens.available() == pytest.approx(full_tokens)
    assert requests.metrics.refunded == pytest.approx(3)
    assert tokens.metrics.refunded == pytest.approx(6000)
    await policy.execute(answered, context(2000))
    assert sent == ["call"]
    assert requests.available() == pytest.approx(full_requests - 1)


async def test_the_tokens_burst_grows_to_the_largest_call_but_not_past_a_configured_limit() -> None:
    policy = Limits(RateLimitSettings(tokens_per_minute=10_000), clock=FakeClock())
    group = policy.group("p", "m")
    assert group.tokens.limiter.burst == pytest.approx(200)
    await group.acquire(3000)
    assert group.tokens.limiter.burst == pytest.approx(3000)
    rate, burst = group.tokens.limiter.rate, group.tokens.limiter.burst
    assert rate * 60 + burst <= 10_000 * 0.985 + 1e-6
    with pytest.raises(ConfigurationError, match="--tpm"):
        await group.acquire(20_000)


# -- 429s ----------------------------------------------------------------------------------------------

async def test_a_429_pauses_every_caller_of_that_limit_and_lowers_it_once() -> None:
    clock = FakeClock(autojump=False)
    policy = Limits(RateLimitSettings(requests_per_minute=600), clock=clock)
    started: list[tuple[str, float]] = []
    answer = asyncio.Event()

    def call(name: str, fail: bool):
        async def attempt() -> tuple[str, ChatResponse]:
            started.append((name, clock.monotonic()))
            if fail:
                await answer.wait()
                raise RateLimitError("429", status_code=429, retry_after=5.0)
            return name, response()
        return attempt

    pauses: list[tuple[str, float]] = []
    policy.engine.events.subscribe(LimitPause, lambda event: pauses.append((event.group, event.seconds)))
    first = asyncio.create_task(policy.execute(call("a", True), context(key="a")))
    second = asyncio.create_task(policy.execute(call("b", True), context(key="b")))
    for _ in range(20):
        await asyncio.sleep(0)
    assert {n for n, _ in started} == {"a", "b"}, "the burst lets both through"
    answer.set()
    for task in (first, second):
        with pytest.raises(RateLimitError):
            await task
    group = policy.group("p", "m")
    assert group.rate_limited == 2
    assert pauses == [("p/m", 5.0), ("p/m", 5.0)], "the progress display hears of each pause"
    assert group.requests.decreases == 1, "two 429s of one overload lower the limit once"
    assert group.requests.planned == pytest.approx(600 * 0.5), "nothing accepted yet: a plain multiplicative cut"
    third = asyncio.create_task(policy.execute(call("c", False), context(key="c")))
    unrelated = asyncio.create_task(policy.group("p", "other model").acquire(10))
    for _ in range(20):
        await asyncio.sleep(0)
    assert unrelated.done(), "another model's limits are not paused"
    while not third.done():
        clock.advance(0.5)
        for _ in range(20):
            await asyncio.sleep(0)
    assert started[-1] == ("c", pytest.approx(5.0, abs=0.6)), "nobody calls before the Retry-After"


async def test_429s_from_traffic_still_in_the_providers_window_do_not_compound_the_cut() -> None:
    """A sliding-window provider refuses for up to a minute after an overshoot, whatever we send now: below
    what it accepted in that minute, we wait the 429s out instead of cutting 3% per refusal."""
    clock = FakeClock()
    policy = Limits(RateLimitSettings(initial_requests_per_minute=600, probe_step=1e-6), clock=clock)
    group = policy.group("p", "m")

    async def accepted() -> tuple[str, ChatResponse]:
        return "ok", response()

    async def refused() -> None:
        raise RateLimitError("429", status_code=429, retry_after=1.0)

    for i in range(590):  # a minute's worth at the plan
        await policy.execute(accepted, context(key=f"k{i}"))
    with pytest.raises(RateLimitError):
        await policy.execute(refused, context())
    settled = group.requests.planned
    assert settled == pytest.approx(590 * 0.97, rel=0.02), "cut once, to just under what was accepted"
    for _ in range(6):  # refusals of calls granted after the cut, while the provider's window is still full
        with pytest.raises(RateLimitError):
            await policy.execute(refused, context())
    assert group.requests.planned == settled and group.requests.decreases == 1
    assert group.rate_limited == 7 and group.paused_total >= 7.0, "every refusal still paused every caller"

    clock.advance(61.0)  # nothing accepted for a minute: the provider's limit really is lower now
    with pytest.raises(RateLimitError):
        await policy.execute(refused, context())
    assert group.requests.planned < settled and group.requests.decreases == 2


async def test_a_429_without_retry_after_pauses_for_the_default() -> None:
    clock = FakeClock()
    policy = Limits(RateLimitSettings(requests_per_minute=600, default_pause=2.5), clock=clock)

    async def limited() -> None:
        raise RateLimitError("429", status_code=429)

    with pytest.raises(RateLimitError):
        await policy.execute(limited, context())
    group = policy.group("p", "m")
    assert group.requests.limiter.paused_for() == pytest.approx(2.5)


async def test_a_fixed_limit_is_never_lowered_when_adaptive_is_off() -> None:
    policy = Limits(RateLimitSettings(requests_per_minute=600, adaptive=False), clock=FakeClock())

    async def limited() -> None:
        raise RateLimitError("429", status_code=429, retry_after=1)

    for _ in range(3):
        with pytest.raises(RateLimitError):
            await policy.execute(limited, context())
    assert policy.group("p", "m").requests.planned == 600


# -- headers -------------------------------------------------------------------------------------------

async def test_x_ratelimit_headers_set_the_limit_and_pause_when_nothing_remains() -> None:
    clock = FakeClock()
    policy = Limits(RateLimitSettings(), clock=clock)
    group = policy.group("p", "m")
    assert group.requests.mode == "adaptive" and group.requests.planned == 60

    async def answered() -> tuple[str, ChatResponse]:
        return "ok", response(headers={"x-ratelimit-limit-requests": "3000", "x-ratelimit-remaining-requests": "0",
                                       "x-ratelimit-reset-requests": "2s", "x-ratelimit-limit-tokens": "1000000"})

    await policy.execute(answered, context())
    assert group.requests.mode == "header" and group.requests.planned == 3000
    assert group.tokens.planned == 1_000_000
    assert group.requests.limiter.rate * 60 == pytest.approx(3000 * 0.985 - 60)
    assert group.requests.limiter.paused_for() == pytest.approx(2.0)


async def test_a_header_limit_never_raises_a_lower_configured_one() -> None:
    policy = Limits(RateLimitSettings(requests_per_minute=100), clock=FakeClock())

    async def answered() -> tuple[str, ChatResponse]:
        return "ok", response(headers={"x-ratelimit-limit-requests": "500"})

    await policy.execute(answered, context())
    assert policy.group("p", "m").requests.planned == 100


# -- convergence against the simulator's sliding window, on virtual time -------------------------------


async def converge(limit: int, settings: RateLimitSettings, *, minutes: float, headers: bool = False,
                   workers: int = 24) -> dict[str, Any]:
    clock = VirtualClock()
    window = _Window(limit, None, clock.monotonic)
    rng = random.Random(7)
    policy = Limits(settings, clock=clock)
    pipeline = PolicyPipeline([RetryPolicy(RetryConfig(max_attempts=8, max_elapsed=None), clock=clock,
                                           rng=random.Random(7)), policy])
    log: list[tuple[float, bool]] = []

    async def call() -> tuple[str, ChatResponse]:
        entry, wait = window.admit(500)
        log.append((clock.monotonic(), entry is not None))
        if entry is None:
            raise RateLimitError("429", status_code=429, retry_after=float(max(1, math.ceil(wait))))
        await clock.sleep(rng.uniform(0.05, 0.4))
        window.add(entry, 300)
        return "ok", response(500, 300, {"x-ratelimit-limit-requests": str(limit)} if headers else None)

    async def worker(index: int) -> None:
        for item in itertools.count():
            await pipeline.execute(call, context(1800, f"{index}-{item}"))

    tasks = [asyncio.create_task(worker(i)) for i in range(workers)]
    await clock.run(minutes * 60)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    late = [ok for at, ok in log if 60 <= at < minutes * 60]
    return {"share_after_first_minute": sum(late) / (limit * (minutes - 1)),
            "limited_after_first_minute": (len(late) - sum(late)) / len(late),
            "limited": sum(1 for _, ok in log if not ok), "planned": policy.group("p", "m").requests.planned}


async def test_a_configured_limit_is_used_to_95_percent_without_a_single_429() -> None:
    result = await converge(300, RateLimitSettings(requests_per_minute=300), minutes=4)
    assert result["limited"] == 0
    assert result["share_after_first_minute"] >= 0.95


@pytest.mark.parametrize("limit", [60, 600])
async def test_an_unknown_limit_converges_with_under_2_percent_429s_after_the_first_minute(limit: int) -> None:
    result = await converge(limit, RateLimitSettings(), minutes=7)
    assert result["limited_after_first_minute"] < 0.02
    assert result["share_after_first_minute"] >= 0.85
    assert 0.9 * limit <= result["planned"] <= 1.1 * limit


async def test_the_sliding_window_algorithm_matches_a_sliding_window_provider() -> None:
    result = await converge(300, RateLimitSettings(requests_per_minute=300, algorithm="sliding_window"), minutes=4)
    assert result["limited"] == 0
    assert result["share_after_first_minute"] >= 0.97


# -- settings and wiring -------------------------------------------------------------------------------

def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RL_REQUESTS_PER_MINUTE", "500")
    monkeypatch.setenv("RL_SHARDS", "auto")
    monkeypatch.setenv("RL_ALGORITHM", "sliding_window")
    settings = rate_limit_settings(tpm=90_000)
    assert (settings.requests_per_minute, settings.tokens_per_minute) == (500, 90_000)
    assert settings.shards == "auto" and settings.algorithm == "sliding_window"
    assert rate_limit_settings(rpm=42).requests_per_minute == 42
    monkeypatch.setenv("RL_ALGORITHM", "leaky_bucket")
    with pytest.raises(ConfigurationError, match="RL_ALGORITHM"):
        rate_limit_settings()
    with pytest.raises(ConfigurationError, match="--rpm"):
        rate_limit_settings(rpm=0)


def test_the_default_policy_puts_the_limiter_innermost(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    engine = default_policy(ProcessOptions(input_path=tmp_path / "x.csv", rpm=120))
    policy = engine.pipeline("p", "m").policy
    assert isinstance(policy, PolicyPipeline)
    assert isinstance(policy.policies[0], RetryPolicy)
    assert isinstance(policy.policies[-1], LimitGroup)
    assert engine.ratelimit is not None and engine.ratelimit.settings.requests_per_minute == 120
    assert Resilience.find(DirectPolicy()) is None and Resilience.find(PolicyPipeline([engine])) is engine
    monkeypatch.setenv("RL_ENABLED", "false")
    assert default_policy(ProcessOptions(input_path=tmp_path / "x.csv")).ratelimit is None


def test_sharded_memory_backend_is_chosen_by_setting() -> None:
    limits = MemoryLimits(shards=4)
    assert limits.make("p/m:requests", 100, 100).shards == 4
    assert MemoryLimits(shards="auto").make("x", 100, 100).shards == 10


@pytest.mark.parametrize(("shards", "tpm"), [("auto", 1_000_000), ("4", 100_000)])
async def test_sharding_splits_the_requests_limit_but_never_the_tokens_one(tmp_path: Path, shards: str, tpm: int,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A call takes ~2,000 tokens: split into 10-token shards, or over 4 of a 2,000-token burst, it never fits."""
    monkeypatch.setenv("RL_SHARDS", shards)
    words = tmp_path / "words.txt"
    words.write_text("사과\n바나나\n학교\n", encoding="utf-8")
    options = ProcessOptions(input_path=words, output=tmp_path / "out.jsonl", provider="simulated",
                             db_url=f"sqlite:///{tmp_path / 'ledger.db'}", rpm=6000, tpm=tpm)
    policy = default_policy(options)
    result = await process(options, policy=policy)
    assert result.outcome is not None and result.outcome.stats.done == 3 and result.outcome.failures == []
    group = policy.limit_groups[0]
    assert isinstance(group.requests.limiter, ShardedRateLimiter) and group.requests.limiter.shards > 1
    assert not isinstance(group.tokens.limiter, ShardedRateLimiter)


async def test_process_publishes_the_limiter_state_and_status_reads_it(tmp_path: Path) -> None:
    words = tmp_path / "words.txt"
    words.write_text("사과\n바나나\n학교\n", encoding="utf-8")
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    options = ProcessOptions(input_path=words, output=tmp_path / "out.jsonl", provider="simulated", db_url=db,
                             rpm=6000, simulator=SimulatorConfig(requests_per_minute=6000))
    result = await process(options)
    assert result.outcome is not None and result.outcome.stats.done == 3
    ledger = Ledger(open_database(db))
    published = ledger.run_metrics(result.outcome.run_id)["ratelimit"]
    ledger.engine.dispose()
    group = published["limits"]["simulated/simulated/flashcard-sim"]
    assert group["requests"]["acquire"]["acquired"] == 6, "one request per stage per word"
    assert group["rate_limited"] == 0
    assert group["tokens"]["acquire"]["tokens"] > 6 * 1000, "each call reserved its prompt plus max_tokens"
    assert group["requests"]["mode"] == "header", "the simulator's x-ratelimit-* headers were read"

    cli = CliRunner()
    shown = cli.invoke(app, ["ratelimit", "status", "--db", db, "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["published"]["limits"] == published["limits"]
    table = cli.invoke(app, ["ratelimit", "status", "--db", db])
    assert table.exit_code == 0 and "simulated/simulated/flashcard-sim" in table.output
    assert cli.invoke(app, ["ratelimit", "status", "--db", db, "--run", "99"]).exit_code == 2


async def test_process_shows_each_429_pause_in_its_progress(tmp_path: Path) -> None:
    words = tmp_path / "words.txt"
    words.write_text("".join(f"낱말{i}\n" for i in range(12)), encoding="utf-8")
    clock = FakeClock()
    policy = Resilience(retry=RetryConfig(max_attempts=10), ratelimit=RateLimitSettings(requests_per_minute=6000),
                        clock=clock, rng=random.Random(2))
    options = ProcessOptions(input_path=words, output=tmp_path / "out.jsonl", provider="simulated",
                             db_url=f"sqlite:///{tmp_path / 'ledger.db'}",
                             simulator=SimulatorConfig(rate_limit_rate=0.25, retry_after_seconds=3, seed=8))
    result = await process(options, policy=policy)
    assert result.outcome is not None and result.outcome.stats.done == 12
    group = policy.limit_groups[0]
    stats = result.outcome.stats
    assert group.rate_limited > 0 and stats.rate_limited == group.rate_limited - group.rate_limited_noise, \
        "every 429 pause reached the stats"
    assert stats.rate_limit_label == "simulated/simulated/flashcard-sim"


def test_process_accepts_rpm_and_tpm_and_rejects_a_bad_environment(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    words = tmp_path / "words.txt"
    words.write_text("사과\n", encoding="utf-8")
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    cli = CliRunner()
    ok = cli.invoke(app, ["process", str(words), "--provider", "simulated", "--db", db, "-o",
                          str(tmp_path / "o.jsonl"), "--rpm", "3000", "--tpm", "5000000"])
    assert ok.exit_code == 0, ok.output
    monkeypatch.setenv("RL_SHARDS", "many")
    bad = cli.invoke(app, ["process", str(words), "--provider", "simulated", "--db", db])
    assert bad.exit_code == 2 and "RL_SHARDS" in bad.output


# -- RL_SHARDS against the limit -----------------------------------------------------------------------

@pytest.mark.parametrize(("settings", "named", "fits"), [
    (RateLimitSettings(shards=4), "RL_INITIAL_REQUESTS_PER_MINUTE (where the adaptive limit starts) is 60", 1),
    (RateLimitSettings(shards=4, requests_per_minute=150), "RL_REQUESTS_PER_MINUTE (--rpm) is 150", 3),
])
def test_shards_that_cannot_each_hold_one_call_are_refused_when_the_policy_is_built(settings: RateLimitSettings,
                                                                                     named: str, fits: int) -> None:
    """At 60/min the 2% burst is 1.2 requests: four shards of 0.3 would refuse every call."""
    with pytest.raises(ConfigurationError) as refused:
        Limits(settings, clock=FakeClock())
    message = str(refused.value)
    assert "\n" not in message and "tokens" not in message
    assert message.startswith("RL_SHARDS=4 needs a requests limit of at least 200 per minute")
    assert named in message and message.endswith(f"raise it or set RL_SHARDS={fits}")
    assert refused.value.code == "requests_limit_too_small"


async def test_at_the_stated_minimum_every_shard_holds_one_call() -> None:
    policy = Limits(RateLimitSettings(shards=4, requests_per_minute=200, adaptive=False), clock=FakeClock())

    async def call() -> str:
        return "sent"

    assert [await policy.execute(call, context(key=f"k{i}")) for i in range(4)] == ["sent"] * 4
    limiter = policy.group("p", "m").requests.limiter
    assert isinstance(limiter, ShardedRateLimiter) and limiter.shards == 4
    assert all(shard.burst >= 1.0 for shard in limiter._shards)


def test_shards_are_not_checked_against_a_limit_there_is_none_of_or_that_redis_holds() -> None:
    Limits(RateLimitSettings(shards=64, adaptive=False), clock=FakeClock())  # unlimited: nothing to split
    Limits(RateLimitSettings(shards=4, initial_requests_per_minute=200), clock=FakeClock())
    # Redis keeps one shared bucket whatever RL_SHARDS says (nothing connects until the first call).
    redis = Limits(RateLimitSettings(shards=4, backend="redis", redis_url="redis://127.0.0.1:1/0"))
    assert redis.limits.name == "redis"


def test_a_limit_too_small_for_one_call_is_refused_unsharded_too() -> None:
    """0.985 x 1/min plans a bucket of 0.985 requests, which never grants one."""
    with pytest.raises(ConfigurationError, match=r"^RL_REQUESTS_PER_MINUTE \(--rpm\) is 1: a requests limit under "
                                                 r"1.02 per minute cannot hold one call"):
        Limits(RateLimitSettings(requests_per_minute=1), clock=FakeClock())


@pytest.mark.parametrize(("per_minute", "warned"), [(1000, True), (2000, False)])
def test_fewer_than_ten_calls_per_shard_work_but_are_warned_about(per_minute: int, warned: bool,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="flashcard_pipeline.resilience.rate_limit"):
        Limits(RateLimitSettings(shards=4, requests_per_minute=per_minute), clock=FakeClock())
    assert any("RL_SHARDS=4 leaves 5 calls per shard" in r.getMessage() for r in caplog.records) is warned


async def test_adaptive_cuts_below_what_the_shards_hold_never_make_every_call_fail() -> None:
    """Each minute 429s halve the limit, down to the floor; the shards follow and a call still goes through."""
    clock = FakeClock()
    policy = Limits(RateLimitSettings(shards=4, initial_requests_per_minute=200), clock=clock)
    group = policy.group("p", "m")

    async def refused() -> str:
        raise RateLimitError("429", status_code=429, retry_after=1.0)

    async def accepted() -> tuple[str, ChatResponse]:
        return "sent", response()

    planned = [group.requests.planned]
    while True:
        for _ in range(3):  # every call refused: after a cut, the third refusal in a row is an overload
            with pytest.raises(RateLimitError):
                await policy.execute(refused, context())
        clock.advance(61)  # one cut per window
        if group.requests.planned == planned[-1]:
            break
        planned.append(group.requests.planned)
    assert planned[:3] == [200, 100, 50] and len(planned) > 6
    assert group.requests.planned == pytest.approx(1 / 0.985), "the floor still holds one call"
    limiter = group.requests.limiter
    assert isinstance(limiter, ShardedRateLimiter) and limiter.shards == 1 and limiter.configured_shards == 4
    assert await policy.execute(accepted, context()) == ("sent", response())


async def test_a_requests_limit_that_can_never_grant_a_call_says_so_instead_of_blaming_tokens() -> None:
    policy = Limits(RateLimitSettings(requests_per_minute=600, adaptive=False), clock=FakeClock())
    group = policy.group("p", "m")
    await group.requests.limiter.set_limit(0.01, 0.5)

    async def call() -> str:
        return "sent"

    with pytest.raises(ConfigurationError, match="the requests limit of 600 per minute can never grant a call") as err:
        await policy.execute(call, context(tokens=1000))
    assert "tokens" not in str(err.value) and err.value.code == "requests_limit_too_small"


@pytest.mark.parametrize(("args", "named"), [
    ([], "RL_INITIAL_REQUESTS_PER_MINUTE (where the adaptive limit starts) is 60"),
    (["--provider", "simulated", "--rpm", "60"], "RL_REQUESTS_PER_MINUTE (--rpm) is 60"),
])
def test_the_cli_refuses_rl_shards_4_with_default_limits_in_one_line_before_any_call(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], named: str) -> None:
    monkeypatch.setenv("RL_SHARDS", "4")
    words = tmp_path / "words.txt"
    words.write_text("사과\n", encoding="utf-8")
    db = tmp_path / "ledger.db"
    result = CliRunner().invoke(app, ["process", str(words), "--db", f"sqlite:///{db}", "-o",
                                      str(tmp_path / "o.jsonl"), *args])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: RL_SHARDS=4 needs a requests limit of at least 200 per minute") and named in line
    assert not db.exists(), "refused before the run started: nothing was opened, let alone sent"


# -- the retry deadline ----------------------------------------------------------------------------------

def _flaky(clock: FakeClock, sent: list[float]):
    """A call that fails once with a retryable 500, then succeeds; records when each attempt was sent."""
    async def attempt() -> tuple[str, ChatResponse]:
        sent.append(clock.monotonic())
        if len(sent) == 1:
            raise ServerError("upstream failed", status_code=500)
        return "sent", response()
    return attempt


def _deadline_retry(clock: FakeClock) -> RetryPolicy:
    return RetryPolicy(RetryConfig(max_attempts=3, max_elapsed=20, initial_delay=1, max_delay=1,
                                   jitter_enabled=False), clock=clock, rng=random.Random(0))


async def test_waiting_in_the_rate_limiter_does_not_count_against_the_retry_deadline() -> None:
    """At 3 per minute the second call queues ~30 s; with a 20 s deadline it must still get its retry."""
    clock = FakeClock()
    limiter = Limits(RateLimitSettings(requests_per_minute=3, adaptive=False), clock=clock)
    retry = _deadline_retry(clock)
    await limiter.execute(_flaky(clock, [0.0]), context(key="first"))  # takes the burst: the next one queues
    sent: list[float] = []
    call = _flaky(clock, sent)
    second = context(key="second")  # one context for the whole request, as the pipeline passes it
    result = await retry.execute(lambda: limiter.execute(call, second), second)
    assert result == ("sent", response())
    assert len(sent) == 2 and sent[0] >= 29, "the first attempt waited its turn in the limiter"
    assert retry.stats.retries == 1 and retry.stats.gave_up == 0


async def test_the_default_policy_order_skips_limiter_waits_in_the_deadline_too() -> None:
    """retry, breaker, limiter, as runner.default_policy builds them."""
    clock = FakeClock()
    retry = _deadline_retry(clock)
    engine = Resilience(breaker=CircuitBreakerConfig(), ratelimit=RateLimitSettings(requests_per_minute=3,
                                                                                    adaptive=False), clock=clock)
    pipeline = PolicyPipeline([retry, engine])
    await engine.limit_group("p", "m").execute(_flaky(clock, [0.0]), context(key="first"))
    sent: list[float] = []
    assert await pipeline.execute(_flaky(clock, sent), context(key="second")) == ("sent", response())
    assert len(sent) == 2 and sent[0] >= 29 and retry.stats.gave_up == 0


async def test_a_429_pauses_every_call_even_with_unlimited_buckets() -> None:
    """RL_ADAPTIVE=false and no --rpm: both buckets are unlimited, and the Retry-After still holds for everyone
    (an unlimited bucket used to grant straight through the pause)."""
    clock = FakeClock()
    limits = Limits(RateLimitSettings(adaptive=False), clock=clock)

    async def ok() -> tuple[str, ChatResponse]:
        return "ok", ChatResponse(content="{}", finish_reason="stop", usage=Usage(200, 100), model="m",
                                  response_id=None, latency_s=0.1, status_code=200)

    async def limited() -> None:
        raise RateLimitError("429", status_code=429, retry_after=3.0)

    ctx = CallContext(stage="nuance", item_key="k", provider="p", model="m", estimated_tokens=1000)
    await limits.execute(ok, ctx)
    assert clock.monotonic() == 0.0, "unlimited: no wait"
    with pytest.raises(RateLimitError):
        await limits.execute(limited, ctx)
    sent: list[float] = []

    async def timed() -> tuple[str, ChatResponse]:
        sent.append(clock.monotonic())
        return await ok()

    await asyncio.gather(*(limits.execute(timed, ctx) for _ in range(5)))
    assert sent and min(sent) >= 3.0 - 1e-9, "nobody was sent before the Retry-After"
    assert max(sent) == pytest.approx(3.0), "and then everyone at once: the limits are unlimited"
