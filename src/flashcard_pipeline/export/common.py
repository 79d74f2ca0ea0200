"""Helpers every exporter shares: the simulated-source tag, Anki-safe text and tags, atomic writes."""

from __future__ import annotations

import contextlib
import html
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path

from flashcard_pipeline.errors import ConfigurationError
from flashcard_pipeline.models import Flashcard

SIMULATED_TAG = "source:simulated"

# C0 controls other than tab/newline/carriage return, and DEL: invalid in HTML and XML, useless on a card.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_LINE_BREAK = re.compile(r"\r\n|[\r\n\u2028\u2029]")
_WHITESPACE = re.compile(r"\s+")


def card_tags(card: Flashcard, *, simulated: bool) -> list[str]:
    """The card's own tags, plus ``source:simulated`` when the run used the simulator (so nobody studies fake
    content by mistake)."""
    if simulated and SIMULATED_TAG not in card.tags:
        return [*card.tags, SIMULATED_TAG]
    return list(card.tags)


def clean_text(text: str) -> str:
    """Model text without control characters; everything else (emoji, RTL marks, quotes) is kept as text."""
    return _CONTROL.sub("", text)


def html_text(text: str) -> str:
    """Model text as an HTML fragment that shows exactly that text: escaped, line breaks as ``<br>``.

    ``"`` is escaped too (a template may put a field in an attribute); ``'`` stays readable in Anki's editor.
    """
    escaped = html.escape(clean_text(text), quote=False).replace('"', "&quot;")
    return _LINE_BREAK.sub("<br>", escaped)


def anki_tag(tag: str) -> str:
    """Anki separates tags with spaces, so whitespace inside a tag becomes ``_``."""
    return _WHITESPACE.sub("_", clean_text(tag)).strip("_")


def anki_tags(tags: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(t for t in (anki_tag(tag) for tag in tags) if t))


def one_line(text: str) -> str:
    """For names that end up in a header line (deck names): no control characters, no line breaks or tabs."""
    return _WHITESPACE.sub(" ", clean_text(text)).strip()


def check_writable(path: Path) -> None:
    """Fail before any work (or money) is spent when ``path`` cannot be written: its folder is made, and a
    probe file created and removed there, because permission bits alone lie (root, read-only mounts)."""
    if path.is_dir():
        raise ConfigurationError(f"{path} is a folder; give a file name, such as {path / 'deck.apkg'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.probe")
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as exc:
        raise ConfigurationError(f"cannot write {path}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds, so a failed or
    interrupted export never leaves a half-written file where the previous good one was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Only a name: the writer creates the file, so it gets the usual permissions (mkstemp's would be 0600).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
