"""Versioned prompt templates, one TOML file per stage, shipped inside the package.

A template's ``version`` is part of every cache key, so editing the wording without bumping
it would serve stale answers; :func:`load_prompt` therefore refuses a file without one.
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass
from importlib import resources
from string import Template

from flashcard_pipeline.errors import ConfigurationError

#: The template each stage uses by default.
DEFAULT_PROMPTS = {"nuance": "nuance.v2", "cards": "cards.v2"}


@dataclass(frozen=True)
class PromptTemplate:
    version: str
    system: str
    user: str
    temperature: float
    max_tokens: int

    def render(self, **values: str) -> tuple[str, str]:
        """(system, user) with ``$name`` placeholders filled; a missing value is an error, not a blank. The system
        part, the same for every request of a run (three thousand characters to scan), is remembered by the
        values it uses."""
        try:
            system = _rendered(self.system, tuple((name, values[name]) for name in _identifiers(self.system)))
            return system, Template(self.user).substitute(values).strip()
        except KeyError as exc:
            raise ConfigurationError(f"prompt {self.version} needs a value for ${exc.args[0]}") from exc


@functools.lru_cache(maxsize=64)
def _identifiers(text: str) -> tuple[str, ...]:
    return tuple(Template(text).get_identifiers())


@functools.lru_cache(maxsize=64)
def _rendered(text: str, values: tuple[tuple[str, str], ...]) -> str:
    return Template(text).substitute(dict(values)).strip()


def load_prompt(name: str) -> PromptTemplate:
    try:
        text = resources.files(__package__).joinpath(f"{name}.toml").read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigurationError(f"no prompt template named {name!r}") from exc
    data = tomllib.loads(text)
    missing = [k for k in ("version", "system", "user") if not data.get(k)]
    if missing:
        raise ConfigurationError(f"prompt template {name!r} lacks {', '.join(missing)}")
    return PromptTemplate(version=data["version"], system=data["system"], user=data["user"],
                          temperature=float(data.get("temperature", 0.4)), max_tokens=int(data.get("max_tokens", 1500)))
