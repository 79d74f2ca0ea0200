"""The config file (flag > environment > file > default), `config show|validate|init`, and the settings reference
generated from the models."""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flashcard_pipeline.cli.app import app
from flashcard_pipeline.config import (
    SETTINGS,
    CacheSettings,
    CircuitBreakerSettings,
    ConfigurationError,
    DatabaseSettings,
    GeneralSettings,
    KeySettings,
    RateLimitEnvironment,
    RetrySettings,
    breaker_config,
    env_name,
    rate_limit_settings,
    read_settings,
    retry_config,
)
from flashcard_pipeline.runner import ProcessOptions, _provider, model_kind_setting
from flashcard_pipeline.settings_catalog import NOTES, SECRET_MASK, config_template, settings, settings_markdown
from flashcard_pipeline.storage.db import resolve_database_url

DOCS = Path(__file__).resolve().parents[1] / "docs"
runner = CliRunner()

#: One value per section, none of them a default.
EVERY_SECTION = """
[general]
database_url = "{db}"
model_kind = "reasoning"
[keys]
openrouter_api_key = "sk-or-from-the-file"
[database]
pool_size = 7
[cache]
memory_entries = 11
[retry]
max_attempts = 5
jitter_strategy = "full"
[circuit_breaker]
max_wait = 42.0
failure_categories = ["network"]
[rate_limit]
requests_per_minute = 123.0
shards = "auto"
"""


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def test_the_file_feeds_every_settings_class_and_the_edges(tmp_path: Path) -> None:
    db = tmp_path / "from-file.db"
    write(Path.cwd() / "flashcard-pipeline.toml", EVERY_SECTION.format(db=db))
    assert read_settings(DatabaseSettings).pool_size == 7
    assert read_settings(CacheSettings).memory_entries == 11
    assert retry_config().max_attempts == 5 and retry_config().jitter_strategy == "full"
    breaker = breaker_config()
    assert breaker.max_wait == 42.0 and {c.value for c in breaker.failure_categories} == {"network"}
    limits = rate_limit_settings()
    assert limits.requests_per_minute == 123.0 and limits.shards == "auto"
    assert resolve_database_url() == f"sqlite:///{db}"
    assert model_kind_setting(None) == "reasoning" and model_kind_setting("chat") == "chat"  # the flag wins
    provider = _provider(ProcessOptions(input_path=tmp_path / "x.csv"), None)
    assert provider.api_key is not None and provider.api_key.get_secret_value() == "sk-or-from-the-file"
    flagged = _provider(ProcessOptions(input_path=tmp_path / "x.csv", api_key="sk-flag"), None)
    assert flagged.api_key is not None and flagged.api_key.get_secret_value() == "sk-flag"


