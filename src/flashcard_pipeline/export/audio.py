"""Pronunciation audio for the word and its example sentence, from a pluggable text-to-speech provider.

Two providers: espeak-ng offline (the default), and any OpenAI-compatible ``/v1/audio/speech`` endpoint with the
run's key (the simulator answers it offline). Either way the card gets MP3 (espeak-ng's WAV is encoded with the
``lameenc`` wheel: about 4 KB a word instead of 40 KB). With a ledger, every clip is cached like a stage answer
(same table, type ``audio``, key from provider, model, voice and text) and every paid clip's cost is recorded as an
API call of the run. Clips are made a chunk of texts at a time (:class:`Speaker`), written to files and stored as
they go, so a long list never holds more than one chunk's MP3 bytes. Audio is a nice-to-have: a missing tool or
voice, or a refusing endpoint, leaves the export without audio and says so once.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import shutil
import subprocess
import time
import wave
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import httpx

from flashcard_pipeline.choices import AudioEngine as AudioEngine  # its home before choices.py
from flashcard_pipeline.export.anki_model import language_code

if TYPE_CHECKING:
    from flashcard_pipeline.storage.ledger import Ledger

ESPEAK = "espeak-ng"
AUDIO = "audio"
_TIMEOUT_S = 30.0
_MP3_KBPS = 32
#: US dollars per million input characters of OpenAI's speech models (the simulator bills the same, simulated).
SPEECH_PRICES_PER_MILLION_CHARS = {"tts-1": 15.0, "tts-1-hd": 30.0, "gpt-4o-mini-tts": 12.0}
DEFAULT_SPEECH_MODEL = "tts-1"
DEFAULT_VOICE = "alloy"


class SpeechError(Exception):
    """One clip could not be made; the message is one line."""


@dataclass(frozen=True)
class Clip:
    mp3: bytes
    cost_usd: float | None = None
    latency_ms: float = 0.0


class SpeechProvider(Protocol):
    name: str
    model: str

    def identity(self) -> str:
        """What decides the sound besides the text (engine, model, voice): part of the cache key."""
        ...

    def speak(self, text: str) -> Clip: ...


def mp3_from_wav(wav: bytes) -> bytes:
    """16-bit PCM WAV (what espeak-ng writes) as a small MP3."""
    with wave.open(io.BytesIO(wav)) as reader:
        if reader.getsampwidth() != 2:
            raise SpeechError(f"unexpected WAV sample width {reader.getsampwidth()}")
        channels, rate, pcm = reader.getnchannels(), reader.getframerate(), reader.readframes(reader.getnframes())
    return encode_mp3(pcm, rate=rate, channels=channels)


def encode_mp3(pcm: bytes, *, rate: int, channels: int = 1) -> bytes:
    """16-bit little-endian PCM as MP3 at 32 kbit/s (speech needs no more)."""
    import lameenc

    encoder = lameenc.Encoder()
    encoder.set_bit_rate(_MP3_KBPS)
    encoder.set_in_sample_rate(rate)
    encoder.set_channels(channels)
    encoder.set_quality(2)
    return bytes(encoder.encode(pcm) + encoder.flush())


def espeak_voice(language: str) -> str:
    return language_code(language) or language.strip().lower()


class EspeakSpeech:
    """espeak-ng, offline; WAV on stdout, encoded to MP3 here."""

    name = "espeak"

    def __init__(self, language: str, executable: str | None = None) -> None:
        found = executable or shutil.which(ESPEAK)
        if found is None:
            raise SpeechError(f"{ESPEAK} is not installed, so the export has no audio (install it, e.g. "
                              f"`apt-get install {ESPEAK}`, to add pronunciations)")
        self.executable = found
        self.voice = espeak_voice(language)
        self.model = f"{ESPEAK}:{self.voice}"

    def identity(self) -> str:
        return f"espeak:{self.voice}:mp3-{_MP3_KBPS}"

    def speak(self, text: str) -> Clip:
        started = time.perf_counter()
        try:
            # The text goes in on stdin, so a text that starts with '-' is never read as an option.
            proc = subprocess.run([self.executable, "-v", self.voice, "--stdout", "--stdin"], input=text.encode(),
                                  capture_output=True, timeout=_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SpeechError(f"{type(exc).__name__}: {exc}") from exc
        if proc.returncode != 0 or not proc.stdout:
            detail = proc.stderr.decode(errors="replace").strip().splitlines()
            raise SpeechError(detail[0] if detail else f"exit status {proc.returncode}")
        try:
            mp3 = mp3_from_wav(proc.stdout)
        except (wave.Error, EOFError) as exc:
            raise SpeechError(f"{ESPEAK} wrote no readable WAV: {exc}") from exc
        return Clip(mp3=mp3, latency_ms=(time.perf_counter() - started) * 1000)


class OpenAISpeech:
    """``POST {base_url}/audio/speech`` as OpenAI defines it; the key never leaves the Authorization header."""

    name = "openai"

    def __init__(self, base_url: str, api_key: str | None, *, model: str = DEFAULT_SPEECH_MODEL,
                 voice: str = DEFAULT_VOICE, provider: str = "openai", timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=base_url.rstrip("/") + "/", headers=headers, timeout=timeout,
                                    transport=transport, trust_env=False)
        self.model, self.voice, self.name = model, voice, provider

    def identity(self) -> str:
        return f"{self.name}:{self.model}:{self.voice}:mp3"

    def close(self) -> None:
        self._client.close()

    def speak(self, text: str) -> Clip:
        started = time.perf_counter()
        try:
            response = self._client.post("audio/speech", json={"model": self.model, "input": text,
                                                                "voice": self.voice, "response_format": "mp3"})
        except httpx.HTTPError as exc:
            raise SpeechError(f"{type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise SpeechError(f"the speech endpoint answered HTTP {response.status_code}")
        if not response.content or "json" in response.headers.get("content-type", ""):
            raise SpeechError("the speech endpoint answered without audio")
        price = SPEECH_PRICES_PER_MILLION_CHARS.get(self.model)
        return Clip(mp3=response.content, cost_usd=None if price is None else len(text) * price / 1e6,
                    latency_ms=(time.perf_counter() - started) * 1000)


def media_name(identity: str, text: str) -> str:
    """A file name that depends only on the voice and the text: safe in ``[sound:...]``, the same in every export."""
    digest = hashlib.sha256(f"{identity}\x1f{text}".encode()).hexdigest()[:24]
    return f"fp-{digest}.mp3"


def cache_key(identity: str, text: str) -> str:
    return hashlib.sha256(f"{AUDIO}\x1f{identity}\x1f{text}".encode()).hexdigest()


@dataclass(frozen=True)
class AudioReport:
    files: dict[str, Path] = field(default_factory=dict)
    """text -> its audio file"""
    warning: str | None = None
    cached: int = 0
    cost_usd: float = 0.0


@dataclass(frozen=True)
class AudioStore:
    """Where clips are cached and their cost recorded: the run's ledger."""

    ledger: Ledger
    run_id: int | None = None


