"""The exports as Anki itself sees them: imported with the official ``anki`` package into fresh collections."""

from __future__ import annotations

import asyncio
import csv
import html
import re
import shutil
import time
from pathlib import Path

import pytest
from anki.collection import Collection
from anki.import_export_pb2 import (
    ImportAnkiPackageOptions,
    ImportAnkiPackageRequest,
    ImportAnkiPackageUpdateCondition,
    ImportCsvRequest,
    ImportResponse,
)
from anki.notes import Note

from flashcard_pipeline.export import prepare_deck, write_export
from flashcard_pipeline.export.anki_model import NoteType, note_type
from flashcard_pipeline.export.audio import EspeakSpeech, media_name
from flashcard_pipeline.export.common import SIMULATED_TAG, clean_text
from flashcard_pipeline.export.jsonl import read_jsonl
from flashcard_pipeline.models import CardType, Flashcard, TermResult, VocabularyItem
from flashcard_pipeline.runner import ProcessOptions, process
from flashcard_pipeline.simulator.content import analysis_for, cards_for
from flashcard_pipeline.storage.db import open_database
from flashcard_pipeline.storage.ledger import Ledger
from tests.conftest import shared_file

IF_NEWER = ImportAnkiPackageUpdateCondition.IMPORT_ANKI_PACKAGE_UPDATE_CONDITION_IF_NEWER

T0 = 1_750_000_000.0


def import_apkg(col: Collection, path: Path) -> ImportResponse.Log:
    """Anki's default package import: update notes when the package's copy is newer, no scheduling."""
    options = ImportAnkiPackageOptions(merge_notetypes=False, update_notes=IF_NEWER, update_notetypes=IF_NEWER,
                                       with_scheduling=False, with_deck_configs=False)
    return col.import_anki_package(ImportAnkiPackageRequest(package_path=str(path), options=options)).log


def import_text(col: Collection, path: Path) -> ImportResponse.Log:
    """Anki's File > Import of a text file, taking every setting from the file's header lines."""
    metadata = col.get_csv_metadata(str(path), None)
    return col.import_csv(ImportCsvRequest(path=str(path), metadata=metadata)).log


def assert_no_import_errors(log: ImportResponse.Log) -> None:
    assert not log.conflicting and not log.missing_notetype and not log.missing_deck
    assert not log.empty_first_field and not log.first_field_match


def add_note_type(col: Collection, kind: NoteType) -> None:
    """What a collection has after any .apkg of this project (or a push) created the note type."""
    models = col.models
    model = models.new(kind.name)
    for name in kind.fields:
        models.add_field(model, models.new_field(name))
    for spec in kind.templates:
        template = models.new_template(spec["name"])
        template["qfmt"], template["afmt"] = spec["qfmt"], spec["afmt"]
        models.add_template(model, template)
    model["css"] = kind.css
    models.add(model)


def notes_by_guid(col: Collection) -> dict[str, Note]:
    return {note.guid: note for note in (col.get_note(nid) for nid in col.find_notes(""))}


_TAG = re.compile(r"<[^>]*>")


def as_text(field: str) -> str:
    """What a field shows: it must hold no markup but line breaks."""
    assert set(_TAG.findall(field)) <= {"<br>"}, field
    return html.unescape(field.replace("<br>", "\n"))


def make_result(term: str, position: int = 1, *, hints: dict[str, str] | None = None) -> TermResult:
    analysis = analysis_for(term, type="noun")
    return TermResult(item=VocabularyItem(position=position, term=term, type="noun", hints=hints or {}),
                      analysis=analysis, cards=list(cards_for(term, analysis).cards))


def with_meaning(result: TermResult, meaning: str) -> TermResult:
    return result.model_copy(update={"analysis": result.analysis.model_copy(update={"primary_meaning": meaning})})


