"""deploy/: promtool accepts the Prometheus config and rules; the other files parse and agree with each other; and a
real Prometheus (Debian's package) scrapes a real simulated `process` run, after which every PromQL expression of
the Grafana dashboards and the rules returns data."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import UNDER_CI

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
RULES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
#: What the run exercises, so each alert's full expression (not only its signal) must hold at the end.
FIRING = {"FlashcardProviderErrorRate", "FlashcardCircuitOpen", "FlashcardRateLimited", "FlashcardBudgetNearlySpent"}


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        message = f"{name} not found: Debian's `prometheus` package provides it (.ci/run installs it)"
        if UNDER_CI:
            pytest.fail(message)
        pytest.skip(message)
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("make_dashboards", DEPLOY / "grafana" / "make_dashboards.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, expr) of every target of every dashboard file."""
    found = []
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text(encoding="utf-8"))["panels"]:
            found += [(f"{path.name}: {panel['title']}", target["expr"]) for target in panel["targets"]]
    return found


def rules() -> list[dict[str, Any]]:
    return [rule for path in RULES for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
            for rule in group["rules"]]


# -- static checks --------------------------------------------------------------------------------------------

def test_promtool_accepts_the_config_and_the_rules() -> None:
    promtool = tool("promtool")
    for command in (["check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                    ["check", "rules", *map(str, RULES)]):
        done = subprocess.run([promtool, *command], capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
    assert len(RULES) == 2


def test_the_dashboards_are_what_the_generator_writes() -> None:
    rendered = load_generator().rendered()
    on_disk = {p.name: p.read_text(encoding="utf-8") for p in (DEPLOY / "grafana" / "dashboards").glob("*.json")}
    assert on_disk == rendered, "run python deploy/grafana/make_dashboards.py"
    titles = {json.loads(text)["title"].split(": ")[1] for text in rendered.values()}
    assert titles == {"run overview", "provider latency", "errors", "rate limits and circuit breakers", "cache",
                      "database pool"}


def test_the_stack_files_parse_and_agree_with_each_other() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    assert set(compose["services"]) == {"otel-collector", "jaeger", "prometheus", "grafana"}
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), f"compose mounts {source}, which is missing"
    collector = yaml.safe_load((DEPLOY / "otel-collector" / "config.yaml").read_text(encoding="utf-8"))
    pipelines = collector["service"]["pipelines"]
    for pipeline in pipelines.values():
        assert pipeline["processors"][0] == "memory_limiter" and pipeline["processors"][-1] == "batch"
        assert set(pipeline["processors"]) <= set(collector["processors"])
        assert set(pipeline["exporters"]) <= set(collector["exporters"])
    assert "tail_sampling" in pipelines["traces"]["processors"]
    policies = collector["processors"]["tail_sampling"]["policies"]
    assert {"type": "status_code", "status_code": {"status_codes": ["ERROR"]}}.items() <= \
        {k: v for p in policies if p["type"] == "status_code" for k, v in p.items()}.items()
    assert collector["exporters"]["otlp/jaeger"]["endpoint"].startswith("jaeger:")
    metrics_port = collector["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1]
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
    targets = {t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert f"otel-collector:{metrics_port}" in targets
    sources = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "datasources.yml")
                             .read_text(encoding="utf-8"))["datasources"]
    uids = {source["uid"]: source["url"] for source in sources}
    assert uids["prometheus"] == "http://prometheus:9090" and uids["jaeger"].startswith("http://jaeger:")
    for path in (DEPLOY / "grafana" / "dashboards").glob("*.json"):
        for panel in json.loads(path.read_text(encoding="utf-8"))["panels"]:
            assert panel["datasource"]["uid"] in uids and panel["targets"] and panel["description"]
    names = {rule.get("alert") for rule in rules()} - {None}
    assert names == FIRING | {"FlashcardProviderLatencyHigh"}
    for rule in rules():
        if "alert" in rule:
            assert re.fullmatch(r"(?s)(.+)\s>\s*[0-9.]+\s*", rule["expr"]), f"{rule['alert']}: not signal > threshold"
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]


# -- a real Prometheus against a real run ---------------------------------------------------------------------

class PrometheusServer:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr, time=f"{at:.3f}")
        return list(data["result"])


