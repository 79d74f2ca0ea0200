"""Writes the Grafana dashboards in dashboards/ from the panels below (run it after changing one):

    python deploy/grafana/make_dashboards.py

tests/test_prometheus.py checks the files are what this writes, and evaluates every expression against a real
scraped run. docs/observability.md says what each panel shows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
RATE = "$__rate_interval"
CALLS = "gen_ai_client_operation_duration_seconds"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 12


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


def quantiles(by: str, selector: str = "") -> tuple[Query, ...]:
    return tuple(Query(f"histogram_quantile({q}, sum by (le, {by}) (rate({CALLS}_bucket{selector}[{RATE}])))",
                       f"p{int(q * 100)} {{{{{by}}}}}") for q in (0.5, 0.95, 0.99))


DASHBOARDS = (
    Dashboard("flashcard-run", "Flashcard pipeline: run overview", "Progress, throughput and spend of the runs.", (
        Panel("Items by state", "The run's items: total, done, failed, in flight, flagged for review.",
              (Query("sum by (flashcard_run_id, flashcard_item_state) (flashcard_run_items)",
                     "run {{flashcard_run_id}} {{flashcard_item_state}}"),)),
        Panel("Progress", "Share of the run's items done.",
              (Query('sum by (flashcard_run_id) (flashcard_run_items{flashcard_item_state="done"}) / '
                     'sum by (flashcard_run_id) (flashcard_run_items{flashcard_item_state="total"})',
                     "run {{flashcard_run_id}}"),), unit="percentunit", kind="stat", width=6),
        Panel("Spent", "US dollars the run has spent, earlier invocations included (simulated runs: what the "
              "model would have cost).", (Query("sum by (flashcard_run_id) (flashcard_run_cost_usd)",
                                                "run {{flashcard_run_id}}"),), unit="currencyUSD", kind="stat",
              width=6),
        Panel("Items finished per minute", "Items done and failed per minute.",
              (Query(f"sum by (flashcard_outcome) (rate(flashcard_items_total[{RATE}])) * 60",
                     "{{flashcard_outcome}}"),)),
        Panel("Provider calls per second", "Calls by stage and outcome (ok, error).",
              (Query(f"sum by (flashcard_stage, flashcard_outcome) (rate({CALLS}_count[{RATE}]))",
                     "{{flashcard_stage}} {{flashcard_outcome}}"),), unit="reqps"),
        Panel("Tokens per second", "Input and output tokens the provider counted.",
              (Query(f"sum by (gen_ai_token_type) (rate(gen_ai_client_token_usage_sum[{RATE}]))",
                     "{{gen_ai_token_type}}"),)),
        Panel("Spend per hour", "US dollars per hour at the current pace.",
              (Query(f"sum by (gen_ai_request_model) (rate(flashcard_llm_cost_usd_total[{RATE}])) * 3600",
                     "{{gen_ai_request_model}}"),), unit="currencyUSD"),
        Panel("Budget used", "Share of --max-cost spent (runs with a budget); the alert fires at 80%.",
              (Query("flashcard:run_budget_used:ratio", "run {{flashcard_run_id}}"),), unit="percentunit"),
    )),
    Dashboard("flashcard-latency", "Flashcard pipeline: provider latency", "How long provider calls take.", (
        Panel("Call duration by model", "p50, p95 and p99 of every call (errors included).",
              quantiles("gen_ai_request_model"), unit="s", width=24),
        Panel("Call duration by stage", "p50, p95 and p99 per stage (nuance answers are shorter than cards).",
              quantiles("flashcard_stage"), unit="s"),
        Panel("Successful call duration", "p50, p95 and p99 of the calls that succeeded.",
              quantiles("gen_ai_request_model", '{flashcard_outcome="ok"}'), unit="s"),
        Panel("p95 over 5 minutes", "The recorded p95 the latency alert watches (30 s).",
              (Query("flashcard:gen_ai_latency_seconds:p95_5m", "{{gen_ai_request_model}}"),), unit="s"),
    )),
    Dashboard("flashcard-errors", "Flashcard pipeline: errors", "Failed calls by category and code, retries.", (
        Panel("Failed calls by category", "external_service (5xx, error bodies), network, timeout, rate_limit, "
              "invalid_response (bad JSON, schema, content checks), authentication, ...",
              (Query(f'sum by (flashcard_error_category) (rate({CALLS}_count{{flashcard_outcome="error"}}[{RATE}]))',
                     "{{flashcard_error_category}}"),), unit="reqps"),
        Panel("Failed calls by code", "error.type: the error's code (server_error, rate_limited, read_timeout, "
              "schema_violation, ...).",
              (Query(f'sum by (error_type) (rate({CALLS}_count{{flashcard_outcome="error"}}[{RATE}]))',
                     "{{error_type}}"),), unit="reqps"),
        Panel("Error ratio", "Share of calls that failed over 5 minutes; the alert fires above 10%.",
              (Query("flashcard:gen_ai_error_ratio:rate5m", "{{gen_ai_request_model}}"),), unit="percentunit"),
        Panel("Retry decisions", "retry (after a transient error, with back-off), reask (invalid answer, at "
              "once), give_up (budget spent, deadline, Retry-After beyond the cap).",
              (Query(f"sum by (flashcard_retry_action) (rate(flashcard_retries_total[{RATE}]))",
                     "{{flashcard_retry_action}}"),)),
        Panel("Items failed", "Items that failed this run (their last error is in `process`'s report).",
              (Query('sum by (gen_ai_request_model) (flashcard_items_total{flashcard_outcome="failed"}) or '
                     "sum by (gen_ai_request_model) (flashcard_items_total) * 0", "{{gen_ai_request_model}}"),),
              kind="stat"),
    )),
    Dashboard("flashcard-resilience", "Flashcard pipeline: rate limits and circuit breakers",
              "The limiter's limit, waits and pauses; 429s; the breakers' states.", (
        Panel("Planned limit per minute", "The rate limiter's limit for requests and tokens (configured, from "
              "headers, or found adaptively).",
              (Query("flashcard_ratelimit_limit", "{{flashcard_ratelimit_group}} {{flashcard_ratelimit_dimension}}"),)),
        Panel("Queue wait p95", "How long calls waited for their rate-limit slot.",
              (Query("histogram_quantile(0.95, sum by (le, flashcard_ratelimit_dimension) "
                     f"(rate(flashcard_ratelimit_wait_duration_seconds_bucket[{RATE}])))",
                     "{{flashcard_ratelimit_dimension}}"),), unit="s"),
        Panel("429 share", "Share of calls the provider refused for rate limits; the alert fires above 5%.",
              (Query("flashcard:gen_ai_429_ratio:rate5m", "{{gen_ai_request_model}}"),), unit="percentunit"),
        Panel("Pauses after 429s", "Seconds per second every caller was paused by 429s (1 = always paused).",
              (Query(f"sum by (flashcard_ratelimit_group) (rate(flashcard_ratelimit_pause_time_seconds_total[{RATE}]))",
                     "{{flashcard_ratelimit_group}}"),)),
        Panel("Circuit state", "1 marks each circuit's current state: closed (normal), open (calls wait), "
              "half_open (probing), isolated (held open by `breaker isolate`).",
              (Query("flashcard_circuit_state == 1", "{{flashcard_circuit}} {{flashcard_circuit_state}}"),)),
        Panel("Circuit transitions", "Changes of state per interval.",
              (Query("sum by (flashcard_circuit, flashcard_circuit_to) "
                     f"(increase(flashcard_circuit_transitions_total[{RATE}]))",
                     "{{flashcard_circuit}} to {{flashcard_circuit_to}}"),)),
    )),
    Dashboard("flashcard-cache", "Flashcard pipeline: cache", "Stage answers served without a call.", (
        Panel("Hit ratio by type", "Share of stage lookups answered by the cache (or by a call in flight for "
              "the same request); misses become provider calls.",
              (Query("flashcard:cache_hit_ratio:rate5m", "{{flashcard_cache_type}}"),), unit="percentunit"),
        Panel("Lookups per second", "Hits and misses by type (nuance: stage 1, cards: stage 2).",
              (Query("sum by (flashcard_cache_type, flashcard_cache_result) "
                     f"(rate(flashcard_cache_lookups_total[{RATE}]))",
                     "{{flashcard_cache_type}} {{flashcard_cache_result}}"),)),
    )),
    Dashboard("flashcard-pool", "Flashcard pipeline: database pool", "The ledger's connection pool and writes.", (
        Panel("Pool efficiency", "Share of checkouts served by an idle pooled connection (the plan's goal: 95%).",
              (Query("flashcard_db_pool_efficiency"),), unit="percentunit"),
        Panel("Mean checkout wait", "Seconds a checkout waited for a connection, on average.",
              (Query(f"rate(flashcard_db_pool_checkout_wait_time_seconds_total[{RATE}]) / "
                     f"rate(flashcard_db_pool_checkouts_total[{RATE}])"),), unit="s"),
        Panel("Connections", "Checked out, in overflow beyond the pool size, the peak, and the pool size.",
              (Query("flashcard_db_pool_connections", "{{flashcard_pool_state}}"),)),
        Panel("Ledger batch commit p95", "Seconds to commit one batch of ledger writes.",
              (Query("histogram_quantile(0.95, sum by (le) "
                     f"(rate(flashcard_ledger_batch_duration_seconds_bucket[{RATE}])))", "p95"),), unit="s"),
    )),
)


def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, object]:
    return {
        "id": panel_id, "type": panel.kind, "title": panel.title, "description": panel.description,
        "datasource": DATASOURCE, "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": q.expr,
                     "legendFormat": q.legend or "__auto"} for i, q in enumerate(panel.queries)],
    }


def dashboard_json(dashboard: Dashboard) -> dict[str, object]:
    panels, x, y = [], 0, 0
    for number, panel in enumerate(dashboard.panels, 1):
        if x + panel.width > 24:
            x, y = 0, y + 8
        panels.append(panel_json(panel, number, x, y))
        x += panel.width
    return {
        "uid": dashboard.uid, "title": dashboard.title, "description": dashboard.description,
        "tags": ["flashcard-pipeline"], "timezone": "browser", "schemaVersion": 39, "version": 1,
        "refresh": "10s", "time": {"from": "now-1h", "to": "now"}, "editable": True, "panels": panels,
        "templating": {"list": []}, "annotations": {"list": []},
    }


def rendered() -> dict[str, str]:
    """File name -> content of every dashboard."""
    return {f"{d.uid}.json": json.dumps(dashboard_json(d), indent=2, ensure_ascii=False) + "\n" for d in DASHBOARDS}


def main() -> None:
    folder = HERE / "dashboards"
    folder.mkdir(exist_ok=True)
    for name, content in rendered().items():
        (folder / name).write_text(content, encoding="utf-8")


if __name__ == "__main__":
    main()
