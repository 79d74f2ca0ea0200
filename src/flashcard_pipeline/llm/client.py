"""Async client for OpenAI-compatible ``/chat/completions`` endpoints.

It makes exactly one HTTP call per :meth:`LLMClient.complete` and turns every way that call can
go wrong into one of the structured errors from :mod:`flashcard_pipeline.errors`, so retries,
breakers and the ledger can decide on class and code alone. It never retries by itself and
never parses the content: both belong to layers above.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Self

import aiohttp
import httpx

from flashcard_pipeline import jsontext
from flashcard_pipeline.errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    EmptyContentError,
    InsufficientCreditsError,
    InvalidResponseError,
    NetworkError,
    ProviderError,
    RateLimitError,
    RequestTimeoutError,
    ServerError,
    StructuredError,
    TruncatedOutputError,
)
from flashcard_pipeline.headers import header_number
from flashcard_pipeline.llm.providers import ProviderConfig
from flashcard_pipeline.llm.transport import AiohttpTransport
from flashcard_pipeline.llm.types import ChatRequest, ChatResponse, Usage
from flashcard_pipeline.redaction import redact

logger = logging.getLogger("flashcard_pipeline.llm")

#: Enough of a body to diagnose a failure, small enough to store for every failed call.
SNIPPET_CHARS = 500
MESSAGE_CHARS = 240
USER_AGENT = "flashcard-pipeline"


_WIDE_CHARS = re.compile(
    "[\u1100-\u11ff\u3000-\u30ff\u3130-\u318f\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]"
)


@functools.lru_cache(maxsize=256)
def estimate_tokens(text: str) -> int:
    """Rough token count without a tokenizer: ~1 per Hangul/CJK/kana char, ~1 per 3.5 other chars.

    Good enough for cost previews and token-bucket limits, which only need the right magnitude. Remembered: every
    request of a stage repeats its system prompt.
    """
    wide = len(_WIDE_CHARS.findall(text))
    return wide + math.ceil((len(text) - wide) / 3.5)


def estimate_request_tokens(request: ChatRequest, *, format_tokens: int | None = None) -> int:
    """Worst-case tokens a request can consume: the prompt (with schema) plus ``max_tokens``. ``format_tokens``
    is the response format's estimate when the caller has it already (stages compute it once per schema)."""
    per_message_overhead = 4
    prompt = sum(estimate_tokens(m.content) + per_message_overhead for m in request.messages)
    if request.response_format is not None:
        prompt += (format_tokens if format_tokens is not None
                   else estimate_tokens(json.dumps(request.response_format, ensure_ascii=False)))
    return prompt + request.max_tokens


