"""A running run seen from anywhere: the ``process`` that works on it publishes a heartbeat with its live
counters into the run's metrics every second, and :func:`take_snapshot` puts that together with what the
database knows (items, calls, errors, circuits, limits), so `monitor` and `runs` work from another terminal.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flashcard_pipeline.pipeline import RunStats
    from flashcard_pipeline.storage.records import RunRecord
    from flashcard_pipeline.storage.status_reader import StatusSource

#: Seconds between two heartbeats of a running ``process``.
PROGRESS_INTERVAL = 1.0
#: A heartbeat older than this means the process is gone (killed, or its machine is).
STALE_AFTER = timedelta(seconds=15)
#: The window the current pace (calls and items per minute) is measured over.
PACE_WINDOW = timedelta(seconds=60)

#: States of a run as a user sees them; the last four are final.
LIVE_STATES = ("running", "starting")
ENDED_STATES = ("completed", "failed", "aborted", "interrupted")


def pause_text(stats: RunStats, now: float | None = None) -> str | None:
    """Why calls wait right now (an open circuit, a 429 that paused everybody), or None."""
    reasons = [stats.pause_reason] if stats.pause_reason else []
    if (wait := stats.rate_limit_wait(now)) > 0:
        reasons.append(f"{stats.rate_limit_label} answered 429 (rate limit), every call waits {math.ceil(wait)} s")
    return "; ".join(reasons) or None


def progress_snapshot(stats: RunStats, *, owner: str, options: dict[str, Any], active: bool = True) -> dict[str, Any]:
    """The heartbeat: this invocation's live counters, which the database does not hold (calls in flight, the
    pause reason), and the options it runs with."""
    now = time.monotonic()
    return {
        "updated_at": datetime.now(UTC).isoformat(), "active": active, "owner": owner,
        "in_flight": stats.in_flight, "requests": stats.requests, "api_errors": stats.api_errors,
        "cache_hits": stats.cache_hits, "done_this_invocation": stats.done - stats.already_done,
        "elapsed_s": round(now - stats.started_at, 3), "requests_per_minute": round(stats.requests_per_minute(now), 1),
        "paused": pause_text(stats, now), "options": options,
    }


@contextlib.asynccontextmanager
async def publishing_progress(publish: Callable[[dict[str, Any]], Any], snapshot: Callable[[bool], dict[str, Any]],
                              interval: float = PROGRESS_INTERVAL) -> AsyncIterator[None]:
    """Publish ``snapshot(active=True)`` every ``interval`` seconds while the block runs, and a last one that
    says the process has stopped working on the run when it ends."""
    import asyncio  # here: `monitor` and `runs` import this module and start faster without it

    async def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # a busy database must not stop the run; the next beat retries
                await publish(snapshot(True))
            await asyncio.sleep(interval)

    task = asyncio.create_task(beat(), name="progress-heartbeat")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(Exception):
            await publish(snapshot(False))


def _parse(stamp: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(stamp) if isinstance(stamp, str) else None
    except ValueError:
        return None


def run_state(run: RunRecord, progress: dict[str, Any] | None, now: datetime) -> str:
    """``running`` (a process reported within STALE_AFTER), ``starting`` (marked running a moment ago, no report
    yet), ``interrupted`` (marked running but nobody reports: killed), or the stored final status."""
    beat = _parse((progress or {}).get("updated_at"))
    if progress and progress.get("active") and beat is not None and now - beat < STALE_AFTER:
        return "running"
    if run.status == "running":
        if progress and not progress.get("active", True):  # its process said goodbye without a final status
            return "interrupted"
        last = max(filter(None, (beat, run.updated_at, run.created_at)))
        return "starting" if now - last < STALE_AFTER else "interrupted"
    return str(run.status)


@dataclass
class RunSnapshot:
    """Everything `monitor` shows about one run at one instant (``to_dict`` is its ``--json``)."""

    run_id: int
    state: str
    provider: str
    model: str
    input_path: str
    simulated: bool
    started_at: str
    total: int
    done: int
    failed: int
    pending: int
    in_flight: int
    api_calls: int
    api_errors: int
    tokens: int
    cost_usd: float
    calls_per_minute: float
    items_per_minute: float
    eta_seconds: float | None
    paused: str | None
    errors_by_category: dict[str, int]
    errors_by_code: dict[str, int]
    circuits: list[dict[str, Any]] = field(default_factory=list)
    isolated: list[str] = field(default_factory=list)
    limits: dict[str, Any] | None = None
    heartbeat_age_s: float | None = None
    owner: str | None = None
    redis: list[dict[str, Any]] | None = None
    #: The run's ``worker`` processes (host, pid, items done, last heartbeat, state); empty for a single `process`.
    workers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def newest_watchable_run(source: StatusSource, now: datetime | None = None) -> RunRecord | None:
    """The newest run a process works on (or is about to), else the newest run."""
    now = now or datetime.now(UTC)
    runs = source.runs(limit=20)
    for run in runs:
        if run_state(run, (source.run_metrics(run.id) or {}).get("progress"), now) in LIVE_STATES:
            return run
    return runs[0] if runs else None


def take_snapshot(source: StatusSource, run: RunRecord, now: datetime | None = None) -> RunSnapshot:
    """The run as the database and its process's last heartbeat show it."""
    now = now or datetime.now(UTC)
    record = source.get_run(run.id) or run
    metrics = source.run_metrics(run.id) or {}
    progress = metrics.get("progress") or {}
    workers = [w.to_dict(now) for w in source.workers(run.id)]
    state = run_state(record, progress or None, now)
    if state not in LIVE_STATES and record.status == "running" and any(w["state"] == "running" for w in workers):
        state = "running"  # a worker that beats is the run's life sign, whatever the last progress line said
    live = state in LIVE_STATES
    summary = source.summary(run.id)
    beat = _parse(progress.get("updated_at"))
    # The process's running time as of now, not as of its last heartbeat: the first one says ~0 s, and items can
    # finish before the next, so a window ending at that heartbeat's age would hold none of their calls.
    elapsed = float(progress.get("elapsed_s") or 0.0)
    if elapsed > 0 and beat is not None:
        elapsed += max(0.0, (now - beat).total_seconds())
    window = min(PACE_WINDOW.total_seconds(), elapsed) if live and elapsed > 0 else PACE_WINDOW.total_seconds()
    calls, items = source.recent_activity(run.id, now - timedelta(seconds=window)) if live else (0, 0)
    items_per_minute = items * 60.0 / window if window else 0.0
    remaining = summary.pending
    eta = remaining / items_per_minute * 60.0 if live and items_per_minute > 0 else None
    circuit = f"{record.provider}/{record.model}"
    circuits = [s.to_dict(now) for s in source.snapshots() if s.run_id == run.id and (s.live(now) or not live)]
    isolated = [name for name, command in source.latest_commands().items()
                if command.action == "isolate" and name == circuit]
    return RunSnapshot(
        run_id=record.id, state=state, provider=record.provider, model=record.model, input_path=record.input_path,
        simulated=record.simulated, started_at=record.created_at.isoformat(), total=summary.total,
        done=summary.done, failed=summary.failed, pending=summary.pending,
        in_flight=(sum(int(w["in_flight"]) for w in workers if w["state"] == "running") if workers
                   else int(progress.get("in_flight") or 0)) if live else 0, api_calls=summary.api_calls,
        api_errors=summary.api_errors, tokens=summary.tokens_in + summary.tokens_out,
        cost_usd=round(summary.cost_usd, 6), calls_per_minute=round(calls * 60.0 / window, 1) if window else 0.0,
        items_per_minute=round(items_per_minute, 1), eta_seconds=None if eta is None else round(eta, 1),
        paused=progress.get("paused") if live else None, errors_by_category=dict(summary.by_error),
        errors_by_code=source.errors_by_code(run.id), circuits=circuits, isolated=isolated,
        limits=metrics.get("ratelimit"), owner=progress.get("owner"), workers=workers,
        heartbeat_age_s=None if beat is None else round((now - beat).total_seconds(), 1))
