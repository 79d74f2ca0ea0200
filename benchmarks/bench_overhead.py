"""What the pipeline costs on top of the HTTP calls it makes: `process` against a bare httpx loop.

    python benchmarks/bench_overhead.py [--terms 500] [--concurrency 8 32 128] [--repeats 3]

A zero-latency simulator runs in its own process, so neither side pays for the server's CPU. Each run is a
subprocess that reports the wall and CPU time (user + system) of its work, after its imports: interpreter start-up
is the same few hundred milliseconds whatever the list's length and is measured by bench_startup.py instead; the
content checks' analyser and Hanja table (about 1.3 s of CPU, once per process) are loaded and the (empty) ledger
database created before the clock, and the simulator is warmed up before the first run.

- `process`: the runner's `process()` (what `flashcard-pipeline process LIST --provider openai-compatible
  --base-url SIM --rpm 1000000` does, export included, under the garbage collector's settings the command sets)
  on a fresh SQLite database, so every stage answer is a paid call
  (ledger, cache, retry, breaker and limiter included; a stated limit skips the limiter's slow start, which
  finds an unknown limit and is not overhead);
- bare loops: `httpx.AsyncClient` (httpx's default transport), and `aiohttp.ClientSession`, posting the same
  request bodies (both stages of every term, built by the same code) with the same concurrency, parsing the JSON
  answer and nothing else: what a user writes in an afternoon.

The table gives calls/s (best and median of the repeats), client CPU per call (minimum and median), how busy the
client kept its core (CPU time over wall time: 1.0 is all one Python process can do with the GIL), the
simulator's CPU per call (from /proc, "n/a" elsewhere) and the share of the client's CPU its garbage collector's
passes took (median), then the ratios of `process` to each bare loop (medians).
These machines are noisy: read ratios and medians.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "korean_1000_terms.csv"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def simulator() -> Any:
    """A zero-latency simulator in its own process, warmed up (its first answers are slower); yields its base
    URL."""
    with simulator_process() as (url, _pid):
        yield url


def process_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) process ``pid`` has used so far, from /proc; None where there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def simulator_process() -> Any:
    """:func:`simulator`, yielding (base URL, process id)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flashcard_pipeline", "simulate", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/v1"
        warm_simulator(url)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def warm_simulator(url: str, terms: int = 100) -> None:
    """Ask the simulator for both stages of ``terms`` terms: whichever client ran first would otherwise pay for
    its warm-up (its first answers took about five times its later ones' CPU)."""
    import httpx

    with httpx.Client(timeout=60) as client:
        for body in request_bodies(terms):
            client.post(f"{url}/chat/completions", json=body).raise_for_status()


