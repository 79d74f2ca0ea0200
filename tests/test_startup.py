"""The status commands start fast (benchmarks/bench_startup.py times them): they import neither SQLAlchemy nor
pydantic(-settings), and the shortcuts that allow it (quick settings, plain option values) answer as the full path
does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.main
from typer._coercion import build_runtime_param

from flashcard_pipeline import config, quick_settings
from flashcard_pipeline.cli.app import app
from flashcard_pipeline.cli.fast_params import _NotPlain, plain_value
from flashcard_pipeline.config_files import default_database_path
from flashcard_pipeline.storage.db import resolve_database_url
from tests.test_status_reader import populate


@pytest.fixture(autouse=True)
def _no_declined_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """A DB_*, RL_* or other LOG_* variable in the developer's shell would send every command the full way."""
    for name in list(os.environ):
        if quick_settings.env_handling(name) == "declined":
            monkeypatch.delenv(name)


#: What a status command must not load: each costs a tenth of a second or more.
HEAVY = ("sqlalchemy", "pydantic", "pydantic_settings", "alembic", "httpx")
STATUS = [["runs", "list"], ["runs", "show", "2"], ["breaker", "status"], ["ratelimit", "status"],
          ["monitor", "--once"]]
_PROBE = """
import json, sys
from flashcard_pipeline.cli.app import main
sys.argv = ["flashcard-pipeline", *json.loads(sys.argv[1])]
try:
    main()
except SystemExit as exit:
    code = exit.code
heavy = sorted({name.split(".")[0] for name in sys.modules} & set(json.loads(sys.argv_heavy)))
""".replace("sys.argv_heavy", repr(json.dumps(HEAVY)))
_PROBE += "print('\\nPROBE', code, json.dumps(heavy), file=sys.stderr)\n"


def _probe(args: list[str], env: dict[str, str]) -> tuple[int | None, list[str], str]:
    """Run the command line in a fresh interpreter; its exit code, the heavy packages it loaded, its stdout."""
    done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(args)], capture_output=True, text=True, env=env,
                          timeout=60)
    line = [ln for ln in done.stderr.splitlines() if ln.startswith("PROBE ")]
    assert line, done.stderr
    _, code, heavy = line[-1].split(" ", 2)
    return None if code == "None" else int(code), json.loads(heavy), done.stdout


def test_help_loads_nothing_heavy() -> None:
    for args in (["--help"], ["runs", "--help"], ["monitor", "--help"]):
        code, heavy, stdout = _probe(args, dict(os.environ))
        assert code in (0, None) and heavy == [] and "Usage" in stdout, (args, heavy)


def test_the_status_commands_load_neither_sqlalchemy_nor_pydantic(db_url: str) -> None:
    env = dict(os.environ)
    if db_url.startswith("sqlite"):  # the default database, as a user who names none has it
        populate(f"sqlite:///{default_database_path()}")
        extra: list[str] = []
    else:
        populate(db_url)
        extra = ["--db", db_url]
    for args in STATUS:
        for as_json in ([], ["--json"]):
            code, heavy, stdout = _probe([*args, *extra, *as_json], env)
            assert code in (0, None) and stdout.strip(), (args, as_json, code)
            assert heavy == [], (args, as_json, heavy)
    # A setting the quick path leaves to config.py: the same command, the full path, SQLAlchemy loaded.
    code, heavy, _ = _probe(["runs", "list", *extra], {**env, "DB_POOL_SIZE": "4"})
    assert code in (0, None) and "sqlalchemy" in heavy


# --- quick settings against config.py ------------------------------------------------------------------------------

_CLASSES = (config.GeneralSettings, config.KeySettings, config.LogSettings, config.DatabaseSettings,
            config.RateLimitEnvironment)


def test_every_setting_the_commands_read_is_handled_or_declined() -> None:
    """A setting the full path reads for these commands that quick_settings neither reads nor declines would be
    ignored on the quick path (a new LOG_* field, say)."""
    for cls in _CLASSES:
        assert cls.model_config.get("env_file") is None, cls  # no .env file to read
        for field, info in cls.model_fields.items():
            name = config.env_name(cls, field)
            assert quick_settings.env_handling(name) in ("handled", "declined"), name
            assert quick_settings.env_handling(name.lower()) == "declined", name
            if quick_settings.env_handling(name) == "handled":
                assert quick_settings.HANDLED[name] == (cls.config_section, field)
                assert quick_settings.DEFAULTS[field] == info.default, field
    assert config.RateLimitEnvironment.model_fields["backend"].default != "redis"  # quick: never Redis
    assert quick_settings.env_handling("HOME") == quick_settings.env_handling("FLASHCARD_DEBUG") == "ignored"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


AGREEING: list[tuple[dict[str, str], dict[str, str]]] = [
    ({}, {}),
    ({"LOG_LEVEL": "debug", "LOG_FORMAT": " JSON ", "LOG_LEVELS": "httpx=INFO,flashcard_pipeline=ERROR",
      "OPENAI_API_KEY": "sk-test-1", "OPENROUTER_API_KEY": ""}, {}),
    ({"LOG_LEVEL": "warn", "FLASHCARD_DATABASE_URL": "env.db"}, {}),
    ({}, {"user": '[logging]\nlevel = "info"\nformat = "json"\n[general]\ndatabase_url = "file.db"\n'
                  '[keys]\nopenrouter_api_key = "or-file"\n'}),
    ({"LOG_LEVEL": "error", "FLASHCARD_DATABASE_URL": "env.db"},
     {"user": '[logging]\nlevel = "info"\n[general]\ndatabase_url = "file.db"\n'}),
    ({"FLASHCARD_DATABASE_URL": ""}, {"user": '[general]\ndatabase_url = "file.db"\n'}),
    ({}, {"cwd": '[logging]\nlevel = "debug"\n', "user": '[logging]\nlevel = "error"\nlevels = "httpx=DEBUG"\n'}),
    ({"FLASHCARD_CONFIG": "{explicit}"}, {"explicit": '[logging]\nformat = "json"\n',
                                          "user": '[logging]\nlevel = "error"\n'}),
    ({"LOG_LEVEL": "20"}, {"cwd": "[general]\n"}),
]


