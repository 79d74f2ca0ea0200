"""Pronunciation audio with espeak-ng, when it is installed.

Audio is a nice-to-have: when espeak-ng is missing or has no voice for the language, the export
goes on without it and says so once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from flashcard_pipeline.choices import AudioEngine as AudioEngine  # its home before choices.py
from flashcard_pipeline.export.anki_model import language_code

ESPEAK = "espeak-ng"
_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class AudioReport:
    files: dict[str, Path] = field(default_factory=dict)
    """term -> its audio file"""
    warning: str | None = None

    def media_names(self) -> dict[str, str]:
        return {term: path.name for term, path in self.files.items()}


def media_name(language: str, term: str) -> str:
    """A file name that depends only on (language, term): safe in ``[sound:...]``, the same in every export."""
    digest = hashlib.sha256(f"{language}\x1f{term}".encode()).hexdigest()[:24]
    return f"fp-{digest}.wav"


def espeak_voice(language: str) -> str:
    return language_code(language) or language.strip().lower()


def synthesize(terms: Iterable[str], *, language: str, directory: Path) -> AudioReport:
    """Write one WAV per distinct term into ``directory``; never raises for a missing tool or voice."""
    executable = shutil.which(ESPEAK)
    if executable is None:
        return AudioReport(warning=f"{ESPEAK} is not installed, so the export has no audio "
                                   f"(install it, e.g. `apt-get install {ESPEAK}`, to add pronunciations)")
    voice = espeak_voice(language)
    unique = list(dict.fromkeys(terms))
    directory.mkdir(parents=True, exist_ok=True)

    def speak(term: str) -> tuple[str, Path | None, str | None]:
        target = directory / media_name(language, term)
        try:
            # The term goes in on stdin, so a term that starts with '-' is never read as an option.
            proc = subprocess.run([executable, "-v", voice, "-w", str(target), "--stdin"], input=term.encode(),
                                  capture_output=True, timeout=_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return term, None, f"{type(exc).__name__}: {exc}"
        if proc.returncode != 0 or not target.exists() or target.stat().st_size == 0:
            detail = proc.stderr.decode(errors="replace").strip().splitlines()
            return term, None, detail[0] if detail else f"exit status {proc.returncode}"
        return term, target, None

    files: dict[str, Path] = {}
    problems: list[tuple[str, str]] = []
    if unique:
        first_term, first_path, first_error = speak(unique[0])
        if first_path is None:
            # Almost always a missing voice; no point trying the other terms.
            return AudioReport(warning=f"{ESPEAK} could not speak {language} (voice {voice!r}): {first_error}; "
                                       "the export has no audio")
        files[first_term] = first_path
        with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
            for term, path, error in pool.map(speak, unique[1:]):
                if path is not None:
                    files[term] = path
                else:
                    problems.append((term, error or "unknown error"))
    warning = None
    if problems:
        term, error = problems[0]
        warning = f"{ESPEAK} failed for {len(problems)} terms (first: {term!r}: {error}); they have no audio"
    return AudioReport(files=files, warning=warning)
