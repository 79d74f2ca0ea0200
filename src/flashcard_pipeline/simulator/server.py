"""An OpenAI-compatible chat-completions server that answers the pipeline's two stages offline.

It replaces the real provider in tests, benchmarks and the demo, so it is deterministic (answers
from :mod:`.content`, faults from seeded RNGs) and can misbehave on purpose: every failure the
client must survive (5xx, 429, hangs, dropped connections, broken or schema-violating JSON,
OpenRouter-style errors inside a 200, empty or truncated output) has its own probability.

Token accounting is an estimate, not a tokenizer: one token per Hangul/CJK/kana character and one
per 3.5 other non-space characters, plus 4 tokens of framing per message. That is close enough to
real counts for budgets and rate limits to behave realistically.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import socket
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Self

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flashcard_pipeline.llm.client import estimate_tokens
from flashcard_pipeline.models import TermAnalysis
from flashcard_pipeline.simulator.content import analysis_for, cards_for

__all__ = [
    "COMPLETION_PRICE_PER_MILLION",
    "DEFAULT_PORT",
    "PROMPT_PRICE_PER_MILLION",
    "Outcome",
    "Simulator",
    "SimulatorConfig",
    "SimulatorStats",
    "Stage",
    "estimate_tokens",
    "run_simulator",
    "serve",
]

#: Simulated price in USD per million tokens, used for ``usage.cost``.
PROMPT_PRICE_PER_MILLION = 0.15
COMPLETION_PRICE_PER_MILLION = 0.60
DEFAULT_PORT = 8765
CHAT_PATHS = ("/v1/chat/completions", "/api/v1/chat/completions")
WINDOW_SECONDS = 60.0
#: Answer for a request with no known stage schema: valid JSON, so ``json_object`` mode clients cope.
OTHER_STAGE_CONTENT = "{}"
_TOKENS_PER_MESSAGE = 4
_SHUTDOWN_TIMEOUT = 0.5

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[Any]]


class Stage(StrEnum):
    """Which pipeline stage a request belongs to, from ``response_format.json_schema.name``."""

    TERM_ANALYSIS = "term_analysis"
    FLASHCARD_SET = "flashcard_set"
    OTHER = "other"


class Outcome(StrEnum):
    """How a chat request was answered; the injectable faults share their config field's prefix."""

    OK = "ok"
    SERVER_ERROR = "server_error"
    RATE_LIMIT = "rate_limit"
    HANG = "hang"
    MALFORMED_JSON = "malformed_json"
    SCHEMA_INVALID = "schema_invalid"
    ERROR_IN_BODY = "error_in_body"
    EMPTY_CONTENT = "empty_content"
    TRUNCATED = "truncated"
    DROPPED_CONNECTION = "dropped_connection"
    #: A real ``requests_per_minute`` / ``tokens_per_minute`` limit was hit (not an injected fault).
    RATE_LIMITED = "rate_limited"
    #: The answer outgrew the request's ``max_tokens`` and was cut (finish_reason "length").
    LENGTH_LIMIT = "length_limit"
    BAD_REQUEST = "bad_request"


FAULTS: tuple[Outcome, ...] = (
    Outcome.SERVER_ERROR, Outcome.RATE_LIMIT, Outcome.HANG, Outcome.MALFORMED_JSON, Outcome.SCHEMA_INVALID,
    Outcome.ERROR_IN_BODY, Outcome.EMPTY_CONTENT, Outcome.TRUNCATED, Outcome.DROPPED_CONNECTION,
)


def _rate() -> Any:
    return Field(default=0.0, ge=0.0, le=1.0)