def check_collection_matches(col: Collection, results: list[TermResult], *, subdecks: str = "none",
                             simulated: bool = True, deck: str | None = None) -> None:
    expected = prepare_deck(results, language="Korean", deck=deck, subdecks=subdecks, simulated=simulated).notes
    notes = notes_by_guid(col)
    assert col.note_count() == len(expected) == len({r.item.term for r in results}), "one note per word"
    assert col.card_count() == sum(len(note.cards) for note in expected)
    assert set(notes) == {note.guid for note in expected}
    for wanted in expected:
        note = notes[wanted.guid]
        assert note.note_type()["name"] == "Flashcard Pipeline v2 (Korean)"
        assert list(note.fields) == list(wanted.fields)
        assert sorted(note.tags) == sorted(wanted.tags)
        cards = note.cards()
        assert sorted(card.template()["name"] for card in cards) == sorted(wanted.cards), "siblings of one note"
        assert {"Recognition", "Production"} <= set(wanted.cards)
        assert {col.decks.name(card.did) for card in cards} == {wanted.deck}


# --- .apkg ------------------------------------------------------------------------------------------------------


def test_apkg_imports_into_a_fresh_collection_with_every_field_and_tag(tmp_path: Path, col: Collection) -> None:
    results = [make_result("학교", 1), make_result("먹다", 2), make_result("빨리", 3)]
    path = tmp_path / "deck.apkg"
    report = write_export("apkg", results, path, simulated=True, timestamp=T0)
    log = import_apkg(col, path)
    assert_no_import_errors(log)
    assert len(log.new) == len(results) and report.cards == col.card_count() > 2 * len(results)
    check_collection_matches(col, results)
    assert all(SIMULATED_TAG in col.get_note(nid).tags for nid in col.find_notes(""))
    cards = [col.get_card(cid) for cid in col.find_cards("")]
    assert {card.type for card in cards} == {0} and {card.reps for card in cards} == {0}, "no scheduling data"
    assert col.db.scalar("select count() from revlog") == 0
    assert "Korean vocabulary (simulated)" in [d.name for d in col.decks.all_names_and_ids()]


def test_a_real_deck_imported_after_a_simulated_one_adds_its_own_notes(tmp_path: Path, col: Collection) -> None:
    results = [make_result("학교", 1), make_result("먹다", 2)]
    simulated, real = tmp_path / "sim.apkg", tmp_path / "real.apkg"
    write_export("apkg", results, simulated, simulated=True, timestamp=T0)
    write_export("apkg", results, real, simulated=False, timestamp=T0 + 3600)
    import_apkg(col, simulated)
    log = import_apkg(col, real)
    assert_no_import_errors(log)
    assert len(log.new) == len(results) and len(log.updated) == 0, "real notes never update simulated ones"
    assert col.note_count() == 2 * len(results)

    # Deleting the simulated deck, as a user does once real cards arrive, leaves every real card.
    col.decks.remove([col.decks.id_for_name("Korean vocabulary (simulated)")])
    check_collection_matches(col, results, simulated=False)
    assert not any(SIMULATED_TAG in col.get_note(nid).tags for nid in col.find_notes(""))


def test_reimporting_a_changed_deck_updates_the_note_in_place_and_keeps_its_reviews(tmp_path: Path,
                                                                                     col: Collection) -> None:
    results = [make_result("학교", 1), make_result("먹다", 2)]
    first = tmp_path / "v1.apkg"
    write_export("apkg", results, first, simulated=True, timestamp=T0)
    import_apkg(col, first)
    before = notes_by_guid(col)

    col.decks.select(col.decks.id_for_name("Korean vocabulary (simulated)"))
    card = col.sched.getCard()
    reviewed_note = card.note()
    col.sched.answerCard(card, 3)

    changed = [with_meaning(results[0], "school (revised)"), results[1]]
    changed_guid = prepare_deck(changed, language="Korean", simulated=True).notes[0].guid
    second = tmp_path / "v2.apkg"
    write_export("apkg", changed, second, simulated=True, timestamp=T0 + 3600)
    log = import_apkg(col, second)

    assert_no_import_errors(log)
    # Anki counts every note whose copy is newer as updated, changed or not; none is added.
    assert len(log.new) == 0 and {n.id.nid for n in log.updated} == {n.id for n in before.values()}
    after = notes_by_guid(col)
    assert {guid: note.id for guid, note in after.items()} == {guid: note.id for guid, note in before.items()}
    assert after[changed_guid]["Meaning"] == "school (revised)"
    check_collection_matches(col, changed)
    reviewed = col.get_card(card.id)
    assert reviewed.reps == 1 and reviewed.nid == reviewed_note.id, "the review history survived the update"
    assert col.db.scalar("select count() from revlog where cid = ?", card.id) == 1


