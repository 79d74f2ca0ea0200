"""The simulator: HTTP surface, fault injection, rate limiting, stats and generated content."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from flashcard_pipeline.checks import check_analysis, check_cards
from flashcard_pipeline.cli.app import parse_sim_options
from flashcard_pipeline.errors import BadRequestError, ConfigurationError, RateLimitError, ServerError
from flashcard_pipeline.llm import ChatMessage, ChatRequest, LLMClient, resolve_provider
from flashcard_pipeline.models import (
    CardType,
    FlashcardSet,
    PartOfSpeech,
    TermAnalysis,
    strict_json_schema,
    validate_cards_against_analysis,
)
from flashcard_pipeline.simulator import (
    COMPLETION_PRICE_PER_MILLION,
    MODEL_IDS,
    PROMPT_PRICE_PER_MILLION,
    Flavor,
    Simulator,
    SimulatorConfig,
    analysis_for,
    cards_for,
    estimate_tokens,
    hangul_ipa,
    part_of_speech,
    run_simulator,
    serve,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TAG = re.compile(r"^[^\s:]+:[^\s]+$")


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class RecordingSleep:
    """Stands in for asyncio.sleep: remembers each requested delay and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def stage1_payload(term: str = "내가", **overrides: Any) -> dict[str, Any]:
    payload = {"term": term, "type": "pronoun", "language": "Korean", "learner_language": "English",
               "hints": {"Definition": "I"}}
    return {**payload, **overrides}


def chat_body(stage: str | None, payload: Any = None, *, max_tokens: int | None = None,
              model: str = "sim/test-model") -> dict[str, Any]:
    user = "Analyse this vocabulary item.\n<input>\n" + json.dumps(payload, ensure_ascii=False) + "\n</input>"
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "system", "content": "You are an expert Korean teacher."},
                     {"role": "user", "content": user}],
        "temperature": 0.4,
        "usage": {"include": True},
    }
    if stage is not None:
        model_type = TermAnalysis if stage == "term_analysis" else FlashcardSet
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": stage, "strict": True, "schema": strict_json_schema(model_type)}}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


def analysis_body(term: str = "내가", **overrides: Any) -> dict[str, Any]:
    return chat_body("term_analysis", stage1_payload(term, **overrides))


def cards_body(analysis: TermAnalysis, hints: dict[str, str] | None = None) -> dict[str, Any]:
    return chat_body("flashcard_set", {"term": analysis.term, "language": "Korean", "learner_language": "English",
                                       "analysis": analysis.model_dump(mode="json"), "hints": hints or {}})


def content_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


@contextlib.asynccontextmanager
async def started(config: SimulatorConfig | None = None, **kwargs: Any
                  ) -> AsyncIterator[tuple[Simulator, httpx.AsyncClient]]:
    async with run_simulator(config, **kwargs) as sim, httpx.AsyncClient(base_url=sim.base_url) as client:
        yield sim, client


# -- HTTP surface ---------------------------------------------------------------------------------


async def test_health_and_base_url() -> None:
    async with started() as (sim, client):
        assert sim.base_url == f"http://127.0.0.1:{sim.port}/v1"
        response = await client.get(f"http://127.0.0.1:{sim.port}/health")
        assert response.status_code == 200


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/v1/chat/completions"])
async def test_both_paths_answer_a_valid_analysis(path: str) -> None:
    async with started() as (sim, client):
        response = await client.post(f"http://127.0.0.1:{sim.port}{path}", json=analysis_body())
        body = response.json()
        assert body["object"] == "chat.completion"
        assert body["id"].startswith("gen-")
        assert body["model"] == "sim/test-model"
        assert body["provider"] == "simulated"
        assert isinstance(body["created"], int)
        choice = body["choices"][0]
        assert choice["finish_reason"] == "stop"
        assert choice["message"]["role"] == "assistant"
        analysis = TermAnalysis.model_validate_json(content_of(response))
        assert analysis.term == "내가"
        assert analysis.pos is PartOfSpeech.PRONOUN
        assert analysis.primary_meaning == "I"