def measured(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, garbage collector's CPU seconds) of the work a worker subprocess reports,
    start-up and imports excluded."""
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed ({result.returncode}): {result.stderr[-2000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report["wall"], report["cpu"], report["gc"]


@contextmanager
def timed() -> Any:
    """Print the wall and CPU time of the block, and the CPU the garbage collector's passes took in it, as JSON
    (the worker's report)."""
    collecting = {"total": 0.0, "since": 0.0}

    def on_pass(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collecting["since"] = time.process_time()
        else:
            collecting["total"] += time.process_time() - collecting["since"]

    started, cpu = time.perf_counter(), time.process_time()
    gc.callbacks.append(on_pass)
    try:
        yield
    finally:
        gc.callbacks.remove(on_pass)
    print(json.dumps({"wall": time.perf_counter() - started, "cpu": time.process_time() - cpu,
                      "gc": collecting["total"]}))


def request_bodies(terms: int) -> list[dict[str, Any]]:
    """Both stages' bodies for the first ``terms`` terms, as `process` builds them."""
    from flashcard_pipeline.ingest import VocabularyReader
    from flashcard_pipeline.simulator.content import analysis_for
    from flashcard_pipeline.stages import StageSettings, build_cards_request, build_nuance_request

    settings = StageSettings(provider="openai-compatible", model="gpt-4o-mini")
    bodies = []
    for index, item in enumerate(VocabularyReader(DATA)):
        if index == terms:
            break
        bodies.append(build_nuance_request(item, settings).request.to_body())
        analysis = analysis_for(item.term, type=item.type, hints=item.hints)
        bodies.append(build_cards_request(item, analysis, settings).request.to_body())
    return bodies


def warm_content_checks() -> None:
    """Load what the content checks load once per process, before the clock: the analyser's model (its first
    analysis finishes loading it) and the Hanja table, about 1.3 s of CPU a run pays once whatever its length
    (1.3 ms a call over 1,000 calls, 0.07 over 20,000); bench_startup.py is where start-up costs are measured."""
    from flashcard_pipeline.korean.analyzer import morphemes
    from flashcard_pipeline.korean.hanja_readings import reading_of

    morphemes("학교에 갔어요")
    reading_of("學")


def process_worker(url: str, db: str, concurrency: int, terms: int, output: str) -> None:
    from flashcard_pipeline.cli.progress import ConsoleReporter  # noqa: F401 - what the CLI imports too
    from flashcard_pipeline.gc_tuning import long_run_gc
    from flashcard_pipeline.runner import ProcessOptions, process
    from flashcard_pipeline.storage.db import open_database

    options = ProcessOptions(input_path=DATA, output=Path(output), provider="openai-compatible", base_url=url,
                             model="gpt-4o-mini", db_url=db, concurrency=concurrency, limit=terms, rpm=1_000_000)
    warm_content_checks()
    # The ledger exists, as a user's does after their first run (creating and migrating it is start-up, about
    # 0.15 s with Alembic's import); it is empty, so every answer is still a paid call.
    open_database(db).dispose()
    with long_run_gc(), timed():  # the collector's settings the command runs with
        result = asyncio.run(process(options))
    assert result.outcome is not None and result.outcome.stats.done == terms, result


async def bare_loop(url: str, bodies: list[dict[str, Any]], concurrency: int, library: str) -> None:
    """The afternoon version: a bounded pool of tasks posting every body, keeping each answer's content."""
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    answers: list[str] = []
    connections = max(concurrency, 10)
    if library == "aiohttp":
        import aiohttp

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:

            async def aiohttp_worker() -> None:
                while not queue.empty():
                    async with session.post(f"{url}/chat/completions", json=queue.get_nowait()) as response:
                        response.raise_for_status()
                        answers.append((await response.json())["choices"][0]["message"]["content"])

            await asyncio.gather(*(aiohttp_worker() for _ in range(concurrency)))
    else:
        import httpx

        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:

            async def httpx_worker() -> None:
                while not queue.empty():
                    response = await client.post(f"{url}/chat/completions", json=queue.get_nowait())
                    response.raise_for_status()
                    answers.append(response.json()["choices"][0]["message"]["content"])

            await asyncio.gather(*(httpx_worker() for _ in range(concurrency)))
    assert len(answers) == len(bodies)


def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as folder_name, simulator_process() as (url, server):
        folder = Path(folder_name)
        bodies_file = folder / "bodies.json"
        bodies = request_bodies(args.terms)
        bodies_file.write_text(json.dumps(bodies, ensure_ascii=False), encoding="utf-8")
        calls = len(bodies)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RL_", "CB_", "RETRY_", "CACHE_", "DB_"))}
        env["XDG_DATA_HOME"] = str(folder / "data")

        def measured_with_server(command: list[str]) -> tuple[float, float, float, float | None]:
            before = process_cpu(server)
            wall, cpu, collector = measured(command, env)
            after = process_cpu(server)
            return wall, cpu, collector, None if before is None or after is None else after - before

        def command(client: str, concurrency: int, repeat: int) -> list[str]:
            if client == "process":
                db = folder / f"ledger-{concurrency}-{repeat}.db"
                return [sys.executable, __file__, "--process-worker", url, f"sqlite:///{db}", str(concurrency),
                        str(args.terms), str(folder / "cards.jsonl")]
            return [sys.executable, __file__, "--bare-worker", url, str(bodies_file), str(concurrency), client]

        print(f"{args.terms} terms, {calls} calls per run, {args.repeats} repeats; simulator {url}")
        print("busy: the client's CPU time over its wall time (1.0: it kept one core busy, the GIL's limit); "
              "server: the simulator's CPU per call; gc: the client's garbage collector's share of its CPU")
        print(f"{'concurrency':>11} {'client':>8} {'calls/s best':>12} {'median':>8} {'CPU ms/call min':>16} "
              f"{'median':>8} {'busy':>6} {'server ms/call':>15} {'gc':>6}")
        for concurrency in args.concurrency:
            rows: dict[str, list[tuple[float, float, float, float | None]]] = {"process": [], "httpx": [],
                                                                              "aiohttp": []}
            for repeat in range(args.repeats):
                # Each repeat starts with the next client: whichever runs first in a round runs slower (about 10%
                # here), and always putting `process` first counted that against it.
                order = list(rows)[repeat % len(rows):] + list(rows)[:repeat % len(rows)]
                for client in order:
                    rows[client].append(measured_with_server(command(client, concurrency, repeat)))
            summary = {}
            for client, samples in rows.items():
                rates = [calls / wall for wall, _, _, _ in samples]
                cpu = [1000 * cpu / calls for _, cpu, _, _ in samples]
                busy = statistics.median(cpu / wall for wall, cpu, _, _ in samples)
                collector = statistics.median(spent / total for _, total, spent, _ in samples)
                served = [1000 * used / calls for _, _, _, used in samples if used is not None]
                server_cpu = f"{statistics.median(served):.2f}" if served else "n/a"
                summary[client] = (statistics.median(rates), statistics.median(cpu))
                print(f"{concurrency:>11} {client:>8} {max(rates):>12.0f} {statistics.median(rates):>8.0f} "
                      f"{min(cpu):>16.2f} {statistics.median(cpu):>8.2f} {busy:>6.2f} {server_cpu:>15} "
                      f"{collector:>6.1%}")
            for library in ("httpx", "aiohttp"):
                rate_ratio = summary["process"][0] / summary[library][0]
                cpu_ratio = summary["process"][1] / summary[library][1]
                print(f"{concurrency:>11} {'ratio':>8} process/{library}: calls/s {rate_ratio:.2f}, "
                      f"CPU per call {cpu_ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--terms", type=int, default=500)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bare-worker", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--process-worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_worker:
        url, bodies_file, concurrency, library = args.bare_worker
        __import__(library)  # imported before the clock starts, as the pipeline's modules are
        bodies = json.loads(Path(bodies_file).read_text(encoding="utf-8"))
        with timed():
            asyncio.run(bare_loop(url, bodies, int(concurrency), library))
        return
    if args.process_worker:
        url, db, concurrency, terms, output = args.process_worker
        process_worker(url, db, int(concurrency), int(terms), output)
        return
    run(args)


if __name__ == "__main__":
    main()
