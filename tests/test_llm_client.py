"""LLM client and provider resolution, scripted with ``httpx.MockTransport`` (no sockets)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from flashcard_pipeline.errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    EmptyContentError,
    InsufficientCreditsError,
    InvalidResponseError,
    MalformedJSONError,
    NetworkError,
    ProviderError,
    RateLimitError,
    RequestTimeoutError,
    ServerError,
    StructuredError,
    TruncatedOutputError,
)
from flashcard_pipeline.llm import (
    ChatMessage,
    ChatRequest,
    LLMClient,
    ProviderConfig,
    ProviderName,
    estimate_request_tokens,
    estimate_tokens,
    parse_retry_after,
    redact,
    resolve_provider,
)
from flashcard_pipeline.llm.client import MESSAGE_CHARS, SNIPPET_CHARS

KEY = "sk-or-v1-0123456789abcdefSECRET9876543210"
NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)

Handler = Callable[[httpx.Request], httpx.Response]


def openrouter() -> ProviderConfig:
    return resolve_provider("openrouter", api_key=KEY, env={})


def keyless() -> ProviderConfig:
    return resolve_provider("openai-compatible", base_url="http://127.0.0.1:11434/v1/", env={})


def chat_request(**overrides: Any) -> ChatRequest:
    fields: dict[str, Any] = {
        "model": "openai/gpt-4o-mini",
        "messages": (ChatMessage("system", "You analyse words."), ChatMessage("user", "사과")),
    }
    fields.update(overrides)
    return ChatRequest(**fields)


def ok_body(content: Any = '{"term": "사과"}', *, finish_reason: str | None = "stop", **extra: Any) -> dict:
    body: dict[str, Any] = {
        "id": "gen-123",
        "model": "openai/gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 120, "completion_tokens": 45, "total_tokens": 165, "cost": 0.00042},
    }
    body.update(extra)
    return body


def reply(status: int = 200, body: Any = None, *, text: str | None = None,
          headers: dict[str, str] | None = None) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        if text is not None:
            return httpx.Response(status, text=text, headers=headers)
        return httpx.Response(status, json=ok_body() if body is None else body, headers=headers)

    return handler


MakeClient = Callable[..., LLMClient]


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    opened: list[httpx.AsyncClient] = []

    def factory(handler: Handler, provider: ProviderConfig | None = None, **kwargs: Any) -> LLMClient:
        http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        opened.append(http)
        kwargs.setdefault("wall_clock", lambda: NOW)
        return LLMClient(provider or openrouter(), http=http, **kwargs)

    yield factory
    for http in opened:
        await http.aclose()


async def fail(client: LLMClient, request: ChatRequest | None = None) -> StructuredError:
    with pytest.raises(StructuredError) as info:
        await client.complete(request or chat_request())
    return info.value


# --- request shape -------------------------------------------------------------------------------


async def test_openrouter_request_has_url_auth_and_attribution(make_client: MakeClient) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=ok_body())

    schema = {"type": "json_schema", "json_schema": {"name": "TermAnalysis", "strict": True, "schema": {}}}
    client = make_client(handler)
    await client.complete(chat_request(response_format=schema, temperature=0.2, max_tokens=800,
                                       extra_body={"provider": {"sort": "price"}}))

    (sent,) = seen
    assert sent.method == "POST"
    assert str(sent.url) == "https://openrouter.ai/api/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.headers["x-openrouter-title"] == "flashcard-pipeline"
    assert sent.headers["http-referer"]
    body = json.loads(sent.content)
    assert body["model"] == "openai/gpt-4o-mini"
    assert body["messages"] == [{"role": "system", "content": "You analyse words."},
                                {"role": "user", "content": "사과"}]
    assert body["temperature"] == 0.2
    assert body["max_tokens"] == 800
    assert body["response_format"] == schema
    assert "usage" not in body
    assert body["provider"] == {"sort": "price"}


async def test_keyless_provider_sends_no_auth_header_and_no_openrouter_extras(make_client: MakeClient) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=ok_body())

    await make_client(handler, keyless()).complete(chat_request())

    (sent,) = seen
    assert str(sent.url) == "http://127.0.0.1:11434/v1/chat/completions"
    assert "authorization" not in sent.headers
    body = json.loads(sent.content)
    assert "usage" not in body
    assert "response_format" not in body


def test_request_core_fields_win_over_extra_body_and_lists_become_tuples() -> None:
    request = ChatRequest(model="m", messages=[ChatMessage("user", "hi")],  # type: ignore[arg-type]
                          extra_body={"model": "other", "seed": 7})
    assert isinstance(request.messages, tuple)
    body = request.to_body()
    assert body["model"] == "m"
    assert body["seed"] == 7


# --- successful answers --------------------------------------------------------------------------


async def test_success_parses_content_usage_cost_latency_and_headers(make_client: MakeClient) -> None:
    ticks = iter([100.0, 102.5])
    handler = reply(200, ok_body(), headers={"X-RateLimit-Remaining": "17"})
    response = await make_client(handler, clock=lambda: next(ticks)).complete(chat_request())

    assert response.content == '{"term": "사과"}'
    assert response.finish_reason == "stop"
    assert response.usage.prompt_tokens == 120
    assert response.usage.completion_tokens == 45
    assert response.usage.total_tokens == 165
    assert response.usage.cost_usd == pytest.approx(0.00042)
    assert response.model == "openai/gpt-4o-mini-2024-07-18"
    assert response.response_id == "gen-123"
    assert response.latency_s == pytest.approx(2.5)
    assert response.status_code == 200
    assert response.headers["x-ratelimit-remaining"] == "17"
    assert response.headers["X-RateLimit-Remaining"] == "17"


async def test_cost_absent_is_none_and_usage_absent_is_zero(make_client: MakeClient) -> None:
    no_cost = ok_body(usage={"prompt_tokens": 10, "completion_tokens": 3})
    response = await make_client(reply(200, no_cost)).complete(chat_request())
    assert response.usage.cost_usd is None
    assert response.usage.total_tokens == 13

    no_usage = ok_body()
    del no_usage["usage"], no_usage["model"], no_usage["id"]
    response = await make_client(reply(200, no_usage)).complete(chat_request())
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (0, 0)
    assert response.usage.cost_usd is None
    assert response.model == "openai/gpt-4o-mini"
    assert response.response_id is None


async def test_content_is_returned_unparsed_and_content_parts_are_joined(make_client: MakeClient) -> None:
    response = await make_client(reply(200, ok_body("not json {"))).complete(chat_request())
    assert response.content == "not json {"

    parts = [{"type": "text", "text": "hello "}, {"type": "image_url"}, {"type": "text", "text": "world"}]
    response = await make_client(reply(200, ok_body(parts))).complete(chat_request())
    assert response.content == "hello world"


# --- HTTP status mapping -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "cls", "code"),
    [
        (400, BadRequestError, "bad_request"),
        (401, AuthenticationError, "authentication_failed"),
        (403, AuthenticationError, "authentication_failed"),
        (402, InsufficientCreditsError, "insufficient_credits"),
        (404, BadRequestError, "not_found"),
        (408, RequestTimeoutError, "timeout"),
        (413, BadRequestError, "payload_too_large"),
        (422, BadRequestError, "unprocessable_entity"),
        (429, RateLimitError, "rate_limited"),
        (500, ServerError, "server_error"),
        (502, ServerError, "server_error"),
        (503, ServerError, "server_error"),
        (409, APIError, "unexpected_status"),
    ],
)
async def test_status_maps_to_error_class(make_client: MakeClient, status: int, cls: type[APIError],
                                          code: str) -> None:
    body = {"error": {"code": status, "message": f"upstream said {status}"}}
    exc = await fail(make_client(reply(status, body)))

    assert type(exc) is cls
    assert isinstance(exc, APIError)
    assert exc.status_code == status
    assert exc.code == code
    assert f"upstream said {status}" in str(exc)
    assert exc.response is not None and f"upstream said {status}" in exc.response
    assert exc.details["status_code"] == status
    assert exc.details["provider"] == "openrouter"
    assert exc.details["model"] == "openai/gpt-4o-mini"


async def test_openrouter_moderation_403_is_a_bad_request_not_an_auth_failure(make_client: MakeClient) -> None:
    body = {"error": {"code": 403, "message": "Input flagged",
                      "metadata": {"reasons": ["harassment"], "flagged_input": "...", "provider_name": "OpenAI"}}}
    exc = await fail(make_client(reply(403, body)))
    assert type(exc) is BadRequestError
    assert exc.code == "moderation_flagged"
    assert not exc.aborts_run


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"Retry-After": format_datetime(NOW + timedelta(seconds=30), usegmt=True)}, 30.0),
        ({"Retry-After": format_datetime(NOW - timedelta(seconds=30), usegmt=True)}, 0.0),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "250", "Retry-After": "9"}, 0.25),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "-3"}, None),
        ({}, None),
    ],
)
async def test_rate_limit_retry_after(make_client: MakeClient, headers: dict[str, str],
                                      expected: float | None) -> None:
    exc = await fail(make_client(reply(429, {"error": {"code": 429, "message": "slow down"}}, headers=headers)))
    assert isinstance(exc, RateLimitError)
    assert exc.retryable
    if expected is None:
        assert exc.retry_after is None
    else:
        assert exc.retry_after == pytest.approx(expected)


async def test_server_error_carries_retry_after_and_html_bodies_are_bounded(make_client: MakeClient) -> None:
    html = "<html><body>" + "Bad gateway page " * 200 + "</body></html>"
    exc = await fail(make_client(reply(502, text=html, headers={"Retry-After": "12"})))
    assert isinstance(exc, ServerError)
    assert exc.retry_after == 12.0
    assert "Bad Gateway" in str(exc)
    assert exc.response is not None and len(exc.response) <= SNIPPET_CHARS


def test_parse_retry_after_uses_the_given_now() -> None:
    header = {"retry-after": format_datetime(NOW + timedelta(minutes=2), usegmt=True)}
    assert parse_retry_after(header, now=NOW) == pytest.approx(120.0)
    assert parse_retry_after(header, now=NOW + timedelta(minutes=1)) == pytest.approx(60.0)


async def test_openrouter_error_body_supplies_message_code_and_metadata(make_client: MakeClient) -> None:
    body = {
        "error": {
            "code": 402,
            "message": "Insufficient credits. Add more using https://openrouter.ai/credits",
            "metadata": {"provider_name": "Anthropic", "raw": "RAW-UPSTREAM-MARKER " * 100},
        },
        "user_id": "user_abc",
    }
    exc = await fail(make_client(reply(402, body)))
    assert isinstance(exc, InsufficientCreditsError)
    assert exc.aborts_run
    assert "Insufficient credits" in str(exc)
    assert "RAW-UPSTREAM-MARKER" not in str(exc)
    assert "user_abc" not in str(exc)
    assert exc.details["provider_code"] == 402
    assert exc.details["metadata"]["provider_name"] == "Anthropic"
    assert len(exc.details["metadata"]["raw"]) <= SNIPPET_CHARS
    json.dumps(exc.to_dict())


async def test_string_error_codes_and_long_messages(make_client: MakeClient) -> None:
    body = {"error": {"code": "model_not_found", "type": "invalid_request_error", "message": "no " * 1000}}
    exc = await fail(make_client(reply(404, body)))
    assert isinstance(exc, BadRequestError)
    assert exc.code == "not_found"
    assert exc.details["provider_code"] == "model_not_found"
    assert exc.details["error_type"] == "invalid_request_error"
    assert len(str(exc)) <= MESSAGE_CHARS


async def test_plain_string_and_detail_error_bodies(make_client: MakeClient) -> None:
    exc = await fail(make_client(reply(404, {"error": "model 'llama9' not found"}), keyless()))
    assert "model 'llama9' not found" in str(exc)
    exc = await fail(make_client(reply(422, {"detail": "messages must not be empty"}), keyless()))
    assert "messages must not be empty" in str(exc)


# --- transport failures --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "cls", "code"),
    [
        (httpx.ConnectTimeout, RequestTimeoutError, "connect_timeout"),
        (httpx.ReadTimeout, RequestTimeoutError, "read_timeout"),
        (httpx.WriteTimeout, RequestTimeoutError, "write_timeout"),
        (httpx.PoolTimeout, RequestTimeoutError, "pool_timeout"),
        (httpx.ConnectError, NetworkError, "connect_error"),
        (httpx.RemoteProtocolError, NetworkError, "protocol_error"),
        (httpx.ReadError, NetworkError, "read_error"),
        (httpx.ProxyError, NetworkError, "network_error"),
    ],
)
async def test_transport_errors_map_with_cause(make_client: MakeClient, error: type[httpx.RequestError],
                                               cls: type[StructuredError], code: str) -> None:
    raised: list[httpx.RequestError] = []

    def handler(request: httpx.Request) -> httpx.Response:
        raised.append(error("boom", request=request))
        raise raised[0]

    exc = await fail(make_client(handler))
    assert type(exc) is cls
    assert exc.code == code
    assert exc.retryable
    assert exc.__cause__ is raised[0]
    assert exc.to_dict()["cause"] == f"{error.__name__}: boom"
    if isinstance(exc, APIError):
        assert exc.status_code is None


# --- checks on HTTP 200 bodies -------------------------------------------------------------------


async def test_a_200_body_that_is_not_an_api_answer_is_the_service_failing(make_client: MakeClient) -> None:
    """A proxy's HTML page is not bad model output: no re-ask, but a back-off and a breaker failure."""
    exc = await fail(make_client(reply(200, text="<html>oops</html>")))
    assert type(exc) is ProviderError and not isinstance(exc, MalformedJSONError)
    assert exc.code == "malformed_body" and exc.category.value == "external_service"
    assert isinstance(exc.__cause__, ValueError)
    assert "oops" in exc.details["response"]

    exc = await fail(make_client(reply(200, ["not", "an", "object"])))
    assert type(exc) is ProviderError and exc.code == "malformed_body"


