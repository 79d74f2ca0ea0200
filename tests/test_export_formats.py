"""The exporters without Anki: GUIDs, ids, escaping, tags, decks, TSV headers, CSV injection, JSONL, audio."""

from __future__ import annotations

import asyncio
import csv
import json
import shutil
import sqlite3
import tempfile
import threading
import weakref
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import genanki
import pytest

import flashcard_pipeline.export as export_module
import flashcard_pipeline.export.audio as audio_module
from flashcard_pipeline.errors import ConfigurationError
from flashcard_pipeline.export import prepare_deck, resolve_format, write_export
from flashcard_pipeline.export.anki_model import FIELDS, deck_id, language_code, note_type
from flashcard_pipeline.export.apkg import write_apkg
from flashcard_pipeline.export.audio import (
    AudioStore,
    Clip,
    EspeakSpeech,
    OpenAISpeech,
    SpeechError,
    media_name,
    synthesize,
)
from flashcard_pipeline.export.common import SIMULATED_TAG, anki_tags, html_text
from flashcard_pipeline.export.csv_export import neutralise
from flashcard_pipeline.export.jsonl import card_records, read_jsonl, write_jsonl
from flashcard_pipeline.export.notes import AnkiNote, Subdecks, build_notes, resolve_deck_name
from flashcard_pipeline.models import CardType, Flashcard, TermResult, VocabularyItem
from flashcard_pipeline.simulator import run_simulator
from flashcard_pipeline.simulator.content import analysis_for, cards_for, speech_for
from flashcard_pipeline.storage.db import open_database
from flashcard_pipeline.storage.ledger import Ledger

T0 = 1_750_000_000.0


def make_result(term: str, position: int = 1, *, hints: dict[str, str] | None = None,
                cards: list[Flashcard] | None = None) -> TermResult:
    analysis = analysis_for(term, type="noun")
    return TermResult(item=VocabularyItem(position=position, term=term, type="noun", hints=hints or {}),
                      analysis=analysis, cards=cards if cards is not None else list(cards_for(term, analysis).cards))


def card(card_type: CardType, front: str = "front", back: str = "back", tags: list[str] | None = None) -> Flashcard:
    return Flashcard(card_type=card_type, front=front, back=back, tags=tags or [])


def notes_of(results: list[TermResult], **kwargs: object) -> list:
    options: dict = {"language": "Korean", "root_deck": "Deck", "subdecks": Subdecks.NONE, "simulated": False}
    options.update(kwargs)
    return list(build_notes(results, **options))


# --- identity: GUIDs and ids ----------------------------------------------------------------------------------


def test_one_note_per_word_whose_guid_comes_from_language_and_term() -> None:
    cards = [card(CardType.SCENE), card(CardType.EXAMPLE), card(CardType.GRAMMAR, front="how?")]
    notes = notes_of([make_result("학교", cards=cards), make_result("먹다", 2)])
    assert [n.term for n in notes] == ["학교", "먹다"]
    assert notes[0].guid == genanki.guid_for("Korean", "학교")
    assert notes_of([make_result("학교")], simulated=True)[0].guid == genanki.guid_for("simulated", "Korean", "학교")
    assert notes[0].cards == ("Recognition", "Production", "Scene", "Grammar", "Example")
    assert notes[0].field("SceneFront") == "front" and notes[0].field("GrammarFront") == "how?"
    assert notes[0].field("CulturalFront") == "", "a type the model did not choose makes no card"
    assert notes[0].field("Term") == "학교", "the first field is the word: AnkiConnect's duplicate check"


def test_guid_ignores_position_wording_and_run_but_not_language() -> None:
    first = notes_of([make_result("학교", position=1, cards=[card(CardType.SCENE, front="old wording")])])
    later = notes_of([make_result("학교", position=40, cards=[card(CardType.SCENE, front="new wording")])])
    other_language = notes_of([make_result("학교", cards=[card(CardType.SCENE)])], language="Japanese")
    assert first[0].guid == later[0].guid
    assert first[0].field("SceneFront") != later[0].field("SceneFront")
    assert other_language[0].guid != first[0].guid


