"""Models, prompt rendering, request building, cache keys and answer parsing."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from pydantic import ValidationError

from flashcard_pipeline.errors import ConfigurationError, MalformedJSONError, SchemaViolationError
from flashcard_pipeline.models import (
    CardType,
    Flashcard,
    FlashcardSet,
    TermAnalysis,
    VocabularyItem,
    strict_json_schema,
)
from flashcard_pipeline.prompts import DEFAULT_PROMPTS, PromptTemplate, load_prompt
from flashcard_pipeline.stages import (
    SCHEMA_NAMES,
    StageSettings,
    build_cards_request,
    build_nuance_request,
    language_name,
    parse_cards,
    parse_nuance,
)

ANALYSIS = {
    "term": "학교", "ipa": "hak̚.k͈jo", "pos": "noun", "primary_meaning": "school",
    "other_meanings": "", "metaphor": "A crane (학) flying over a school", "metaphor_noun": "crane",
    "metaphor_action": "flying", "suggested_location": "school gate", "anchor_object": "bell",
    "anchor_sensory": "the ring of the bell", "explanation": "The everyday word for school.",
    "usage_context": None, "comparison": {"vs": "학원", "nuance": "학원 is a private academy."},
    "homonyms": [{"hanja": "學校", "reading": "학교", "meaning": "school", "differentiator": "the common one"}],
    "keywords": ["school", "education"],
}
CARDS = {"cards": [
    {"card_type": "Scene", "front": "A crane over the gate…", "back": "학교 — school", "tags": ["pos:noun"],
     "honorific_level": "none"},
    {"card_type": "Hanja", "front": "學校?", "back": "학교", "tags": ["card:hanja"], "honorific_level": "neutral"},
]}


@pytest.fixture
def settings() -> StageSettings:
    return StageSettings(provider="openrouter", model="openai/gpt-4o-mini")


def item(position: int = 1, term: str = "학교", **hints: str) -> VocabularyItem:
    return VocabularyItem(position=position, term=term, type="noun", hints=hints)


# --- models ------------------------------------------------------------------------------------

def test_analysis_enforces_limits_and_enums() -> None:
    TermAnalysis.model_validate(ANALYSIS)
    with pytest.raises(ValidationError):
        TermAnalysis.model_validate({**ANALYSIS, "pos": "gerund"})
    with pytest.raises(ValidationError):
        TermAnalysis.model_validate({**ANALYSIS, "primary_meaning": "x" * 121})
    with pytest.raises(ValidationError):
        TermAnalysis.model_validate({**ANALYSIS, "homonyms": ANALYSIS["homonyms"] * 6})
    with pytest.raises(ValidationError):
        TermAnalysis.model_validate({**ANALYSIS, "keywords": ["k"] * 11})
    with pytest.raises(ValidationError):
        TermAnalysis.model_validate({**ANALYSIS, "surprise": "extra field"})


def test_cards_need_two_to_four_and_key_value_tags() -> None:
    card = CARDS["cards"][0]
    with pytest.raises(ValidationError):
        FlashcardSet.model_validate({"cards": [card]})
    with pytest.raises(ValidationError):
        FlashcardSet.model_validate({"cards": [card] * 5})
    for bad in ("pos noun", "nocolon", "a:b c"):
        with pytest.raises(ValidationError):
            Flashcard.model_validate({**card, "tags": [bad]})
    assert Flashcard.model_validate({**card, "tags": ["level:topik-1"]}).tags == ["level:topik-1"]


def test_strict_schema_requires_every_property_and_forbids_extras() -> None:
    schema = strict_json_schema(TermAnalysis)

    def objects(node):
        if isinstance(node, dict):
            if node.get("type") == "object":
                yield node
            for value in node.values():
                yield from objects(value)
        elif isinstance(node, list):
            for value in node:
                yield from objects(value)

    found = list(objects(schema))
    assert len(found) >= 3  # analysis, comparison, homonym
    for obj in found:
        assert obj["additionalProperties"] is False
        assert sorted(obj["required"]) == sorted(obj["properties"])
    text = json.dumps(schema)
    assert "maxLength" not in text and "at most 120 characters" in text
    # optional fields stay nullable rather than disappearing
    assert {"type": "null"} in schema["properties"]["usage_context"]["anyOf"]


# --- prompts ------------------------------------------------------------------------------------

def test_prompt_templates_are_versioned_and_render_languages() -> None:
    for stage, name in DEFAULT_PROMPTS.items():
        template = load_prompt(name)
        assert template.version == name and stage in name
        system, user = template.render(language="Japanese", learner_language="German", input_json="{}")
        assert "Japanese" in system and "German" in system
        assert "$" not in system + user
        assert "<input>\n{}\n</input>" in user


def test_prompt_rendering_refuses_missing_values() -> None:
    with pytest.raises(ConfigurationError, match="learner_language"):
        load_prompt("nuance.v1").render(language="Korean", input_json="{}")
    with pytest.raises(ConfigurationError, match="no prompt template"):
        load_prompt("nuance.v999")


def test_language_names() -> None:
    assert language_name("ko") == "Korean"
    assert language_name("EN") == "English"
    assert language_name("swahili") == "Swahili"
    with pytest.raises(ConfigurationError):
        language_name("  ")


# --- requests and cache keys ----------------------------------------------------------------------

def test_nuance_request_carries_term_hints_and_strict_schema(settings: StageSettings) -> None:
    staged = build_nuance_request(item(Definition="school"), settings)
    body = staged.request.to_body()
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["name"] == SCHEMA_NAMES["nuance"]
    assert body["response_format"]["json_schema"]["strict"] is True
    user = body["messages"][-1]["content"]
    payload = json.loads(re.search(r"<input>\n(.*)\n</input>", user, re.S).group(1))
    assert payload == {"term": "학교", "type": "noun", "language": "Korean", "learner_language": "English",
                       "hints": {"Definition": "school"}}
    assert staged.prompt_version == "nuance.v2"
    schema = body["response_format"]["json_schema"]["schema"]
    keywords = json.dumps(schema)
    assert '"maxItems"' in keywords and '"maxLength"' not in keywords, "array bounds stay, string lengths move"
    assert {"example", "conjugations", "honorifics", "synonyms", "antonyms", "collocations", "hanja"} <= set(
        schema["required"])


def test_position_is_not_part_of_the_cache_key(settings: StageSettings) -> None:
    first = build_nuance_request(item(position=1), settings)
    later = build_nuance_request(item(position=977), settings)
    assert first.cache_key == later.cache_key
    assert "977" not in json.dumps(later.request.to_body())


@pytest.mark.parametrize("change", [
    lambda s: dataclasses.replace(s, model="openai/gpt-4o"),
    lambda s: dataclasses.replace(s, provider="simulated"),
    lambda s: dataclasses.replace(s, learner_language="French"),
    lambda s: dataclasses.replace(s, nuance_prompt=dataclasses.replace(s.nuance_prompt, version="nuance.v3")),
    lambda s: dataclasses.replace(s, nuance_prompt=dataclasses.replace(s.nuance_prompt, temperature=0.9)),
    lambda s: dataclasses.replace(s, nuance_prompt=dataclasses.replace(s.nuance_prompt, max_tokens=99)),
])
def test_every_generation_setting_changes_the_key(settings: StageSettings, change) -> None:
    assert build_nuance_request(item(), settings).cache_key != build_nuance_request(item(), change(settings)).cache_key


def test_hints_and_term_change_the_key(settings: StageSettings) -> None:
    base = build_nuance_request(item(), settings).cache_key
    assert build_nuance_request(item(Definition="school"), settings).cache_key != base
    assert build_nuance_request(item(term="학생"), settings).cache_key != base


def test_cards_key_depends_on_the_analysis(settings: StageSettings) -> None:
    analysis = TermAnalysis.model_validate(ANALYSIS)
    other = analysis.model_copy(update={"metaphor": "A different image entirely"})
    first = build_cards_request(item(), analysis, settings)
    assert first.cache_key == build_cards_request(item(position=5), analysis, settings).cache_key
    assert first.cache_key != build_cards_request(item(), other, settings).cache_key
    assert "학원 is a private academy." in first.request.messages[-1].content


def test_usage_include_is_not_a_generation_parameter(settings: StageSettings) -> None:
    with_usage = dataclasses.replace(settings, extra_body={"usage": {"include": True}})
    assert build_nuance_request(item(), settings).cache_key == build_nuance_request(item(), with_usage).cache_key


# --- parsing ----------------------------------------------------------------------------------------

def test_parse_nuance_accepts_valid_and_fenced_answers() -> None:
    assert parse_nuance(json.dumps(ANALYSIS), item()).pos == "noun"
    fenced = "```json\n" + json.dumps(ANALYSIS) + "\n```"
    assert parse_nuance(fenced, item()).primary_meaning == "school"


def test_parse_nuance_pins_the_requested_term() -> None:
    answer = json.dumps({**ANALYSIS, "term": "학교(學校)"})
    assert parse_nuance(answer, item()).term == "학교"


@pytest.mark.parametrize("content", ['{"term": "학교"', "", "not json", "[1, 2"])
def test_malformed_answers_raise(content: str) -> None:
    with pytest.raises(MalformedJSONError) as info:
        parse_nuance(content, item())
    assert info.value.retryable


def test_schema_violations_name_the_field() -> None:
    broken = {k: v for k, v in ANALYSIS.items() if k != "ipa"}
    with pytest.raises(SchemaViolationError, match="ipa"):
        parse_nuance(json.dumps(broken), item())


def test_hanja_card_without_hanja_is_rejected() -> None:
    without = TermAnalysis.model_validate({**ANALYSIS, "homonyms": []})
    with pytest.raises(SchemaViolationError, match="Hanja"):
        parse_cards(json.dumps(CARDS), without)
    cards = parse_cards(json.dumps(CARDS), TermAnalysis.model_validate(ANALYSIS))
    assert [c.card_type for c in cards.cards] == [CardType.SCENE, CardType.HANJA]


def test_custom_template_is_used(settings: StageSettings) -> None:
    template = PromptTemplate(version="nuance.test", system="Teach $language to $learner_language speakers.",
                              user="<input>\n$input_json\n</input>", temperature=0.1, max_tokens=10)
    staged = build_nuance_request(item(), dataclasses.replace(settings, nuance_prompt=template))
    assert staged.request.messages[0].content == "Teach Korean to English speakers."
    assert staged.request.max_tokens == 10 and staged.prompt_version == "nuance.test"


def test_a_system_prompt_is_rendered_once_for_the_values_it_uses() -> None:
    template = PromptTemplate(version="t", system="Teach $language. " + "x" * 3000, user="$input_json",
                              temperature=0.1, max_tokens=10)
    first = template.render(language="Korean", learner_language="English", input_json="1")
    second = template.render(language="Korean", learner_language="English", input_json="2")
    assert first[0] is second[0] and (first[1], second[1]) == ("1", "2")
    assert template.render(language="Thai", learner_language="English", input_json="1")[0].startswith("Teach Thai.")
    quoting = dataclasses.replace(template, system="Input: $input_json")
    assert [quoting.render(language="Korean", learner_language="English", input_json=v)[0] for v in "ab"] == [
        "Input: a", "Input: b"]
    with pytest.raises(ConfigurationError, match=r"needs a value for \$language"):
        template.render(learner_language="English", input_json="1")


def test_the_schema_work_done_once_per_stage_gives_the_same_keys_and_estimates() -> None:
    from flashcard_pipeline.llm.client import estimate_request_tokens
    from flashcard_pipeline.stages import cache_key_for

    settings = StageSettings(provider="openrouter", model="openai/gpt-4o-mini")
    first = build_nuance_request(VocabularyItem(position=1, term="학교"), settings)
    second = build_nuance_request(VocabularyItem(position=2, term="먹다"), settings)
    assert first.request.response_format is second.request.response_format, "one schema per stage, not per call"
    for staged in (first, second):
        # The spliced canonical JSON hashes exactly like the plain dump of the whole body.
        assert staged.cache_key == cache_key_for("openrouter", staged.request, staged.prompt_version)
        assert staged.estimated_tokens == estimate_request_tokens(staged.request)
    assert first.cache_key != second.cache_key


def test_stage_keys_are_the_ones_main_computed_before_orjson_wrote_prompts_and_keys() -> None:
    """Prompts and cache keys written by orjson hash as the standard library's text did: no cached answer is
    orphaned (quotes, tabs, a line break, a control character, an emoji, float parameters)."""
    analysis = TermAnalysis.model_validate({**ANALYSIS,
                                            "explanation": 'Said "학교"\twith a tab,\nback\\slash, \x01 and 🏫.'})
    expected = {  # computed on main at 9674091, with json.dumps throughout
        "openrouter": ("78e284ec32c09a57479d671ae5995afce5e1c609b35cc6e17613e14cf5470184",
                       "f0a73154834c7a7ecbbd982c72c87ad9872eccdb9ddb43a3f1c1fc6f03b958f9"),
        "openai-compatible": ("a87cd71cefcdc3be527b1af9fd9eba8774d33b23dbfc3874e54ad4e7fc486430",
                              "550f701acb525fa6d6a520dab3ab2964845ee03ec846ba90776697fe367dc47c"),
    }
    for provider, model in (("openrouter", "openai/gpt-4o-mini"), ("openai-compatible", "local")):
        stage_settings = StageSettings(provider=provider, model=model, params={"top_p": 0.9, "seed": 7})
        term = item(note='a "quoted"\ttab', level="초급")
        assert (build_nuance_request(term, stage_settings).cache_key,
                build_cards_request(term, analysis, stage_settings).cache_key) == expected[provider]


@pytest.mark.parametrize("content", [json.dumps(ANALYSIS), f"```json\n{json.dumps(ANALYSIS)}\n```",
                                     json.dumps({**ANALYSIS, "pos": "gerund"}), '{"term": "학교",', "[]"])
def test_an_answer_parses_or_fails_as_the_standard_librarys_reading_did(content: str) -> None:
    """Most answers go through pydantic's JSON reader in one pass; the rest get the errors they always got."""
    try:
        expected: object = TermAnalysis.model_validate(json.loads(content.strip("`json\n")))
    except (ValidationError, ValueError) as error:
        expected = type(error)
    try:
        got: object = parse_nuance(content, item())
    except (SchemaViolationError, MalformedJSONError) as error:
        got = {SchemaViolationError: ValidationError, MalformedJSONError: json.JSONDecodeError}[type(error)]
    assert got == expected