@pytest.mark.parametrize(("code", "expected", "retryable"), [
    (400, BadRequestError, False), (401, AuthenticationError, False), (402, InsufficientCreditsError, False),
    (403, AuthenticationError, False), (408, RequestTimeoutError, True), (429, RateLimitError, True),
    (500, ProviderError, True), ("upstream_error", ProviderError, True),
])
async def test_an_error_in_a_200_body_is_classed_by_its_code(make_client: MakeClient, code: Any,
                                                             expected: type[StructuredError], retryable: bool) -> None:
    body = {"error": {"code": code, "message": "told in the body"}, "usage": {"prompt_tokens": 9, "cost": 0.001}}
    exc = await fail(make_client(reply(200, body)))
    assert type(exc) is expected and exc.retryable is retryable
    assert exc.details["http_status"] == 200 and exc.details["usage"]["prompt_tokens"] == 9
    if isinstance(exc, APIError):
        assert exc.status_code == code


async def test_error_object_in_200_body_is_a_provider_error(make_client: MakeClient) -> None:
    body = {"error": {"code": 502, "message": "Upstream provider went away", "metadata": {"provider_name": "X"}},
            "usage": {"prompt_tokens": 50, "completion_tokens": 0, "cost": 0.0001}}
    exc = await fail(make_client(reply(200, body)))
    assert type(exc) is ProviderError
    assert exc.details["status_code"] == 502
    assert exc.details["http_status"] == 200
    assert "Upstream provider went away" in str(exc)
    assert exc.details["usage"]["cost_usd"] == pytest.approx(0.0001)