def _store_clips(store: AudioStore, provider: SpeechProvider, made: dict[str, Clip]) -> None:
    from flashcard_pipeline.storage.ledger import CachePut, CallRecorded

    ops: list[CachePut | CallRecorded] = []
    for text, clip in made.items():
        key = cache_key(provider.identity(), text)
        ops.append(CachePut(key=key, stage=AUDIO, provider=provider.name, model=provider.model,
                            prompt_version=provider.identity()[:40], value=clip.mp3, raw_bytes=len(clip.mp3),
                            stored_bytes=len(clip.mp3), cost_usd=clip.cost_usd))
        ops.append(CallRecorded(run_id=store.run_id, item_id=None, stage=AUDIO, provider=provider.name,
                                model=provider.model, cache_key=key, status="ok", http_status=None,
                                tokens_in=len(text), cost_usd=clip.cost_usd, latency_ms=clip.latency_ms))
    store.ledger.write_batch(ops)


#: Texts spoken, written and stored at a time by :func:`synthesize`: a chunk's clips are all the MP3 bytes held.
CHUNK_TEXTS = 500


class Speaker:
    """Speaks a long list chunk by chunk (:meth:`add`), so only one chunk's clips are ever in memory: each chunk's
    distinct new texts come from the cache or are spoken in parallel, then written to ``directory`` and stored
    in the ledger, and their bytes dropped. A text is spoken once per run, whichever chunks repeat it.

    The first text the provider is asked for is spoken alone: when it fails (almost always a missing voice or a
    refusing endpoint) nothing else is asked for the rest of the run; cache hits are still taken."""

    def __init__(self, provider: SpeechProvider, directory: Path, store: AudioStore | None = None) -> None:
        self.provider = provider
        self.directory = directory
        self.store = store
        self.names: dict[str, str] = {}
        """text -> the media file name of its clip, for every chunk so far (what a note's sound fields need)"""
        self.media: dict[str, Path] = {}
        """media file name -> the file, for every chunk so far"""
        self.cached = 0
        self.cost_usd = 0.0
        self._identity = provider.identity()
        self._tried = False
        self._refusal: tuple[str, str] | None = None
        self._missing: set[str] = set()
        """texts without a clip: failed, or never asked for after the refusal"""
        self._first_problem: tuple[str, str] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    def add(self, texts: Iterable[str]) -> None:
        """Make the clips of this chunk's texts; :attr:`names` then has every one that could be made."""
        fresh = [t for t in dict.fromkeys(t.strip() for t in texts) if t and t not in self.names
                 and t not in self._missing]
        wanted: list[str] = []
        for text in fresh:
            hit = self.store.ledger.cache_get(cache_key(self._identity, text)) if self.store is not None else None
            if hit is not None and hit.codec == "identity" and hit.value:
                self._write(text, hit.value)
                self.cached += 1
            else:
                wanted.append(text)
        if not wanted:
            return
        if self._refusal is not None:
            self._missing.update(wanted)
            return
        made: dict[str, Clip] = {}
        if not self._tried:
            self._tried = True
            text, clip, error = self._speak(wanted[0])
            if clip is None:
                self._refusal = (text, error or "unknown error")
                self._missing.update(wanted)
                return
            made[text] = clip
            wanted = wanted[1:]
        if wanted:
            with ThreadPoolExecutor(max_workers=min(len(wanted), max(2, os.cpu_count() or 2))) as pool:
                for text, clip, error in pool.map(self._speak, wanted):
                    if clip is not None:
                        made[text] = clip
                    else:
                        self._missing.add(text)
                        if self._first_problem is None:
                            self._first_problem = (text, error or "unknown error")
        for text, clip in made.items():
            self._write(text, clip.mp3)
            self.cost_usd += clip.cost_usd or 0.0
        if self.store is not None and made:
            _store_clips(self.store, self.provider, made)

    def _speak(self, text: str) -> tuple[str, Clip | None, str | None]:
        try:
            return text, self.provider.speak(text), None
        except SpeechError as exc:
            return text, None, str(exc)

    def _write(self, text: str, mp3: bytes) -> None:
        name = media_name(self._identity, text)
        target = self.directory / name
        target.write_bytes(mp3)
        self.names[text] = name
        self.media[name] = target

    @property
    def warning(self) -> str | None:
        """One line for the clips the chunks so far could not make, if any."""
        name = self.provider.name
        if self._refusal is not None:
            text, error = self._refusal
            return f"{name} could not speak {text!r}: {error}; {len(self._missing)} clips are missing"
        if self._first_problem is not None:
            text, error = self._first_problem
            return f"{name} failed for {len(self._missing)} clips (first: {text!r}: {error}); they have no audio"
        return None

    def report(self) -> AudioReport:
        return AudioReport(files={text: self.media[name] for text, name in self.names.items()}, warning=self.warning,
                           cached=self.cached, cost_usd=self.cost_usd)


def synthesize(texts: Iterable[str], *, provider: SpeechProvider, directory: Path,
               store: AudioStore | None = None) -> AudioReport:
    """One MP3 per distinct text in ``directory``: from the cache when ``store`` has it, else spoken (and then
    cached, its cost recorded), :data:`CHUNK_TEXTS` at a time. Never raises for a failing provider: the report's
    warning says what happened."""
    speaker = Speaker(provider, directory, store)
    iterator = iter(texts)
    while chunk := list(itertools.islice(iterator, CHUNK_TEXTS)):
        speaker.add(chunk)
    return speaker.report()
