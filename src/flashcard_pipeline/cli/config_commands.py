"""``flashcard-pipeline config show|validate|init``: the settings in effect, where each comes from, a check of
a config file and the environment, and a commented file to start from."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from flashcard_pipeline.cli.options import JsonOption
from flashcard_pipeline.cli.output import ExitCode, command_group, fail, stderr_console, warning
from flashcard_pipeline.cli.root import app

config_app = command_group("Settings: every effective value and its source, a check of the config file and the "
                           "environment, a commented file with the defaults.")
app.add_typer(config_app, name="config")


def _short(path: Path) -> str:
    """``./flashcard-pipeline.toml`` or ``~/.config/...`` rather than the whole absolute path."""
    for base, label in ((Path.cwd(), "."), (Path.home(), "~")):
        try:
            return f"{label}/{path.resolve().relative_to(base.resolve())}"
        except ValueError:
            continue
    return str(path)


def warn_loose_key_files() -> None:
    """A warning for each config file in effect that holds an API key others may read."""
    from flashcard_pipeline.config import loose_key_files

    for path in loose_key_files():
        warning(f"{path} holds an API key and other users can read it: chmod 600 {path}")


@config_app.command("show")
def show(as_json: JsonOption = False) -> None:
    """Every effective setting, its variable and where its value comes from (env, file or default); secrets
    are masked."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from flashcard_pipeline.config import config_files, user_config_file
    from flashcard_pipeline.settings_catalog import effective

    files = config_files()
    rows = effective()
    warn_loose_key_files()
    if as_json:
        typer.echo(json.dumps({"files": [str(f) for f in files], "settings": rows}, indent=2, ensure_ascii=False))
        return
    console = Console()
    numbered = {str(path): f"file {i}" if len(files) > 1 else "file" for i, path in enumerate(files, start=1)}
    if files:
        console.print("config files, the first wins: " + ", ".join(
            f"{numbered[str(path)]} = {_short(path)}" for path in files), highlight=False, soft_wrap=True)
    else:
        console.print(f"no config file (looked for ./flashcard-pipeline.toml and {_short(user_config_file())}; "
                      "`flashcard-pipeline config init` writes one)", highlight=False)
    table = Table(box=None, padding=(0, 1), show_edge=False)
    table.add_column("variable", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_column("source", no_wrap=True)
    section = None
    for row in rows:
        if row["section"] != section:
            section = row["section"]
            table.add_row(f"[bold]\\[{section}][/]", "", "")
        source = row["source"].split(" ", 1)
        label = numbered.get(source[1], "file") if source[0] == "file" else source[0]
        table.add_row(row["env"], escape(_text(row["value"])), label)
    console.print(table)


def _text(value: object) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


@config_app.command("validate")
def validate(file: Annotated[Path | None, typer.Argument(
        metavar="FILE", help="The config file to check (default: the ones in effect).", show_default=False)] = None,
) -> None:
    """Check a config file and the environment: every unknown section or key and every bad value is named (with
    its variable or its file and key); exit 2 when there is any."""
    from pydantic import ValidationError as PydanticValidationError
    from rich.markup import escape

    from flashcard_pipeline.config import (
        SETTINGS,
        config_file_problems,
        config_files,
        settings_problems,
        using_config_files,
    )
    from flashcard_pipeline.errors import ConfigurationError

    problems: list[str] = []
    try:
        files = [file] if file is not None else config_files()
    except ConfigurationError as exc:
        problems.append(str(exc))
        files = []
    if file is not None and not file.is_file():
        raise fail(f"no such file: {file}")
    readable = []
    for path in files:
        try:
            problems.extend(config_file_problems(path))
            readable.append(path)
        except ConfigurationError as exc:
            problems.append(str(exc))
    checked = 0
    with using_config_files(readable):
        for cls in SETTINGS:
            checked += len(cls.model_fields)
            try:
                cls()
            except (PydanticValidationError, ValueError) as exc:
                problems.extend(f"invalid {problem}" for problem in settings_problems(cls, exc))
        warn_loose_key_files()
    for problem in problems:
        stderr_console().print(f"[red]error:[/] {escape(problem)}", highlight=False)
    if problems:
        raise typer.Exit(int(ExitCode.USAGE))
    where = ", ".join(_short(f) for f in readable) if readable else "no config file"
    typer.echo(f"ok: {checked} settings from the environment and {where} are valid")


@config_app.command("init")
def init(
    file: Annotated[Path | None, typer.Argument(metavar="FILE", help="Where to write (default: "
                                                                     "./flashcard-pipeline.toml).",
                                                show_default=False)] = None,
    user: Annotated[bool, typer.Option("--user", help="Write the user's file "
                                                      "($XDG_CONFIG_HOME/flashcard-pipeline/flashcard-pipeline.toml) "
                                                      "instead.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a config file listing every setting with its default, commented out (readable by you only, as it
    may hold an API key)."""
    from flashcard_pipeline.config import CONFIG_FILE_NAME, user_config_file
    from flashcard_pipeline.settings_catalog import config_template

    if file is not None and user:
        raise fail("give a FILE or --user, not both")
    target = file or (user_config_file() if user else Path.cwd() / CONFIG_FILE_NAME)
    if target.exists() and not force:
        raise fail(f"{target} exists; `--force` overwrites it (`config show` prints what it sets)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(config_template())
        os.chmod(target, 0o600)  # an existing file kept its mode through O_TRUNC
    except OSError as exc:
        raise fail(f"cannot write {target}: {exc.strerror or exc}") from None
    typer.echo(f"wrote {target}: every setting with its default, commented out; uncomment a line to change it "
               "(`flashcard-pipeline config validate` checks it)")
