"""An OpenAI-compatible chat-completions server that answers the pipeline's two stages offline.

It replaces the real provider in tests, benchmarks and the demo, so it is deterministic (answers
from :mod:`.content`, faults from seeded RNGs) and can misbehave on purpose: every failure the
client must survive (5xx, 429, hangs, dropped connections, broken or schema-violating JSON,
OpenRouter-style errors inside a 200, empty or truncated output) has its own probability.

Every HTTP error speaks the dialect of the provider being simulated (``SimulatorConfig.flavor``), so a
client's error parsing is exercised against the bodies it will really meet: OpenAI's
``{"error": {"message", "type", "param", "code"}}`` or OpenRouter's ``{"error": {"code": <status>,
"message", "metadata"}}``. Streaming is refused with a 400 rather than answered with a body the client
cannot read as server-sent events.

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
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any, Literal, Self

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flashcard_pipeline.llm.client import estimate_tokens
from flashcard_pipeline.models import TermAnalysis
from flashcard_pipeline.simulator.content import analysis_for, cards_for, speech_for

__all__ = [
    "COMPLETION_PRICE_PER_MILLION",
    "DEFAULT_PORT",
    "MODEL_IDS",
    "PROMPT_PRICE_PER_MILLION",
    "Flavor",
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
MODELS_PATHS = ("/v1/models", "/api/v1/models")
SPEECH_PATHS = ("/v1/audio/speech", "/api/v1/audio/speech")
#: OpenAI's limit on the input of one speech request, in characters.
SPEECH_MAX_INPUT = 4096
#: What ``GET /v1/models`` lists: the simulated provider's default model (chat answers any model name).
MODEL_IDS: tuple[str, ...] = ("simulated/flashcard-sim",)
#: A fixed ``created`` stamp (2025-01-01 UTC) keeps the model list identical run to run.
_MODELS_CREATED = 1_735_689_600
_UPSTREAM = "simulated-upstream"
WINDOW_SECONDS = 60.0
#: Answer for a request with no known stage schema: valid JSON, so ``json_object`` mode clients cope.
OTHER_STAGE_CONTENT = "{}"
_TOKENS_PER_MESSAGE = 4
_SHUTDOWN_TIMEOUT = 0.5
#: An early retry must be early by more than this (the client's clock starts when the answer arrives, later).
_CLOCK_SLACK = 1e-3

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[Any]]
#: Whose wire dialect the simulator speaks in its error bodies (and model list).
Flavor = Literal["openai", "openrouter"]


class Stage(StrEnum):
    """Which pipeline stage a request belongs to, from ``response_format.json_schema.name``."""

    TERM_ANALYSIS = "term_analysis"
    FLASHCARD_SET = "flashcard_set"
    OTHER = "other"
    #: ``POST /v1/audio/speech``: text to speech, answered with a short MP3.
    SPEECH = "speech"


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
    flavor: Flavor = Field(
        default="openai", description="whose dialect to speak: OpenAI's error.type/param/code or OpenRouter's "
                                      "error.code/message/metadata (and per-token prices in /v1/models)")
    latency: float | tuple[float, float] = Field(
        default=0.0, description="seconds before answering: fixed, or a (min, max) range drawn per request")
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    limit_window: float = Field(
        default=60.0, gt=0, le=60.0, description="seconds over which the per-minute limits are enforced, pro rata "
                                                 "(600/min over 5 s: 50 per 5 s), as providers that check a minute's "
                                                 "limit over shorter periods do; /stats reports the peak requests "
                                                 "received in any such window")
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
    down_models: tuple[str, ...] = Field(
        default=(), description="models in a full outage: every chat request for one is answered 503 (others "
                                "answer as configured), to try fallback models; comma list")
    heeds_feedback: bool = Field(
        default=False, description="a re-ask that sends the rejected answer back with a message about it is "
                                   "answered without an injected invalid-JSON or schema fault, as a model that reads "
                                   "the errors would (a blind re-ask of the same question is not)")

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
    #: The most chat requests received (admitted or not) in any ``limit_window`` seconds: what all clients together
    #: sent, to compare with the limit (``requests_per_minute * limit_window / 60``).
    peak_requests_per_window: int = 0
    #: Requests for a payload (model, stage, term) that arrived before the Retry-After its last 429 gave.
    early_retries: int = 0
    #: Good answers paid more than once: per stage and term, every ``ok`` after the first.
    paid_twice: int = 0

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
    early_retries: int = 0
    #: Per payload, when its last 429's Retry-After ends (on the simulator's clock).
    not_before: dict[str, float] = field(default_factory=dict)

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
            early_retries=self.early_retries,
            paid_twice=sum(n - 1 for c in self.successes.values() for n in c.values() if n > 1),
        )


def _cost(prompt_tokens: int, completion_tokens: int) -> float:
    return (prompt_tokens * PROMPT_PRICE_PER_MILLION + completion_tokens * COMPLETION_PRICE_PER_MILLION) / 1e6


class _BadRequest(Exception):
    """The client sent something no provider would accept; answered with 400, never simulated.

    ``param`` names the offending request field, as OpenAI's ``error.param`` does.
    """

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


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
    #: What OpenAI's reasoning models take instead of ``max_tokens``; the same budget here.
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stream: bool | None = None


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
    #: The request carries an earlier answer and a user message after it: a re-ask with feedback.
    feedback: bool = False

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

    def __init__(self, rpm: int | None, tpm: int | None, clock: Clock, span: float = WINDOW_SECONDS) -> None:
        self._rpm, self._tpm, self._clock, self._span = rpm, tpm, clock, span
        # What one window of ``span`` seconds admits: the per-minute limits pro rata (the limits themselves when
        # the window is a minute).
        self._rpm_cap = None if rpm is None else max(1, math.floor(rpm * span / WINDOW_SECONDS))
        self._tpm_cap = None if tpm is None else max(1, math.floor(tpm * span / WINDOW_SECONDS))
        self._entries: deque[list[float]] = deque()
        self._tokens = 0.0

    def admit(self, tokens: int) -> tuple[list[float] | None, float]:
        """(entry to add completion tokens to, 0) if admitted, else (None, seconds until it would be)."""
        now = self._clock()
        while self._entries and self._entries[0][0] <= now - self._span:
            self._tokens -= self._entries.popleft()[1]
        wait = 0.0
        if self._rpm_cap is not None and len(self._entries) >= self._rpm_cap:
            wait = self._entries[len(self._entries) - self._rpm_cap][0] + self._span - now
        if self._tpm_cap is not None and self._entries and self._tokens + tokens > self._tpm_cap:
            # Without a fit the request alone exceeds the limit: it waits for an empty window.
            freed, expires = 0.0, self._entries[-1][0]
            for stamp, used in self._entries:
                freed += used
                if self._tokens - freed + tokens <= self._tpm_cap:
                    expires = stamp
                    break
            wait = max(wait, expires + self._span - now)
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
        while self._entries and self._entries[0][0] <= now - self._span:
            self._tokens -= self._entries.popleft()[1]
        reset = f"{self._entries[0][0] + self._span - now:.3f}s" if self._entries else "0s"
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


class _Arrivals:
    """Every chat request received, over a sliding window of ``span`` seconds, and the most the window ever held."""

    def __init__(self, span: float, clock: Clock) -> None:
        self._span, self._clock = span, clock
        self._stamps: deque[float] = deque()
        self.peak = 0

    def note(self) -> None:
        now = self._clock()
        self._stamps.append(now)
        while self._stamps[0] <= now - self._span:
            self._stamps.popleft()
        self.peak = max(self.peak, len(self._stamps))


@dataclass(frozen=True)
class _Failure:
    """One error reply, independent of the dialect it is rendered in.

    ``code`` and ``param`` only reach OpenAI bodies (OpenRouter's code is the HTTP status);
    ``metadata`` only OpenRouter's.
    """

    status: int
    message: str
    code: str | None = None
    param: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def body(self, flavor: Flavor) -> dict[str, Any]:
        if flavor == "openrouter":
            return {"error": {"code": self.status, "message": self.message, "metadata": self.metadata}}
        return {"error": {"message": self.message, "type": _openai_type(self.status), "param": self.param,
                          "code": self.code}}


def _openai_type(status: int) -> str:
    """OpenAI's ``error.type`` for a status: the SDK and clients branch on it, not on the message."""
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def _http_failure(request: web.Request, exc: web.HTTPException) -> _Failure:
    """aiohttp's own refusals (unknown path, wrong method, oversized body) as provider errors."""
    where = f"{request.method} {request.path}"
    if exc.status == 404:
        return _Failure(404, f"Invalid URL ({where})")
    if exc.status == 405:
        return _Failure(405, f"Invalid method for URL ({where})")
    return _Failure(exc.status, exc.text or exc.reason)


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
        self._window = _Window(self.config.requests_per_minute, self.config.tokens_per_minute, clock,
                               self.config.limit_window)
        self._arrivals = _Arrivals(self.config.limit_window, clock)
        self._attempts: Counter[str] = Counter()
        self._runner: web.AppRunner | None = None
        self._host = ""
        self._port: int | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._http_errors])
        for path in CHAT_PATHS:
            app.router.add_post(path, self._chat)
        for path in SPEECH_PATHS:
            app.router.add_post(path, self._speech)
        for path in MODELS_PATHS:
            app.router.add_get(path, self._models)
            app.router.add_get(path + "/{model:.+}", self._model)
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
        return replace(self._stats.snapshot(), peak_requests_per_window=self._arrivals.peak)

    # -- handlers ------------------------------------------------------------------------------

    def _reply(self, failure: _Failure, headers: dict[str, str] | None = None) -> web.Response:
        return web.json_response(failure.body(self.config.flavor), status=failure.status, headers=headers)

    @web.middleware
    async def _http_errors(self, request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """Turn aiohttp's plain-text 4xx into JSON error bodies a provider's SDK can parse."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            allow = exc.headers.get("Allow")
            return self._reply(_http_failure(request, exc), headers={"Allow": allow} if allow else None)

    async def _models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_entry(m) for m in MODEL_IDS]})

    async def _model(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        if model not in MODEL_IDS:
            return self._reply(_Failure(404, f"The model '{model}' does not exist", code="model_not_found",
                                        param="model"))
        return web.json_response(self._model_entry(model))

    def _model_entry(self, model: str) -> dict[str, Any]:
        """OpenAI's model object; OpenRouter's list adds a display name and per-token prices."""
        entry: dict[str, Any] = {"id": model, "object": "model", "created": _MODELS_CREATED,
                                 "owned_by": "flashcard-pipeline"}
        if self.config.flavor == "openrouter":
            entry["name"] = f"Simulated: {model}"
            entry["pricing"] = {"prompt": _per_token(PROMPT_PRICE_PER_MILLION),
                                "completion": _per_token(COMPLETION_PRICE_PER_MILLION)}
        return entry

    async def _speech(self, request: web.Request) -> web.Response:
        """OpenAI's text-to-speech: ``{"model", "input", "voice", "response_format"}`` -> audio/mpeg."""
        self._stats.total += 1
        self._stats.stages[Stage.SPEECH] += 1
        try:
            body = json.loads(await request.read())
        except ValueError:
            body = None
        text = body.get("input") if isinstance(body, dict) else None
        if not isinstance(text, str) or not text.strip() or len(text) > SPEECH_MAX_INPUT:
            self._stats.outcomes[Outcome.BAD_REQUEST] += 1
            return self._reply(_Failure(400, f"'input' must be a non-empty string of at most {SPEECH_MAX_INPUT} "
                                             "characters", code="invalid_value", param="input"))
        if body.get("response_format", "mp3") != "mp3":
            self._stats.outcomes[Outcome.BAD_REQUEST] += 1
            return self._reply(_Failure(400, "the simulator speaks mp3 only", code="invalid_value",
                                        param="response_format"))
        self._stats.outcomes[Outcome.OK] += 1
        return web.Response(body=speech_for(text), content_type="audio/mpeg")

    async def _health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _stats_handler(self, _request: web.Request) -> web.Response:
        return web.json_response(self.stats().to_dict())

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        stats = self._stats
        stats.total += 1
        self._arrivals.note()
        try:
            chat = self._parse(await request.read())
        except _BadRequest as exc:
            stats.outcomes[Outcome.BAD_REQUEST] += 1
            return self._reply(_Failure(400, str(exc), code=exc.code, param=exc.param,
                                        metadata={"param": exc.param} if exc.param else {}))
        stats.stages[chat.stage] += 1
        payload = f"{chat.model}:{chat.stage.value}:{chat.term}"
        if self._clock() < stats.not_before.get(payload, -math.inf):
            stats.early_retries += 1

        entry, wait = self._window.admit(chat.prompt_tokens)
        if entry is None:
            stats.outcomes[Outcome.RATE_LIMITED] += 1
            retry_after = max(1, math.ceil(wait))
            stats.not_before[payload] = self._clock() + retry_after - _CLOCK_SLACK
            headers = {"Retry-After": str(retry_after), **self._limit_headers()}
            return self._reply(_Failure(429, "Rate limit exceeded: "
                                        f"requests_per_minute={self.config.requests_per_minute}, "
                                        f"tokens_per_minute={self.config.tokens_per_minute}; retry later.",
                                        code="rate_limit_exceeded", metadata={"headers": headers}),
                               headers=headers)

        if chat.model in self.config.down_models:
            stats.outcomes[Outcome.SERVER_ERROR] += 1
            return self._reply(_Failure(503, f"Simulated outage: {chat.model} is down.", metadata={
                "provider_name": _UPSTREAM, "raw": "model unavailable"}))
        rng = self._request_rng(chat)
        fault = self._pick_fault(rng)
        if chat.feedback and self.config.heeds_feedback and fault in (Outcome.MALFORMED_JSON, Outcome.SCHEMA_INVALID):
            fault = None
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
            return self._reply(_Failure(status, f"Simulated upstream failure (HTTP {status}).", metadata={
                "provider_name": _UPSTREAM, "raw": f"upstream answered HTTP {status}"}))
        if fault is Outcome.RATE_LIMIT:
            stats.outcomes[fault] += 1
            stats.not_before[payload] = self._clock() + self.config.retry_after_seconds - _CLOCK_SLACK
            return self._reply(_Failure(429, "Simulated provider rate limit; retry later.", code="rate_limit_exceeded",
                                        metadata={"provider_name": _UPSTREAM, "raw": "upstream rate limit"}),
                               headers={"Retry-After": str(self.config.retry_after_seconds)})
        if fault is Outcome.ERROR_IN_BODY:
            # OpenRouter-only behaviour, so OpenRouter's shape whatever the flavor: OpenAI has no error-in-200.
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
            raise _BadRequest(f"invalid request body: {_first_error(exc)}", param=_param_of(exc)) from exc
        if body.stream:
            raise _BadRequest("stream=true is not supported by the simulator: it answers with one JSON body, "
                              "never server-sent events; leave stream out or set it to false",
                              param="stream", code="unsupported_parameter")
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
                raise _BadRequest(f"invalid <input> for {stage.value}: {detail}", param="messages") from exc
            answer = result.model_dump(mode="json")
        roles = [m.role for m in body.messages]
        feedback = "assistant" in roles and roles[-1] == "user" and roles.index("assistant") < len(roles) - 1
        return _Chat(model=body.model, stage=stage, term=term, answer=answer, prompt_tokens=prompt_tokens,
                     max_tokens=body.max_completion_tokens or body.max_tokens, feedback=feedback)

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


def _param_of(exc: ValidationError) -> str | None:
    """The top-level request field the first error is about, for ``error.param``."""
    loc = exc.errors(include_url=False)[0]["loc"]
    return loc[0] if loc and isinstance(loc[0], str) else None


def _per_token(per_million: float) -> str:
    """OpenRouter's price notation: USD per token as a plain decimal string."""
    return f"{per_million / 1e6:.12f}".rstrip("0").rstrip(".")


def _input_block(messages: list[_Message]) -> Any:
    """The JSON between ``<input>`` and ``</input>`` in the last user message that has one (a re-ask appends the
    rejected answer and a user message about it after the question)."""
    users = [m for m in messages if m.role == "user"]
    if not users:
        raise _BadRequest("no user message", param="messages")
    user = next((m for m in reversed(users) if "<input>" in m.text), users[-1])
    text = user.text
    start, end = text.find("<input>"), text.rfind("</input>")
    if start < 0 or end < start:
        raise _BadRequest("no user message has an <input>...</input> block", param="messages")
    try:
        return json.loads(text[start + len("<input>"): end])
    except json.JSONDecodeError as exc:
        raise _BadRequest(f"the <input> block is not valid JSON: {exc}", param="messages") from exc


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
