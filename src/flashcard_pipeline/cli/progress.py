"""What ``process`` shows while it works: a live Rich panel on a terminal, periodic plain lines
when the output is a pipe or a log file."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from flashcard_pipeline.cli.output import money
from flashcard_pipeline.ingest import RowProblem
from flashcard_pipeline.monitoring import pause_text
from flashcard_pipeline.pipeline import RunStats
from flashcard_pipeline.storage.ledger import RunRecord

MAX_PROBLEMS_SHOWN = 20
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _visible(text: str) -> str:
    """A term as one readable line: control characters (a newline inside a quoted field) shown escaped."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def describe_lines(stats: RunStats, now: float | None = None) -> list[str]:
    """The counters in order of urgency: items and errors, then why the run waits (when it does), then pace and
    cost. A narrow terminal, or a log viewer that cuts lines, loses the least important last."""
    lines = [f"done {stats.done}/{stats.total} · failed {stats.failed} · API errors {stats.api_errors} · "
             f"in flight {stats.in_flight}"]
    if paused := pause_text(stats, now):
        lines.append(f"paused: {paused}")
    limit = f" (limit {stats.limit_status})" if stats.limit_status else ""
    lines.append(f"{stats.requests_per_minute(now):.0f} req/min{limit} · "
                 f"tokens {stats.tokens_in + stats.tokens_out:,} · "
                 f"{money(stats.cost_usd, simulated=stats.simulated)} · cache hits {stats.cache_hits}")
    return lines


def describe(stats: RunStats, now: float | None = None) -> str:
    """The progress as one line (for logs and pipes)."""
    return " · ".join(describe_lines(stats, now))


class _RunProgress(Progress):
    """The bar on one line and the counters below it, wrapped to the terminal's width, so a narrow terminal
    loses neither (one long line would squeeze the bar away and cut the counters off)."""

    def __init__(self, stats: RunStats, *columns: Any, **kwargs: Any) -> None:
        self.stats = stats  # before Progress starts asking for renderables
        super().__init__(*columns, **kwargs)

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        for line in describe_lines(self.stats):
            yield Text(line)


class ConsoleReporter:
    """Problems and run headers go to stderr; the live display too, so stdout stays clean."""

    def __init__(self, console: Console, *, plain_interval: float = 5.0) -> None:
        self.console = console
        self.plain_interval = plain_interval

    def problems(self, problems: list[RowProblem]) -> None:
        """Every skipped row into a log or a pipe; on a terminal the first 20, and how to see them all."""
        shown = problems[:MAX_PROBLEMS_SHOWN] if self.console.is_terminal else problems
        for problem in shown:
            term = f" ({_visible(problem.term)})" if problem.term else ""
            self.console.print(f"[yellow]skipped row {problem.row}{term}: {problem.reason}[/]", highlight=False)
        if len(problems) > len(shown):
            self.console.print(f"[yellow]… and {len(problems) - len(shown)} more skipped rows (all of them are "
                               "listed when stderr goes to a file: 2> skipped.txt)[/]", highlight=False)

    def started(self, run: RunRecord, *, resumed: bool, to_process: int, database: str) -> None:
        verb = "resuming" if resumed else "starting"
        self.console.print(f"{verb} run {run.id}: {run.total_items} items, {to_process} to process "
                           f"({run.provider}, {run.model}) · database {database}", highlight=False, markup=False)

    @contextlib.asynccontextmanager
    async def live(self, stats: RunStats) -> AsyncIterator[None]:
        if self.console.is_terminal:
            async with self._rich(stats):
                yield
        else:
            async with self._plain(stats):
                yield

    @contextlib.asynccontextmanager
    async def _rich(self, stats: RunStats) -> AsyncIterator[None]:
        progress = _RunProgress(stats, TextColumn("[bold]cards"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
                                refresh_per_second=4, transient=False)
        task = progress.add_task("cards", total=stats.total or None)

        async def refresh() -> None:
            while True:
                progress.update(task, completed=stats.done + stats.failed, total=stats.total or None)
                await asyncio.sleep(0.25)

        with progress:
            ticker = asyncio.create_task(refresh())
            try:
                yield
            finally:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
                progress.update(task, completed=stats.done + stats.failed)

    @contextlib.asynccontextmanager
    async def _plain(self, stats: RunStats) -> AsyncIterator[None]:
        async def tick() -> None:
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.5)
                if time.monotonic() - last >= self.plain_interval:
                    last = time.monotonic()
                    self.console.print(describe(stats), highlight=False)

        ticker = asyncio.create_task(tick())
        try:
            yield
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            self.console.print(describe(stats), highlight=False)