def test_level_subdecks_become_anki_decks(tmp_path: Path, col: Collection) -> None:
    results = [make_result("학교", 1, hints={"TOPIK_Level": "1"}), make_result("먹다", 2, hints={"TOPIK_Level": "2"}),
               make_result("빨리", 3)]
    path = tmp_path / "deck.apkg"
    write_export("apkg", results, path, deck_name="TOPIK", subdecks="level", timestamp=T0)
    assert_no_import_errors(import_apkg(col, path))
    check_collection_matches(col, results, subdecks="level", simulated=False, deck="TOPIK")
    assert {"TOPIK", "TOPIK::Level 1", "TOPIK::Level 2"} <= {d.name for d in col.decks.all_names_and_ids()}


# --- Anki text (TSV) --------------------------------------------------------------------------------------------


def test_tsv_imports_through_ankis_own_text_import_and_updates_in_place(tmp_path: Path, col: Collection) -> None:
    add_note_type(col, note_type("Korean"))
    results = [make_result("학교", 1, hints={"TOPIK_Level": "1"}), make_result("#해시", 2), make_result("먹다", 3)]
    path = tmp_path / "deck.tsv"
    report = write_export("tsv", results, path, subdecks="level", simulated=True)
    assert any("needs the note type" in warning for warning in report.warnings)
    assert "# Import an .apkg" in path.read_text(encoding="utf-8")
    log = import_text(col, path)
    assert_no_import_errors(log)
    assert len(log.new) == len(results)
    check_collection_matches(col, results, subdecks="level")
    ids = {guid: note.id for guid, note in notes_by_guid(col).items()}

    changed = [results[0], with_meaning(results[1], "changed\nmeaning"), results[2]]
    write_export("tsv", changed, path, subdecks="level", simulated=True)
    log = import_text(col, path)
    assert_no_import_errors(log)
    assert len(log.new) == 0 and len(log.updated) == 1, "text import updates only notes whose fields changed"
    assert len(log.duplicate) == len(results) - 1
    check_collection_matches(col, changed, subdecks="level")
    assert {guid: note.id for guid, note in notes_by_guid(col).items()} == ids


def test_a_deck_name_with_loose_separators_gets_no_twin_decks_on_reimport(tmp_path: Path, col: Collection) -> None:
    add_note_type(col, note_type("Korean"))
    results = [make_result("학교", 1, hints={"TOPIK_Level": "1"}), make_result("먹다", 2)]
    path = tmp_path / "deck.tsv"
    for _ in range(2):
        write_export("tsv", results, path, deck_name=" Course :: Korean ::", subdecks="level", simulated=True)
        assert_no_import_errors(import_text(col, path))
    names = {d.name for d in col.decks.all_names_and_ids()} - {"Default"}
    assert names == {"Course", "Course::Korean (simulated)", "Course::Korean (simulated)::Level 1"}
    check_collection_matches(col, results, subdecks="level", deck="Course::Korean")


def test_tsv_updates_notes_that_came_from_the_apkg(tmp_path: Path, col: Collection) -> None:
    results = [make_result("학교", 1), make_result("먹다", 2)]
    write_export("apkg", results, tmp_path / "deck.apkg", timestamp=T0)
    import_apkg(col, tmp_path / "deck.apkg")
    changed = [with_meaning(results[0], "fixed meaning"), results[1]]
    write_export("tsv", changed, tmp_path / "deck.tsv")
    log = import_text(col, tmp_path / "deck.tsv")
    assert len(log.new) == 0 and len(log.updated) == 1
    check_collection_matches(col, changed, simulated=False)


# --- hostile content --------------------------------------------------------------------------------------------

SCRIPT = "<script>alert(1)</script>"
FORMULA = "=cmd|' /C calc'!A0"
HOSTILE_FRONT = f"{FORMULA} {SCRIPT} \"double\" 'single'"
HOSTILE_BACK = "tab\there\nnew line 🎴 \u200fעברית\u200e <img src=x onerror=alert(1)> & done\x00"
HOSTILE_TAGS = ['x:"<b>"', "emoji:🎴", "rtl:\u200fmark"]