async def test_stage_two_answer_validates_against_its_analysis() -> None:
    async with started() as (_sim, client):
        for term, type_ in [("학생", "noun"), ("먹었어", "verb")]:
            first = await client.post("/chat/completions", json=analysis_body(term, type=type_))
            analysis = TermAnalysis.model_validate_json(content_of(first))
            second = await client.post("/chat/completions", json=cards_body(analysis))
            cards = FlashcardSet.model_validate_json(content_of(second))
            validate_cards_against_analysis(cards, analysis)
            for card in cards.cards:  # a Scene front asks for the term, so it never shows it
                assert (term not in card.front) if card.card_type is CardType.SCENE else (
                    term in card.front + card.back)
            assert check_cards(cards, analysis, term=term, language="Korean") == []
        for level in ("1", "6"):  # the input's level column wins over the simulator's own pick
            leveled = await client.post("/chat/completions", json=cards_body(analysis, {"TOPIK_Level": level}))
            tags = {tag for card in FlashcardSet.model_validate_json(content_of(leveled)).cards for tag in card.tags}
            assert {t for t in tags if t.startswith("level:")} == {f"level:topik{level}"}


async def _contents(seed: int, terms: list[str]) -> list[str]:
    async with started(SimulatorConfig(seed=seed)) as (_sim, client):
        return [content_of(await client.post("/chat/completions", json=analysis_body(t))) for t in terms]


async def test_answers_repeat_for_a_seed_and_vary_across_seeds() -> None:
    terms = ["내가", "학생", "병원에", "먹었어", "아주", "hello"]
    first, again, other = await _contents(1, terms), await _contents(1, terms), await _contents(2, terms)
    assert first == again
    assert first != other
    assert len(set(first)) == len(terms)


