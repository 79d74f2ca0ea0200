"""``flashcard-pipeline runs list|show|delete``: the runs a database holds, one run in detail, and removing one."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flashcard_pipeline.cli.monitor import worker_rows
from flashcard_pipeline.cli.options import DbOption, JsonOption
from flashcard_pipeline.cli.output import ExitCode, command_group, duration, fail, label_grid, money
from flashcard_pipeline.cli.root import app

if TYPE_CHECKING:
    from flashcard_pipeline.storage.ledger import Ledger
    from flashcard_pipeline.storage.records import RunRecord, RunSummary

runs_app = command_group("The runs in the database: list them, show one (input, model, settings, counts, cost, "
                         "duration, state), delete one.")
app.add_typer(runs_app, name="runs")

RunArgument = Annotated[int, typer.Argument(metavar="ID", help="The run's id (`runs list` shows them).",
                                            show_default=False)]


def _ledger(db: str | None) -> Ledger:
    from flashcard_pipeline.storage.db import open_database
    from flashcard_pipeline.storage.ledger import Ledger

    return Ledger(open_database(db, must_exist=True))


def _when(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone().strftime("%Y-%m-%d %H:%M")


def _seconds(run: RunRecord, state: str, now: datetime) -> float:
    """Wall time from the run's creation to its end (to now while it runs; to its last write if it stopped)."""
    end = run.finished_at if state not in ("running", "starting") else now
    return ((end or run.updated_at or now) - run.created_at).total_seconds()


def _row(run: RunRecord, summary: RunSummary, state: str, now: datetime) -> dict[str, Any]:
    return {"id": run.id, "state": state, "status": str(run.status), "input_path": run.input_path,
            "provider": run.provider, "model": run.model, "simulated": run.simulated,
            "created_at": run.created_at.isoformat(),
            "finished_at": None if run.finished_at is None else run.finished_at.isoformat(),
            "duration_s": round(_seconds(run, state, now), 1), "total": summary.total, "done": summary.done,
            "failed": summary.failed, "quarantined": summary.quarantined, "pending": summary.pending,
            "api_calls": summary.api_calls,
            "api_errors": summary.api_errors, "tokens": summary.tokens_in + summary.tokens_out,
            "cost_usd": round(summary.cost_usd, 6)}


@runs_app.command("list")
def list_runs(db: DbOption = None, as_json: JsonOption = False,
              limit: Annotated[int | None, typer.Option(metavar="N", help="Only the newest N runs.", min=1)] = None,
              ) -> None:
    """Every run, newest first: state, start, items done and failed, cost, duration, input and model."""
    from rich.console import Console

    from flashcard_pipeline import quick_settings
    from flashcard_pipeline.monitoring import run_state
    from flashcard_pipeline.storage.status_reader import open_status

    source = open_status(db, quick_settings.read())
    try:
        now = datetime.now(UTC)
        runs = source.runs(limit=limit)
        summaries = source.summaries([run.id for run in runs])
        rows = [_row(run, summaries[run.id], run_state(run, (source.run_metrics(run.id) or {}).get("progress"), now),
                     now) for run in runs]
    finally:
        source.close()
    if as_json:
        typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    console = Console()
    if not rows:
        console.print("no runs yet (`flashcard-pipeline process INPUT` makes one)")
        return
    for row, run in zip(rows, runs, strict=True):
        cost = money(row["cost_usd"], simulated=False) + (" est." if run.simulated else "")
        console.print(f"{row['id']:>5}  {row['state']:<11} {_when(run.created_at)}  {row['done']}/{row['total']} done"
                      f"  {row['failed']} failed  {cost}  {duration(row['duration_s'])}", highlight=False)
        console.print(f"       {Path(run.input_path).name} · {run.provider}/{run.model}", highlight=False,
                      markup=False, soft_wrap=True)