def test_note_type_and_deck_ids_derive_from_names() -> None:
    korean = note_type("Korean")
    assert korean.id == note_type("Korean").id
    assert korean.id != note_type("Japanese").id
    assert korean.name == "Flashcard Pipeline v2 (Korean)"
    assert deck_id("Korean vocabulary") == deck_id("Korean vocabulary") != deck_id("Korean vocabulary::noun")
    for value in (korean.id, deck_id("x"), deck_id("Korean vocabulary")):
        assert (1 << 30) <= value < (1 << 31)
    assert korean.fields == FIELDS and korean.fields[0] == "Term"
    assert korean.genanki_model().sort_field_index == FIELDS.index("Term")


def test_the_template_marks_the_term_with_its_language() -> None:
    assert language_code("Korean") == "ko" and language_code("ko") == "ko"
    assert language_code("Klingon") is None
    assert 'lang="ko"' in note_type("Korean").templates[0]["afmt"]
    assert "lang=" not in note_type("Klingon").templates[0]["afmt"]
    css = note_type("Korean").css
    assert ".nightMode" in css and "Noto Sans KR" in css and "keep-all" in css


# --- text, tags and decks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("<script>alert(1)</script>", "&lt;script&gt;alert(1)&lt;/script&gt;"),
    ('say "hi" & \'bye\'', "say &quot;hi&quot; &amp; 'bye'"),
    ("one\ntwo\r\nthree\rfour", "one<br>two<br>three<br>four"),
    ("tab\there", "tab\there"),
    ("null\x00byte\x1b", "nullbyte"),
    ("🎴 \u200fמילה\u200e", "🎴 \u200fמילה\u200e"),
])
def test_model_text_is_html_escaped(text: str, expected: str) -> None:
    assert html_text(text) == expected


def test_tags_contain_no_spaces_and_the_simulated_tag_is_added_once() -> None:
    assert anki_tags(["pos:noun", "a b", "tab\tbed", "ideo\u3000space", "  ", "pos:noun"]) == (
        "pos:noun", "a_b", "tab_bed", "ideo_space")
    cards = [card(CardType.SCENE, tags=["pos:noun", SIMULATED_TAG]), card(CardType.GRAMMAR, tags=["pos:noun"])]
    notes = notes_of([make_result("학교", cards=cards)], simulated=True)
    for note in notes:
        assert note.tags.count(SIMULATED_TAG) == 1
        assert all(" " not in tag for tag in note.tags)
    assert SIMULATED_TAG not in notes_of([make_result("학교", cards=cards[1:])])[0].tags


@pytest.mark.parametrize(("requested", "simulated", "expected"), [
    (None, False, "Korean vocabulary"),
    (None, True, "Korean vocabulary (simulated)"),
    ("My deck", True, "My deck (simulated)"),
    ("My deck (simulated)", True, "My deck (simulated)"),
    ("  Two\nlines\tdeck ", False, "Two lines deck"),
    ("Parent::Child", False, "Parent::Child"),
    (" A :: B ::", True, "A::B (simulated)"),  # as Anki stores it, or its text import makes twin decks
    ("::", False, "Korean vocabulary"),
])
def test_deck_name(requested: str | None, simulated: bool, expected: str) -> None:
    assert resolve_deck_name(requested, language="Korean", simulated=simulated) == expected


def test_subdecks_by_part_of_speech_and_by_the_inputs_level_column() -> None:
    results = [make_result("학교", 1, hints={"TOPIK_Level": "1"}), make_result("먹다", 2, hints={"level": "Level 3"}),
               make_result("빨리", 3, hints={"Definition": "quickly"}), make_result("그", 4, hints={"cefr_LEVEL": " "})]
    by_level = {n.term: n.deck for n in notes_of(results, subdecks=Subdecks.LEVEL)}
    assert by_level == {"학교": "Deck::Level 1", "먹다": "Deck::Level 3", "빨리": "Deck", "그": "Deck"}
    by_pos = {n.term: n.deck for n in notes_of(results, subdecks=Subdecks.POS)}
    assert by_pos == {r.item.term: f"Deck::{r.analysis.pos.value}" for r in results}
    assert {n.deck for n in notes_of(results)} == {"Deck"}