async def test_usage_block_counts_tokens_and_prices_them() -> None:
    async with started() as (_sim, client):
        short = (await client.post("/chat/completions", json=analysis_body())).json()
        long_body = analysis_body()
        long_body["messages"][0]["content"] += " Be precise." * 200
        long = (await client.post("/chat/completions", json=long_body)).json()
    usage = short["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] == estimate_tokens(short["choices"][0]["message"]["content"])
    expected = (usage["prompt_tokens"] * PROMPT_PRICE_PER_MILLION
                + usage["completion_tokens"] * COMPLETION_PRICE_PER_MILLION) / 1_000_000
    assert usage["cost"] == pytest.approx(expected)
    assert usage["cost"] > 0
    assert long["usage"]["prompt_tokens"] > usage["prompt_tokens"] + 400


async def test_other_schemas_get_an_empty_json_object() -> None:
    async with started() as (sim, client):
        response = await client.post("/chat/completions", json=chat_body(None, {"anything": 1}))
        assert json.loads(content_of(response)) == {}
        assert sim.stats().stages["other"] == 1


@pytest.mark.parametrize("budget", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_cuts_the_answer_with_finish_reason_length(budget: str) -> None:
    async with started() as (sim, client):
        body = analysis_body()
        body.pop("max_tokens", None)
        body[budget] = 20
        response = await client.post("/chat/completions", json=body)
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "length"
        assert response.json()["usage"]["completion_tokens"] == 20
        with pytest.raises(json.JSONDecodeError):
            json.loads(choice["message"]["content"])
        assert sim.stats().outcomes["length_limit"] == 1


@pytest.mark.parametrize("raw", [
    b"this is not json",
    b"\xff\xfe not utf-8",
    json.dumps({"model": "x"}).encode(),
    json.dumps({"model": "x", "messages": []}).encode(),
    json.dumps([1, 2]).encode(),
])
async def test_malformed_bodies_get_400_with_an_openai_error(raw: bytes) -> None:
    async with started() as (sim, client):
        response = await client.post("/chat/completions", content=raw,
                                     headers={"content-type": "application/json"})
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error" and error["code"]
        assert sim.stats().outcomes["bad_request"] == 1


def _without_markers() -> dict[str, Any]:
    body = analysis_body()
    body["messages"][-1]["content"] = "Analyse 내가 please."
    return body


def _bad_input_json() -> dict[str, Any]:
    body = analysis_body()
    body["messages"][-1]["content"] = "<input>{term: 내가</input>"
    return body


@pytest.mark.parametrize("body", [
    _without_markers(),
    _bad_input_json(),
    chat_body("term_analysis", {"type": "noun"}),
    chat_body("term_analysis", ["내가"]),
    chat_body("flashcard_set", {"term": "내가", "analysis": {"term": "내가"}}),
], ids=["no-markers", "bad-json", "no-term", "not-an-object", "invalid-analysis"])
async def test_stage_requests_without_usable_input_get_400(body: dict[str, Any]) -> None:
    async with started() as (sim, client):
        response = await client.post("/chat/completions", json=body)
        assert response.status_code == 400
        assert "input" in response.json()["error"]["message"]
        assert sim.stats().outcomes["ok"] == 0


# -- provider dialects ----------------------------------------------------------------------------

FLAVORS: tuple[Flavor, ...] = ("openai", "openrouter")
STREAM_BODY = {**analysis_body(), "stream": True}
#: (config, method, path, body, status): one of every error the simulator sends.
PROVOKED_ERRORS: list[tuple[dict[str, Any], str, str, dict[str, Any] | None, int]] = [
    ({}, "POST", "/chat/completions", {"model": "x", "messages": []}, 400),
    ({}, "POST", "/chat/completions", STREAM_BODY, 400),
    ({}, "POST", "/embeddings", {"model": "x", "input": "y"}, 404),
    ({}, "GET", "/models/no-such-model", None, 404),
    ({}, "GET", "/chat/completions", None, 405),
    ({"rate_limit_rate": 1.0}, "POST", "/chat/completions", analysis_body(), 429),
    ({"server_error_rate": 1.0}, "POST", "/chat/completions", analysis_body(), 500),
]


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize(("config", "method", "path", "body", "status"), PROVOKED_ERRORS,
                         ids=["invalid", "stream", "unknown-path", "unknown-model", "wrong-method", "429", "5xx"])
async def test_every_error_body_takes_the_flavors_shape(flavor: Flavor, config: dict[str, Any], method: str,
                                                        path: str, body: dict[str, Any] | None, status: int) -> None:
    async with started(SimulatorConfig(flavor=flavor, **config)) as (_sim, client):
        response = await client.request(method, path, json=body)
    assert response.status_code == status or (status == 500 and response.status_code in (502, 503))
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    if flavor == "openai":
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == {429: "rate_limit_error", 500: "server_error"}.get(status, "invalid_request_error")
    else:
        assert set(error) == {"code", "message", "metadata"}
        assert error["code"] == response.status_code
        assert isinstance(error["metadata"], dict)
    assert error["message"]


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_stream_true_is_refused_naming_the_parameter(flavor: Flavor) -> None:
    async with started(SimulatorConfig(flavor=flavor)) as (sim, client):
        response = await client.post("/chat/completions", json=STREAM_BODY)
        assert sim.stats().outcomes["bad_request"] == 1
    assert response.status_code == 400
    error = response.json()["error"]
    assert "stream" in error["message"] and "not supported" in error["message"]
    param = error["param"] if flavor == "openai" else error["metadata"]["param"]
    assert param == "stream"


async def test_stream_false_is_answered() -> None:
    async with started() as (_sim, client):
        assert content_of(await client.post("/chat/completions", json={**analysis_body(), "stream": False}))


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("path", ["/v1/models", "/api/v1/models"])
async def test_models_are_listed_on_both_prefixes(flavor: Flavor, path: str) -> None:
    async with started(SimulatorConfig(flavor=flavor)) as (sim, client):
        response = await client.get(f"http://127.0.0.1:{sim.port}{path}")
        one = await client.get(f"http://127.0.0.1:{sim.port}{path}/{MODEL_IDS[0]}")
    assert response.status_code == 200
    listing = response.json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == list(MODEL_IDS) == ["simulated/flashcard-sim"]
    model = listing["data"][0]
    assert model["object"] == "model" and isinstance(model["created"], int) and model["owned_by"]
    assert one.json() == model
    if flavor == "openrouter":
        assert float(model["pricing"]["prompt"]) == pytest.approx(PROMPT_PRICE_PER_MILLION / 1e6)
        assert float(model["pricing"]["completion"]) == pytest.approx(COMPLETION_PRICE_PER_MILLION / 1e6)
    else:
        assert "pricing" not in model


def test_the_flavor_is_a_sim_option() -> None:
    assert SimulatorConfig().flavor == "openai"
    assert parse_sim_options(["flavor=openrouter"]).flavor == "openrouter"
    assert parse_sim_options(["flavor=openai", "seed=3"]).flavor == "openai"
    with pytest.raises(ConfigurationError, match="flavor"):
        parse_sim_options(["flavor=anthropic"])


@contextlib.asynccontextmanager
async def project_client(config: SimulatorConfig) -> AsyncIterator[LLMClient]:
    """The pipeline's own LLM client pointed at a simulator, as ``--provider simulated`` wires it."""
    async with run_simulator(config) as sim, LLMClient(resolve_provider("simulated", base_url=sim.base_url)) as client:
        yield client


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_the_projects_client_classifies_both_flavors_errors(flavor: Flavor) -> None:
    """What the pipeline's retry policy sees must not depend on the dialect the errors came in."""
    term = ChatMessage("user", "<input>" + json.dumps(stage1_payload(), ensure_ascii=False) + "</input>")
    request = ChatRequest(model="simulated/flashcard-sim", messages=(term,),
                          response_format=analysis_body()["response_format"])
    no_input = ChatRequest(model="simulated/flashcard-sim", messages=(ChatMessage("user", "내가"),),
                           response_format=request.response_format)
    cases: list[tuple[dict[str, Any], ChatRequest, type[Exception]]] = [
        ({"rate_limit_rate": 1.0, "retry_after_seconds": 7}, request, RateLimitError),
        ({"server_error_rate": 1.0}, request, ServerError),
        ({}, no_input, BadRequestError),
    ]
    for config, sent, expected in cases:
        async with project_client(SimulatorConfig(flavor=flavor, **config)) as client:
            with pytest.raises(expected) as info:
                await client.complete(sent)
        error = info.value
        assert type(error) is expected
        assert error.details["provider"] == "simulated"
        if expected is RateLimitError:
            assert error.retry_after == 7
            assert error.details["provider_code"] == ("rate_limit_exceeded" if flavor == "openai" else 429)
        if expected is ServerError:
            assert error.details["status_code"] in (500, 502, 503)
        if expected is BadRequestError:
            assert error.details["status_code"] == 400 and "input" in str(error)
    async with project_client(SimulatorConfig(flavor=flavor)) as client:
        assert TermAnalysis.model_validate_json((await client.complete(request)).content).term == "내가"


# -- faults ---------------------------------------------------------------------------------------


async def _faulty(rate_field: str, body: dict[str, Any] | None = None, **extra: Any
                  ) -> tuple[httpx.Response, Simulator]:
    async with started(SimulatorConfig(**{rate_field: 1.0}, **extra), sleep=RecordingSleep()) as (sim, client):
        return await client.post("/chat/completions", json=body or analysis_body()), sim


async def test_server_errors_use_5xx_with_an_error_body() -> None:
    statuses = set()
    async with started(SimulatorConfig(server_error_rate=1.0)) as (sim, client):
        for term in ["내가", "그", "난", "내", "학생", "아주", "먹었어", "병원에"]:
            response = await client.post("/chat/completions", json=analysis_body(term))
            statuses.add(response.status_code)
            assert set(response.json()["error"]) >= {"message", "type", "code"}
        assert sim.stats().outcomes["server_error"] == 8
    assert statuses <= {500, 502, 503}
    assert len(statuses) > 1


async def test_injected_rate_limit_sends_retry_after() -> None:
    response, sim = await _faulty("rate_limit_rate", retry_after_seconds=7)
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "7"
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert sim.stats().outcomes["rate_limit"] == 1


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_error_inside_a_200_body_has_no_choices(flavor: Flavor) -> None:
    """OpenRouter's shape in both flavors: only OpenRouter reports an upstream failure inside a 200."""
    response, sim = await _faulty("error_in_body_rate", flavor=flavor)
    assert response.status_code == 200
    body = response.json()
    assert "choices" not in body
    assert body["error"]["code"] == 502
    assert body["error"]["message"] == "upstream provider failed"
    assert isinstance(body["error"]["metadata"], dict)
    assert sim.stats().outcomes["error_in_body"] == 1


async def test_empty_content() -> None:
    response, sim = await _faulty("empty_content_rate")
    assert content_of(response) == ""
    assert sim.stats().outcomes["empty_content"] == 1


async def test_truncated_output_is_a_cut_prefix_with_finish_reason_length() -> None:
    async with started() as (_sim, client):
        full = content_of(await client.post("/chat/completions", json=analysis_body()))
    response, sim = await _faulty("truncated_rate")
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    cut = choice["message"]["content"]
    assert cut and full.startswith(cut) and len(cut) < len(full)
    assert sim.stats().outcomes["truncated"] == 1


@pytest.mark.parametrize("stage", ["term_analysis", "flashcard_set"])
async def test_malformed_json_does_not_parse(stage: str) -> None:
    body = analysis_body() if stage == "term_analysis" else cards_body(analysis_for("학생", type="noun"))
    response, sim = await _faulty("malformed_json_rate", body)
    with pytest.raises(json.JSONDecodeError):
        json.loads(content_of(response))
    assert response.json()["choices"][0]["finish_reason"] == "stop"
    assert sim.stats().outcomes["malformed_json"] == 1


@pytest.mark.parametrize("stage", ["term_analysis", "flashcard_set"])
async def test_schema_invalid_is_json_that_fails_validation(stage: str) -> None:
    if stage == "term_analysis":
        body, model_type = analysis_body(), TermAnalysis
    else:
        body, model_type = cards_body(analysis_for("학생", type="noun")), FlashcardSet
    response, sim = await _faulty("schema_invalid_rate", body)
    data = json.loads(content_of(response))
    assert isinstance(data, dict)
    with pytest.raises(ValidationError):
        model_type.model_validate(data)
    assert sim.stats().outcomes["schema_invalid"] == 1


async def test_dropped_connection_gives_no_http_response() -> None:
    async with started(SimulatorConfig(dropped_connection_rate=1.0)) as (sim, client):
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            await client.post("/chat/completions", json=analysis_body())
        assert sim.stats().outcomes["dropped_connection"] == 1


async def test_hang_sleeps_the_configured_time_before_answering() -> None:
    sleep = RecordingSleep()
    async with started(SimulatorConfig(hang_rate=1.0, hang_seconds=45.0), sleep=sleep) as (sim, client):
        response = await client.post("/chat/completions", json=analysis_body())
        TermAnalysis.model_validate_json(content_of(response))
        stats = sim.stats()
    assert sleep.delays == [45.0]
    assert stats.outcomes["hang"] == 1
    assert stats.outcomes["ok"] == 0
    assert stats.term_successes == {}


async def test_a_hung_request_is_abandoned_when_the_client_times_out() -> None:
    async with started(SimulatorConfig(hang_rate=1.0, hang_seconds=30.0)) as (sim, client):
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/chat/completions", json=analysis_body(), timeout=0.05)
        assert sim.stats().outcomes["hang"] == 1


async def test_latency_fixed_and_ranged() -> None:
    fixed = RecordingSleep()
    async with started(SimulatorConfig(latency=0.25), sleep=fixed) as (_sim, client):
        await client.post("/chat/completions", json=analysis_body())
    assert fixed.delays == [0.25]

    ranged = RecordingSleep()
    async with started(SimulatorConfig(latency=(0.1, 0.2)), sleep=ranged) as (_sim, client):
        for term in ["가", "나", "다", "라", "마"]:
            await client.post("/chat/completions", json=analysis_body(term))
    assert len(ranged.delays) == 5
    assert all(0.1 <= d <= 0.2 for d in ranged.delays)
    assert len(set(ranged.delays)) > 1


async def _outcomes(config: SimulatorConfig, terms: list[str]) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = {}
    async with started(config) as (_sim, client):
        for term in terms:
            response = await client.post("/chat/completions", json=analysis_body(term))
            seen.setdefault(term, []).append(response.status_code if response.status_code != 200 else (
                200 if _parses(content_of(response)) else 299))
    return seen


def _parses(content: str) -> bool:
    try:
        TermAnalysis.model_validate_json(content)
    except ValidationError:
        return False
    return True


async def test_faults_are_reproducible_per_term_whatever_the_order() -> None:
    config = SimulatorConfig(seed=5, server_error_rate=0.3, malformed_json_rate=0.3)
    terms = [f"단어{i}" for i in range(12)] * 2
    first = await _outcomes(config, terms)
    reordered = await _outcomes(config, list(reversed(terms)))
    assert first == reordered
    assert first == await _outcomes(config, terms)
    kinds = {code for codes in first.values() for code in codes}
    assert {200, 299} <= kinds and kinds & {500, 502, 503}
    assert first != await _outcomes(config.model_copy(update={"seed": 6}), terms)


# -- real rate limits -----------------------------------------------------------------------------


async def test_requests_per_minute_limit_with_a_sliding_window() -> None:
    clock = FakeClock()
    async with started(SimulatorConfig(requests_per_minute=3), clock=clock) as (sim, client):
        for second in range(3):
            clock.now = 1_000.0 + second * 10
            assert (await client.post("/chat/completions", json=analysis_body())).status_code == 200
        clock.now = 1_025.0
        limited = await client.post("/chat/completions", json=analysis_body())
        assert limited.status_code == 429
        assert limited.headers["Retry-After"] == "35"
        assert limited.json()["error"]["type"] == "rate_limit_error"

        clock.now = 1_060.5  # the first request has left the window, the other two are still in it
        assert (await client.post("/chat/completions", json=analysis_body())).status_code == 200
        again = await client.post("/chat/completions", json=analysis_body())
        assert again.status_code == 429
        assert int(again.headers["Retry-After"]) >= 1

        clock.now = 1_200.0
        assert (await client.post("/chat/completions", json=analysis_body())).status_code == 200
        assert sim.stats().outcomes["rate_limited"] == 2
        assert sim.stats().outcomes["ok"] == 5


async def test_tokens_per_minute_limit() -> None:
    async with started() as (_sim, client):
        usage = (await client.post("/chat/completions", json=analysis_body())).json()["usage"]
    limit = usage["total_tokens"] + usage["prompt_tokens"] - 1
    clock = FakeClock()
    async with started(SimulatorConfig(tokens_per_minute=limit), clock=clock) as (sim, client):
        assert (await client.post("/chat/completions", json=analysis_body())).status_code == 200
        clock.now += 59.5
        limited = await client.post("/chat/completions", json=analysis_body())
        assert limited.status_code == 429
        assert limited.headers["Retry-After"] == "1"
        clock.now += 1.0
        assert (await client.post("/chat/completions", json=analysis_body())).status_code == 200
        assert sim.stats().outcomes["rate_limited"] == 1


async def test_a_request_bigger_than_the_token_limit_waits_for_an_empty_window() -> None:
    clock = FakeClock()
    async with started(SimulatorConfig(tokens_per_minute=5), clock=clock) as (_sim, client):
        assert (await client.post("/chat/completions", json=analysis_body())).status_code == 200
        clock.now += 10
        limited = await client.post("/chat/completions", json=analysis_body())
        assert limited.status_code == 429
        assert limited.headers["Retry-After"] == "50"
        clock.now += 50
        assert (await client.post("/chat/completions", json=analysis_body())).status_code == 200


# -- stats ----------------------------------------------------------------------------------------


async def test_stats_count_outcomes_stages_tokens_and_terms() -> None:
    async with started() as (sim, client):
        usages = []
        for term in ["내가", "학생", "내가"]:
            usages.append((await client.post("/chat/completions", json=analysis_body(term))).json()["usage"])
        analysis = analysis_for("학생", type="noun")
        usages.append((await client.post("/chat/completions", json=cards_body(analysis))).json()["usage"])
        await client.post("/chat/completions", content=b"{")
        stats = sim.stats()
        served = (await client.get(f"http://127.0.0.1:{sim.port}/stats")).json()

    assert stats.total == 5
    assert stats.outcomes["ok"] == 4 and stats.outcomes["bad_request"] == 1
    assert stats.stages == {"term_analysis": 3, "flashcard_set": 1, "other": 0, "speech": 0}
    assert stats.tokens_in == sum(u["prompt_tokens"] for u in usages)
    assert stats.tokens_out == sum(u["completion_tokens"] for u in usages)
    assert stats.cost_usd == pytest.approx(sum(u["cost"] for u in usages))
    assert stats.term_successes == {"내가": 2, "학생": 2}
    assert stats.term_successes_by_stage == {"term_analysis": {"내가": 2, "학생": 1},
                                             "flashcard_set": {"학생": 1}}
    assert served == stats.to_dict()
    assert stats.paid_twice == 1, "내가's analysis was answered well twice"
    assert stats.early_retries == 0


async def test_a_request_before_its_429s_retry_after_counts_as_an_early_retry() -> None:
    clock = FakeClock()
    config = SimulatorConfig(rate_limit_rate=1.0, retry_after_seconds=2)
    async with started(config, clock=clock) as (sim, client):
        await client.post("/chat/completions", json=analysis_body("내가"))
        clock.now += 1.5
        await client.post("/chat/completions", json=analysis_body("내가"))  # 0.5 s too early
        await client.post("/chat/completions", json=analysis_body("학생"))  # another payload: on time
        clock.now += 2.0
        await client.post("/chat/completions", json=analysis_body("내가"))  # after the second 429's wait
        clock.now += 2.0
        await client.post("/chat/completions", json=analysis_body("내가"))
    assert sim.stats().early_retries == 1
    assert sim.stats().paid_twice == 0


# -- configuration and lifecycle ------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"server_error_rate": 1.5}, "less than or equal to 1"),
    ({"hang_rate": -0.1}, "greater than or equal to 0"),
    ({"server_error_rate": 0.6, "hang_rate": 0.6}, "at most 1"),
    ({"latency": (2.0, 1.0)}, "min <= max"),
    ({"latency": -1.0}, "negative"),
    ({"requests_per_minute": 0}, "greater than or equal to 1"),
    ({"bogus_rate": 0.1}, "Extra inputs"),
])
def test_config_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        SimulatorConfig(**kwargs)