class SimulatorConfig(BaseModel):
    """How the simulator behaves; the defaults answer every request instantly and correctly."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 0
    latency: float | tuple[float, float] = Field(
        default=0.0, description="seconds before answering: fixed, or a (min, max) range drawn per request")
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    server_error_rate: float = _rate()
    rate_limit_rate: float = _rate()
    hang_rate: float = _rate()
    malformed_json_rate: float = _rate()
    schema_invalid_rate: float = _rate()
    error_in_body_rate: float = _rate()
    empty_content_rate: float = _rate()
    truncated_rate: float = _rate()
    dropped_connection_rate: float = _rate()
    hang_seconds: float = Field(default=30.0, ge=0.0, description="how long a hung request sleeps")
    retry_after_seconds: int = Field(default=1, ge=1, description="Retry-After of injected 429s")
    rate_limit_headers: bool = Field(
        default=True, description="send x-ratelimit-{limit,remaining,reset}-{requests,tokens} for configured limits")

    @model_validator(mode="after")
    def _check(self) -> Self:
        low, high = self.latency_range
        if low < 0:
            raise ValueError(f"latency must not be negative, got {self.latency!r}")
        if low > high:
            raise ValueError(f"latency range must be (min, max) with min <= max, got {self.latency!r}")
        total = sum(self.fault_rates.values())
        if total > 1.0 + 1e-9:
            rates = ", ".join(f"{k}_rate={v}" for k, v in self.fault_rates.items() if v)
            raise ValueError(f"fault rates must add up to at most 1, got {total:g} ({rates})")
        return self

    @property
    def latency_range(self) -> tuple[float, float]:
        return (self.latency, self.latency) if isinstance(self.latency, int | float) else self.latency

    @property
    def fault_rates(self) -> dict[Outcome, float]:
        return {fault: getattr(self, f"{fault.value}_rate") for fault in FAULTS}


@dataclass(frozen=True)
class SimulatorStats:
    """A snapshot of what the simulator has answered so far."""

    total: int
    outcomes: dict[str, int]
    stages: dict[str, int]
    tokens_in: int
    tokens_out: int
    cost_usd: float
    #: Successful (``ok``) answers per term over all stages: a normal run gives each term 2.
    term_successes: dict[str, int]
    #: The same per stage (``term_analysis`` / ``flashcard_set`` / ``other``): any value > 1 is a repeat.
    term_successes_by_stage: dict[str, dict[str, int]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Recorder:
    total: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    stages: Counter[str] = field(default_factory=Counter)
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    successes: dict[str, Counter[str]] = field(default_factory=dict)

    def snapshot(self) -> SimulatorStats:
        terms: Counter[str] = Counter()
        for counter in self.successes.values():
            terms.update(counter)
        return SimulatorStats(
            total=self.total,
            outcomes={o.value: self.outcomes.get(o.value, 0) for o in Outcome},
            stages={s.value: self.stages.get(s.value, 0) for s in Stage},
            tokens_in=self.tokens_in,
            tokens_out=self.tokens_out,
            cost_usd=round(self.cost_usd, 10),
            term_successes=dict(terms),
            term_successes_by_stage={stage: dict(c) for stage, c in self.successes.items()},
        )


def _cost(prompt_tokens: int, completion_tokens: int) -> float:
    return (prompt_tokens * PROMPT_PRICE_PER_MILLION + completion_tokens * COMPLETION_PRICE_PER_MILLION) / 1e6


class _BadRequest(Exception):
    """The client sent something no provider would accept; answered with 400, never simulated."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(str(part.get("text", "")) for part in self.content if isinstance(part, dict))
        return self.content or ""


class _ChatBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = "simulator"
    messages: list[_Message] = Field(min_length=1)
    response_format: dict[str, Any] | None = None
    max_tokens: int | None = Field(default=None, ge=1)


class _AnalysisInput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    term: str = Field(min_length=1, max_length=200)
    type: str | None = None
    language: str = "Korean"
    learner_language: str = "English"
    hints: dict[str, Any] = Field(default_factory=dict)


class _CardsInput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    term: str = Field(min_length=1, max_length=200)
    language: str = "Korean"
    learner_language: str = "English"
    analysis: TermAnalysis
    hints: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class _Chat:
    """A parsed, valid chat request with the answer it deserves when nothing goes wrong."""

    model: str
    stage: Stage
    term: str | None
    answer: dict[str, Any] | None
    prompt_tokens: int
    max_tokens: int | None

    @property
    def content(self) -> str:
        if self.answer is None:
            return OTHER_STAGE_CONTENT
        return json.dumps(self.answer, ensure_ascii=False)