async def test_error_inside_a_choice_is_a_provider_error(make_client: MakeClient) -> None:
    body = ok_body(None, finish_reason="error")
    body["choices"][0]["error"] = {"code": "server_error", "message": "stream reset"}
    exc = await fail(make_client(reply(200, body)))
    assert type(exc) is ProviderError
    assert "stream reset" in str(exc)


@pytest.mark.parametrize("choices", [None, [], ["text"]])
async def test_missing_choices_is_invalid(make_client: MakeClient, choices: Any) -> None:
    body = ok_body()
    if choices is None:
        del body["choices"]
    else:
        body["choices"] = choices
    exc = await fail(make_client(reply(200, body)))
    assert type(exc) is InvalidResponseError
    assert exc.code == "no_choices"


async def test_length_finish_is_truncated_and_keeps_usage(make_client: MakeClient) -> None:
    exc = await fail(make_client(reply(200, ok_body('{"term": "사', finish_reason="length"))),
                     chat_request(max_tokens=64))
    assert type(exc) is TruncatedOutputError
    assert exc.details["max_tokens"] == 64
    assert exc.details["usage"]["completion_tokens"] == 45


@pytest.mark.parametrize("content", [None, "", "   \n\t"])
async def test_empty_content(make_client: MakeClient, content: str | None) -> None:
    exc = await fail(make_client(reply(200, ok_body(content))))
    assert type(exc) is EmptyContentError
    assert exc.code == "empty_content"


