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

Then the floor: what the OpenTelemetry SDK itself charges, measured in this process (a span started and ended
through the batch processor and encoded to OTLP protobuf, with no attribute and per attribute; a histogram
measurement), times what an `otlp` run sends per item (the sink decodes every export and counts spans and span
attributes). That is the least any code using the SDK pays for those spans, as a share of `off`'s CPU per item.
"""

from __future__ import annotations

import argparse
import collections
import http.server
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_overhead import DATA, free_port, measured, simulator, timed, warm_content_checks

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
    """Accepts every export; counts the spans and span attributes of trace exports (GET /count reads and resets)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    counted = [0, 0]
    names: collections.Counter[str] = collections.Counter()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"spans": counted[0], "attributes": counted[1], "names": names}).encode()
            counted[:] = [0, 0]
            names.clear()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path.endswith("/v1/traces"):
                request = ExportTraceServiceRequest.FromString(data)
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        counted[0] += len(scope.spans)
                        counted[1] += sum(len(span.attributes) for span in scope.spans)
                        names.update(span.name.split()[0] for span in scope.spans)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()  # one thread: the counts add up


def sent(sink_url: str) -> dict[str, Any]:
    """What the sink counted since the last call."""
    with urllib.request.urlopen(f"{sink_url}/count", timeout=10) as answer:
        return json.loads(answer.read())  # type: ignore[no-any-return]


def sdk_costs(count: int = 20_000) -> dict[str, float]:
    """Microseconds of CPU the SDK takes, in this process: per span (batch processor and OTLP encoding included),
    per span attribute, per histogram measurement and per measurement attribute."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Encoding(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            encode_spans(spans).SerializeToString()
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Encoding(), max_queue_size=count + 1))
    tracer = provider.get_tracer("floor")
    histogram = MeterProvider(metric_readers=[InMemoryMetricReader()]).get_meter("floor").create_histogram("h")
    eight = {f"attribute.{n}": f"value {n}" for n in range(8)}

    def cost(work: Any) -> float:
        cpu = time.process_time()
        work()
        provider.force_flush()
        return 1e6 * (time.process_time() - cpu) / count

    bare = min(cost(lambda: [tracer.start_span("s").end() for _ in range(count)]) for _ in range(3))
    with_eight = min(cost(lambda: [tracer.start_span("s", attributes=eight).end() for _ in range(count)])
                     for _ in range(3))
    measurement = min(cost(lambda: [histogram.record(1.0) for _ in range(count)]) for _ in range(3))
    measured_eight = min(cost(lambda: [histogram.record(1.0, eight) for _ in range(count)]) for _ in range(3))
    provider.shutdown()
    return {"span": bare, "span attribute": (with_eight - bare) / 8, "measurement": measurement,
            "measurement attribute": (measured_eight - measurement) / 8}


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
    if mode != "off":  # telemetry's modules, like the pipeline's, are imported before the clock starts
        import opentelemetry.exporter.otlp.proto.http.metric_exporter
        import opentelemetry.exporter.otlp.proto.http.trace_exporter
        import opentelemetry.exporter.prometheus
        import opentelemetry.instrumentation.sqlalchemy.engine  # noqa: F401

        import flashcard_pipeline.telemetry  # noqa: F401
    warm_content_checks()  # what a run loads once per process (1.3 s): not what is measured here
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
        exported: list[dict[str, Any]] = []
        floors: list[tuple[int, float, float]] = []
        for concurrency in args.concurrency:
            samples: dict[str, list[tuple[float, float]]] = {mode: [] for mode, _, _ in modes}
            for repeat in range(args.repeats):
                for number, (mode, worker_mode, mode_env) in enumerate(modes):
                    db = folder / f"ledger-{concurrency}-{repeat}-{number}.db"
                    sent(sink_url)
                    samples[mode].append(measured(
                        [sys.executable, __file__, "--worker", url, f"sqlite:///{db}", str(concurrency),
                         str(args.terms), str(folder / "cards.jsonl"), worker_mode], mode_env))
                    if mode == "otlp":
                        exported.append(sent(sink_url))
            medians, cpus = {}, {}
            for mode, runs in samples.items():
                rates = [args.terms / wall for wall, _ in runs]
                medians[mode] = statistics.median(rates)
                cpus[mode] = statistics.median(1000 * cpu / args.terms for _, cpu in runs)
                print(f"{concurrency:>11} {mode:>15} {max(rates):>12.1f} {medians[mode]:>8.1f} {cpus[mode]:>12.2f}")
            for mode in medians:
                if mode != "off":
                    print(f"{concurrency:>11} {'ratio':>15} {mode}/off: items/s {medians[mode] / medians['off']:.3f}")
            floors.append((concurrency, cpus["off"], cpus["otlp"]))
    costs = sdk_costs()
    spans = statistics.median(counts["spans"] / args.terms for counts in exported)
    attributes = statistics.median(counts["attributes"] / args.terms for counts in exported)
    floor_ms = (spans * costs["span"] + attributes * costs["span attribute"]) / 1000
    print("SDK cost, us of CPU: " + ", ".join(f"{name} {value:.1f}" for name, value in costs.items()))
    print(f"an otlp run exports {spans:.1f} spans and {attributes:.1f} span attributes per item: "
          f"a floor of {floor_ms:.2f} ms of CPU per item for its spans alone")
    kinds: collections.Counter[str] = collections.Counter()
    for counts in exported:
        kinds.update(counts["names"])
    print("spans per item by name: " + ", ".join(f"{name} {count / len(exported) / args.terms:.2f}"
                                                  for name, count in kinds.most_common()))
    for concurrency, off_cpu, otlp_cpu in floors:
        print(f"{concurrency:>11} off {off_cpu:.2f} ms/item, otlp {otlp_cpu:.2f} (+{otlp_cpu - off_cpu:.2f}); "
              f"the floor is {100 * floor_ms / off_cpu:.1f}% of off's CPU")


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