class _Window:
    """Sliding 60 s window of admitted requests and their tokens, on an injectable clock.

    A request is charged its prompt tokens on admission and its completion tokens once answered.
    A request bigger than the whole token limit is still admitted into an empty window, as
    providers do, rather than being refused forever.
    """

    def __init__(self, rpm: int | None, tpm: int | None, clock: Clock) -> None:
        self._rpm, self._tpm, self._clock = rpm, tpm, clock
        self._entries: deque[list[float]] = deque()
        self._tokens = 0.0

    def admit(self, tokens: int) -> tuple[list[float] | None, float]:
        """(entry to add completion tokens to, 0) if admitted, else (None, seconds until it would be)."""
        now = self._clock()
        while self._entries and self._entries[0][0] <= now - WINDOW_SECONDS:
            self._tokens -= self._entries.popleft()[1]
        wait = 0.0
        if self._rpm is not None and len(self._entries) >= self._rpm:
            wait = self._entries[len(self._entries) - self._rpm][0] + WINDOW_SECONDS - now
        if self._tpm is not None and self._entries and self._tokens + tokens > self._tpm:
            # Without a fit the request alone exceeds the limit: it waits for an empty window.
            freed, expires = 0.0, self._entries[-1][0]
            for stamp, used in self._entries:
                freed += used
                if self._tokens - freed + tokens <= self._tpm:
                    expires = stamp
                    break
            wait = max(wait, expires + WINDOW_SECONDS - now)
        if wait > 0:
            return None, wait
        entry = [now, float(tokens)]
        self._entries.append(entry)
        self._tokens += tokens
        return entry, 0.0

    def add(self, entry: list[float], tokens: int) -> None:
        entry[1] += tokens
        self._tokens += tokens

    def headers(self) -> dict[str, str]:
        """``x-ratelimit-*`` as OpenAI sends them; the reset is when the oldest entry leaves the window."""
        now = self._clock()
        while self._entries and self._entries[0][0] <= now - WINDOW_SECONDS:
            self._tokens -= self._entries.popleft()[1]
        reset = f"{self._entries[0][0] + WINDOW_SECONDS - now:.3f}s" if self._entries else "0s"
        found: dict[str, str] = {}
        if self._rpm is not None:
            found.update({"x-ratelimit-limit-requests": str(self._rpm),
                          "x-ratelimit-remaining-requests": str(max(0, self._rpm - len(self._entries))),
                          "x-ratelimit-reset-requests": reset})
        if self._tpm is not None:
            found.update({"x-ratelimit-limit-tokens": str(self._tpm),
                          "x-ratelimit-remaining-tokens": str(max(0, int(self._tpm - self._tokens))),
                          "x-ratelimit-reset-tokens": reset})
        return found


def _error(status: int, message: str, type_: str, code: str | int,
           headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": type_, "code": code}},
                             status=status, headers=headers)