def test_default_config_has_no_faults() -> None:
    config = SimulatorConfig()
    assert sum(config.fault_rates.values()) == 0
    assert config.latency_range == (0.0, 0.0)
    assert config.requests_per_minute is None and config.tokens_per_minute is None


async def test_serve_runs_until_cancelled() -> None:
    ready: asyncio.Queue[Simulator] = asyncio.Queue()
    task = asyncio.create_task(serve(SimulatorConfig(), "127.0.0.1", 0, ready=ready.put_nowait))
    sim = await asyncio.wait_for(ready.get(), 5)
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"http://127.0.0.1:{sim.port}/health")).status_code == 200
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{sim.port}/health")


async def test_concurrent_requests_are_all_answered() -> None:
    async with started() as (sim, client):
        terms = [f"단어{i}" for i in range(200)]
        responses = await asyncio.gather(*(client.post("/chat/completions", json=analysis_body(t))
                                           for t in terms))
        assert all(r.status_code == 200 for r in responses)
        assert set(sim.stats().term_successes) == set(terms)
        assert max(sim.stats().term_successes.values()) == 1


# -- content --------------------------------------------------------------------------------------


def _check_content(term: str, type_: str | None, language: str = "Korean",
                   hints: dict[str, str] | None = None) -> tuple[TermAnalysis, FlashcardSet]:
    analysis = TermAnalysis.model_validate(
        analysis_for(term, type=type_, language=language, hints=hints or {}).model_dump())
    cards = FlashcardSet.model_validate(cards_for(term, analysis, language=language).model_dump())
    validate_cards_against_analysis(cards, analysis)
    assert 3 <= len(analysis.keywords) <= 6
    assert 2 <= len(cards.cards) <= 4
    assert len({c.card_type for c in cards.cards}) == len(cards.cards)
    for card in cards.cards:
        assert all(TAG.match(tag) for tag in card.tags)
        assert f"card:{card.card_type.value.lower()}" in card.tags
    return analysis, cards