def test_analysis_fields_are_escaped_and_hanja_carry_the_korean_tag() -> None:
    result = make_result("학교")
    note = notes_of([result], lang="ko")[0]
    assert note.field("Explanation") == html_text(result.analysis.explanation)
    assert html_text(result.analysis.metaphor) in note.field("MemoryImage")
    assert note.field("HanjaBreakdown").startswith('<div class="fp-hanja" lang="ko">學校</div>')
    for homonym in result.analysis.homonyms:
        assert f'<span lang="ko">{html_text(homonym.hanja)}</span>' in note.field("Homonyms")
    assert note.field("Pronunciation") == "학꾜" and note.field("Romanization") == "hakgyo"
    hostile = result.model_copy(update={"analysis": result.analysis.model_copy(
        update={"explanation": "<b>學</b> & 校"})})
    assert notes_of([hostile], lang="ko")[0].field("Explanation") == (
        '&lt;b&gt;<span lang="ko">學</span>&lt;/b&gt; &amp; <span lang="ko">校</span>')


def test_the_example_highlights_the_words_inflected_form() -> None:
    result = make_result("먹다", cards=[card(CardType.EXAMPLE)])
    example = result.analysis.example.model_copy(update={"sentence": "내가 <밥>을 먹었어."})
    result = result.model_copy(update={"analysis": result.analysis.model_copy(update={"example": example})})
    note = notes_of([result], lang="ko")[0]
    assert note.field("Example") == '내가 &lt;밥&gt;을 <mark class="fp-hl">먹었어</mark>.'
    assert note.field("ExampleCloze") == '내가 &lt;밥&gt;을 <span class="fp-gap">&nbsp;</span>.'
    assert "Example" in note.cards


# --- formats ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("explicit", "output", "expected"), [
    (None, "deck.apkg", "apkg"), (None, "deck.TSV", "tsv"), (None, "deck.txt", "tsv"), (None, "deck.csv", "csv"),
    (None, "deck.jsonl", "jsonl"), (None, None, "jsonl"), (None, "deck", "jsonl"), ("tsv", "deck.dat", "tsv"),
    ("APKG", "deck.csv", "apkg"),
])
def test_format_comes_from_the_option_or_the_extension(explicit: str | None, output: str | None,
                                                        expected: str) -> None:
    assert resolve_format(explicit, Path(output) if output else None) == expected


@pytest.mark.parametrize(("explicit", "output"), [("xlsx", None), (None, "deck.xlsx")])
def test_unknown_format_is_a_configuration_error(explicit: str | None, output: str | None) -> None:
    with pytest.raises(ConfigurationError, match="apkg, tsv, csv, jsonl"):
        resolve_format(explicit, Path(output) if output else None)


def test_anki_tsv_headers_point_at_the_right_columns(tmp_path: Path) -> None:
    results = [make_result("학교", 1, hints={"TOPIK_Level": "2"}), make_result("#해시", 2)]
    path = tmp_path / "deck.tsv"
    report = write_export("tsv", results, path, subdecks="level", simulated=True)
    lines = path.read_text(encoding="utf-8").splitlines()
    headers = dict(line[1:].split(":", 1) for line in lines if line.startswith("#") and ":" in line[:20])
    assert headers["separator"] == "tab" and headers["html"] == "true"
    assert headers["notetype"] == "Flashcard Pipeline v2 (Korean)"
    assert headers["deck"] == "Korean vocabulary (simulated)" == report.deck
    columns = headers["columns"].split("\t")
    assert columns[:len(FIELDS)] == list(FIELDS)
    rows = list(csv.reader(lines[len(headers) + 1:], delimiter="\t"))
    assert lines[len(headers)].startswith("# Import an .apkg"), "a comment line says what Anki needs first"
    assert len(rows) == len(results) and report.cards == sum(len(n.cards) for n in prepare_deck(
        results, language="Korean").notes)
    expected = {n.guid: n for n in prepare_deck(results, language="Korean", subdecks="level", simulated=True).notes}
    by_guid = {row[int(headers["guid column"]) - 1]: row for row in rows}
    assert set(by_guid) == set(expected)
    for guid, note in expected.items():
        row = by_guid[guid]
        assert row[:len(FIELDS)] == list(note.fields)
        assert row[int(headers["tags column"]) - 1].split(" ") == list(note.tags)
        assert row[int(headers["deck column"]) - 1] == note.deck
        assert not row[0].startswith("#"), "Anki would skip the row as a comment"
    decks = [row[int(headers["deck column"]) - 1] for row in rows]
    assert set(decks) == {"Korean vocabulary (simulated)::Level 2", "Korean vocabulary (simulated)"}
    assert decks == sorted(decks, key=lambda deck: deck.count("::")), "parent decks first (see anki_tsv)"


