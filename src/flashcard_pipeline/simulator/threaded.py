"""The simulator on its own event loop in a thread: for callers that are not async themselves (worker processes
under test, benchmarks that drive subprocesses) and need the provider up beside them."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from flashcard_pipeline.simulator.server import Simulator, SimulatorConfig, SimulatorStats, run_simulator


@contextlib.contextmanager
def simulator_in_a_thread(config: SimulatorConfig) -> Iterator[tuple[str, Callable[[], SimulatorStats]]]:
    """The simulated provider on a free port, served by its own event loop: (base URL, its statistics)."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def serve() -> None:
        holder["stop"] = asyncio.Event()
        async with run_simulator(config) as sim:
            holder["sim"] = sim
            ready.set()
            await holder["stop"].wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    if not ready.wait(30):
        raise RuntimeError("the simulator did not start within 30 s")
    sim: Simulator = holder["sim"]

    async def stats() -> SimulatorStats:
        return sim.stats()

    try:
        yield sim.base_url, lambda: asyncio.run_coroutine_threadsafe(stats(), loop).result(10)
    finally:
        loop.call_soon_threadsafe(holder["stop"].set)
        thread.join(30)
        loop.close()
