"""The SDK's providers for a :class:`TelemetrySettings`: resource, exporters, readers, the Prometheus endpoint.

The SDK reads the standard variables itself: the OTLP exporters OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]ENDPOINT,
_HEADERS, _TIMEOUT, _COMPRESSION and _CERTIFICATE; the tracer provider OTEL_TRACES_SAMPLER and _ARG; the batch
processor OTEL_BSP_*; the metric reader OTEL_METRIC_EXPORT_INTERVAL and _TIMEOUT; the resource OTEL_SERVICE_NAME
and OTEL_RESOURCE_ATTRIBUTES. ``config.telemetry_settings`` has already chosen exporters and protocol from the rest.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

from opentelemetry.sdk.metrics import (
    AlwaysOffExemplarFilter,
    AlwaysOnExemplarFilter,
    ExemplarFilter,
    MeterProvider,
    TraceBasedExemplarFilter,
)
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from flashcard_pipeline.config import OtlpProtocol, TelemetrySettings
from flashcard_pipeline.errors import ConfigurationError

SERVICE = "flashcard-pipeline"
EXEMPLAR_FILTERS: dict[str, type[ExemplarFilter]] = {
    "always_off": AlwaysOffExemplarFilter, "always_on": AlwaysOnExemplarFilter, "trace_based": TraceBasedExemplarFilter}


def package_version() -> str:
    try:
        return version("flashcard-pipeline")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


def resource() -> Resource:
    """OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME over our defaults: service ``flashcard-pipeline``, its
    version, and one instance id per process (so several workers' series stay apart)."""
    ours = Resource({SERVICE_NAME: SERVICE, SERVICE_VERSION: package_version(),
                     SERVICE_INSTANCE_ID: f"{socket.gethostname()}:{os.getpid()}"})
    detected = Resource.create()
    if str(detected.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        detected = Resource({k: v for k, v in detected.attributes.items() if k != SERVICE_NAME})
    return ours.merge(detected)


def _missing_grpc(signal: str) -> ConfigurationError:
    return ConfigurationError(f"OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs the gRPC exporter for {signal}: "
                              "pip install opentelemetry-exporter-otlp-proto-grpc, or use http/protobuf "
                              "(the Collector's port 4318)")


def span_exporter(kind: str, protocol: OtlpProtocol) -> SpanExporter:
    if kind == "console":
        return ConsoleSpanExporter()
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpans
        except ImportError:
            raise _missing_grpc("traces") from None
        return GrpcSpans()  # type: ignore[no-any-return]
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def metric_exporter(kind: str, protocol: OtlpProtocol) -> MetricExporter:
    if kind == "console":
        return ConsoleMetricExporter()
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetrics
        except ImportError:
            raise _missing_grpc("metrics") from None
        return GrpcMetrics()  # type: ignore[no-any-return]
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    return OTLPMetricExporter()


@dataclass
class Providers:
    """What a session exports through; ``close`` flushes and stops everything (the last metrics included)."""

    tracer_provider: TracerProvider | None
    meter_provider: MeterProvider | None
    #: Where Prometheus scrapes, when serving.
    metrics_url: str | None = None
    closers: list[Callable[[], object]] = field(default_factory=list)

    def close(self) -> None:
        for close in self.closers:
            close()
        self.closers.clear()


def build(settings: TelemetrySettings) -> Providers:
    """The providers ``settings`` ask for; a port Prometheus cannot be served on is a usage error."""
    shared = resource()
    tracer_provider = None
    if settings.traces != "none":
        tracer_provider = TracerProvider(resource=shared)  # the sampler from OTEL_TRACES_SAMPLER
        tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter(settings.traces, settings.traces_protocol)))
    readers: list[MetricReader] = []
    if settings.metrics != "none":
        readers.append(PeriodicExportingMetricReader(metric_exporter(settings.metrics, settings.metrics_protocol)))
    providers = Providers(tracer_provider, None)
    if settings.metrics_port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry()
        try:
            server, thread = start_http_server(settings.metrics_port, settings.metrics_host, registry=registry)
        except OSError as exc:
            raise ConfigurationError(f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: "
                                     f"{exc.strerror or exc}") from exc
        readers.append(PrometheusMetricReader(registry=registry))
        providers.metrics_url = f"http://{settings.metrics_host}:{server.server_port}/metrics"

        def stop_serving() -> None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

        providers.closers.append(stop_serving)
    if readers:
        providers.meter_provider = MeterProvider(resource=shared, metric_readers=readers,
                                                 exemplar_filter=EXEMPLAR_FILTERS[settings.exemplar_filter]())
        # Flushed before the endpoint stops, so a last export carries the run's final figures.
        providers.closers.insert(0, providers.meter_provider.shutdown)
    if tracer_provider is not None:
        providers.closers.insert(0, tracer_provider.shutdown)
    return providers