@pytest.mark.parametrize(("cell", "expected"), [
    ("=cmd|' /C calc'!A0", "'=cmd|' /C calc'!A0"), ("+1", "'+1"), ("-2+3", "'-2+3"), ("@SUM(A1)", "'@SUM(A1)"),
    ("\tx", "'\tx"), ("\rx", "'\rx"), ("  =1+1", "'  =1+1"), ("학교", "학교"), ("a=b", "a=b"), ("", ""),
])
def test_csv_cells_that_spreadsheets_would_run_are_neutralised(cell: str, expected: str) -> None:
    assert neutralise(cell) == expected


def test_csv_is_plain_text_with_a_bom_and_no_live_formulas(tmp_path: Path) -> None:
    hostile = [card(CardType.SCENE, front="=cmd|' /C calc'!A0", back="@SUM(1)\n<b>bold</b>", tags=["x:-1"])]
    results = [make_result("학교", cards=hostile), make_result("-다", 2)]
    path = tmp_path / "cards.csv"
    report = write_export("csv", results, path)
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    with path.open(encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == report.cards == 1 + len(results[1].cards) and report.terms == 2
    for row in rows:
        for value in row.values():
            assert not value.startswith(("=", "+", "-", "@", "\t", "\r")), value
    assert rows[0]["front"] == "'=cmd|' /C calc'!A0"
    assert rows[0]["back"] == "'@SUM(1)\n<b>bold</b>", "plain text: not HTML-escaped, line break kept"
    assert rows[1]["term"] == "'-다"


def test_jsonl_loads_back_into_the_models(tmp_path: Path) -> None:
    results = [make_result("학교"), make_result("먹다", 2)]
    path = tmp_path / "cards.jsonl"
    report = write_export("jsonl", results, path, simulated=True)
    records = list(read_jsonl(path))
    assert len(records) == report.cards and report.terms == 2
    flat = [(r, c) for r in results for c in r.cards]
    for record, (result, original) in zip(records, flat, strict=True):
        assert record.analysis == result.analysis and record.item == result.item
        assert record.card.front == original.front and record.card.card_type is original.card_type
        assert record.card.tags == [*original.tags, SIMULATED_TAG]


@pytest.mark.parametrize("simulated", [False, True])
def test_each_jsonl_line_is_its_card_records_own_json(tmp_path: Path, simulated: bool) -> None:
    """The lines share each term's serialised analysis and item, and are still byte for byte what the record's
    ``model_dump_json`` writes (a quote, a backslash and a line break in the term included)."""
    results = [make_result("학교"), make_result('먹"다\\\n', 2)]
    path = tmp_path / "cards.jsonl"
    write_jsonl(results, path, simulated=simulated)
    expected = [record.model_dump_json() for record in card_records(results, simulated=simulated)]
    assert path.read_text(encoding="utf-8").splitlines() == expected
    assert len(expected) == sum(len(result.cards) for result in results) > 2


def test_a_failed_export_leaves_the_previous_file_and_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "deck.apkg"
    write_export("apkg", [make_result("학교")], path)
    before = path.read_bytes()

    def broken() -> Iterator[TermResult]:
        yield make_result("먹다")
        raise RuntimeError("database went away")

    for fmt in ("apkg", "tsv", "csv", "jsonl"):
        target = path if fmt == "apkg" else tmp_path / f"deck.{fmt}"
        with pytest.raises(RuntimeError):
            write_export(fmt, broken(), target)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deck.apkg"]


def test_apkg_holds_the_notes_and_their_media(tmp_path: Path) -> None:
    path = tmp_path / "deck.apkg"
    report = write_export("apkg", [make_result("학교"), make_result("먹다", 2)], path, simulated=True)
    with zipfile.ZipFile(path) as archive:
        assert {"collection.anki2", "media"} <= set(archive.namelist())
    assert report.deck == "Korean vocabulary (simulated)" and report.terms == 2 and report.audio_files == 0


def genanki_package(notes: list[AnkiNote], path: Path, *, root: str, media: list[Path], timestamp: float) -> None:
    """The package as genanki's own ``Package.write_to_file`` writes it: every note held until the end."""
    model = note_type("Korean").genanki_model()
    decks = {root: genanki.Deck(deck_id(root), root)}
    for note in notes:
        deck = decks.setdefault(note.deck, genanki.Deck(deck_id(note.deck), note.deck))
        deck.add_note(genanki.Note(model=model, fields=list(note.fields), tags=list(note.tags), guid=note.guid))
    decks[root].add_model(model)
    genanki.Package(list(decks.values()), media_files=[str(p) for p in media]).write_to_file(str(path),
                                                                                            timestamp=timestamp)


def package_content(path: Path, scratch: Path) -> dict[str, object]:
    """Everything Anki reads from a package: the collection row, notes and cards by id, the media files."""
    with zipfile.ZipFile(path) as archive:
        content: dict[str, object] = {name: archive.read(name) for name in archive.namelist()
                                      if name != "collection.anki2"}
        database = Path(archive.extract("collection.anki2", scratch))
    connection = sqlite3.connect(database)
    try:
        for table in ("col", "notes", "cards", "revlog", "graves"):
            content[table] = connection.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
    finally:
        connection.close()
    database.unlink()
    return content


def level_results(count: int) -> list[TermResult]:
    """Words whose levels interleave, so the sub-decks' notes arrive mixed (every fourth has none: root deck)."""
    return [make_result(f"단어{i}", i + 1, hints={"TOPIK_Level": str(i % 4)} if i % 4 else {}) for i in range(count)]


@pytest.mark.parametrize("subdecks", ["none", "level"])
def test_a_streamed_apkg_is_the_package_genanki_writes_from_the_same_notes(tmp_path: Path, subdecks: str) -> None:
    results = level_results(30)
    sound = tmp_path / "fp-1.mp3"
    sound.write_bytes(b"ID3 clip")
    root = "Korean vocabulary"
    notes = prepare_deck(results, language="Korean", subdecks=subdecks).notes
    assert len({note.deck for note in notes}) == (1 if subdecks == "none" else 4)
    genanki_package(notes, tmp_path / "genanki.apkg", root=root, media=[sound], timestamp=T0)
    count = write_apkg(iter(notes), tmp_path / "streamed.apkg", note_type=note_type("Korean"), root_deck=root,
                       media=[sound], timestamp=T0)
    assert count == len(notes)
    expected = package_content(tmp_path / "genanki.apkg", tmp_path)
    assert package_content(tmp_path / "streamed.apkg", tmp_path) == expected
    assert len(expected["cards"]) > 2 * len(notes)


def test_the_apkg_export_builds_and_writes_one_note_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               ) -> None:
    alive: weakref.WeakSet[genanki.Note] = weakref.WeakSet()
    made = 0

    class Counted(genanki.Note):
        def __init__(self, *args: object, **kwargs: object) -> None:
            nonlocal made
            super().__init__(*args, **kwargs)
            alive.add(self)
            made += 1

    monkeypatch.setattr(genanki, "Note", Counted)
    seen: list[tuple[int, int]] = []

    def results() -> Iterator[TermResult]:
        for result in level_results(12):
            seen.append((made, len(alive)))
            yield result

    report = write_export("apkg", results(), tmp_path / "deck.apkg", subdecks="level", timestamp=T0)
    assert report.terms == 12 and report.decks == ("Korean vocabulary", *(f"Korean vocabulary::Level {n}"
                                                                          for n in (1, 2, 3)))
    assert [made for made, _ in seen] == list(range(12)), "each word is written before the next is read"
    assert max(count for _, count in seen) <= 1