def _setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], files: dict[str, str]) -> None:
    places = {"cwd": Path.cwd() / config.CONFIG_FILE_NAME, "user": config.user_config_file(),
              "explicit": tmp_path / "explicit.toml"}
    for where, text in files.items():
        _write(places[where], text)
    for name, value in env.items():
        monkeypatch.setenv(name, value.replace("{explicit}", str(places["explicit"])))
    for name in ("env.db", "file.db"):
        _write(Path.cwd() / name, "")


@pytest.mark.parametrize(("env", "files"), AGREEING)
def test_quick_settings_agree_with_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                          files: dict[str, str]) -> None:
    _setup(tmp_path, monkeypatch, env, files)
    _write(default_database_path(), "")
    quick = quick_settings.read()
    assert quick is not None
    for flags in ({}, {"verbosity": 1}, {"verbosity": -1}, {"level": "info"}, {"format": "text"}):
        full_flags: dict[str, Any] = {"level": None, "format": None, "verbosity": 0, **flags}
        assert quick_settings.log_options(quick, **full_flags) == config.log_options(**full_flags), flags
    for flag in (None, "other.db", f"sqlite:///{tmp_path / 'named.db'}"):
        if flag is not None:
            _write(tmp_path / "named.db", "")
            _write(Path.cwd() / "other.db", "")
        target = quick_settings.database_target(flag, quick)
        assert target is not None and target.dialect == "sqlite"
        assert f"sqlite:///{target.path}" == resolve_database_url(flag), flag


DECLINED: list[tuple[dict[str, str], dict[str, str]]] = [
    ({"DB_POOL_SIZE": "5"}, {}), ({"RL_BACKEND": "redis"}, {}), ({"LOG_FILE": "false"}, {}),
    ({"FLASHCARD_MODEL_KIND": "chat"}, {}), ({"log_level": "DEBUG"}, {}), ({"LOG_LEVEL": "15"}, {}),
    ({"LOG_LEVEL": "loud"}, {}), ({"LOG_FORMAT": "xml"}, {}), ({"LOG_LEVELS": "httpx"}, {}),
    ({"FLASHCARD_CONFIG": "/nonexistent/flashcard-pipeline.toml"}, {}),
    ({}, {"user": "[retry]\nmax_attempts = 3\n"}), ({}, {"user": '[logging]\nlevle = "info"\n'}),
    ({}, {"user": "[logging]\nlevel = 10\n"}), ({}, {"cwd": "[logging\n"}), ({}, {"user": 'general = "x"\n'}),
    ({}, {"user": '[general]\nmodel_kind = "chat"\n'}), ({}, {"user": "[rate_limit]\nbackend = \"redis\"\n"}),
]


@pytest.mark.parametrize(("env", "files"), DECLINED)
def test_quick_settings_decline_what_they_do_not_repeat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         env: dict[str, str], files: dict[str, str]) -> None:
    _setup(tmp_path, monkeypatch, env, files)
    assert quick_settings.read() is None


def test_database_targets_the_full_path_handles(tmp_path: Path) -> None:
    quick = quick_settings.read()
    assert quick is not None
    _write(tmp_path / "x.db", "")
    for flag in ("not a url", "postgresql:/x", "mysql://h/db", "sqlite://", "sqlite:///:memory:",
                 f"sqlite:///{tmp_path / 'x.db'}?mode=ro", f"sqlite:///{tmp_path / 'missing.db'}", "missing.db"):
        assert quick_settings.database_target(flag, quick) is None, flag
    target = quick_settings.database_target("postgresql+psycopg://u@h:5433/d?options=-csearch_path%3Ds", quick)
    assert target is not None and target.conninfo == "postgresql://u@h:5433/d?options=-csearch_path%3Ds"


# --- plain option values against Typer's converter ----------------------------------------------------------------


def _parameters() -> list[tuple[Any, Any]]:
    root = typer.main.get_command(app)
    ctx = typer.Context(root)
    found = [(param, ctx) for param in root.params]
    for name in root.list_commands(ctx):  # type: ignore[attr-defined]
        command = root.get_command(ctx, name)  # type: ignore[attr-defined]
        commands = [command.get_command(ctx, n) for n in command.list_commands(ctx)] \
            if hasattr(command, "list_commands") else [command]
        found += [(param, typer.Context(c)) for c in commands for param in c.params]
    return [(p, c) for p, c in found if hasattr(p, "type_descriptor") and not (p.multiple or p.nargs == -1)]


def test_plain_values_convert_as_typer_converts_them() -> None:
    values: list[Any] = ["0", "1", "7", "-1", "-3", "256", "257", "100000", "99999999999999999999", "abc", "1.5",
                         " 5", "007", "+4", "1_000", "", 0, 5, -2, 1.0, 0.05, 0.0001, True, None]
    parameters = _parameters()
    assert {p.type_descriptor.annotation for p, _ in parameters} >= {int, float, str, bool}
    plain = 0
    for param, ctx in parameters:
        for value in [param.default, *values]:
            try:
                mine = plain_value(param.type_descriptor, value)
            except _NotPlain:
                continue
            plain += 1
            theirs = build_runtime_param(param.type_descriptor).coerce(value, param=param, ctx=ctx)
            assert (mine, type(mine)) == (theirs, type(theirs)), (param.name, value)
    assert plain > 100
