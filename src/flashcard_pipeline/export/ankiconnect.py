"""Push notes into a running Anki through the AnkiConnect add-on (protocol version 6).

AnkiConnect cannot set a note's GUID, so a pushed note is recognised on the next push by its
first field (``Term``: one note per word) within the deck: it is never added twice, and
when its content changed (a regenerated run) its fields are updated in place, so its cards keep
their review history.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import httpx

from flashcard_pipeline.errors import ErrorCategory, StructuredError
from flashcard_pipeline.export.anki_model import NoteType
from flashcard_pipeline.export.notes import AnkiNote

DEFAULT_URL = "http://127.0.0.1:8765"
PROTOCOL_VERSION = 6
BATCH_SIZE = 100
INFO_BATCH_SIZE = 500


class AnkiConnectError(StructuredError):
    """AnkiConnect answered with an error, or not in its protocol."""

    category: ClassVar[ErrorCategory] = ErrorCategory.EXTERNAL_SERVICE
    default_code: ClassVar[str] = "ankiconnect_error"


class AnkiNotRunningError(AnkiConnectError):
    category: ClassVar[ErrorCategory] = ErrorCategory.NETWORK
    default_code: ClassVar[str] = "anki_not_running"


class AnkiConnect:
    """A small synchronous AnkiConnect client; one ``invoke`` per action."""

    def __init__(self, url: str = DEFAULT_URL, *, key: str | None = None, timeout: float = 120.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = url
        self._key = key
        self._client = httpx.Client(timeout=httpx.Timeout(timeout, connect=5.0), transport=transport,
                                    trust_env=False)

    def __enter__(self) -> AnkiConnect:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def request(self, action: str, **params: Any) -> dict[str, Any]:
        """One action as AnkiConnect wants it, key included: also each action inside ``multi``, which AnkiConnect
        checks one by one (and answers unwrapped, in version 4's form, unless each names its version)."""
        payload: dict[str, Any] = {"action": action, "version": PROTOCOL_VERSION, "params": params}
        if self._key:
            payload["key"] = self._key
        return payload

    def invoke(self, action: str, **params: Any) -> Any:
        payload = self.request(action, **params)
        try:
            response = self._client.post(self.url, json=payload)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise AnkiNotRunningError(f"Anki is not running or AnkiConnect is not installed ({self.url})") from exc
        except httpx.HTTPError as exc:
            raise AnkiConnectError(f"AnkiConnect at {self.url} did not answer {action}: "
                                   f"{type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise AnkiConnectError(f"AnkiConnect at {self.url} answered {action} with HTTP {response.status_code}")
        try:
            body = response.json()
        except ValueError as exc:
            raise AnkiConnectError(f"{self.url} did not answer {action} in AnkiConnect's format (not JSON)") from exc
        if not isinstance(body, dict) or "result" not in body or "error" not in body:
            raise AnkiConnectError(f"{self.url} did not answer {action} in AnkiConnect's format "
                                   "(is it AnkiConnect, and version 6 or newer?)")
        if body["error"] is not None:
            raise AnkiConnectError(f"AnkiConnect refused {action}: {body['error']}")
        return body["result"]


@dataclass(frozen=True)
class PushReport:
    added: int
    #: Notes that were there with the same content (with ``update`` off: every note that was there).
    already_present: int
    failed: int
    decks: tuple[str, ...]
    created_note_type: bool
    media_files: int
    updated: int = 0


def note_params(note: AnkiNote, *, note_type: NoteType, root_deck: str) -> dict[str, Any]:
    """An ``addNote`` note: duplicates are checked by first field in the whole deck tree of ``root_deck``."""
    return {
        "deckName": note.deck,
        "modelName": note_type.name,
        "fields": note.field_map(),
        "tags": list(note.tags),
        "options": {
            "allowDuplicate": False,
            "duplicateScope": "deck",
            "duplicateScopeOptions": {"deckName": root_deck, "checkChildren": True, "checkAllModels": False},
        },
    }


def search_term(name: str, value: str) -> str:
    """One quoted term of Anki's search syntax: ``"deck:Korean \\* vocabulary"`` matches that deck literally."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("*", "\\*").replace("_", "\\_")
    return f'"{name}:{escaped}"'


ExistingNotes = dict[str, tuple[int, str]]


def fields_digest(fields: Mapping[str, str]) -> str:
    """A note's content as a short digest: what a push compares, so it does not hold every note's fields."""
    return hashlib.sha256(json.dumps(sorted(fields.items()), ensure_ascii=False).encode()).hexdigest()


def existing_notes(client: AnkiConnect, *, note_type: NoteType, root_deck: str) -> ExistingNotes:
    """The notes of ``note_type`` in ``root_deck`` and its sub-decks, by first field: ``key -> (id, digest of
    its fields)``."""
    query = f"{search_term('deck', root_deck)} {search_term('note', note_type.name)}"
    ids = client.invoke("findNotes", query=query)
    if not isinstance(ids, list):
        raise AnkiConnectError("AnkiConnect answered findNotes with an unexpected result")
    found: ExistingNotes = {}
    first = note_type.fields[0]
    for start in range(0, len(ids), INFO_BATCH_SIZE):
        infos = client.invoke("notesInfo", notes=ids[start:start + INFO_BATCH_SIZE])
        if not isinstance(infos, list):
            raise AnkiConnectError("AnkiConnect answered notesInfo with an unexpected result")
        for info in infos:
            fields = {name: field["value"] for name, field in (info.get("fields") or {}).items()}
            if first in fields:
                found.setdefault(fields[first], (info["noteId"], fields_digest(fields)))
    return found


def push_notes(client: AnkiConnect, notes: Iterable[AnkiNote], *, note_type: NoteType, root_deck: str,
               media: Mapping[str, Path] | None = None, batch_size: int = BATCH_SIZE,
               update: bool = True) -> PushReport:
    """Create the root deck and the note type when missing, then take the notes a batch at a time (so a long
    list is never held): create the batch's new sub-decks, add the notes that are not there yet and, with
    ``update``, rewrite the fields of those that are there with other content.

    ``media`` maps a media file name used in a field to the file to upload with the note; it is looked up as
    each batch goes, so it may grow while ``notes`` is consumed.
    """
    version = client.invoke("version")
    if not isinstance(version, int) or version < PROTOCOL_VERSION:
        raise AnkiConnectError(f"AnkiConnect at {client.url} speaks version {version}; "
                               f"version {PROTOCOL_VERSION} or newer is needed (update the add-on)")
    client.invoke("createDeck", deck=root_deck)
    decks: dict[str, None] = {root_deck: None}
    created = False
    if note_type.name not in (client.invoke("modelNames") or []):
        client.invoke("createModel", **note_type.ankiconnect_params())
        created = True

    media = {} if media is None else media  # an empty dict may fill as the notes are built
    uploaded: set[str] = set()

    def upload(note: AnkiNote) -> None:
        for name in note.media:
            if name not in uploaded and name in media:
                data = base64.b64encode(media[name].read_bytes()).decode()
                client.invoke("storeMediaFile", filename=name, data=data)
                uploaded.add(name)

    existing: ExistingNotes | None = None
    added = present = failed = updated = 0
    iterator = iter(notes)
    while batch := list(itertools.islice(iterator, batch_size)):
        for deck in dict.fromkeys(note.deck for note in batch):
            if deck not in decks:  # before canAddNotes, which refuses a note whose deck is missing
                client.invoke("createDeck", deck=deck)
                decks[deck] = None
        params = [note_params(note, note_type=note_type, root_deck=root_deck) for note in batch]
        # Newer AnkiConnect fails a whole addNotes call when one note is a duplicate: ask first.
        addable = client.invoke("canAddNotes", notes=params)
        if not isinstance(addable, list) or len(addable) != len(params):
            raise AnkiConnectError("AnkiConnect answered canAddNotes with an unexpected result")
        to_add = [(note, p) for note, p, ok in zip(batch, params, addable, strict=True) if ok]
        there = [note for note, ok in zip(batch, addable, strict=True) if not ok]
        if there and update:
            if existing is None:  # read once, when a batch first meets notes already there
                existing = existing_notes(client, note_type=note_type, root_deck=root_deck)
            changed = [(existing[n.fields[0]][0], n) for n in there
                       if n.fields[0] in existing and existing[n.fields[0]][1] != fields_digest(n.field_map())]
            for _, note in changed:
                upload(note)
            if changed:
                answers = client.invoke("multi", actions=[
                    client.request("updateNoteFields", note={"id": note_id, "fields": note.field_map()})
                    for note_id, note in changed])
                if not isinstance(answers, list) or len(answers) != len(changed):
                    raise AnkiConnectError("AnkiConnect answered multi with an unexpected result")
                done = sum(1 for a in answers if not (isinstance(a, dict) and a.get("error")))
                updated += done
                failed += len(changed) - done
            present += len(there) - len(changed)
        else:
            present += len(there)
        for note, _ in to_add:
            upload(note)
        if to_add:
            ids = client.invoke("addNotes", notes=[p for _, p in to_add])
            if not isinstance(ids, list):
                raise AnkiConnectError("AnkiConnect answered addNotes with an unexpected result")
            done = sum(1 for note_id in ids if note_id is not None)
            added += done
            failed += len(to_add) - done
    return PushReport(added=added, already_present=present, failed=failed, decks=tuple(decks),
                      created_note_type=created, media_files=len(uploaded), updated=updated)