async def test_content_filter_and_refusal_are_empty_content_with_specific_codes(make_client: MakeClient) -> None:
    exc = await fail(make_client(reply(200, ok_body("", finish_reason="content_filter"))))
    assert type(exc) is EmptyContentError
    assert exc.code == "content_filter"

    body = ok_body(None)
    body["choices"][0]["message"]["refusal"] = "I can't help with that."
    exc = await fail(make_client(reply(200, body)))
    assert type(exc) is EmptyContentError
    assert exc.code == "refusal"
    assert exc.details["refusal"] == "I can't help with that."


# --- secrets -------------------------------------------------------------------------------------


def assert_no_key(exc: StructuredError) -> None:
    for text in (str(exc), repr(exc), json.dumps(exc.to_dict(), ensure_ascii=False),
                 getattr(exc, "response", None) or ""):
        assert KEY not in text
        assert KEY[:12] not in text


async def test_key_echoed_by_server_never_leaks(make_client: MakeClient,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="flashcard_pipeline.llm")
    echoing_401 = {"error": {"code": 401, "message": f"Invalid key: Bearer {KEY}",
                             "metadata": {"echo": KEY, KEY: [f"token={KEY}"]}}}
    exc = await fail(make_client(reply(401, echoing_401)))
    assert isinstance(exc, AuthenticationError)
    assert "***" in str(exc)
    assert_no_key(exc)

    # Redaction must happen before truncation, or a prefix of the key survives the cut.
    boundary = "x" * (SNIPPET_CHARS - 20) + KEY
    assert_no_key(await fail(make_client(reply(500, text=boundary))))

    echoing_200 = {"error": {"code": 500, "message": f"bad auth {KEY}"}}
    assert_no_key(await fail(make_client(reply(200, echoing_200))))

    refusal = ok_body(None)
    refusal["choices"][0]["message"]["refusal"] = f"I won't repeat {KEY}"
    assert_no_key(await fail(make_client(reply(200, refusal))))

    await make_client(reply(200, ok_body())).complete(chat_request())
    assert len(caplog.records) == 5
    for record in caplog.records:
        assert KEY not in record.getMessage()
        assert "Authorization" not in record.getMessage()


