"""`process -o deck.apkg`, `export` and `push` from the command line; push talks to a fake AnkiConnect."""

from __future__ import annotations

import base64
import re
import shutil
import socket
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy
from typer.testing import CliRunner

import flashcard_pipeline.export as export_module
from flashcard_pipeline.cli.app import app
from flashcard_pipeline.export import prepare_deck, push_results
from flashcard_pipeline.export.anki_model import FIELDS, note_type
from flashcard_pipeline.export.ankiconnect import AnkiConnect, AnkiConnectError, push_notes
from flashcard_pipeline.export.jsonl import read_jsonl
from flashcard_pipeline.export.notes import AnkiNote
from flashcard_pipeline.models import CardType, Flashcard, TermResult, VocabularyItem
from flashcard_pipeline.simulator.content import analysis_for
from flashcard_pipeline.storage.db import open_database
from flashcard_pipeline.storage.ledger import Ledger
from tests.conftest import json_server
from tests.test_export_formats import FakeSpeech, make_result

runner = CliRunner()


def run_cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def words(tmp_path: Path, count: int) -> Path:
    path = tmp_path / "words.csv"
    rows = [f"{i},단어{i},noun,{1 + i % 3}" for i in range(1, count + 1)]
    path.write_text("position,term,type,TOPIK_Level\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


@dataclass
class Run:
    db_url: str
    run_id: int
    #: Cards the model wrote (rows of the CSV and JSONL exports).
    cards: int
    results: list[TermResult]

    @property
    def notes(self) -> int:
        """Anki notes: one per word."""
        return len(self.results)

    @property
    def anki_cards(self) -> int:
        return sum(len(n.cards) for n in prepare_deck(self.results, language="Korean", simulated=True).notes)


def processed(tmp_path: Path, count: int) -> Run:
    db_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    code, _, stderr = run_cli("process", str(words(tmp_path, count)), "--provider", "simulated", "--db", db_url,
                              "-o", str(tmp_path / "first.jsonl"))
    assert code == 0, stderr
    engine = open_database(db_url)
    try:
        ledger = Ledger(engine)
        run = ledger.get_run()
        results = list(ledger.results(run.id))
    finally:
        engine.dispose()
    return Run(db_url=db_url, run_id=run.id, cards=sum(len(r.cards) for r in results), results=results)


@pytest.fixture
def small_run(tmp_path: Path) -> Run:
    return processed(tmp_path, 4)


def api_calls(db_url: str) -> int:
    engine = open_database(db_url)
    try:
        ledger = Ledger(engine)
        return len(ledger.api_calls(ledger.get_run().id))
    finally:
        engine.dispose()


# --- process and export -----------------------------------------------------------------------------------------


def test_process_writes_an_apkg_chosen_by_the_extension(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    deck = tmp_path / "deck.apkg"
    code, stdout, stderr = run_cli("process", str(words(tmp_path, 3)), "--provider", "simulated", "--db", db_url,
                                   "-o", str(deck), "--deck-name", "Mine", "--subdecks", "level")
    assert code == 0, stderr
    with zipfile.ZipFile(deck) as archive:
        assert "collection.anki2" in archive.namelist()
    assert "wrote" in stdout and str(deck) in stdout


def test_process_format_option_beats_the_extension_and_subdecks_reach_the_file(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    out = tmp_path / "cards.out"
    code, _, stderr = run_cli("process", str(words(tmp_path, 3)), "--provider", "simulated", "--db", db_url,
                              "-o", str(out), "--format", "tsv", "--subdecks", "level", "--deck-name", "TOPIK")
    assert code == 0, stderr
    lines = out.read_text(encoding="utf-8").splitlines()
    assert "#separator:tab" in lines and f"#deck column:{len(FIELDS) + 3}" in lines
    columns = next(line for line in lines if line.startswith("#columns:")).split("\t")
    decks = {row.split("\t")[columns.index("Deck")] for row in lines if not row.startswith("#")}
    assert decks == {f"TOPIK (simulated)::Level {level}" for level in (1, 2, 3)}


def test_export_rewrites_a_stored_run_in_every_format_without_api_calls(tmp_path: Path, small_run: Run) -> None:
    calls = api_calls(small_run.db_url)
    for name in ("deck.apkg", "deck.tsv", "deck.csv", "deck.jsonl"):
        code, stdout, stderr = run_cli("export", "--db", small_run.db_url, "-o", str(tmp_path / name))
        assert code == 0, stderr
        cards = small_run.anki_cards if name.endswith((".apkg", ".tsv")) else small_run.cards
        assert f"wrote {cards} cards for 4 terms from run {small_run.run_id}" in stdout
    assert api_calls(small_run.db_url) == calls
    assert len(list(read_jsonl(tmp_path / "deck.jsonl"))) == small_run.cards
    assert "#deck:Korean vocabulary (simulated)" in (tmp_path / "deck.tsv").read_text(encoding="utf-8")


def test_export_format_option_beats_the_extension_and_deck_options_apply(tmp_path: Path, small_run: Run) -> None:
    out = tmp_path / "deck.dat"
    code, stdout, stderr = run_cli("export", "--db", small_run.db_url, "--run", str(small_run.run_id), "--format",
                                   "tsv", "-o", str(out), "--deck-name", "TOPIK", "--subdecks", "level")
    assert code == 0, stderr
    text = out.read_text(encoding="utf-8")
    assert text.startswith("#separator:tab\n") and "#deck:TOPIK (simulated)\n" in text
    assert "TOPIK (simulated)::Level 2" in text and f"#deck column:{len(FIELDS) + 3}" in text
    assert "deck 'TOPIK (simulated)'" in stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--run", "99"], "there is no run 99"),
    (["--format", "xlsx"], "'xlsx' is not one of 'apkg', 'tsv', 'csv', 'jsonl'"),
])
def test_export_usage_errors_are_one_line_and_exit_2(tmp_path: Path, small_run: Run, args: list[str],
                                                     message: str) -> None:
    code, _, stderr = run_cli("export", "--db", small_run.db_url, "-o", str(tmp_path / "x.apkg"), *args)
    assert code == 2 and message in stderr
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "x.apkg").exists()