def hostile_results() -> list[TermResult]:
    results = []
    for position, term in enumerate([FORMULA, "#해시", "<i>학교</i>"], start=1):
        analysis = analysis_for("학교", type="noun").model_copy(update={
            "term": term, "ipa": "<b>ipa</b>", "primary_meaning": "@SUM(1+1)", "explanation": SCRIPT + "\nnext"})
        cards = [Flashcard(card_type=CardType.SCENE, front=HOSTILE_FRONT, back=HOSTILE_BACK, tags=HOSTILE_TAGS),
                 Flashcard(card_type=CardType.EXAMPLE, front="-1+2", back="+1\r\nline", tags=["pos:noun"])]
        results.append(TermResult(item=VocabularyItem(position=position, term=term), analysis=analysis,
                                  cards=cards))
    return results


def assert_hostile_note_is_text(col: Collection, results: list[TermResult]) -> None:
    expected = {note.guid: note for note in prepare_deck(results, language="Korean", simulated=True).notes}
    notes = notes_by_guid(col)
    assert set(notes) == set(expected)
    for result in results:
        note = next(n for g, n in notes.items() if expected[g].term == result.item.term)
        scene = result.cards[0]
        assert as_text(note["Term"]) == result.item.term
        assert as_text(note["SceneFront"]) == clean_text(scene.front).replace("\r\n", "\n")
        assert as_text(note["SceneBack"]) == clean_text(scene.back).replace("\r\n", "\n")
        assert as_text(note["Meaning"]) == "@SUM(1+1)"
        assert sorted(note.tags) == sorted(["pos:noun", *HOSTILE_TAGS, SIMULATED_TAG])
        for card in note.cards():
            rendered = card.question() + card.answer()
            assert "<script" not in rendered and "<img" not in rendered and "<i>" not in rendered
            assert "&lt;script&gt;" in rendered


