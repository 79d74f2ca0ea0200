"""``flashcard-pipeline logs``: a run's log lines (from its log files), each with its run, item, stage and call."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from datetime import datetime
from typing import Annotated, Any

import typer

from flashcard_pipeline.cli.options import DbOption, JsonOption
from flashcard_pipeline.cli.output import ExitCode, fail
from flashcard_pipeline.cli.root import app

#: Context keys shown after a text line's message, in this order, with these names.
_SHOWN = (("item", "item"), ("stage", "stage"), ("attempt", "attempt"), ("model", "model"), ("call_id", "call"))


@app.command("logs")
def logs_command(
    run: Annotated[int | None, typer.Option("--run", metavar="ID", help="The run (default: the newest).")] = None,
    item: Annotated[str | None, typer.Option("--item", metavar="TERM", help="Only the lines about this term.")]
    = None,
    call: Annotated[str | None, typer.Option("--call", metavar="ID", help="Only the lines of this call (its id is in "
                                                                         "`errors` and in api_calls).")] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """A run's log lines, from the log files its processes wrote (LOG_DIR): time, level, message and the item,
    stage, attempt, model and call each line is about. --json prints them as stored, one object per line."""
    from flashcard_pipeline.config import LogSettings, data_directory, read_settings
    from flashcard_pipeline.logging_config import read_log_lines, run_log_directory, run_log_files
    from flashcard_pipeline.storage.db import open_database
    from flashcard_pipeline.storage.ledger import Ledger

    engine = open_database(db, must_exist=True)
    try:
        found = Ledger(engine).get_run(run)
        database = engine.url.render_as_string(hide_password=True)
    finally:
        engine.dispose()
    if found is None:
        raise fail("no runs yet (`flashcard-pipeline process INPUT` makes one)" if run is None
                   else f"no run {run} in this database (`flashcard-pipeline runs list` shows them)")
    settings = read_settings(LogSettings)
    directory = run_log_directory(settings.dir or data_directory() / "logs", database)
    files = run_log_files(directory, found.id) if directory.is_dir() else []
    if not files:
        raise fail(f"no log file of run {found.id} in {directory} (written by `process` on this machine unless "
                   "LOG_FILE=false)", ExitCode.FAILED_ITEMS)
    lines = _select(read_log_lines(files), item=item, call=call)
    if as_json:
        for line in lines:
            typer.echo(json.dumps(line, ensure_ascii=False))
        return
    for line in lines:
        typer.echo(text_line(line))


def _select(lines: Iterable[dict[str, Any]], *, item: str | None, call: str | None) -> list[dict[str, Any]]:
    chosen = [line for line in lines
              if (item is None or line.get("item") == item) and (call is None or line.get("call_id") == call)]
    chosen.sort(key=lambda line: str(line.get("time", "")))  # files of several processes, merged
    return chosen


def text_line(line: dict[str, Any]) -> str:
    """``12:00:01.234 WARNING message [item=학교 stage=nuance attempt=2 call=9f2c...] (category/code)``."""
    stamp = str(line.get("time", ""))
    with contextlib.suppress(ValueError):
        stamp = datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone().strftime("%H:%M:%S.%f")[:-3]
    text = f"{stamp} {line.get('level', ''):<7} {line.get('message', '')}"
    context = " ".join(f"{name}={line[key]}" for key, name in _SHOWN if line.get(key) is not None)
    if context:
        text += f" [{context}]"
    error = line.get("error")
    if isinstance(error, dict) and error.get("code"):
        text += f" ({error.get('category')}/{error.get('code')})"
    return text