@contextlib.contextmanager
def prometheus(tmp_path: Path, scrape_port: int) -> Iterator[PrometheusServer]:
    binary = tool("prometheus")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
        "rule_files": [str(path) for path in RULES],
        "scrape_configs": [{"job_name": "flashcard-pipeline",
                            "static_configs": [{"targets": [f"127.0.0.1:{scrape_port}"]}]}],
    }), encoding="utf-8")
    log = (tmp_path / "prometheus.log").open("wb")
    server = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                               f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                              stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError((tmp_path / "prometheus.log").read_text()) from None
                time.sleep(0.1)
        yield PrometheusServer(url)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def word_list(path: Path, count: int) -> Path:
    path.write_text("position,term\n" + "".join(f"{i},단어{i}\n" for i in range(1, count + 1)), encoding="utf-8")
    return path


def cli(*args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "flashcard_pipeline", *args], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_a_real_prometheus_scrapes_a_run_and_every_dashboard_and_rule_expression_returns_data(
        tmp_path: Path) -> None:
    words = word_list(tmp_path / "words.csv", 90)
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    # The first 10 words answered once before, so the watched run has cache hits too.
    warm = cli("process", str(words), "--provider", "simulated", "--limit", "10", "--db", db, "-o",
               str(tmp_path / "warm.jsonl"), env={})
    assert warm.wait(timeout=120) == 0, warm.stdout.read() if warm.stdout else ""
    metrics_port = free_port()
    # The alert is under test, not the trip rule: the plain ratio (no confidence bound) opens the circuit on a
    # quarter of calls failing, so the run really has an open circuit for the alert to see; each break outlasts two
    # scrapes (a break shorter than the scrape interval can fall between two of them, unseen).
    faults = {"CB_CONFIDENCE": "0", "CB_MIN_THROUGHPUT": "6", "CB_FAILURE_RATIO": "0.2", "CB_SAMPLING_DURATION": "5",
              "CB_BREAK_DURATION": "2.5", "CB_MAX_BREAK_DURATION": "2.5", "RETRY_INITIAL_DELAY": "0.05",
              "RETRY_MAX_ATTEMPTS": "4"}
    with prometheus(tmp_path, metrics_port) as server:
        run = cli("process", str(words), "--provider", "simulated", "--db", db, "-o", str(tmp_path / "cards.jsonl"),
                  "--metrics-port", str(metrics_port), "--concurrency", "4", "--max-cost", "0.035",
                  "--sim", "latency=0.05", "--sim", "requests_per_minute=900", "--sim", "server_error_rate=0.25",
                  "--sim", "rate_limit_rate=0.08", "--sim", "seed=5", env=faults)
        started = time.time()
        output = run.communicate(timeout=240)[0].decode()
        ended = time.time()
        assert run.returncode == 3 and "budget of $0.0350 reached" in output, output  # it ran to its budget
        # The last moment Prometheus saw the run alive: every expression is evaluated there.
        time.sleep(1.5)
        series = server.get("/api/v1/query_range", query='up{job="flashcard-pipeline"} == 1', start=started,
                            end=ended + 1, step="1")["result"]
        assert series, "Prometheus never scraped the run"
        seen = [float(stamp) for stamp, _ in series[0]["values"]]
        assert len(seen) >= 8, f"only {len(seen)} scrapes in {ended - started:.1f}s: the run was too short"
        at = max(seen)
        empty = [(where, expr) for where, expr in dashboard_queries()
                 if not server.query(expr.replace("$__rate_interval", "1m"), at)]
        assert not empty, f"dashboard queries without data: {empty}"
        for rule in rules():
            name = rule.get("record") or rule["alert"]
            expr = rule["expr"]
            if "alert" in rule:
                signal = re.fullmatch(r"(?s)(.+)\s>\s*[0-9.]+\s*", expr).group(1)  # type: ignore[union-attr]
                assert server.query(signal, at), f"{name}: its signal has no data"
                if name in FIRING:
                    assert server.query(expr, at), f"{name} does not fire on a run that should fire it"
            else:
                assert server.query(expr, at), f"{name}: no data"
                assert server.query(rule["record"], at), f"{name}: Prometheus did not record it"
