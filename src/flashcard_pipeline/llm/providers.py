"""Where chat completions are sent and with which credentials.

Resolution happens once, up front, so a missing key or URL fails the run before any work is
done, with a message that tells the user exactly what to type.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from flashcard_pipeline.choices import ProviderName
from flashcard_pipeline.errors import ConfigurationError

OPENROUTER_BASE_URL = "https://openrouter.ai/api/v1"
#: OpenRouter attributes traffic to an app through ``HTTP-Referer`` and ``X-OpenRouter-Title``
#: (``X-Title`` is the legacy name).
APP_URL = "https://github.com/flashcard-pipeline/flashcard-pipeline"
APP_TITLE = "flashcard-pipeline"


class ProviderConfig(BaseModel):
    """Everything the client needs to reach one provider. The key is a ``SecretStr`` so that
    repr, str and model dumps show ``**********`` instead of it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: ProviderName
    base_url: str
    api_key: SecretStr | None = None
    extra_headers: dict[str, str] = Field(default_factory=dict)
    extra_body: dict[str, Any] = Field(default_factory=dict)
    connect_timeout: float = Field(default=10.0, gt=0)
    read_timeout: float = Field(default=120.0, gt=0)
    write_timeout: float = Field(default=30.0, gt=0)
    #: Waiting for a free pooled connection is normal under load, so this is generous.
    pool_timeout: float = Field(default=300.0, gt=0)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {value!r}")
        return value

    @property
    def chat_completions_url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def secrets(self) -> tuple[str, ...]:
        """Strings that must never leave the process in messages or logs."""
        if self.api_key is None:
            return ()
        key = self.api_key.get_secret_value()
        return (key,) if key else ()


def _key_from(api_key: str | SecretStr | None, env: Mapping[str, str], variable: str) -> SecretStr | None:
    raw = api_key.get_secret_value() if isinstance(api_key, SecretStr) else api_key
    if raw is None or not raw.strip():
        raw = env.get(variable, "")
    raw = raw.strip()
    return SecretStr(raw) if raw else None


def resolve_provider(
    name: ProviderName | str,
    *,
    base_url: str | None = None,
    api_key: str | SecretStr | None = None,
    env: Mapping[str, str] = os.environ,
    connect_timeout: float | None = None,
    read_timeout: float | None = None,
    extra_headers: Mapping[str, str] | None = None,
    require_key: bool = True,
) -> ProviderConfig:
    """Build a :class:`ProviderConfig` from CLI options and the environment.

    Raises :class:`ConfigurationError` for an unknown provider, a missing URL, or a real provider
    without a key (unless ``require_key`` is off: a dry run sends nothing).
    """
    try:
        provider = ProviderName(name)
    except ValueError:
        choices = ", ".join(p.value for p in ProviderName)
        raise ConfigurationError(
            f"Unknown provider {name!r}; choose one of: {choices}",
            code="unknown_provider",
            details={"provider": str(name)},
        ) from None

    headers: dict[str, str] = {}
    if provider is ProviderName.OPENROUTER:
        url = base_url or OPENROUTER_BASE_URL
        key = _key_from(api_key, env, "OPENROUTER_API_KEY")
        if key is None and require_key:
            raise ConfigurationError(
                "No API key for provider openrouter. Pass --api-key or run "
                "`export OPENROUTER_API_KEY=...`; to try the pipeline offline use --provider simulated.",
                code="missing_api_key",
                details={"provider": provider.value, "env_var": "OPENROUTER_API_KEY"},
            )
        # No ``usage: {include: true}``: OpenRouter deprecated it and now always reports ``usage.cost``.
        headers = {"HTTP-Referer": APP_URL, "X-OpenRouter-Title": APP_TITLE}
    elif provider is ProviderName.OPENAI_COMPATIBLE:
        if not base_url:
            raise ConfigurationError(
                "--base-url is required for provider openai-compatible",
                code="missing_base_url",
                details={"provider": provider.value},
            )
        url = base_url
        key = _key_from(api_key, env, "OPENAI_API_KEY")
    else:
        if not base_url:
            raise ConfigurationError(
                "--base-url is required for provider simulated (the in-process simulator's address)",
                code="missing_base_url",
                details={"provider": provider.value},
            )
        url = base_url
        key = None

    headers.update(extra_headers or {})
    timeouts = {
        field: value
        for field, value in (("connect_timeout", connect_timeout), ("read_timeout", read_timeout))
        if value is not None
    }
    try:
        return ProviderConfig(
            name=provider, base_url=url, api_key=key, extra_headers=headers, **timeouts
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors(include_input=False, include_url=False)
        )
        raise ConfigurationError(
            f"Invalid settings for provider {provider.value}: {problems}",
            code="invalid_provider_config",
            details={"provider": provider.value},
        ) from exc
