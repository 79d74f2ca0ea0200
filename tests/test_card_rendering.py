"""Every card template as a learner's phone shows it: rendered by the official anki package from an imported
.apkg, laid out by headless Chromium at 360 px in day and night mode, and checked by a script in the page."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from anki.collection import Collection

from flashcard_pipeline.export import write_export
from flashcard_pipeline.export.anki_model import FIELDS, VERSION, note_type
from flashcard_pipeline.ingest import read_vocabulary
from flashcard_pipeline.models import CardType, Flashcard, TermResult, VocabularyItem
from flashcard_pipeline.simulator.content import analysis_for, cards_for
from tests.card_pages import Side, check_in_chromium, chromium
from tests.conftest import UNDER_CI, shared_file
from tests.test_export_anki import T0, assert_no_import_errors, import_apkg

TEMPLATES = ("Recognition", "Production", "Scene", "Usage-Comparison", "Hanja", "Grammar", "Formal-Casual",
             "Example", "Cultural")


def require_chromium() -> None:
    if chromium() is None:
        message = "chromium is not installed (.ci/run installs Debian's chromium)"
        if UNDER_CI:
            pytest.fail(message + "; CI must run this test")
        pytest.skip(message)


def every_type(term: str, type_: str) -> TermResult:
    """A word with a card of every optional type, as a model would write them."""
    analysis = analysis_for(term, type=type_, hints={"Definition": "school", "TOPIK_Level": "1"})
    cards = [
        Flashcard(card_type=CardType.SCENE, front="At the school gate in the morning, a bell rings: which word "
                  "names the place where children learn (noun)?", back="The bell belongs to the school."),
        Flashcard(card_type=CardType.USAGE_COMPARISON, front="학교 or 학원: which one is the state school?",
                  back="학교; 학원 is a private cram school."),
        Flashcard(card_type=CardType.HANJA, front="Hanja?", back="學校"),
        Flashcard(card_type=CardType.GRAMMAR, front="학교 + the place particle for going there?",
                  back="학교에 가요: 에 marks the destination."),
        Flashcard(card_type=CardType.FORMAL_CASUAL, front="Tell your teacher politely that you go to school.",
                  back="학교에 갑니다 (formal), 학교에 가요 (polite)."),
        Flashcard(card_type=CardType.EXAMPLE, front="cloze", back="answer"),
        Flashcard(card_type=CardType.CULTURAL, front="What do Korean pupils say to teachers at the school gate?",
                  back="안녕하세요, with a bow."),
    ]
    return TermResult(item=VocabularyItem(position=6, term=term, type=type_, hints={"TOPIK_Level": "1"},
                                          frequency_rank=120), analysis=analysis, cards=cards)


def rich_results() -> list[TermResult]:
    """The five rich words of the shared list, answered by the simulator, plus 학교 with every card type and
    a verb with its conjugations."""
    results = []
    items, _ = read_vocabulary(shared_file("korean_5_rich.csv"))
    for item in items:
        analysis = analysis_for(item.term, type=item.type, hints=item.hints)
        results.append(TermResult(item=item, analysis=analysis,
                                  cards=list(cards_for(item.term, analysis, hints=item.hints).cards)))
    results.append(every_type("학교", "noun"))
    verb = analysis_for("먹다", type="verb", hints={"Definition": "to eat"})
    grammar = Flashcard(card_type=CardType.GRAMMAR, front="How does 먹다 conjugate?", back="Like any -다 verb.")
    results.append(TermResult(item=VocabularyItem(position=7, term="먹다", type="verb"), analysis=verb,
                              cards=[grammar, *cards_for("먹다", verb).cards][:4]))
    return results


def rendered_sides(col: Collection, results: list[TermResult], tmp_path: Path) -> list[tuple[str, str, Side]]:
    """(term, template, side) for both sides of every card of the imported deck."""
    write_export("apkg", results, tmp_path / "deck.apkg", timestamp=T0)
    assert_no_import_errors(import_apkg(col, tmp_path / "deck.apkg"))
    sides = []
    for cid in sorted(col.find_cards("")):
        card = col.get_card(cid)
        term, template = card.note()["Term"], card.template()["name"]
        sides.append((term, template, Side(f"{term} {template} front", card.question())))
        sides.append((term, template, Side(f"{term} {template} back", card.answer())))
    return sides


def test_the_rich_list_imports_as_one_note_per_word_with_its_cards_as_siblings(tmp_path: Path,
                                                                                col: Collection) -> None:
    results = rich_results()
    sides = rendered_sides(col, results, tmp_path)
    assert col.note_count() == len(results)
    for nid in col.find_notes(""):
        note = col.get_note(nid)
        names = [card.template()["name"] for card in note.cards()]
        assert {"Recognition", "Production"} <= set(names) and len(names) == len(set(names)) >= 3
    assert {template for _, template, _ in sides} == set(TEMPLATES), "every template makes a card somewhere"
    school = next(col.get_note(nid) for nid in col.find_notes("Term:학교"))
    assert len(school.cards()) == len(TEMPLATES)
    assert school["Pronunciation"] == "학꾜" and school["Romanization"] == "hakgyo"
    assert school["FrequencyRank"] == "120" and school["TopikLevel"] == "1" and school["ListPosition"] == "6"
    assert "學" in school["HanjaBreakdown"] and "배울 학" in school["HanjaBreakdown"]
    assert {"pos:noun", "level:topik1"} <= set(school.tags)


def test_each_back_answers_its_own_card_and_shows_term_pronunciation_and_meaning_once(tmp_path: Path,
                                                                                      col: Collection) -> None:
    for term, template, side in rendered_sides(col, rich_results(), tmp_path):
        if not side.label.endswith("back"):
            assert "<details" not in side.html, f"{term} {template}: the front shows no analysis"
            continue
        for cls in ("fp-term", "fp-pron", "fp-meaning"):
            assert len(re.findall(rf'class="{cls}"', side.html)) == 1, f"{term} {template}: {cls} once"
        assert side.html.count("<details") == 1 and "<summary>" in side.html
        if template == "Hanja":
            assert "배울" in side.html.split("<details")[0], "the Hanja breakdown answers the Hanja card"
        if template == "Example":
            answer = side.html.split('id="answer"')[1].split("<details")[0]
            assert '<mark class="fp-hl">' in answer and "fp-gap" in side.html.split('id="answer"')[0]


def test_every_template_fits_360_px_in_day_and_night_without_breaking_a_korean_word(tmp_path: Path,
                                                                                    col: Collection) -> None:
    require_chromium()
    sides = [side for _, _, side in rendered_sides(col, rich_results(), tmp_path)]
    verdict = check_in_chromium(sides, tmp_path)
    assert verdict.checked == 2 * len(sides)
    assert verdict.words > 10 * len(sides), "the script measured the Korean words"
    assert verdict.problems == []


def test_the_page_check_catches_overflow_a_broken_korean_word_and_untagged_hanja(tmp_path: Path) -> None:
    require_chromium()
    kind = note_type("Korean")
    wide = Side("wide", f"<style>{kind.css}</style><div style='width:900px'>넓은 상자</div>")
    broken = Side("broken", "<style>body{width:120px;word-break:break-all;font-size:30px}</style>"
                            "<p>학교에서 공부했어요 대한민국</p>")
    hanja = Side("hanja", "<p>學校</p>")
    verdict = check_in_chromium([wide, broken, hanja], tmp_path)
    text = "\n".join(verdict.problems)
    assert "wide (day)" in text and "px wide" in text
    assert "broken (night): Hangul word" in text and "spans 2 lines" in text
    assert "Hanja 學校 without lang=ko" in text


def test_the_note_type_is_versioned_by_its_fields_and_templates() -> None:
    """Changing the fields or templates changes this fingerprint: bump VERSION too (a new name and id)."""
    kind = note_type("Korean")
    assert kind.name == f"Flashcard Pipeline v{VERSION} (Korean)"
    assert (VERSION, kind.fields, kind.template_names) == (2, FIELDS, TEMPLATES)
    assert note_type("Japanese").id != kind.id


def test_the_tsv_says_the_note_type_must_come_first(tmp_path: Path) -> None:
    report = write_export("tsv", rich_results()[:2], tmp_path / "deck.tsv")
    assert report.warnings and "import an .apkg" in report.warnings[0]
    assert os.path.getsize(tmp_path / "deck.tsv") > 0