def test_the_apkg_export_leaves_no_scratch_file_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    write_export("apkg", [make_result("학교")], tmp_path / "deck.apkg")
    assert list(scratch.iterdir()) == []


# --- audio ------------------------------------------------------------------------------------------------------


def test_missing_espeak_is_one_warning_and_the_export_goes_on(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    path = tmp_path / "deck.apkg"
    report = write_export("apkg", [make_result("학교")], path, audio="espeak")
    assert path.exists() and report.cards > 0 and report.audio_files == 0
    assert len(report.warnings) == 1 and "espeak-ng is not installed" in report.warnings[0]
    prepared = prepare_deck([make_result("학교")], language="Korean", audio="espeak", media_dir=tmp_path / "m")
    assert all(note.field("Audio") == "" for note in prepared.notes)


def test_audio_is_only_for_anki_decks(tmp_path: Path) -> None:
    report = write_export("jsonl", [make_result("학교")], tmp_path / "cards.jsonl", audio="espeak")
    assert report.audio_files == 0 and "only attached to .apkg" in report.warnings[0]


requires_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


def is_mp3(data: bytes) -> bool:
    """An ID3 tag or an MPEG audio frame header (11 set sync bits)."""
    return data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0)


@requires_espeak
def test_espeak_writes_one_small_mp3_per_text_with_a_stable_name(tmp_path: Path) -> None:
    provider = EspeakSpeech("Korean")
    report = synthesize(["학교", "먹다", "학교", "-빨리", "내가 밥을 먹었어."], provider=provider, directory=tmp_path)
    assert report.warning is None
    assert set(report.files) == {"학교", "먹다", "-빨리", "내가 밥을 먹었어."}
    for text, path in report.files.items():
        assert path.name == media_name(provider.identity(), text)
        data = path.read_bytes()
        assert is_mp3(data) and 500 < len(data) < 12_000, "compressed: a few KB, not espeak's 40 KB WAV"
    assert media_name(provider.identity(), "학교") != media_name(EspeakSpeech("Japanese").identity(), "학교")