def parse_retry_after(headers: Mapping[str, str], *, now: datetime) -> float | None:
    """Seconds the server asked us to wait, from ``retry-after-ms`` or ``Retry-After`` (seconds or
    HTTP date relative to ``now``); ``None`` when absent or unparseable."""
    milliseconds = header_number(headers.get("retry-after-ms"))
    if milliseconds is not None:
        return milliseconds / 1000
    raw = headers.get("retry-after")
    if raw is None:
        return None
    seconds = header_number(raw)
    if seconds is not None:
        return seconds
    try:
        when = parsedate_to_datetime(raw.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _redact_tree(value: Any, secrets: tuple[str, ...]) -> Any:
    """Redact and bound every string in a JSON value so it can be stored in ``details``."""
    if isinstance(value, str):
        return _shorten(redact(value, secrets), SNIPPET_CHARS)
    if isinstance(value, Mapping):
        return {_redact_tree(str(k), secrets): _redact_tree(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_tree(v, secrets) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return _redact_tree(str(value), secrets)


@dataclass(frozen=True)
class _ErrorBody:
    code: str | int | None
    message: str | None
    type: str | None
    metadata: Any


def _error_body(payload: Any, *, allow_detail: bool) -> _ErrorBody | None:
    """Read OpenRouter/OpenAI ``{"error": {...}}``, Ollama ``{"error": "..."}`` or FastAPI ``{"detail": ...}``."""
    if not isinstance(payload, Mapping):
        return None
    error = payload.get("error")
    if isinstance(error, Mapping):
        code = error.get("code")
        message = error.get("message")
        kind = error.get("type")
        return _ErrorBody(
            code=code if isinstance(code, str | int) and not isinstance(code, bool) else None,
            message=message if isinstance(message, str) else None,
            type=kind if isinstance(kind, str) else None,
            metadata=error.get("metadata"),
        )
    if isinstance(error, str) and error:
        return _ErrorBody(code=None, message=error, type=None, metadata=None)
    if allow_detail:
        detail = payload.get("detail", payload.get("message"))
        if isinstance(detail, str) and detail:
            return _ErrorBody(code=None, message=detail, type=None, metadata=None)
        if detail is not None:
            return _ErrorBody(code=None, message=None, type=None, metadata=detail)
    return None


def _status_class(status: int, body: _ErrorBody | None) -> tuple[type[APIError], str | None]:
    if status in (401, 403):
        metadata = body.metadata if body else None
        if status == 403 and isinstance(metadata, Mapping) and (
            "flagged_input" in metadata or "reasons" in metadata
        ):
            # OpenRouter uses 403 for moderation flags: this item's input is the problem, not the key.
            return BadRequestError, "moderation_flagged"
        return AuthenticationError, None
    mapping: dict[int, tuple[type[APIError], str | None]] = {
        400: (BadRequestError, None),
        402: (InsufficientCreditsError, None),
        404: (BadRequestError, "not_found"),
        408: (RequestTimeoutError, None),
        413: (BadRequestError, "payload_too_large"),
        422: (BadRequestError, "unprocessable_entity"),
        429: (RateLimitError, None),
    }
    if status in mapping:
        return mapping[status]
    if status >= 500:
        return ServerError, None
    return APIError, "unexpected_status"


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(0, value)
    if isinstance(value, float) and math.isfinite(value):
        return max(0, int(value))
    return 0


def _as_cost(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None


def _parse_usage(raw: Any) -> Usage:
    if not isinstance(raw, Mapping):
        return Usage(prompt_tokens=0, completion_tokens=0, cost_usd=None)
    return Usage(
        prompt_tokens=_as_int(raw.get("prompt_tokens")),
        completion_tokens=_as_int(raw.get("completion_tokens")),
        cost_usd=_as_cost(raw.get("cost")),
    )


def _content_text(content: Any) -> str:
    """Message content is a string, or (some providers) a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"] for part in content if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        )
    return ""


_TIMEOUT_CODES: tuple[tuple[type[httpx.TimeoutException], str], ...] = (
    (httpx.ConnectTimeout, "connect_timeout"),
    (httpx.ReadTimeout, "read_timeout"),
    (httpx.WriteTimeout, "write_timeout"),
    (httpx.PoolTimeout, "pool_timeout"),
)
_NETWORK_CODES: tuple[tuple[type[httpx.RequestError], str], ...] = (
    (httpx.ConnectError, "connect_error"),
    (httpx.RemoteProtocolError, "protocol_error"),
    (httpx.ReadError, "read_error"),
    (httpx.WriteError, "write_error"),
)


def _utc_now() -> datetime:
    return datetime.now(UTC)


#: JSON as httpx's ``json=`` writes it.
_dumps = jsontext.standard_compact


def _direct_post(http: httpx.AsyncClient, transport: AiohttpTransport, url: str, headers: Mapping[str, str],
                 timeout: httpx.Timeout) -> tuple[AiohttpTransport, dict[str, str], aiohttp.ClientTimeout] | None:
    """What posting straight through our own transport needs: the headers httpx's client would merge (its defaults,
    ours, the body's type) and the timeouts as the transport maps them. None when httpx would route the URL
    elsewhere (a proxy from the environment): then the call goes through httpx's client."""
    if http._transport_for_url(httpx.URL(url)) is not transport:
        return None
    merged = http.headers.copy()
    merged.update(headers)
    merged["Content-Type"] = "application/json"
    return transport, dict(merged.items()), aiohttp.ClientTimeout(sock_connect=timeout.connect,
                                                                   sock_read=timeout.read, connect=timeout.pool)


class LLMClient:
    """One provider, one pooled HTTP client, one call per :meth:`complete`.

    Use as ``async with LLMClient(provider) as client:``; an injected ``http`` client stays
    owned (and closed) by the caller.
    """

    def __init__(
        self,
        provider: ProviderConfig,
        *,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.perf_counter,
        max_connections: int = 100,
        wall_clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._provider = provider
        self._secrets = provider.secrets()
        self._clock = clock
        self._wall_clock = wall_clock
        self._owns_http = http is None
        timeout = httpx.Timeout(connect=provider.connect_timeout, read=provider.read_timeout,
                                write=provider.write_timeout, pool=provider.pool_timeout)
        # Loading the CA bundle costs tens of milliseconds; a plain-HTTP provider (a local server, the simulator)
        # never needs it.
        transport = AiohttpTransport(limits=httpx.Limits(max_connections=max_connections,
                                                         max_keepalive_connections=max_connections),
                                     verify=provider.base_url.startswith("https://"))
        self._http = http or httpx.AsyncClient(
            timeout=timeout,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
        )
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT, **provider.extra_headers}
        if provider.api_key is not None:
            headers["Authorization"] = f"Bearer {provider.api_key.get_secret_value()}"
        self._headers = headers
        self._direct = _direct_post(self._http, transport, provider.chat_completions_url, headers, timeout) \
            if http is None else None
        #: The JSON of each response format seen (one per stage), kept with the dict it was made from.
        self._format_json: dict[int, tuple[Any, str]] = {}

    def __repr__(self) -> str:
        return f"LLMClient(provider={self._provider.name.value!r}, base_url={self._provider.base_url!r})"

    @property
    def provider(self) -> ProviderConfig:
        return self._provider

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def complete(self, request: ChatRequest) -> ChatResponse:
        """Send one chat completion and return its non-empty, untruncated content.

        Raises a :class:`StructuredError` subclass for every failure; never retries.
        """
        body = {**self._provider.extra_body, **request.to_body()}
        started = self._clock()
        status: int | None = None
        try:
            response = await self._post(body, request)
            status = response.status_code
            latency = self._clock() - started
            result = self._parse(response, request, latency)
        except StructuredError as exc:
            logger.debug(
                "llm call failed provider=%s model=%s status=%s code=%s latency=%.3fs",
                self._provider.name.value,
                request.model,
                status,
                exc.code,
                self._clock() - started,
            )
            raise
        logger.debug(
            "llm call provider=%s model=%s status=%s latency=%.3fs prompt_tokens=%d completion_tokens=%d "
            "cost_usd=%s",
            self._provider.name.value,
            result.model,
            result.status_code,
            result.latency_s,
            result.usage.prompt_tokens,
            result.usage.completion_tokens,
            result.usage.cost_usd,
        )
        return result

    def _encode(self, body: dict[str, Any]) -> bytes:
        """``body`` as httpx's ``json=`` encodes it, byte for byte (a dict's compact dump is each key's dump and
        its value's, in order). The response format (the stage's schema, most of a request's structure and shared
        by every request of a stage) is serialised once, not per call; the messages (most of its text, strings
        only) by orjson; the rest, which may hold a user's float parameters, by the standard library."""
        parts = []
        for key, value in body.items():
            if key == "messages":
                text = jsontext.compact(value)
            elif key == "response_format" and value is not None:
                known = self._format_json.get(id(value))
                if known is None or known[0] is not value:
                    known = self._format_json[id(value)] = (value, _dumps(value))
                text = known[1]
            else:
                text = _dumps(value)
            parts.append(f"{_dumps(key)}:{text}")
        return ("{" + ",".join(parts) + "}").encode()

    async def _post(self, body: dict[str, Any], request: ChatRequest) -> httpx.Response:
        url = self._provider.chat_completions_url
        try:
            if self._direct is not None:
                transport, headers, timeout = self._direct
                return await transport.post(url, self._encode(body), headers, timeout)
            return await self._http.post(url, content=self._encode(body),
                                         headers={**self._headers, "Content-Type": "application/json"})
        except httpx.TimeoutException as exc:
            code = next((c for kind, c in _TIMEOUT_CODES if isinstance(exc, kind)), "timeout")
            raise RequestTimeoutError(
                self._text(f"{self._provider.name.value} call to {url} timed out ({code})"),
                code=code,
                details=self._base_details(request),
            ) from exc
        except httpx.RequestError as exc:
            code = next((c for kind, c in _NETWORK_CODES if isinstance(exc, kind)), "network_error")
            raise NetworkError(
                self._text(f"{self._provider.name.value} call to {url} failed: {type(exc).__name__}: {exc}"),
                code=code,
                details=self._base_details(request),
            ) from exc

    def _parse(self, response: httpx.Response, request: ChatRequest, latency: float) -> ChatResponse:
        if not response.is_success:
            raise self._status_error(response, request)
        # A body that is not an API answer (a proxy's HTML page, a cut stream) is the service failing, not the
        # model: it waits and counts like a 5xx, instead of drawing on the re-ask budget meant for bad output.
        try:
            payload = jsontext.loads(response.content)
        except ValueError as exc:
            raise ProviderError(
                self._text(f"{self._provider.name.value} answered HTTP {response.status_code} with a non-JSON body"),
                code="malformed_body",
                details=self._details(request, response),
            ) from exc
        if not isinstance(payload, dict):
            raise ProviderError(
                self._text(f"{self._provider.name.value} answered with JSON that is not an object"),
                code="malformed_body",
                details=self._details(request, response),
            )
        usage = _parse_usage(payload.get("usage"))
        error = _error_body(payload, allow_detail=False)
        if error is not None:
            raise self._provider_error(error, request, response, usage)
        choices = payload.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
            raise InvalidResponseError(
                self._text(f"{self._provider.name.value} answer has no choices"),
                code="no_choices",
                details=self._details(request, response, usage),
            )
        choice = choices[0]
        choice_error = _error_body(choice, allow_detail=False)
        if choice_error is not None:
            raise self._provider_error(choice_error, request, response, usage)
        finish_reason = choice.get("finish_reason")
        finish_reason = finish_reason if isinstance(finish_reason, str) else None
        message = choice.get("message")
        message = message if isinstance(message, Mapping) else {}
        content = _content_text(message.get("content"))
        refusal = message.get("refusal")
        if isinstance(refusal, str) and refusal.strip():
            details = self._details(request, response, usage)
            details["refusal"] = _shorten(redact(refusal, self._secrets), SNIPPET_CHARS)
            raise EmptyContentError(
                self._text(f"{request.model} refused: {refusal}"), code="refusal", details=details
            )
        if finish_reason == "length":
            details = self._details(request, response, usage)
            details.update(max_tokens=request.max_tokens, content_chars=len(content))
            raise TruncatedOutputError(
                self._text(f"{request.model} hit max_tokens={request.max_tokens}; the answer is cut off"),
                details=details,
            )
        if not content.strip():
            code = "content_filter" if finish_reason == "content_filter" else None
            raise EmptyContentError(
                self._text(f"{request.model} returned no content (finish_reason={finish_reason})"),
                code=code,
                details=self._details(request, response, usage),
            )
        model = payload.get("model")
        response_id = payload.get("id")
        return ChatResponse(
            content=content,
            finish_reason=finish_reason,
            usage=usage,
            model=model if isinstance(model, str) and model else request.model,
            response_id=response_id if isinstance(response_id, str) else None,
            latency_s=latency,
            status_code=response.status_code,
            headers=httpx.Headers(response.headers),
        )

    def _status_error(self, response: httpx.Response, request: ChatRequest) -> APIError:
        status = response.status_code
        try:
            payload: Any = json.loads(response.content)
        except ValueError:
            payload = None
        error = _error_body(payload, allow_detail=True)
        cls, code = _status_class(status, error)
        reason = (error.message if error else None) or response.reason_phrase or "no message"
        details = self._details(request, response)
        if error is not None:
            details.update(self._error_details(error))
        return cls(
            self._text(f"{self._provider.name.value} returned HTTP {status} for {request.model}: {reason}"),
            status_code=status,
            response=details["response"],
            code=code,
            details=details,
            retry_after=parse_retry_after(response.headers, now=self._wall_clock()),
        )

    def _provider_error(
        self, error: _ErrorBody, request: ChatRequest, response: httpx.Response, usage: Usage
    ) -> StructuredError:
        """An error object inside an HTTP 200 body. Its code, when it is an HTTP status of the caller's own
        making (400, 401, 402, 403, 429, ...), gets that status's error, so a refused key or exhausted credit
        is not retried; upstream failures (5xx, or no code) are a retryable :class:`ProviderError`."""
        details = self._details(request, response, usage)
        details["http_status"] = response.status_code
        details.update(self._error_details(error))
        if isinstance(error.code, int):
            details["status_code"] = error.code
        message = self._text(
            f"{self._provider.name.value} reported an error for {request.model}: {error.message or 'no message'}")
        if isinstance(error.code, int) and 400 <= error.code < 500:
            cls, code = _status_class(error.code, error)
            return cls(message, status_code=error.code, response=details["response"], code=code, details=details)
        return ProviderError(message, details=details)

    def _error_details(self, error: _ErrorBody) -> dict[str, Any]:
        found = {"provider_code": error.code, "error_type": error.type, "metadata": error.metadata}
        return {k: _redact_tree(v, self._secrets) for k, v in found.items() if v is not None}

    def _base_details(self, request: ChatRequest) -> dict[str, Any]:
        return {"provider": self._provider.name.value, "model": request.model}

    def _details(
        self, request: ChatRequest, response: httpx.Response, usage: Usage | None = None
    ) -> dict[str, Any]:
        details = self._base_details(request)
        details["status_code"] = response.status_code
        details["response"] = _shorten(redact(response.text, self._secrets), SNIPPET_CHARS)
        if usage is not None and (usage.total_tokens or usage.cost_usd is not None):
            # A failed answer may still be billed; keep what it cost for the ledger.
            details["usage"] = {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "cost_usd": usage.cost_usd,
            }
        return details

    def _text(self, message: str) -> str:
        return _shorten(redact(message, self._secrets), MESSAGE_CHARS)