async def test_one_debug_line_per_call_with_model_status_and_tokens(make_client: MakeClient,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="flashcard_pipeline.llm")
    await make_client(reply(200, ok_body())).complete(chat_request())
    (record,) = caplog.records
    line = record.getMessage()
    assert "openai/gpt-4o-mini-2024-07-18" in line
    assert "status=200" in line
    assert "prompt_tokens=120" in line
    assert "completion_tokens=45" in line


def test_config_and_client_reprs_hide_the_key() -> None:
    provider = openrouter()
    for text in (repr(provider), str(provider), provider.model_dump_json(), repr(LLMClient(provider))):
        assert KEY not in text
    assert provider.api_key is not None and provider.api_key.get_secret_value() == KEY


def test_redact_handles_bearer_escaped_and_empty_secrets() -> None:
    key = "sk/with+odd=chars"
    text = f"Authorization: Bearer {key}; raw={key}; url=sk%2Fwith%2Bodd%3Dchars; json=sk\\/with+odd=chars"
    cleaned = redact(text, [key, None, ""])
    assert "odd" not in cleaned
    assert cleaned.startswith("Authorization: ***;")
    assert redact("nothing secret", [None, ""]) == "nothing secret"


# --- client lifecycle ----------------------------------------------------------------------------


async def test_owned_http_client_is_configured_and_closed_injected_one_is_not() -> None:
    provider = resolve_provider("openrouter", api_key=KEY, env={}, connect_timeout=3, read_timeout=45)
    async with LLMClient(provider) as client:
        owned = client._http
        assert owned.timeout.connect == 3
        assert owned.timeout.read == 45
    assert owned.is_closed

    injected = httpx.AsyncClient(transport=httpx.MockTransport(reply()))
    async with LLMClient(provider, http=injected):
        pass
    assert not injected.is_closed
    await injected.aclose()