@requires_espeak
def test_espeak_without_a_voice_for_the_language_warns(tmp_path: Path) -> None:
    report = synthesize(["zzz"], provider=EspeakSpeech("Zyzzyvan"), directory=tmp_path)
    assert report.files == {} and report.warning is not None and "could not speak 'zzz'" in report.warning


def test_clips_are_cached_in_the_ledger_with_their_cost_and_never_asked_twice(tmp_path: Path) -> None:
    class Counting:
        name, model = "openai", "tts-1"

        def __init__(self) -> None:
            self.calls: list[str] = []

        def identity(self) -> str:
            return "openai:tts-1:alloy:mp3"

        def speak(self, text: str) -> Clip:
            self.calls.append(text)
            return Clip(mp3=speech_for(text), cost_usd=len(text) * 15 / 1e6)

    engine = open_database(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        ledger = Ledger(engine)
        provider = Counting()
        first = synthesize(["학교", "학교에 가요."], provider=provider, directory=tmp_path / "a",
                           store=AudioStore(ledger))
        again = synthesize(["학교", "학교에 가요."], provider=provider, directory=tmp_path / "b",
                           store=AudioStore(ledger))
        assert provider.calls == ["학교", "학교에 가요."] and again.cached == 2
        assert first.cost_usd == pytest.approx(len("학교학교에 가요.") * 15 / 1e6)
        assert (tmp_path / "b" / media_name(provider.identity(), "학교")).read_bytes() == speech_for("학교")
        with engine.connect() as conn:
            rows = conn.exec_driver_sql("select stage, model, cost_usd from api_calls").all()
        assert sorted((stage, model, round(cost * 1e6)) for stage, model, cost in rows) == [
            ("audio", "tts-1", 2 * 15), ("audio", "tts-1", 7 * 15)], "one billed call per clip, at $15 per M chars"
    finally:
        engine.dispose()


async def test_the_simulator_answers_speech_with_mp3_and_the_provider_bills_it(tmp_path: Path) -> None:
    async with run_simulator() as simulator:
        provider = OpenAISpeech(simulator.base_url, "sk-secret-key", provider="simulated")
        try:
            clip = await asyncio.to_thread(provider.speak, "학교에 가요.")
            assert is_mp3(clip.mp3) and clip.mp3 == speech_for("학교에 가요.")
            assert clip.cost_usd == pytest.approx(len("학교에 가요.") * 15 / 1e6)
            with pytest.raises(SpeechError, match="HTTP 400"):
                await asyncio.to_thread(provider.speak, " ")
        finally:
            provider.close()
        assert simulator.stats().stages["speech"] == 2


# --- audio in chunks: one chunk of words and clips at a time ----------------------------------------------------


def fake_mp3(text: str) -> bytes:
    """A clip's bytes, distinct per text and cheap (encoding real MP3 costs 15 ms a clip)."""
    return b"ID3\x04" + text.encode() * 8


class FakeSpeech:
    """A paid speech endpoint, offline: a clip per text, each call recorded with what ``progress()`` said then, and
    how many of the clips it made were still alive (held by the export)."""

    name, model = "openai", "tts-1"

    def __init__(self, *, refuse: bool = False, fail: frozenset[str] = frozenset(),
                 progress: Callable[[], object] = lambda: None) -> None:
        self.refuse, self.fail, self.progress = refuse, fail, progress
        self.calls: list[str] = []
        self.seen: list[tuple[int, object]] = []
        self._clips: list[weakref.ref[Clip]] = []
        self._lock = threading.Lock()

    def identity(self) -> str:
        return "openai:tts-1:alloy:mp3"

    def speak(self, text: str) -> Clip:
        with self._lock:
            self.calls.append(text)
            self.seen.append((sum(ref() is not None for ref in self._clips), self.progress()))
        if self.refuse:
            raise SpeechError("the speech endpoint answered HTTP 401")
        if text in self.fail:
            raise SpeechError("the speech endpoint answered HTTP 500")
        clip = Clip(mp3=fake_mp3(text), cost_usd=len(text) * 15 / 1e6)
        with self._lock:
            self._clips.append(weakref.ref(clip))
        return clip


def spoken_texts(results: list[TermResult]) -> list[str]:
    """Every distinct text an audio export speaks, in order: each word, then its example sentence."""
    return list(dict.fromkeys(text for r in results for text in (r.item.term, r.analysis.example.sentence)))


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    engine = open_database(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        yield Ledger(engine)
    finally:
        engine.dispose()


def with_fake_speech(monkeypatch: pytest.MonkeyPatch, speech: FakeSpeech, chunk: int) -> None:
    monkeypatch.setattr(export_module, "speech_provider", lambda engine, language, settings: speech)
    monkeypatch.setattr(export_module, "AUDIO_CHUNK_TERMS", chunk)


def test_an_apkg_with_audio_reads_one_chunk_of_words_ahead_and_holds_one_chunk_of_clips(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunk = 4
    written = 0

    class Counted(genanki.Note):
        def __init__(self, *args: object, **kwargs: object) -> None:
            nonlocal written
            super().__init__(*args, **kwargs)
            written += 1

    monkeypatch.setattr(genanki, "Note", Counted)
    words = level_results(14)
    read: list[int] = []  # notes written when each word was read

    def results() -> Iterator[TermResult]:
        for result in words:
            read.append(written)
            yield result

    speech = FakeSpeech(progress=lambda: (len(read), written))
    with_fake_speech(monkeypatch, speech, chunk)
    report = write_export("apkg", results(), tmp_path / "deck.apkg", audio="openai", timestamp=T0)
    assert read == [i // chunk * chunk for i in range(14)], "a chunk is read once the one before is written"
    assert all(taken - notes <= chunk for _, (taken, notes) in speech.seen), "speaking only the chunk read"
    assert max(alive for alive, _ in speech.seen) <= 2 * chunk - 1, "one chunk's clips (two a word), not the run's"
    assert sorted(speech.calls) == sorted(spoken_texts(words)) and report.audio_files == 28
    assert report.terms == 14 and report.warnings == ()


def test_audio_in_chunks_makes_the_package_one_chunk_makes_speaking_each_text_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    words = level_results(10)
    # A word again in a later chunk, and another word whose example sentence is an earlier one's.
    other = make_result("다른말", 11)
    other = other.model_copy(update={"analysis": other.analysis.model_copy(update={
        "example": words[0].analysis.example})})
    words += [make_result("단어2", 12), other]
    texts = spoken_texts(words)
    warm = [texts[5], texts[14], texts[20]]  # in the second, third and fourth chunks
    packages = []
    for chunk, name in ((3, "chunked"), (1000, "whole")):
        engine = open_database(f"sqlite:///{tmp_path / f'{name}.db'}")
        try:
            store = AudioStore(Ledger(engine), run_id=None)
            synthesize(warm, provider=FakeSpeech(), directory=tmp_path / f"warm-{name}", store=store)
            speech = FakeSpeech()
            with_fake_speech(monkeypatch, speech, chunk)
            report = write_export("apkg", words, tmp_path / f"{name}.apkg", subdecks="level", audio="openai",
                                  timestamp=T0, speech=export_module.SpeechSettings(store=store))
            with engine.connect() as conn:
                calls = conn.exec_driver_sql("select count(*) from api_calls where stage = 'audio'").scalar()
                cached = conn.exec_driver_sql("select count(*) from cache_entries where stage = 'audio'").scalar()
        finally:
            engine.dispose()
        assert sorted(speech.calls) == sorted(set(texts) - set(warm)), "each text spoken once, none cached"
        assert calls == len(texts) and cached == len(texts), "every clip spoken is cached and recorded"
        assert report.audio_files == len(texts) and report.terms == 12 and report.warnings == ()
        packages.append(package_content(tmp_path / f"{name}.apkg", tmp_path))
    chunked, whole = packages
    assert chunked == whole
    assert len(json.loads(whole["media"])) == len(texts)


def test_synthesize_in_chunks_reports_the_whole_run(tmp_path: Path, ledger: Ledger,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audio_module, "CHUNK_TEXTS", 2)
    store = AudioStore(ledger)
    synthesize(["c", "e"], provider=FakeSpeech(), directory=tmp_path / "warm", store=store)
    speech = FakeSpeech()
    texts = ["a", "b", "c", " a", "d", "e", "b", "f"]
    report = synthesize(texts, provider=speech, directory=tmp_path / "out", store=store)
    assert speech.calls[0] == "a" and sorted(speech.calls) == ["a", "b", "d", "f"]
    assert report.cached == 2 and report.warning is None
    assert report.cost_usd == pytest.approx(4 * 15 / 1e6)
    assert {text: path.read_bytes() for text, path in report.files.items()} == {
        text: fake_mp3(text) for text in "abcdef"}
    assert max(alive for alive, _ in speech.seen) <= 1, "a chunk of two texts holds at most one clip spoken"


def test_a_provider_that_refuses_its_first_text_is_asked_nothing_more_but_the_cache_still_serves(
        tmp_path: Path, ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audio_module, "CHUNK_TEXTS", 2)
    store = AudioStore(ledger)
    synthesize(["a", "b", "e"], provider=FakeSpeech(), directory=tmp_path / "warm", store=store)
    speech = FakeSpeech(refuse=True)
    report = synthesize(["a", "b", "c", "d", "e", "c", "f"], provider=speech, directory=tmp_path / "out",
                        store=store)
    assert speech.calls == ["c"], "the first text it tried (second chunk) failed: nothing else was asked"
    assert set(report.files) == {"a", "b", "e"} and report.cached == 3, "the fourth chunk's hit was still taken"
    assert report.warning == ("openai could not speak 'c': the speech endpoint answered HTTP 401; "
                              "3 clips are missing"), "c, d and f: each missing text counted once"


def test_clips_that_fail_in_several_chunks_are_one_warning_and_never_retried(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audio_module, "CHUNK_TEXTS", 3)
    speech = FakeSpeech(fail=frozenset({"b", "f"}))
    report = synthesize(["a", "b", "c", "d", "b", "e", "f", "g"], provider=speech, directory=tmp_path)
    assert sorted(speech.calls) == ["a", "b", "c", "d", "e", "f", "g"], "the failing b is not asked again"
    assert set(report.files) == {"a", "c", "d", "e", "g"}
    assert report.warning == ("openai failed for 2 clips (first: 'b': the speech endpoint answered HTTP 500); "
                              "they have no audio")


def test_an_export_whose_provider_refuses_warns_once_and_has_no_audio(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    words = level_results(7)
    speech = FakeSpeech(refuse=True)
    with_fake_speech(monkeypatch, speech, 2)
    report = write_export("apkg", iter(words), tmp_path / "deck.apkg", audio="openai", timestamp=T0)
    assert speech.calls == [words[0].item.term] and report.audio_files == 0 and report.terms == 7
    assert report.warnings == (f"openai could not speak {words[0].item.term!r}: the speech endpoint answered "
                               f"HTTP 401; {len(spoken_texts(words))} clips are missing",)