@runs_app.command("show")
def show_run(run_id: RunArgument, db: DbOption = None, as_json: JsonOption = False) -> None:
    """One run: input file, model, the settings that shaped it, counts, cost, duration, state, errors."""
    from rich.console import Console

    from flashcard_pipeline import quick_settings
    from flashcard_pipeline.monitoring import run_state
    from flashcard_pipeline.storage.status_reader import open_status

    source = open_status(db, quick_settings.read())
    try:
        run = source.get_run(run_id)
        if run is None:
            raise fail(f"there is no run {run_id} in the database")
        now = datetime.now(UTC)
        metrics = source.run_metrics(run.id) or {}
        state = run_state(run, metrics.get("progress"), now)
        summary = source.summary(run.id)
        data = _row(run, summary, state, now)
        data.update({
            "input_sha256": run.input_sha256, "target_language": run.target_language,
            "learner_language": run.learner_language, "settings": run.settings,
            "last_invocation": (metrics.get("progress") or {}).get("options"),
            "cached_stages": summary.cached_stages, "errors_by_category": summary.by_error,
            "errors_by_code": source.errors_by_code(run.id),
            "failures": [f.__dict__ for f in source.failures(run.id)],
            "quarantined_items": [{k: v for k, v in q.__dict__.items() if k != "last_answer"}
                                  for q in source.quarantined(run.id)],
            "recovery": metrics.get("recovery"),
            "cache": metrics.get("cache"), "circuit_breakers": metrics.get("circuit_breakers"),
            "workers": [w.to_dict(now) for w in source.workers(run.id)]})
    finally:
        source.close()
    if as_json:
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))
        return
    rows = [("run", f"{run.id} · {state}" + (f" (stored status {run.status})" if state != run.status else "")),
            ("input", f"{run.input_path} (sha256 {run.input_sha256[:12]}…)"),
            ("model", f"{run.provider}/{run.model}" + (" (simulated: no money spent)" if run.simulated else "")),
            ("language", f"{run.target_language} terms, {run.learner_language} explanations"),
            ("settings", ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in sorted(run.settings.items())
                                   if v not in (None, {}, [])) or "-")]
    if options := data["last_invocation"]:
        rows.append(("last run", ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in options.items()
                                           if v not in (None, [], False))))
    finished = _when(run.finished_at) if state not in ("running", "starting") else None
    quarantined = f" ({summary.quarantined} quarantined)" if summary.quarantined else ""
    rows += [("items", f"{summary.done}/{summary.total} done · {summary.failed} failed{quarantined} · "
                       f"{summary.pending} pending · {summary.cached_stages} stage answers from the cache"),
             ("calls", f"{summary.api_calls} API calls · {summary.api_errors} errors · "
                       f"{summary.tokens_in + summary.tokens_out:,} tokens"),
             ("cost", money(summary.cost_usd, simulated=run.simulated, model=run.model if run.simulated else None)),
             ("time", f"started {_when(run.created_at)}" + (f", finished {finished}" if finished else "")
              + f" · {duration(data['duration_s'])}")]
    if data["errors_by_code"]:
        rows.append(("errors", ", ".join(f"{code} {count}" for code, count in data["errors_by_code"].items())))
    rows += [("failed", f"#{f['position']} {f['term']}: {f['stage'] or '?'} {f['category']}/{f['code']}: "
                        f"{f['message']}") for f in data["failures"][:10]]
    if len(data["failures"]) > 10:
        rows.append(("", f"… and {len(data['failures']) - 10} more (--json lists them all)"))
    rows += [("quarantined", f"#{q['position']} {q['term']}: {q['stage'] or '?'} {q['code']}: {q['message']}")
             for q in data["quarantined_items"][:10]]
    if applied := (data["recovery"] or {}).get("applied"):
        rows.append(("recovery", ", ".join(f"{name} {count}" for name, count in applied.items())))
    rows += worker_rows(data["workers"])
    Console().print(label_grid(rows))


@runs_app.command("delete")
def delete_run(run_id: RunArgument, db: DbOption = None,
               yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
               ) -> None:
    """Delete a run with its items, answers and cards (after showing what goes and asking). The call log and the
    cache keep theirs; a run a process works on is refused."""
    from flashcard_pipeline.monitoring import LIVE_STATES, run_state

    ledger = _ledger(db)
    try:
        run = ledger.get_run(run_id)
        if run is None:
            raise fail(f"there is no run {run_id} in the database")
        progress = (ledger.run_metrics(run.id) or {}).get("progress") or {}
        state = run_state(run, progress or None, datetime.now(UTC))
        if state in LIVE_STATES:
            raise fail(f"run {run.id} is {state} (process {progress.get('owner', '?')}); stop it (Ctrl-C) before "
                       "deleting it")
        summary = ledger.summary(run.id)
        typer.echo(f"run {run.id} ({Path(run.input_path).name}, {run.provider}/{run.model}, {state}): its "
                   f"{summary.total} items with their {summary.done} finished answers and cards will be deleted. "
                   f"Its {summary.api_calls} API calls stay in the call log (costs stay counted); its answers stay "
                   "in the cache unless `cache clear` removed them.")
        if not yes and not typer.confirm(f"Delete run {run.id}?", default=False):
            typer.echo("nothing deleted")
            raise typer.Exit(int(ExitCode.FAILED_ITEMS))
        ledger.delete_run(run.id)
    finally:
        ledger.engine.dispose()
    typer.echo(f"deleted run {run_id}")
