"""Prometheus metrics under TF Serving's names (util/prometheus_exporter.cc exports them with the
leading ':' of its metric paths), shared by the REST and gRPC front ends."""

import time

import prometheus_client as prom

REGISTRY = prom.CollectorRegistry()
REQUEST_COUNT = prom.Counter(":tensorflow:serving:request_count", "Requests by model and status.",
                             ["model_name", "status"], registry=REGISTRY)
REQUEST_LATENCY = prom.Histogram(":tensorflow:serving:request_latency", "Request latency in microseconds.",
                                 ["model_name", "API", "entrypoint"], registry=REGISTRY,
                                 buckets=[100 * 1.8 ** i for i in range(20)])
RUNTIME_LATENCY = prom.Histogram(":tensorflow:serving:runtime_latency", "Model call latency in microseconds.",
                                 ["model_name", "API", "runtime"], registry=REGISTRY,
                                 buckets=[50 * 1.8 ** i for i in range(20)])
BATCH_SIZE = prom.Histogram(":tensorflow:serving:batching_session:processed_batch_size",
                            "Rows per model call when batching is on.", ["signature"], registry=REGISTRY,
                            buckets=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024])
# A model name is only a label value once the repository knows the model: a URL cannot add series.
UNKNOWN_MODEL = "(unknown)"


def record_request(model: str, known: bool, api: str, entrypoint: str, status: str, started: float) -> None:
    """One answered request (REST or GRPC entrypoint): its status count, and its latency if OK.
    `known`: the repository serves the model (else the name goes in as UNKNOWN_MODEL)."""
    name = model if known else UNKNOWN_MODEL
    REQUEST_COUNT.labels(name, status).inc()
    if status == "OK":
        REQUEST_LATENCY.labels(name, api, entrypoint).observe((time.perf_counter() - started) * 1e6)


def page() -> bytes:
    return prom.generate_latest(REGISTRY)


CONTENT_TYPE = prom.CONTENT_TYPE_LATEST