# --- provider resolution -------------------------------------------------------------------------


def test_openrouter_key_from_argument_or_environment() -> None:
    from_env = resolve_provider("openrouter", env={"OPENROUTER_API_KEY": "env-key"})
    assert from_env.api_key is not None and from_env.api_key.get_secret_value() == "env-key"
    assert from_env.base_url == "https://openrouter.ai/api/v1"
    assert from_env.extra_body == {}
    assert {"HTTP-Referer", "X-OpenRouter-Title"} <= set(from_env.extra_headers)

    explicit = resolve_provider(ProviderName.OPENROUTER, api_key=SecretStr("arg-key"),
                                env={"OPENROUTER_API_KEY": "env-key"})
    assert explicit.api_key is not None and explicit.api_key.get_secret_value() == "arg-key"


@pytest.mark.parametrize("env", [{}, {"OPENROUTER_API_KEY": "   "}, {"OPENAI_API_KEY": "wrong-var"}])
def test_openrouter_without_key_says_how_to_fix(env: dict[str, str]) -> None:
    with pytest.raises(ConfigurationError) as info:
        resolve_provider("openrouter", env=env)
    message = str(info.value)
    assert "--api-key" in message
    assert "export OPENROUTER_API_KEY=" in message
    assert "--provider simulated" in message
    assert info.value.code == "missing_api_key"
    assert resolve_provider("openrouter", env=env, require_key=False).api_key is None, "a dry run needs none"


def test_openai_compatible_needs_base_url_but_not_a_key() -> None:
    with pytest.raises(ConfigurationError) as info:
        resolve_provider("openai-compatible", env={"OPENAI_API_KEY": "k"})
    assert str(info.value) == "--base-url is required for provider openai-compatible"

    local = resolve_provider("openai-compatible", base_url="http://127.0.0.1:11434/v1/", env={})
    assert local.api_key is None
    assert local.base_url == "http://127.0.0.1:11434/v1"

    keyed = resolve_provider("openai-compatible", base_url="https://api.example.test/v1",
                             env={"OPENAI_API_KEY": "oa-key"})
    assert keyed.api_key is not None and keyed.api_key.get_secret_value() == "oa-key"


def test_simulated_takes_callers_url_and_never_a_key() -> None:
    sim = resolve_provider("simulated", base_url="http://127.0.0.1:8765/v1",
                           api_key="ignored", env={"OPENROUTER_API_KEY": "k", "OPENAI_API_KEY": "k"})
    assert sim.name is ProviderName.SIMULATED
    assert sim.api_key is None
    assert sim.chat_completions_url == "http://127.0.0.1:8765/v1/chat/completions"
    with pytest.raises(ConfigurationError):
        resolve_provider("simulated", env={})


def test_unknown_provider_and_bad_urls_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="openrouter, openai-compatible, simulated"):
        resolve_provider("anthropic", env={})
    with pytest.raises(ConfigurationError, match="base_url"):
        resolve_provider("openai-compatible", base_url="localhost:11434", env={})
    with pytest.raises(ConfigurationError):
        resolve_provider("openrouter", api_key=KEY, env={}, read_timeout=0)


# --- token estimates -----------------------------------------------------------------------------


def test_estimate_tokens_counts_hangul_per_char_and_latin_per_three_and_a_half() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("안녕하세요") == 5
    assert estimate_tokens("漢字") == 2
    assert estimate_tokens("a" * 35) == 10
    assert estimate_tokens("a" * 36) == 11
    assert estimate_tokens("사과 apple") == 2 + 2


def test_estimate_request_tokens_includes_schema_and_max_tokens() -> None:
    plain = chat_request(max_tokens=1000)
    with_schema = chat_request(max_tokens=1000, response_format={"type": "json_schema", "schema": {"a": "b" * 70}})
    assert estimate_request_tokens(plain) > 1000
    assert estimate_request_tokens(with_schema) >= estimate_request_tokens(plain) + 20
    assert estimate_request_tokens(chat_request(max_tokens=10)) == estimate_request_tokens(plain) - 990