def test_environment_beats_file_and_the_working_directory_beats_the_user_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(Path(os.environ["XDG_CONFIG_HOME"]) / "flashcard-pipeline" / "flashcard-pipeline.toml",
          "[retry]\nmax_attempts = 9\nmax_reasks = 4\n[keys]\nopenai_api_key = 'sk-user'\n")
    assert read_settings(RetrySettings).max_attempts == 9
    write(Path.cwd() / "flashcard-pipeline.toml", "[retry]\nmax_attempts = 6\n")
    settings_now = read_settings(RetrySettings)
    assert settings_now.max_attempts == 6 and settings_now.max_reasks == 4  # merged key by key
    monkeypatch.setenv("RETRY_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    assert read_settings(RetrySettings).max_attempts == 2
    assert read_settings(KeySettings).key_for("openai-compatible") == "sk-env"
    code, stdout, _ = cli("config", "show", "--json")
    rows = {row["env"]: row for row in json.loads(stdout)["settings"]}
    assert code == 0
    assert rows["RETRY_MAX_ATTEMPTS"]["source"] == "env RETRY_MAX_ATTEMPTS"
    assert rows["RETRY_MAX_REASKS"] == {**rows["RETRY_MAX_REASKS"], "value": 4, "source":
                                        f"file {Path(os.environ['XDG_CONFIG_HOME'])}/flashcard-pipeline/"
                                        "flashcard-pipeline.toml"}
    assert rows["RETRY_MAX_DELAY"]["source"] == "default" and rows["RETRY_MAX_DELAY"]["value"] == 60.0
    # The process flag wins over all of them.
    only = Path.cwd() / "only.toml"
    write(only, "[retry]\nmax_attempts = 8\n")
    monkeypatch.delenv("RETRY_MAX_ATTEMPTS")
    monkeypatch.setenv("FLASHCARD_CONFIG", str(only))
    assert read_settings(RetrySettings).max_attempts == 8 and read_settings(RetrySettings).max_reasks == 2
    monkeypatch.setenv("FLASHCARD_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigurationError, match=r"FLASHCARD_CONFIG=.*no such file"):
        read_settings(RetrySettings)


def test_a_typo_in_the_file_is_named_with_a_suggestion_and_stops_every_command(tmp_path: Path) -> None:
    write(Path.cwd() / "flashcard-pipeline.toml", "[retry]\nmax_attemps = 5\n")
    with pytest.raises(ConfigurationError, match=r"unknown setting \[retry\] max_attemps \(did you mean max_attempts"):
        read_settings(RetrySettings)
    code, _, stderr = cli("breaker", "status", "--db", str(tmp_path / "x.db"))
    assert code == 2 and stderr.count("\n") == 1 and "[retry] max_attemps" in stderr
    write(Path.cwd() / "flashcard-pipeline.toml", "[retries]\nmax_attempts = 5\n")
    with pytest.raises(ConfigurationError, match=r"unknown section \[retries\] \(did you mean retry\?\)"):
        read_settings(DatabaseSettings)
    write(Path.cwd() / "flashcard-pipeline.toml", "[retry\nmax_attempts = 5\n")
    with pytest.raises(ConfigurationError, match="not valid TOML"):
        read_settings(DatabaseSettings)


def test_a_bad_value_names_its_file_and_key_or_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(Path.cwd() / "flashcard-pipeline.toml", "[rate_limit]\nsafety = 2\n")
    with pytest.raises(ConfigurationError, match=rf"invalid \[rate_limit\] safety in {path}: .*less than or equal"):
        read_settings(RateLimitEnvironment)
    monkeypatch.setenv("RL_SAFETY", "3")
    with pytest.raises(ConfigurationError, match="invalid RL_SAFETY: "):
        read_settings(RateLimitEnvironment)


def test_config_show_masks_secrets_and_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    write(Path.cwd() / "flashcard-pipeline.toml",
          "[keys]\nopenrouter_api_key = 'sk-or-very-secret'\n[cache]\nredis_url = 'redis://:hunter2@cache:6379/1'\n")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env-secret")
    for args in (("config", "show"), ("config", "show", "--json")):
        code, stdout, stderr = cli(*args, env={"COLUMNS": "80"})
        assert code == 0, stderr
        assert "very-secret" not in stdout + stderr and "sk-env-secret" not in stdout and "hunter2" not in stdout
        assert SECRET_MASK in stdout and "redis://:***@cache:6379/1" in stdout
    rows = json.loads(cli("config", "show", "--json")[1])["settings"]
    assert len(rows) == sum(len(cls.model_fields) for cls in SETTINGS) > 40
    assert {row["env"] for row in rows} == {s.env for s in settings()}


def test_config_validate_names_every_bad_value_and_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    bad = write(Path.cwd() / "bad.toml", "[retry]\nmax_attemps = 5\nmax_delay = -1\n[rate_limit]\nsafety = 2\n"
                                         "[bogus]\nx = 1\n")
    monkeypatch.setenv("CB_MIN_THROUGHPUT", "many")
    code, stdout, stderr = cli("config", "validate", str(bad))
    assert code == 2 and stdout == ""
    for needle in ("unknown setting [retry] max_attemps (did you mean max_attempts?)", "unknown section [bogus]",
                   f"invalid [retry] max_delay in {bad}", f"invalid [rate_limit] safety in {bad}",
                   "invalid CB_MIN_THROUGHPUT: Input should be a valid integer"):
        assert needle in stderr, needle
    assert stderr.count("error:") == 5
    monkeypatch.delenv("CB_MIN_THROUGHPUT")
    good = write(Path.cwd() / "good.toml", "[retry]\nmax_attempts = 5\n")
    code, stdout, _ = cli("config", "validate", str(good))
    assert code == 0 and stdout.startswith(f"ok: {sum(len(c.model_fields) for c in SETTINGS)} settings")
    assert cli("config", "validate", str(Path.cwd() / "nope.toml"))[0] == 2


def test_a_readable_file_with_a_key_gets_a_warning_and_init_writes_a_private_one() -> None:
    loose = write(Path.cwd() / "flashcard-pipeline.toml", "[keys]\nopenrouter_api_key = 'sk-x'\n", mode=0o644)
    code, _, stderr = cli("config", "validate")
    assert code == 0 and f"warning: {loose} holds an API key and other users can read it: chmod 600" in stderr
    loose.chmod(0o600)
    assert "warning" not in cli("config", "validate")[2]
    loose.unlink()
    code, stdout, _ = cli("config", "init")
    written = Path.cwd() / "flashcard-pipeline.toml"
    assert code == 0 and str(written) in stdout and written.stat().st_mode & 0o777 == 0o600
    code, _, stderr = cli("config", "init")
    assert code == 2 and "exists; `--force` overwrites it" in stderr
    assert cli("config", "init", "--force")[0] == 0
    assert cli("config", "init", "--user")[0] == 0
    assert (Path(os.environ["XDG_CONFIG_HOME"]) / "flashcard-pipeline" / "flashcard-pipeline.toml").is_file()


def test_the_template_holds_every_setting_and_its_defaults_read_back_as_the_defaults() -> None:
    template = config_template()
    assert tomllib.loads(template) == {s.section: {} for s in settings()}  # everything commented out
    uncommented = "\n".join(line[2:] if re.match(r"# [a-z_]+ = ", line) else line for line in template.splitlines())
    document = tomllib.loads(uncommented)
    for cls in SETTINGS:
        table = document[cls.config_section]
        assert set(table) == {name for name, field in cls.model_fields.items() if field.default is not None}
        read_back = cls.model_validate(table)
        assert read_back == cls.model_construct(), cls.__name__  # each written default means the default
        for name in cls.model_fields:
            assert env_name(cls, name) in template


def test_every_setting_is_explained_and_the_reference_is_current() -> None:
    catalog = list(settings())
    assert all(s.meaning for s in catalog), [s.env for s in catalog if not s.meaning]
    assert set(NOTES) <= {s.env for s in catalog}, "a note for a setting that does not exist"
    reference = (DOCS / "settings.md").read_text(encoding="utf-8")
    assert reference == settings_markdown(), \
        "docs/settings.md is stale: run `python -m flashcard_pipeline.cli.reference docs`"
    for s in catalog:
        assert f"| `{s.env}` | `{s.key}` |" in reference


def test_model_kind_and_database_url_read_like_before(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASHCARD_MODEL_KIND", " Reasoning ")
    assert read_settings(GeneralSettings).model_kind == "reasoning" == model_kind_setting(None)
    monkeypatch.setenv("FLASHCARD_MODEL_KIND", "")
    assert model_kind_setting(None) == "auto"
    monkeypatch.setenv("FLASHCARD_MODEL_KIND", "fast")
    with pytest.raises(ConfigurationError, match="FLASHCARD_MODEL_KIND"):
        model_kind_setting(None)
    assert CircuitBreakerSettings.config_section == "circuit_breaker"
