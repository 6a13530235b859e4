"""The server's Prometheus metrics, kept by prometheus_client in a registry per `Metrics`
(one per app: two apps in one process, as in the tests, never share counts).

The engine and the app call the methods below; /metrics serves `render()`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.utils import floatToGoString

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Paths reported as themselves; anything else is counted as "other" (bounded label values).
KNOWN_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/moderations", "/v1/models", "/health", "/metrics")


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in the text format (CONTENT_TYPE), written as prometheus_client's
    generate_latest writes it but for two things llmctl has always done: labels keep their
    declared order ({rail=...,action=...}; generate_latest sorts them), and there are no
    `_created` samples (prometheus_client's own switch, disable_created_metrics(), turns
    them off for every registry in the process, other libraries' included)."""
    lines = []
    for metric in registry.collect():
        name = metric.name + "_total" if metric.type == "counter" else metric.name
        help_ = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {metric.type}"]
        for s in metric.samples:
            if s.name == metric.name + "_created":
                continue
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in s.labels.items())
            lines.append(f"{s.name}{{{labels}}} {floatToGoString(s.value)}" if labels else f"{s.name} {floatToGoString(s.value)}")
    return ("\n".join(lines) + "\n").encode()


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        # Counter names end in _total (prometheus_client keeps it so, and adds it if missing).
        self.requests = Counter("llmctl_requests_total", "HTTP requests by path and status.", ["path", "status"], registry=r)
        self.errors = Counter("llmctl_errors_total", "Requests answered with a 4xx or 5xx status.", registry=r)
        self.tokens = Counter("llmctl_tokens_generated_total", "Completion tokens generated (including those of cancelled requests).", registry=r)
        self.forwards = Counter(
            "llmctl_forward_passes_total", "Model forward passes (prefills and decoding steps); tokens per pass shows batching at work.", registry=r,
        )
        self.prompt_tokens = Counter("llmctl_prompt_tokens_total", "Prompt tokens accepted.", registry=r)
        self.queue = Gauge("llmctl_queue_depth", "Sequences waiting for a slot in the running batch.", registry=r)
        self.running = Gauge("llmctl_running_sequences", "Sequences in the running batch.", registry=r)
        self.latency = Histogram(
            "llmctl_request_latency_seconds", "Latency of successful completion requests (to the last byte).", buckets=LATENCY_BUCKETS, registry=r,
        )
        self.interventions = Counter(
            "llmctl_safety_interventions_total", "Safety rail interventions (flag, redact, block) by rail and action.", ["rail", "action"], registry=r,
        )

    def request(self, path: str, status: int, seconds: float | None = None) -> None:
        """Count a finished request; `seconds` (successful generations) feeds the histogram."""
        self.requests.labels(path if path in KNOWN_PATHS else "other", str(status)).inc()
        if status >= 400:
            self.errors.inc()
        if seconds is not None:
            self.latency.observe(seconds)

    def add_tokens(self, n: int) -> None:
        if n:
            self.tokens.inc(n)

    def add_forward(self) -> None:
        self.forwards.inc()

    def add_prompt_tokens(self, n: int) -> None:
        self.prompt_tokens.inc(n)

    def safety(self, event: dict) -> None:
        """Count a safety rail's intervention (an event from llmctl.safety)."""
        self.interventions.labels(event["rail"], event["action"]).inc()

    def set_queue(self, n: int) -> None:
        self.queue.set(n)

    def set_running(self, n: int) -> None:
        self.running.set(n)

    def render(self) -> bytes:
        """The Prometheus text exposition (CONTENT_TYPE) of this server's metrics."""
        return exposition(self.registry)