def test_every_term_of_the_1000_list_gives_valid_content() -> None:
    path = DATA / "korean_1000_terms.csv"
    if not path.exists():
        pytest.skip(f"test data not found at {path}")
    with path.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1000
    hanja_terms = relabelled = 0
    for row in rows:
        analysis, cards = _check_content(row["term"], row["type"])
        assert check_analysis(analysis, term=row["term"], language="Korean") == [], row
        # The list's class, unless the analyser cannot read the word so (then its class, as a careful model would).
        relabelled += analysis.pos.value != row["type"]
        assert re.fullmatch(r"[^\s]+(\.[^\s]+)*", analysis.ipa), analysis.ipa
        hanja_terms += analysis.has_hanja
        if analysis.has_hanja:
            assert analysis.pos is PartOfSpeech.NOUN
            assert any(c.card_type is CardType.HANJA for c in cards.cards)
    assert 10 < hanja_terms < 300
    # The list calls particle-attached forms (나도, 집에) "particle"; the prompt asks for the head word's class.
    assert relabelled < 200


def test_rich_hints_are_preferred() -> None:
    path = DATA / "korean_5_rich.csv"
    if not path.exists():
        pytest.skip(f"test data not found at {path}")
    with path.open(encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            hints = {k: v for k, v in row.items() if k not in ("Position", "Hangul", "Word_Type")}
            analysis, _ = _check_content(row["Hangul"], row["Word_Type"], hints=hints)
            assert analysis.ipa == row["IPA_Pronunciation"]
            assert analysis.primary_meaning == row["Definition"]
            assert analysis.usage_context == row["Usage_Hint"]


@pytest.mark.parametrize(("term", "language"), [
    ("hello", "English"), ("ありがとう", "Japanese"), ("😀🎉", "Korean"), ("가" * 200, "Korean"),
    ("x" * 200, "English"), ('say "hi" \'now\'', "English"), ("<script>alert(1)</script>", "Korean"),
    ("학교에 가요", "Korean"), ("TV를", "Korean"), ("  spaced  ", "Spanish"),
])
def test_hostile_and_foreign_terms_give_valid_content(term: str, language: str) -> None:
    for type_ in (None, "noun", "verb", "weird-type"):
        analysis, _ = _check_content(term, type_, language)
        assert analysis.term == term.strip()


def test_content_is_deterministic_and_seeded() -> None:
    same = [analysis_for("사람", type="noun", seed=3) for _ in range(2)]
    assert same[0] == same[1]
    assert cards_for("사람", same[0], seed=3) == cards_for("사람", same[1], seed=3)
    variants = {analysis_for("사람", type="noun", seed=s).metaphor for s in range(10)}
    assert len(variants) > 1


@pytest.mark.parametrize(("term", "ipa"), [
    ("내가", "nɛ.ka"), ("밥을", "pap̚.ɯl"), ("먹었어", "mʌk̚.ʌt̚.ʌ"), ("괜찮아요", "kwɛn.tɕʰan.a.jo"),
    ("사람", "sa.ɾam"), ("학교에 가요", "hak̚.kjo.e ka.jo"),
])
def test_hangul_ipa(term: str, ipa: str) -> None:
    assert hangul_ipa(term) == ipa
    assert analysis_for(term).ipa == ipa


def test_non_korean_ipa_falls_back_to_the_slashed_term() -> None:
    assert analysis_for("Hello", language="English").ipa == "/hello/"


@pytest.mark.parametrize(("label", "pos"), [
    ("Noun", PartOfSpeech.NOUN), ("VERB", PartOfSpeech.VERB), ("adj", PartOfSpeech.ADJECTIVE),
    ("adv", PartOfSpeech.ADVERB), ("postposition", PartOfSpeech.PARTICLE), ("pron", PartOfSpeech.PRONOUN),
    ("interj", PartOfSpeech.INTERJECTION), ("expression", PartOfSpeech.PHRASE), ("mystery", PartOfSpeech.NOUN),
    (None, PartOfSpeech.NOUN),
])
def test_part_of_speech_mapping(label: str | None, pos: PartOfSpeech) -> None:
    assert part_of_speech(label) is pos


def test_definition_hint_is_matched_case_insensitively() -> None:
    assert analysis_for("학교", hints={"definition": "school"}).primary_meaning == "school"
    assert analysis_for("학교", hints={"DEFINITION": "  "}).primary_meaning == "'hakgyo' (simulated sense)"


def test_homonyms_only_for_sino_korean_nouns() -> None:
    school = analysis_for("학교", type="noun")
    assert school.hanja is not None and school.hanja.hanja == "學校"
    assert [(c.character, c.meaning, c.reading) for c in school.hanja.characters] == [("學", "배울", "학"),
                                                                                      ("校", "학교", "교")]
    assert all(h.hanja != "學校" for h in school.homonyms), "the word's own Hanja is no homonym"
    assert analysis_for("학교랑", type="noun").hanja.hanja == "學校"  # the noun of 학교 + 랑
    assert analysis_for("학교에", type="noun").hanja.hanja == "學校"
    assert analysis_for("문제가", type="noun").hanja.hanja == "文題"
    assert analysis_for("학교", type="verb").pos is PartOfSpeech.NOUN, "a class the analyser rules out is fixed"
    assert analysis_for("사람", type="noun").hanja is None  # 람 is not Sino-Korean
    snow = analysis_for("눈", type="noun", hints={"Definition": "eye"})
    assert [(h.hanja, h.meaning) for h in snow.homonyms] == [(None, "snow")], "native homonyms too"
    for seed in range(20):
        analysis = analysis_for("사람", type="noun", seed=seed)
        assert all(c.card_type is not CardType.HANJA for c in cards_for("사람", analysis, seed=seed).cards)