def test_export_of_an_empty_database_says_to_run_process_first(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    open_database(f"sqlite:///{empty}").dispose()
    code, _, stderr = run_cli("export", "--db", f"sqlite:///{empty}", "-o", str(tmp_path / "x.csv"))
    assert code == 2 and "no runs yet" in stderr


@pytest.mark.parametrize("db", ["missing.db", "sqlite:///{tmp}/missing.db"])
def test_export_from_a_database_that_does_not_exist_says_so_and_creates_nothing(tmp_path: Path, db: str) -> None:
    code, _, stderr = run_cli("export", "--db", db.format(tmp=tmp_path), "-o", str(tmp_path / "x.csv"))
    assert code == 2 and "no database at" in stderr and "missing.db" in stderr
    assert not (tmp_path / "missing.db").exists() and not (Path.cwd() / "missing.db").exists()
    code, _, stderr = run_cli("export", "-o", str(tmp_path / "x.csv"))  # the default database, never made
    assert code == 2 and "run `flashcard-pipeline process` first" in stderr


def test_export_of_a_run_with_nothing_finished_is_exit_1(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = open_database(db_url)
    try:
        run = Ledger(engine).create_run(
            run_key="k", input_path="words.csv", input_sha256="0" * 64, provider="simulated", model="m",
            settings={}, target_language="Korean", learner_language="English", simulated=True,
            items=[VocabularyItem(position=1, term="학교"), VocabularyItem(position=2, term="먹다")])
    finally:
        engine.dispose()
    code, _, stderr = run_cli("export", "--db", db_url, "-o", str(tmp_path / "x.apkg"))
    assert code == 1 and f"run {run.id} has no finished items" in stderr and "2 pending" in stderr
    assert not (tmp_path / "x.apkg").exists()


def test_missing_espeak_is_a_warning_not_a_failure(tmp_path: Path, small_run: Run,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    code, _, stderr = run_cli("export", "--db", small_run.db_url, "-o", str(tmp_path / "x.apkg"), "--audio", "espeak")
    assert code == 0 and (tmp_path / "x.apkg").exists()
    assert "espeak-ng is not installed" in stderr


# --- push -------------------------------------------------------------------------------------------------------


@dataclass
class FakeAnki:
    """Just enough AnkiConnect: decks, models, notes with its first-field duplicate check, media."""

    require_key: str | None = None
    refuse_adds: bool = False
    refuse_updates: bool = False
    requests: list[dict[str, Any]] = field(default_factory=list)
    decks: set[str] = field(default_factory=lambda: {"Default"})
    models: dict[str, dict[str, Any]] = field(default_factory=lambda: {"Basic": {}})
    notes: list[dict[str, Any]] = field(default_factory=list)
    media: dict[str, bytes] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def actions(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["action"] == name]

    def _duplicate(self, note: dict[str, Any]) -> bool:
        options = note.get("options", {})
        scope = options.get("duplicateScopeOptions", {})
        root = scope.get("deckName") or note["deckName"]
        first = next(iter(note["fields"].values()))

        def in_scope(deck: str) -> bool:
            return deck == root or (scope.get("checkChildren", False) and deck.startswith(root + "::"))

        return any(n["modelName"] == note["modelName"] and next(iter(n["fields"].values())) == first
                   and in_scope(n["deckName"]) for n in self.notes)

    def _can_add(self, note: dict[str, Any]) -> bool:
        return (note["deckName"] in self.decks and note["modelName"] in self.models
                and not self._duplicate(note))

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.requests.append(request)
            if self.require_key and request.get("key") != self.require_key:
                return {"result": None, "error": "valid api key must be provided"}
            action, params = request["action"], request.get("params", {})
            if action == "version":
                return {"result": 6, "error": None}
            if action == "createDeck":
                self.decks.add(params["deck"])
                return {"result": 1_000 + len(self.decks), "error": None}
            if action == "modelNames":
                return {"result": sorted(self.models), "error": None}
            if action == "createModel":
                self.models[params["modelName"]] = params
                return {"result": {"name": params["modelName"]}, "error": None}
            if action == "canAddNotes":
                return {"result": [self._can_add(n) for n in params["notes"]], "error": None}
            if action == "addNotes":
                ids = []
                for note in params["notes"]:
                    if self._can_add(note) and not self.refuse_adds:
                        self.notes.append(note)
                        ids.append(len(self.notes))
                    else:
                        ids.append(None)
                return {"result": ids, "error": None}
            if action == "storeMediaFile":
                self.media[params["filename"]] = base64.b64decode(params["data"])
                return {"result": params["filename"], "error": None}
            if action == "findNotes":
                return {"result": self._find(params["query"]), "error": None}
            if action == "notesInfo":
                return {"result": [self._info(i) for i in params["notes"]], "error": None}
            if action == "multi":
                assert all(a.get("version") == 6 for a in params["actions"]), "unversioned answers are unwrapped"
                # AnkiConnect runs each inner action through its handler, key check included.
                return {"result": [{"result": None, "error": "valid api key must be provided"}
                                   if self.require_key and a.get("key") != self.require_key
                                   else self._update(a["params"]["note"]) if a["action"] == "updateNoteFields"
                                   else {"result": None, "error": "unsupported action"}
                                   for a in params["actions"]], "error": None}
            return {"result": None, "error": "unsupported action"}

    def _find(self, query: str) -> list[int]:
        """Only the form push sends: "deck:NAME" "note:TYPE", with Anki's escapes; a deck includes its children."""
        found = re.findall(r'"(deck|note):((?:[^"\\]|\\.)*)"', query)
        terms = {name: re.sub(r"\\(.)", r"\1", value) for name, value in found}
        assert set(terms) == {"deck", "note"}, query
        return [i for i, n in enumerate(self.notes, 1) if n["modelName"] == terms["note"]
                and (n["deckName"] == terms["deck"] or n["deckName"].startswith(terms["deck"] + "::"))]

    def _info(self, note_id: int) -> dict[str, Any]:
        note = self.notes[note_id - 1]
        return {"noteId": note_id, "modelName": note["modelName"], "tags": note["tags"],
                "fields": {name: {"value": value, "order": i}
                           for i, (name, value) in enumerate(note["fields"].items())}}

    def _update(self, update: dict[str, Any]) -> dict[str, Any]:
        if self.refuse_updates:
            return {"result": None, "error": "collection is busy"}
        self.notes[update["id"] - 1]["fields"].update(update["fields"])
        return {"result": None, "error": None}


@pytest.fixture
def fake_anki() -> Iterator[tuple[FakeAnki, str]]:
    anki = FakeAnki()
    with json_server(lambda request: (200, anki.handle(request))) as url:
        yield anki, url


def test_push_adds_the_notes_then_finds_them_already_there(tmp_path: Path,
                                                           fake_anki: tuple[FakeAnki, str]) -> None:
    anki, url = fake_anki
    run = processed(tmp_path, 110)
    assert run.notes > 100, "enough notes for two batches"
    code, stdout, stderr = run_cli("push", "--db", run.db_url, "--url", url, "--subdecks", "level")
    assert code == 0, stderr
    assert f"{run.notes} notes added, 0 updated, 0 were already there; created the note type" in stdout

    deck = "Korean vocabulary (simulated)"
    assert {deck, f"{deck}::Level 1", f"{deck}::Level 2", f"{deck}::Level 3"} <= anki.decks
    model = anki.models["Flashcard Pipeline v2 (Korean)"]
    assert model["inOrderFields"][0] == "Term" and "Meaning" in model["inOrderFields"] and model["css"]
    assert [t["Name"] for t in model["cardTemplates"]][:2] == ["Recognition", "Production"]
    batches = anki.actions("addNotes")
    assert len(batches) == 2 and all(len(b["params"]["notes"]) <= 100 for b in batches)
    assert all(r["version"] == 6 for r in anki.requests)
    expected = prepare_deck(run.results, language="Korean", subdecks="level", simulated=True).notes
    assert [n["fields"] for n in anki.notes] == [note.field_map() for note in expected]
    for sent in anki.notes:
        assert sent["options"]["duplicateScope"] == "deck" and sent["options"]["allowDuplicate"] is False
        assert sent["options"]["duplicateScopeOptions"]["deckName"] == deck
        assert "source:simulated" in sent["tags"]

    code, stdout, stderr = run_cli("push", "--db", run.db_url, "--url", url, "--subdecks", "level")
    assert code == 0, stderr
    assert f"0 notes added, 0 updated, {run.notes} were already there" in stdout and "created" not in stdout
    assert len(anki.notes) == run.notes and len(anki.actions("createModel")) == 1


def test_a_second_push_rewrites_changed_notes_in_place_and_leaves_the_rest(tmp_path: Path,
                                                                         fake_anki: tuple[FakeAnki, str]) -> None:
    anki, url = fake_anki
    run = processed(tmp_path, 30)
    deck = "Korean * vocabulary_(test)"  # Anki's search wildcards, taken literally
    assert run_cli("push", "--db", run.db_url, "--url", url, "--deck-name", deck, "--subdecks", "level")[0] == 0
    pushed = [dict(n["fields"]) for n in anki.notes]
    stale = [3, run.notes // 2, run.notes - 1]
    for index in stale:  # as an older run had made them, or as someone edited them in Anki
        anki.notes[index]["fields"]["Meaning"] = "an older answer"

    code, stdout, _ = run_cli("push", "--db", run.db_url, "--url", url, "--deck-name", deck, "--subdecks", "level",
                              "--no-update")
    assert code == 0 and f"0 notes added, {run.notes} were already there" in stdout
    assert anki.actions("findNotes") == [] and anki.notes[3]["fields"]["Meaning"] == "an older answer"

    code, stdout, _ = run_cli("push", "--db", run.db_url, "--url", url, "--deck-name", deck, "--subdecks", "level")
    assert code == 0 and f"0 notes added, 3 updated, {run.notes - 3} were already there" in stdout
    assert [n["fields"] for n in anki.notes] == pushed, "the three are as the run made them again"
    assert len(anki.notes) == run.notes, "nothing was added twice"
    assert len(anki.actions("findNotes")) == 1, "the deck is read once per push, not once per note"
    updates = [a["params"]["note"]["id"] for m in anki.actions("multi") for a in m["params"]["actions"]]
    assert updates == [i + 1 for i in stale], "only the changed notes are written"

    anki.require_key = "secret"
    anki.notes[5]["fields"]["Meaning"] = "edited"
    code, stdout, _ = run_cli("push", "--db", run.db_url, "--url", url, "--deck-name", deck, "--subdecks", "level",
                              "--key", "secret")
    assert code == 0 and "1 updated" in stdout, "with an API key set, the updates inside multi carry it too"
    assert [n["fields"] for n in anki.notes] == pushed
    anki.require_key = None

    anki.notes[7]["fields"]["Meaning"] = "edited"
    anki.refuse_updates = True
    code, stdout, stderr = run_cli("push", "--db", run.db_url, "--url", url, "--deck-name", deck,
                                   "--subdecks", "level")
    assert code == 1 and "1 notes could not be added or updated" in stderr


def test_push_when_anki_is_not_running_is_one_line_and_exit_2(small_run: Run) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    code, _, stderr = run_cli("push", "--db", small_run.db_url, "--url", url)
    assert code == 2
    assert f"Anki is not running or AnkiConnect is not installed ({url})" in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_push_reports_ankiconnects_refusal(small_run: Run, fake_anki: tuple[FakeAnki, str]) -> None:
    anki, url = fake_anki
    anki.require_key = "secret"
    code, _, stderr = run_cli("push", "--db", small_run.db_url, "--url", url)
    assert code == 2 and "valid api key must be provided" in stderr
    code, stdout, _ = run_cli("push", "--db", small_run.db_url, "--url", url, "--key", "secret")
    assert code == 0 and f"{small_run.notes} notes added" in stdout


def test_push_without_espeak_warns_and_still_pushes(small_run: Run, fake_anki: tuple[FakeAnki, str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    anki, url = fake_anki
    monkeypatch.setattr(shutil, "which", lambda name: None)
    code, _, stderr = run_cli("push", "--db", small_run.db_url, "--url", url, "--audio", "espeak")
    assert code == 0 and "espeak-ng is not installed" in stderr
    assert len(anki.notes) == small_run.notes and anki.media == {}


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_push_uploads_one_audio_file_per_term(small_run: Run, fake_anki: tuple[FakeAnki, str]) -> None:
    anki, url = fake_anki
    code, _, stderr = run_cli("push", "--db", small_run.db_url, "--url", url, "--audio", "espeak")
    assert code == 0, stderr
    assert len(anki.media) == 8, "the word and its example sentence"
    assert all(data[:1] == b"\xff" or data[:3] == b"ID3" for data in anki.media.values()), "MP3"
    sounds = {n["fields"]["Audio"] for n in anki.notes} | {n["fields"]["ExampleAudio"] for n in anki.notes}
    assert sounds == {f"[sound:{name}]" for name in anki.media}


def test_pushed_hostile_text_arrives_escaped(fake_anki: tuple[FakeAnki, str]) -> None:
    anki, url = fake_anki
    analysis = analysis_for("학교", type="noun").model_copy(update={"primary_meaning": "<script>alert(1)</script>"})
    card = Flashcard(card_type=CardType.SCENE, front="=cmd|' /C calc'!A0", back='"quoted"\ttab\nline 🎴 \u200f',
                     tags=['x:"<b>"'])
    result = TermResult(item=VocabularyItem(position=1, term="<b>학교</b>"), analysis=analysis, cards=[card])
    with AnkiConnect(url) as client:
        report, warnings = push_results([result], client, language="Korean")
    assert report.added == 1 and warnings == ()
    fields = anki.notes[0]["fields"]
    assert fields["Term"] == "&lt;b&gt;학교&lt;/b&gt;"
    assert fields["Meaning"] == "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert fields["SceneFront"] == "=cmd|' /C calc'!A0"
    assert fields["SceneBack"] == "&quot;quoted&quot;\ttab<br>line 🎴 \u200f"
    assert anki.notes[0]["tags"] == ["pos:noun", 'x:"<b>"']


def test_notes_that_anki_refuses_to_add_are_counted_and_exit_1(small_run: Run,
                                                               fake_anki: tuple[FakeAnki, str]) -> None:
    anki, url = fake_anki
    anki.refuse_adds = True
    code, stdout, stderr = run_cli("push", "--db", small_run.db_url, "--url", url)
    assert code == 1
    assert "0 notes added, 0 updated, 0 were already there" in stdout
    assert f"{small_run.notes} notes could not be added" in stderr


@pytest.mark.parametrize(("status", "body", "message"), [
    (404, b"not found", "answered version with HTTP 404"),
    (200, b"<html>a web page</html>", "not JSON"),
    (200, b'{"apiVersion": "AnkiConnect v.6"}', "is it AnkiConnect"),
    (200, b'{"result": 5, "error": null}', "speaks version 5"),
])
def test_something_else_on_the_port_is_a_clear_error(status: int, body: bytes, message: str) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(status, content=body))
    with AnkiConnect("http://127.0.0.1:8765", transport=transport) as client, \
            pytest.raises(AnkiConnectError, match=re.escape(message)):
        push_notes(client, [], note_type=note_type("Korean"), root_deck="Deck")


def test_export_of_a_partly_finished_run_says_what_was_left_out(tmp_path: Path, small_run: Run) -> None:
    engine = open_database(small_run.db_url)
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("UPDATE items SET cards_state = 'pending' WHERE position = 2"))
    finally:
        engine.dispose()
    unfinished = next(r for r in small_run.results if r.item.position == 2)
    code, stdout, stderr = run_cli("export", "--db", small_run.db_url, "-o", str(tmp_path / "x.csv"))
    assert code == 0
    assert "1 unfinished items" in stderr
    assert f"wrote {small_run.cards - len(unfinished.cards)} cards for 3 terms" in stdout


def test_an_unwritable_output_is_one_line_and_exit_2(tmp_path: Path, small_run: Run) -> None:
    (tmp_path / "file").write_text("not a folder")
    code, _, stderr = run_cli("export", "--db", small_run.db_url, "-o", str(tmp_path / "file" / "deck.apkg"))
    assert code == 2 and "cannot write" in stderr and len(stderr.strip().splitlines()) == 1


def test_process_refuses_an_unwritable_output_before_spending_anything(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    (tmp_path / "file").write_text("not a folder")
    for output, says in ((tmp_path / "file" / "deck.apkg", "cannot write"), (tmp_path, "is a folder")):
        code, _, stderr = run_cli("process", str(words(tmp_path, 2)), "--provider", "simulated", "--db", db_url,
                                  "-o", str(output))
        assert code == 2 and says in stderr and len(stderr.strip().splitlines()) == 1, stderr
    engine = open_database(db_url)
    try:
        assert Ledger(engine).get_run() is None, "no run was started"
    finally:
        engine.dispose()
    nested = tmp_path / "new" / "folder" / "deck.tsv"
    assert run_cli("process", str(words(tmp_path, 2)), "--provider", "simulated", "--db", db_url,
                   "-o", str(nested))[0] == 0
    assert nested.read_text(encoding="utf-8").startswith("#separator:tab")
    assert [p.name for p in nested.parent.iterdir()] == ["deck.tsv"], "no probe or temporary file is left"


def test_an_output_lost_during_the_run_says_how_to_get_the_stored_cards(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("flashcard_pipeline.runner.write_export", disk_full)
    db_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    code, _, stderr = run_cli("process", str(words(tmp_path, 2)), "--provider", "simulated", "--db", db_url,
                              "-o", str(tmp_path / "deck.apkg"))
    assert code == 2, stderr
    assert "No space left on device; the cards are stored, `flashcard-pipeline export --run 1 -o FILE`" in stderr
    monkeypatch.undo()
    code, _, stderr = run_cli("export", "--run", "1", "--db", db_url, "-o", str(tmp_path / "deck.apkg"))
    assert code == 0 and (tmp_path / "deck.apkg").stat().st_size > 0, stderr


def test_push_streams_notes_and_audio_a_batch_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Words read at most one audio chunk ahead of what Anki got; a sub-deck first met in a later batch is created
    before that batch is checked; the notes and media are those of the whole deck at once."""
    chunk, count = 40, 230
    level = [1] * 100 + [2] * 100 + [3] * 30  # Level 2 starts in the second batch, Level 3 in the third
    words = [make_result(f"단어{i}", i, hints={"TOPIK_Level": str(level[i - 1])}) for i in range(1, count + 1)]
    words.append(make_result("단어7", count + 1))  # again, at the end: one note, spoken once
    taken = 0

    def results() -> Iterator[TermResult]:
        nonlocal taken
        for result in words:
            taken += 1
            yield result

    anki = FakeAnki()
    ahead: list[tuple[str, int, int]] = []

    def answer(request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if request["action"] in ("canAddNotes", "createDeck"):
            ahead.append((request["action"], taken, len(anki.notes)))
        return 200, anki.handle(request)

    speech = FakeSpeech()
    monkeypatch.setattr(export_module, "speech_provider", lambda engine, language, settings: speech)
    monkeypatch.setattr(export_module, "AUDIO_CHUNK_TERMS", chunk)
    with json_server(answer) as url, AnkiConnect(url) as client:
        report, warnings = push_results(results(), client, language="Korean", subdecks="level", audio="openai")
    assert warnings == () and report.failed == report.updated == report.already_present == 0
    assert report.added == count and len(anki.notes) == count
    checks = [(taken, pushed) for action, taken, pushed in ahead if action == "canAddNotes"]
    assert len(checks) == 3 and all(taken <= pushed + 100 + chunk for taken, pushed in checks)
    assert checks[0][0] < count, "the first batch went before the list was read"
    deck = "Korean vocabulary"
    assert [(a, pushed) for a, _, pushed in ahead if a == "createDeck"] == [
        ("createDeck", 0), ("createDeck", 0), ("createDeck", 100), ("createDeck", 200)]
    assert report.decks == (deck, *(f"{deck}::Level {n}" for n in (1, 2, 3)))

    spoken = list(speech.calls)
    assert sorted(spoken) == sorted({t for r in words for t in (r.item.term, r.analysis.example.sentence)})
    monkeypatch.setattr(export_module, "AUDIO_CHUNK_TERMS", 10_000)
    whole = prepare_deck(words, language="Korean", subdecks="level", audio="openai", media_dir=tmp_path / "m")
    assert [n["fields"] for n in anki.notes] == [note.field_map() for note in whole.notes]
    assert anki.media == {name: path.read_bytes() for name, path in whole.media.items()}
    assert report.media_files == len(whole.media) == len(spoken)


def test_push_notes_takes_its_notes_a_batch_at_a_time(fake_anki: tuple[FakeAnki, str]) -> None:
    anki, url = fake_anki
    notes = prepare_deck([make_result(f"단어{i}", i) for i in range(1, 8)], language="Korean").notes
    taken: list[int] = []
    sent: list[int] = []

    def stream() -> Iterator[AnkiNote]:
        for note in notes:
            taken.append(len(anki.notes))
            yield note

    with AnkiConnect(url) as client:
        report = push_notes(client, stream(), note_type=note_type("Korean"), root_deck="Korean vocabulary",
                            batch_size=3)
        sent = [len(a["params"]["notes"]) for a in anki.actions("addNotes")]
        again = push_notes(client, iter(notes), note_type=note_type("Korean"), root_deck="Korean vocabulary",
                           batch_size=3)
    assert taken == [0, 0, 0, 3, 3, 3, 6] and sent == [3, 3, 1]
    assert report.added == 7 and again.already_present == 7 and again.added == 0
