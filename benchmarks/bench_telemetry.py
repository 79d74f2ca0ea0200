"""What telemetry costs a run: `process` with it off, exporting OTLP, and serving Prometheus, in items per second.

    python benchmarks/bench_telemetry.py [--terms 500] [--concurrency 8 32] [--repeats 5] [--baseline-src DIR]

A zero-latency simulator runs in its own process (benchmarks/bench_overhead.py's), and so does an OTLP/HTTP sink
that accepts and drops what it is sent, so neither costs the measured process CPU. Each run is a fresh subprocess
on a fresh SQLite database (every stage answer a paid call) and reports its wall and CPU time after its imports;
the modes alternate within each repeat, so drift hits them alike. Modes:

- `off`: no telemetry (the default);
- `otlp`: `--telemetry otlp` to the sink: every span (item, stage, attempt, ledger batch, every SQL statement) and
  the metrics, batched and exported from the SDK's threads;
- `otlp 10%`: the same with `OTEL_TRACES_SAMPLER=parentbased_traceidratio`, `OTEL_TRACES_SAMPLER_ARG=0.1`;
- `otlp metrics`: the same with `OTEL_TRACES_EXPORTER=none`: metrics only;
- `prometheus`: `--metrics-port`: metrics only, served for scraping (nothing scrapes them here);
- `off (baseline)`: with `--baseline-src DIR`, `off` on another checkout's `src` (e.g. `git archive main src`),
  to see whether the hooks cost anything when telemetry is off.

The table gives items/s (best and median) and CPU ms per item (median), then each mode's median items/s against
`off`. These machines are noisy: read the ratios of medians.
"""

from __future__ import annotations

import argparse
import http.server
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_overhead import DATA, free_port, measured, simulator, timed

#: Mode -> (what the worker turns on, extra environment).
MODES: dict[str, tuple[str, dict[str, str]]] = {
    "off": ("off", {}),
    "otlp": ("otlp", {}),
    "otlp 10%": ("otlp", {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}),
    "otlp metrics": ("otlp", {"OTEL_TRACES_EXPORTER": "none"}),
    "prometheus": ("prometheus", {}),
}


@contextmanager
def otlp_sink() -> Any:
    """An OTLP/HTTP receiver in its own process that answers 200 to everything; yields its URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--sink", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def sink(port: int) -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def worker(url: str, db: str, concurrency: int, terms: int, output: str, mode: str) -> None:
    import asyncio

    from flashcard_pipeline.cli.progress import ConsoleReporter  # noqa: F401 - what the CLI imports too
    from flashcard_pipeline.runner import ProcessOptions, process

    extra: dict[str, Any] = {}
    if mode == "otlp":
        extra["telemetry"] = "otlp"
    elif mode == "prometheus":
        extra["metrics_port"] = free_port()
    options = ProcessOptions(input_path=DATA, output=Path(output), provider="openai-compatible", base_url=url,
                             model="gpt-4o-mini", db_url=db, concurrency=concurrency, limit=terms, rpm=1_000_000,
                             **extra)
    if mode != "off":  # the exporters' modules, like the pipeline's, are imported before the clock starts
        import flashcard_pipeline.telemetry  # noqa: F401
    from flashcard_pipeline.korean.analyzer import morphemes

    morphemes("학교")  # the content checks' model loads once per process (2 s): not what is measured here
    with timed():
        result = asyncio.run(process(options))
    assert result.outcome is not None and result.outcome.stats.done == terms, result


def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-telemetry-") as folder_name, simulator() as url, \
            otlp_sink() as sink_url:
        folder = Path(folder_name)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RL_", "CB_", "RETRY_", "CACHE_", "DB_", "OTEL_", "FLASHCARD_"))}
        env.update(XDG_DATA_HOME=str(folder / "data"), OTEL_EXPORTER_OTLP_ENDPOINT=sink_url)
        modes = [(mode, worker_mode, {**env, **extra}) for mode, (worker_mode, extra) in MODES.items()]
        if args.baseline_src:
            modes.append(("off (baseline)", "off", {**env, "PYTHONPATH": str(Path(args.baseline_src).resolve())}))
        print(f"{args.terms} terms ({2 * args.terms} calls) per run, {args.repeats} repeats; simulator {url}")
        print(f"{'concurrency':>11} {'mode':>15} {'items/s best':>12} {'median':>8} {'CPU ms/item':>12}")
        for concurrency in args.concurrency:
            samples: dict[str, list[tuple[float, float]]] = {mode: [] for mode, _, _ in modes}
            for repeat in range(args.repeats):
                for number, (mode, worker_mode, mode_env) in enumerate(modes):
                    db = folder / f"ledger-{concurrency}-{repeat}-{number}.db"
                    samples[mode].append(measured(
                        [sys.executable, __file__, "--worker", url, f"sqlite:///{db}", str(concurrency),
                         str(args.terms), str(folder / "cards.jsonl"), worker_mode], mode_env))
            medians = {}
            for mode, runs in samples.items():
                rates = [args.terms / wall for wall, _ in runs]
                medians[mode] = statistics.median(rates)
                cpu = statistics.median(1000 * cpu / args.terms for _, cpu in runs)
                print(f"{concurrency:>11} {mode:>15} {max(rates):>12.1f} {medians[mode]:>8.1f} {cpu:>12.2f}")
            for mode in medians:
                if mode != "off":
                    print(f"{concurrency:>11} {'ratio':>15} {mode}/off: items/s {medians[mode] / medians['off']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--terms", type=int, default=500)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline-src", help="another checkout's src/ to run `off` on as well")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--sink", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        sink(args.sink)
    elif args.worker:
        url, db, concurrency, terms, output, mode = args.worker
        worker(url, db, int(concurrency), int(terms), output, mode)
    else:
        run(args)


if __name__ == "__main__":
    main()
