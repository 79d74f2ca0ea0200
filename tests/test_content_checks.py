"""Content checks on stage answers: they pass on good answers and fail, with a reason, on crafted bad ones; the
pipeline re-asks once with the reason, then keeps the answer and flags the item for review."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flashcard_pipeline.checks import check_analysis, check_cards
from flashcard_pipeline.cli.app import app
from flashcard_pipeline.export import prepare_deck
from flashcard_pipeline.export.notes import REVIEW_TAG
from flashcard_pipeline.ingest import read_vocabulary
from flashcard_pipeline.korean import Span, analyzer, check_hanja, locate, pos_classes, pronounce
from flashcard_pipeline.llm.types import ChatRequest, ChatResponse, Usage
from flashcard_pipeline.models import (
    CardType,
    ExampleSentence,
    Flashcard,
    FlashcardSet,
    HanjaCharacter,
    HanjaSpelling,
    Homonym,
    PartOfSpeech,
    TermAnalysis,
)
from flashcard_pipeline.pipeline import Pipeline
from flashcard_pipeline.resilience.retry import RetryConfig, RetryPolicy
from flashcard_pipeline.resilience.testing import FakeClock
from flashcard_pipeline.simulator.content import analysis_for, cards_for
from flashcard_pipeline.stages import StageSettings
from flashcard_pipeline.storage.db import open_database
from flashcard_pipeline.storage.ledger import Ledger
from tests.conftest import shared_file
from tests.test_pipeline import new_run

KO = "Korean"


def school() -> TermAnalysis:
    return analysis_for("학교", type="noun", hints={"Definition": "school"})


def test_the_simulators_answers_for_the_rich_list_pass_every_check() -> None:
    items, _ = read_vocabulary(shared_file("korean_5_rich.csv"))
    for item in items:
        analysis = analysis_for(item.term, type=item.type, hints=item.hints)
        assert analysis.example is not None and analysis.example.sentence == item.hints["Example_Sentence"]
        assert check_analysis(analysis, term=item.term, language=KO) == []
        assert check_cards(cards_for(item.term, analysis, hints=item.hints), analysis, term=item.term,
                           language=KO) == []


def test_a_good_analysis_with_hanja_passes() -> None:
    analysis = school()
    assert analysis.hanja is not None and analysis.hanja.hanja == "學校"
    assert check_analysis(analysis, term="학교", language=KO) == []


@pytest.mark.parametrize(("update", "reason"), [
    ({"example": ExampleSentence(sentence="밥을 먹었어요.", translation="I ate.")}, "does not contain 학교"),
    ({"example": None}, "no example sentence"),
    ({"pos": PartOfSpeech.VERB}, "part of speech 'verb' disagrees"),
    ({"hanja": HanjaSpelling(hanja="學生", characters=[
        HanjaCharacter(character="學", meaning="배울", reading="학", gloss="learn"),
        HanjaCharacter(character="生", meaning="날", reading="생", gloss="life")])}, "生 (in 學生) reads 생, not 교"),
    ({"hanja": HanjaSpelling(hanja="學校", characters=[
        HanjaCharacter(character="學", meaning="배울", reading="학", gloss="learn")])}, "does not spell 學校"),
    ({"hanja": HanjaSpelling(hanja="學校", characters=[
        HanjaCharacter(character="學", meaning="배울", reading="각", gloss="learn"),
        HanjaCharacter(character="校", meaning="학교", reading="교", gloss="school")])}, "學 is read 학, not 각"),
    ({"homonyms": [Homonym(hanja="雪", reading="학교", meaning="snow", differentiator="x")]},
     "homonym 학교: Hanja 雪 has 1 characters"),
])
def test_a_crafted_bad_analysis_fails_with_its_reason(update: dict[str, Any], reason: str) -> None:
    problems = check_analysis(school().model_copy(update=update), term="학교", language=KO)
    assert any(reason in problem for problem in problems), problems


def test_a_scene_front_that_shows_the_answer_fails() -> None:
    analysis = school()
    bad = FlashcardSet(cards=[Flashcard(card_type=CardType.SCENE, front="학교 is where you learn. Which word?",
                                        back="x"),
                              Flashcard(card_type=CardType.GRAMMAR, front="학교 + 에?", back="학교에")])
    assert check_cards(bad, analysis, term="학교", language=KO) == ["the Scene card's front shows the answer 학교"]


def test_other_languages_are_not_checked() -> None:
    analysis = analysis_for("casa", language="Spanish").model_copy(update={"example": None})
    assert check_analysis(analysis, term="casa", language="Spanish") == []


@pytest.mark.parametrize(("term", "sentence", "word"), [
    ("내가", "내가 밥을 먹었어.", "내가"), ("먹다", "내가 밥을 먹었어.", "먹었어"), ("학교", "학교에 갔어요", "학교"),
    ("공부하다", "저는 오늘 공부하고 싶어요.", "공부하고"), ("난", "난 지금 바빠.", "난"),
    ("나", "나무를 봤어요", None), ("학교", "밥을 먹었어", None),
])
def test_the_term_is_located_by_lemma(term: str, sentence: str, word: str | None) -> None:
    span = locate(term, sentence)
    assert (sentence[span.start:span.end] if span else None) == word


def test_a_later_occurrence_is_found_when_an_earlier_one_is_part_of_another_word() -> None:
    sentence = "나무 아래에서 나는 잤어. (나)"
    assert locate("나", sentence) == Span(sentence.index("나는"), sentence.index("나는") + 1)
    assert locate("(나)", sentence) == Span(sentence.index("(나)"), len(sentence))  # no pattern syntax


def test_the_sentence_is_tokenised_only_when_the_terms_own_readings_do_not_settle_the_class(
        monkeypatch: pytest.MonkeyPatch) -> None:
    tokenised: list[str] = []
    analysed = analyzer._analysed

    def spy(text: str) -> Any:
        tokenised.append(text)
        return analysed(text)

    monkeypatch.setattr(analyzer, "_analysed", spy)
    standing_alone = school().model_copy(update={"example": ExampleSentence(sentence="학교 앞, 학교.",
                                                                            translation="x")})
    assert check_analysis(standing_alone, term="학교", language=KO) == []
    assert tokenised == []
    problems = check_analysis(standing_alone.model_copy(update={"pos": PartOfSpeech.VERB}), term="학교",
                              language=KO)
    assert tokenised == ["학교 앞, 학교."]
    assert any("disagrees" in problem for problem in problems)


def test_the_six_best_readings_are_analysed_only_when_the_best_one_does_not_settle_the_class(
        monkeypatch: pytest.MonkeyPatch) -> None:
    kiwi = analyzer._kiwi()
    readings: list[int] = []

    class Counting:
        def analyze(self, text: str, top_n: int) -> Any:
            readings.append(top_n)
            return kiwi.analyze(text, top_n=top_n)

        def __getattr__(self, name: str) -> Any:
            return getattr(kiwi, name)

    standing_alone = school().model_copy(update={"example": ExampleSentence(sentence="학교 앞, 학교.",
                                                                            translation="x")})
    monkeypatch.setattr(analyzer, "_kiwi", Counting)
    analyzer.best_head.cache_clear()
    analyzer.head_candidates.cache_clear()
    assert check_analysis(standing_alone, term="학교", language=KO) == []
    assert readings == [1], "the best reading allows a noun, the spelling is the term's own"
    problems = check_analysis(standing_alone.model_copy(update={"pos": PartOfSpeech.VERB}), term="학교",
                              language=KO)
    assert readings == [1, 6] and any("disagrees" in problem for problem in problems)
    analyzer.best_head.cache_clear()
    analyzer.head_candidates.cache_clear()


def test_the_best_reading_is_one_of_the_six_on_a_real_list() -> None:
    """What the cheap first look relies on, asked of the analyser's six readings themselves (head_candidates adds
    the best one should it ever be missing, so it cannot tell)."""
    terms = [item.term for item in read_vocabulary(shared_file("korean_1000_terms.csv"))[0]][:300]
    kiwi = analyzer._kiwi()
    for term in terms:
        six = {analyzer._head(analyzer._morphemes(tokens)) for tokens, _score in kiwi.analyze(term, top_n=6)}
        assert analyzer.best_head(term) in six | {None}, term


def test_pronunciation_and_readings_come_from_the_text() -> None:
    spoken = pronounce("학교")
    assert spoken is not None and (spoken.hangul, spoken.romanization) == ("학꾜", "hakgyo")
    assert pronounce("같이").hangul == "가치" and pronounce("ABC") is None
    assert check_hanja("歷史", "역사") is None and check_hanja("女子", "여자") is None  # the initial-sound rule
    assert check_hanja("不動産", "부동산") is None  # a second reading
    assert PartOfSpeech.PRONOUN in pos_classes("내가") and PartOfSpeech.VERB not in pos_classes("학교")


# --- the pipeline: re-ask once with the reason, then keep and flag ---------------------------------------------


class CheckingClient:
    """Answers 학교 with an example that lacks the term ``bad_answers`` times, then correctly."""

    def __init__(self, bad_answers: int) -> None:
        self.bad_answers = bad_answers
        self.requests: list[ChatRequest] = []

    async def complete(self, request: ChatRequest) -> ChatResponse:
        self.requests.append(request)
        data = json.loads(re.search(r"<input>\s*(.*?)\s*</input>", request.messages[1].content, re.S).group(1))
        term = data["term"]
        if "analysis" in data:
            content = cards_for(term, TermAnalysis.model_validate(data["analysis"])).model_dump_json()
        else:
            analysis = analysis_for(term, type="noun", hints={"Definition": "school"})
            asked = sum(1 for r in self.requests if "analysis" not in r.messages[1].content
                        and '"term": "학교"' in r.messages[1].content)
            if term == "학교" and asked <= self.bad_answers:
                analysis = analysis.model_copy(update={
                    "example": ExampleSentence(sentence="밥을 먹었어요.", translation="I ate.")})
            content = analysis.model_dump_json()
        return ChatResponse(content=content, finish_reason="stop", usage=Usage(10, 20, 0.001), model="m",
                            response_id="r", latency_s=0.01, status_code=200, headers={})


SETTINGS = StageSettings(provider="openrouter", model="openai/gpt-4o-mini")


def run_pipeline(ledger: Ledger, client: CheckingClient) -> Any:
    run = new_run(ledger, ["학교", "사람"])
    policy = RetryPolicy(RetryConfig(max_attempts=3, max_reasks=2), clock=FakeClock())
    return run, Pipeline(ledger=ledger, client=client, settings=SETTINGS, policy=policy, flush_interval=0.01)


async def test_a_failed_check_is_reasked_once_with_the_reason_and_a_fixed_answer_is_not_flagged(
        db_url: str) -> None:
    ledger = Ledger(open_database(db_url))
    client = CheckingClient(bad_answers=1)
    run, pipeline = run_pipeline(ledger, client)
    outcome = await pipeline.run(run)
    assert outcome.flagged == [] and outcome.stats.flagged == 0
    reasks = [r for r in client.requests if len(r.messages) > 2]
    assert len(reasks) == 1
    assert reasks[0].messages[2].role == "assistant" and "밥을 먹었어요" in reasks[0].messages[2].content
    assert "does not contain 학교" in reasks[0].messages[3].content
    calls = ledger.api_calls(run.id)
    assert [c.error_code for c in calls if c.status == "error"] == ["content_check"]
    assert all(not r.flags for r in ledger.results(run.id))


async def test_an_answer_that_still_fails_is_kept_flagged_tagged_and_exportable_for_review(
        db_url: str, tmp_path: Path) -> None:
    ledger = Ledger(open_database(db_url))
    client = CheckingClient(bad_answers=5)
    run, pipeline = run_pipeline(ledger, client)
    outcome = await pipeline.run(run)
    assert outcome.stats.done == 2 and outcome.stats.flagged == 1
    assert [(f.term, f.flags) for f in outcome.flagged] == [
        ("학교", ("nuance: the example sentence '밥을 먹었어요.' does not contain 학교 (checked by lemma)",))]
    assert sum(1 for r in client.requests if "analysis" not in r.messages[1].content
               and "학교" in r.messages[1].content) == 2, "re-asked once, not more"
    results = {r.item.term: r for r in ledger.results(run.id)}
    assert results["학교"].flags and not results["사람"].flags
    notes = {n.term: n for n in prepare_deck(results.values(), language=KO).notes}
    assert REVIEW_TAG in notes["학교"].tags and REVIEW_TAG not in notes["사람"].tags

    # A later run answers from the cache: the checks run again, nothing is re-asked, the flag stays.
    again = CheckingClient(bad_answers=5)
    run2, pipeline2 = run_pipeline(ledger, again)
    run2 = ledger.create_run(run_key="run-b", input_path="x.csv", input_sha256="1" * 64, provider="openrouter",
                             model="openai/gpt-4o-mini", settings={}, target_language=KO,
                             learner_language="English", simulated=False, items=list(r.item for r in
                                                                                     results.values()))
    outcome2 = await pipeline2.run(run2)
    assert again.requests == [] and [f.term for f in outcome2.flagged] == ["학교"]

    out = tmp_path / "review.jsonl"
    result = CliRunner().invoke(app, ["export", "--run", str(run.id), "--flagged", "-o", str(out), "--db", db_url])
    assert result.exit_code == 0, result.output
    assert {json.loads(line)["term"] for line in out.read_text(encoding="utf-8").splitlines()} == {"학교"}


def test_process_lists_the_items_kept_for_review_at_the_end() -> None:
    from rich.console import Console

    from flashcard_pipeline.cli.app import _report
    from flashcard_pipeline.cli.output import ExitCode
    from flashcard_pipeline.pipeline import RunOutcome, RunStats
    from flashcard_pipeline.runner import ProcessResult
    from flashcard_pipeline.storage.ledger import FlaggedItem
    from flashcard_pipeline.storage.schema import RunStatus

    flagged = [FlaggedItem(3, "학교", ("nuance: the example sentence '밥' does not contain 학교 (checked by lemma)",))]
    outcome = RunOutcome(run_id=1, status=RunStatus.COMPLETED, stats=RunStats(total=3, done=3, flagged=1),
                         failures=[], flagged=flagged)
    err = Console(record=True, width=200)
    code = _report(ProcessResult(outcome=outcome, output=None, cards_written=0, problems=[]), err)
    text = err.export_text()
    assert code is ExitCode.OK, "a flagged item is kept, not failed"
    assert "1 items kept for review" in text and "export --flagged" in text
    assert "#3 학교: nuance: the example sentence '밥' does not contain 학교" in text


def test_the_hanja_table_read_as_json_is_the_packages_own() -> None:
    from hanja import table as package

    from flashcard_pipeline.korean.hanja_readings import _package_table_path, load_table

    path = _package_table_path()
    assert path is not None and path.is_file()
    fast = load_table(path)
    assert fast is not package.hanja_table, "read from the file, not the package's PyYAML load"
    assert fast == package.hanja_table


def test_a_hanja_table_json_cannot_read_is_left_to_the_packages_loader(tmp_path: Path) -> None:
    from hanja import table as package

    from flashcard_pipeline.korean.hanja_readings import load_table

    commented = tmp_path / "table.yml"
    commented.write_text('# a comment\n"\\u4E00": "\\uC77C"\n', encoding="utf-8")
    assert load_table(commented) is package.hanja_table
    assert load_table(tmp_path / "missing.yml") is package.hanja_table
    plain = tmp_path / "plain.yml"
    plain.write_text('"\\u4E00": "\\uC77C"\n\n"\\u4E8C": "\\uC774"\n', encoding="utf-8")
    assert load_table(plain) == {"一": "일", "二": "이"}


def test_the_analyser_loads_once_when_a_thread_and_the_event_loop_both_want_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A run warms the model in a thread while its event loop may already check an answer: one model (300 MB),
    not two."""
    import functools
    import threading

    from flashcard_pipeline.korean import analyzer

    loads: list[str] = []
    inside, release = threading.Event(), threading.Event()

    @functools.cache
    def slow_load() -> str:
        loads.append(threading.current_thread().name)
        inside.set()
        release.wait(5)
        return "model"

    monkeypatch.setattr(analyzer, "_load_kiwi", slow_load)
    got: list[str] = []
    first = threading.Thread(target=lambda: got.append(analyzer._kiwi()), name="warm-up")
    first.start()
    assert inside.wait(5)
    second = threading.Thread(target=lambda: got.append(analyzer._kiwi()), name="event-loop")
    second.start()
    second.join(0.2)  # it waits for the first load (without the lock it would start a second one)
    release.set()
    first.join(5)
    second.join(5)
    assert got == ["model", "model"] and loads == ["warm-up"]