def test_hostile_content_arrives_as_harmless_text_in_every_format(tmp_path: Path, col: Collection) -> None:
    results = hostile_results()

    write_export("apkg", results, tmp_path / "deck.apkg", simulated=True, timestamp=T0)
    assert_no_import_errors(import_apkg(col, tmp_path / "deck.apkg"))
    assert_hostile_note_is_text(col, results)

    folder = tmp_path / "anki2"
    folder.mkdir()
    fresh = Collection(str(folder / "collection.anki2"))
    try:
        add_note_type(fresh, note_type("Korean"))
        write_export("tsv", results, tmp_path / "deck.tsv", simulated=True)
        log = import_text(fresh, tmp_path / "deck.tsv")
        assert_no_import_errors(log)
        assert len(log.new) == len(results)
        assert_hostile_note_is_text(fresh, results)
    finally:
        fresh.close()

    write_export("csv", results, tmp_path / "cards.csv", simulated=True)
    with (tmp_path / "cards.csv").open(encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6
    for row in rows:
        assert not any(value.startswith(("=", "+", "-", "@", "\t", "\r")) for value in row.values()), row
    scene = rows[0]
    assert scene["term"] == "'" + FORMULA and scene["front"] == "'" + HOSTILE_FRONT
    assert scene["back"] == clean_text(HOSTILE_BACK) and scene["meaning"] == "'@SUM(1+1)"
    assert rows[1]["front"] == "'-1+2" and rows[1]["back"] == "'+1\r\nline"

    write_export("jsonl", results, tmp_path / "cards.jsonl", simulated=True)
    records = list(read_jsonl(tmp_path / "cards.jsonl"))
    assert [(r.term, r.card.front, r.card.back) for r in records] == [
        (res.item.term, c.front, c.back) for res in results for c in res.cards]
    assert all(r.analysis.explanation == SCRIPT + "\nnext" for r in records)


# --- media ------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_audio_of_word_and_example_reaches_the_collections_media_folder(tmp_path: Path, col: Collection) -> None:
    results = [make_result("학교", 1), make_result("먹다", 2)]
    report = write_export("apkg", results, tmp_path / "deck.apkg", audio="espeak", timestamp=T0)
    assert report.audio_files == 4 and report.warnings == ()
    assert_no_import_errors(import_apkg(col, tmp_path / "deck.apkg"))
    media = Path(col.media.dir())
    identity = EspeakSpeech("Korean").identity()
    for result in results:
        word, example = media_name(identity, result.item.term), media_name(identity, result.analysis.example.sentence)
        assert 500 < (media / word).stat().st_size < 12_000 and (media / example).stat().st_size > 500
        for nid in col.find_notes(f'"Term:{result.item.term}"'):
            note = col.get_note(nid)
            assert note["Audio"] == f"[sound:{word}]" and note["ExampleAudio"] == f"[sound:{example}]"
            recognition = next(c for c in note.cards() if c.template()["name"] == "Recognition")
            played = [tag.filename for tag in recognition.question_av_tags()]
            assert played == [word], "the word is heard on the recognition front"


def test_process_with_openai_speech_from_the_simulator_caches_and_bills_each_clip(tmp_path: Path,
                                                                                   col: Collection) -> None:
    source = tmp_path / "words.csv"
    source.write_text("term,type\n학교,noun\n먹다,verb\n", encoding="utf-8")
    db_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    options = ProcessOptions(input_path=source, output=tmp_path / "deck.apkg", provider="simulated", db_url=db_url,
                             audio="openai")
    result = asyncio.run(process(options))
    assert result.export is not None and result.export.audio_files == 4 and result.export.warnings == ()
    assert_no_import_errors(import_apkg(col, tmp_path / "deck.apkg"))
    sounds = [p for p in Path(col.media.dir()).iterdir() if p.suffix == ".mp3"]
    assert len(sounds) == 4 and all(p.read_bytes()[:1] == b"\xff" for p in sounds)
    engine = open_database(db_url)
    try:
        with engine.connect() as conn:
            audio_calls = conn.exec_driver_sql(
                "select provider, model, cost_usd from api_calls where stage = 'audio'").all()
            cached = conn.exec_driver_sql("select count(*) from cache_entries where stage = 'audio'").scalar()
    finally:
        engine.dispose()
    assert len(audio_calls) == 4 and cached == 4
    assert all(p == "simulated" and m == "tts-1" and cost > 0 for p, m, cost in audio_calls)

    again = asyncio.run(process(ProcessOptions(input_path=source, output=tmp_path / "again.apkg",
                                               provider="simulated", db_url=db_url, audio="openai")))
    assert again.export is not None and again.export.audio_files == 4
    engine = open_database(db_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("select count(*) from api_calls where stage = 'audio'").scalar() == 4
    finally:
        engine.dispose()


# --- the acceptance test --------------------------------------------------------------------------------


@pytest.mark.slow
async def test_the_1000_term_deck_imports_cleanly_and_updates_in_place(tmp_path: Path, col: Collection) -> None:
    source = shared_file("korean_1000_terms.csv")
    db_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    deck = tmp_path / "korean.apkg"
    started = time.perf_counter()
    result = await process(ProcessOptions(input_path=source, output=deck, provider="simulated", db_url=db_url,
                                          concurrency=16))
    pipeline_s = time.perf_counter() - started
    assert result.outcome is not None and result.outcome.stats.done == 1000
    engine = open_database(db_url)
    try:
        ledger = Ledger(engine)
        results = list(ledger.results(ledger.get_run().id))
    finally:
        engine.dispose()
    started = time.perf_counter()
    log = import_apkg(col, deck)
    import_s = time.perf_counter() - started
    assert_no_import_errors(log)
    assert len(log.new) == 1000 == col.note_count()
    assert result.cards_written == col.card_count() > 2000
    assert not log.duplicate and not log.updated

    changed = [with_meaning(results[499], "a corrected meaning"), *results[:499], *results[500:]]
    started = time.perf_counter()
    write_export("apkg", changed, tmp_path / "v2.apkg", simulated=True, timestamp=time.time() + 3600)
    export_s = time.perf_counter() - started
    log = import_apkg(col, tmp_path / "v2.apkg")
    assert_no_import_errors(log)
    assert len(log.new) == 0 and len(log.updated) == 1000 == col.note_count()
    guid = prepare_deck([changed[0]], language="Korean", simulated=True).notes[0].guid
    assert notes_by_guid(col)[guid]["Meaning"] == "a corrected meaning"
    print(f"\n1000 terms: pipeline {pipeline_s:.1f}s, {col.card_count()} cards, apkg export {export_s:.2f}s, "
          f"import {import_s:.2f}s")