class Simulator:
    """The simulated provider: configuration, counters and the aiohttp application serving them.

    ``clock`` drives the rate-limit window and ``sleep`` every deliberate delay (latency, hangs), so
    tests can replace both and never wait.
    """

    def __init__(self, config: SimulatorConfig | None = None, *, clock: Clock = time.monotonic,
                 sleep: Sleep = asyncio.sleep) -> None:
        self.config = config or SimulatorConfig()
        self._clock = clock
        self._sleep = sleep
        self._stats = _Recorder()
        self._window = _Window(self.config.requests_per_minute, self.config.tokens_per_minute, clock)
        self._attempts: Counter[str] = Counter()
        self._runner: web.AppRunner | None = None
        self._host = ""
        self._port: int | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application()
        for path in CHAT_PATHS:
            app.router.add_post(path, self._chat)
        app.router.add_get("/stats", self._stats_handler)
        app.router.add_get("/health", self._health)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on ``host:port`` in the running event loop; port 0 picks a free port."""
        if self._runner is not None:
            raise RuntimeError("simulator already started")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family)
        # handler_cancellation: a client that times out on a hang frees the handler at once.
        runner = web.AppRunner(self.make_app(), access_log=None, handler_cancellation=True,
                               shutdown_timeout=_SHUTDOWN_TIMEOUT)
        try:
            await runner.setup()
            await web.SockSite(runner, sock).start()
        except BaseException:
            await runner.cleanup()
            sock.close()
            raise
        self._runner, self._host, self._port = runner, host, sock.getsockname()[1]

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("simulator not started")
        return self._port

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL (ends in ``/v1``) a client should be pointed at."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}/v1"

    def stats(self) -> SimulatorStats:
        return self._stats.snapshot()

    # -- handlers ------------------------------------------------------------------------------

    async def _health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _stats_handler(self, _request: web.Request) -> web.Response:
        return web.json_response(self.stats().to_dict())

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        stats = self._stats
        stats.total += 1
        try:
            chat = self._parse(await request.read())
        except _BadRequest as exc:
            stats.outcomes[Outcome.BAD_REQUEST] += 1
            return _error(400, str(exc), "invalid_request_error", "invalid_request")
        stats.stages[chat.stage] += 1

        entry, wait = self._window.admit(chat.prompt_tokens)
        if entry is None:
            stats.outcomes[Outcome.RATE_LIMITED] += 1
            return _error(429, "Rate limit exceeded: "
                          f"requests_per_minute={self.config.requests_per_minute}, "
                          f"tokens_per_minute={self.config.tokens_per_minute}; retry later.",
                          "rate_limit_error", "rate_limit_exceeded",
                          headers={"Retry-After": str(max(1, math.ceil(wait))), **self._limit_headers()})

        rng = self._request_rng(chat)
        fault = self._pick_fault(rng)
        low, high = self.config.latency_range
        delay = rng.uniform(low, high) if high > low else low
        if fault is Outcome.HANG:
            # Counted before sleeping: the client usually gives up and the handler is cancelled.
            stats.outcomes[fault] += 1
            delay += self.config.hang_seconds
        if delay > 0:
            await self._sleep(delay)

        if fault is Outcome.DROPPED_CONNECTION:
            stats.outcomes[fault] += 1
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)  # never sent: the connection is already gone
        if fault is Outcome.SERVER_ERROR:
            stats.outcomes[fault] += 1
            status = rng.choice((500, 502, 503))
            return _error(status, f"Simulated upstream failure (HTTP {status}).", "server_error", status)
        if fault is Outcome.RATE_LIMIT:
            stats.outcomes[fault] += 1
            return _error(429, "Simulated provider rate limit; retry later.", "rate_limit_error",
                          "rate_limit_exceeded", headers={"Retry-After": str(self.config.retry_after_seconds)})
        if fault is Outcome.ERROR_IN_BODY:
            stats.outcomes[fault] += 1
            return web.json_response({"error": {
                "code": 502, "message": "upstream provider failed",
                "metadata": {"provider_name": "simulated-upstream", "raw": "connection reset by upstream"},
            }})
        return self._answer(chat, fault, rng, entry)

    # -- helpers -------------------------------------------------------------------------------

    def _parse(self, raw: bytes) -> _Chat:
        try:
            body = _ChatBody.model_validate_json(raw)
        except ValidationError as exc:
            raise _BadRequest(f"invalid request body: {_first_error(exc)}") from exc
        schema = (body.response_format or {}).get("json_schema")
        name = schema.get("name") if isinstance(schema, dict) else None
        stage = Stage(name) if name in (Stage.TERM_ANALYSIS, Stage.FLASHCARD_SET) else Stage.OTHER
        prompt_tokens = sum(estimate_tokens(m.text) + _TOKENS_PER_MESSAGE for m in body.messages)
        term: str | None = None
        answer: dict[str, Any] | None = None
        if stage is not Stage.OTHER:
            payload = _input_block(body.messages)
            seed = self.config.seed
            try:
                if stage is Stage.TERM_ANALYSIS:
                    first = _AnalysisInput.model_validate(payload)
                    hints = {str(k): str(v) for k, v in first.hints.items() if v is not None}
                    term = first.term.strip()
                    result: BaseModel = analysis_for(term, type=first.type, language=first.language,
                                                     learner_language=first.learner_language, hints=hints,
                                                     seed=seed)
                else:
                    second = _CardsInput.model_validate(payload)
                    term = second.term.strip()
                    result = cards_for(term, second.analysis, language=second.language,
                                       learner_language=second.learner_language, seed=seed,
                                       hints={str(k): str(v) for k, v in second.hints.items() if v is not None})
            except (ValidationError, ValueError) as exc:
                detail = _first_error(exc) if isinstance(exc, ValidationError) else str(exc)
                raise _BadRequest(f"invalid <input> for {stage.value}: {detail}") from exc
            answer = result.model_dump(mode="json")
        return _Chat(model=body.model, stage=stage, term=term, answer=answer, prompt_tokens=prompt_tokens,
                     max_tokens=body.max_tokens)

    def _request_rng(self, chat: _Chat) -> random.Random:
        """An RNG per (stage, term, attempt): faults repeat run to run whatever the request order."""
        key = f"{chat.stage.value}:{chat.term}" if chat.term is not None else chat.stage.value
        self._attempts[key] += 1
        return random.Random(f"{self.config.seed}:{key}:{self._attempts[key]}")

    def _pick_fault(self, rng: random.Random) -> Outcome | None:
        draw = rng.random()
        for fault, rate in self.config.fault_rates.items():
            if draw < rate:
                return fault
            draw -= rate
        return None

    def _answer(self, chat: _Chat, fault: Outcome | None, rng: random.Random,
                entry: list[float]) -> web.Response:
        content = chat.content
        finish = "stop"
        outcome = Outcome.OK if fault is None else fault
        if fault is Outcome.MALFORMED_JSON:
            content = content[: max(1, len(content) * 2 // 3)].rstrip("}") + ', "'
        elif fault is Outcome.SCHEMA_INVALID:
            content = json.dumps(_break_schema(chat, rng), ensure_ascii=False)
        elif fault is Outcome.EMPTY_CONTENT:
            content = ""
        elif fault is Outcome.TRUNCATED:
            content = content[: max(1, len(content) // 2)]
            finish = "length"
        completion_tokens = estimate_tokens(content)
        if chat.max_tokens is not None and completion_tokens > chat.max_tokens and finish == "stop":
            content = content[: len(content) * chat.max_tokens // completion_tokens]
            completion_tokens = chat.max_tokens
            finish = "length"
            if outcome is Outcome.OK:
                outcome = Outcome.LENGTH_LIMIT

        stats = self._stats
        if outcome is not Outcome.HANG:
            stats.outcomes[outcome] += 1
        stats.tokens_in += chat.prompt_tokens
        stats.tokens_out += completion_tokens
        cost = _cost(chat.prompt_tokens, completion_tokens)
        stats.cost_usd += cost
        self._window.add(entry, completion_tokens)
        if outcome is Outcome.OK and chat.term is not None:
            stats.successes.setdefault(chat.stage.value, Counter())[chat.term] += 1

        return web.json_response({
            "id": f"gen-sim-{self.config.seed}-{stats.total:08d}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": chat.model,
            "provider": "simulated",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": chat.prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": chat.prompt_tokens + completion_tokens, "cost": cost},
        }, headers=self._limit_headers())

    def _limit_headers(self) -> dict[str, str]:
        return self._window.headers() if self.config.rate_limit_headers else {}


def _first_error(exc: ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in error["loc"]) or "body"
    return f"{where}: {error['msg']}"


def _input_block(messages: list[_Message]) -> Any:
    """The JSON between ``<input>`` and ``</input>`` in the last user message."""
    user = next((m for m in reversed(messages) if m.role == "user"), None)
    if user is None:
        raise _BadRequest("no user message")
    text = user.text
    start, end = text.find("<input>"), text.rfind("</input>")
    if start < 0 or end < start:
        raise _BadRequest("the last user message has no <input>...</input> block")
    try:
        return json.loads(text[start + len("<input>"): end])
    except json.JSONDecodeError as exc:
        raise _BadRequest(f"the <input> block is not valid JSON: {exc}") from exc


def _break_schema(chat: _Chat, rng: random.Random) -> dict[str, Any]:
    """Valid JSON that the stage's model must reject: a required field gone, or too few cards."""
    answer = dict(chat.answer or {})
    if chat.stage is Stage.FLASHCARD_SET:
        answer["cards"] = answer.get("cards", [])[:1]
        return answer
    if chat.stage is Stage.TERM_ANALYSIS:
        answer.pop(rng.choice(("ipa", "pos", "primary_meaning", "metaphor", "explanation")))
        return answer
    return {"unexpected": True}


@contextlib.asynccontextmanager
async def run_simulator(config: SimulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0, *,
                        clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> AsyncIterator[Simulator]:
    """Serve a :class:`Simulator` in the current event loop for the duration of the block."""
    sim = Simulator(config, clock=clock, sleep=sleep)
    await sim.start(host, port)
    try:
        yield sim
    finally:
        await sim.stop()


async def serve(config: SimulatorConfig | None = None, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
                ready: Callable[[Simulator], None] | None = None) -> None:
    """Serve until cancelled (the CLI's ``simulate``); ``ready`` gets the started simulator, e.g. to print its URL."""
    async with run_simulator(config, host, port) as sim:
        if ready is not None:
            ready(sim)
        await asyncio.Event().wait()
