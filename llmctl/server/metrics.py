"""Server counters in the Prometheus text exposition format (version 0.0.4), no dependency."""

from __future__ import annotations

import threading

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Paths reported as themselves; anything else is counted as "other" (bounded label values).
KNOWN_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/moderations", "/v1/models", "/health", "/metrics")


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.tokens = 0
        self.forwards = 0
        self.prompt_tokens = 0
        self.queue = 0
        self.running = 0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.lat_sum = 0.0
        self.lat_count = 0
        self.interventions: dict[tuple[str, str], int] = {}

    def request(self, path: str, status: int, seconds: float | None = None) -> None:
        """Count a finished request; `seconds` (successful generations) feeds the histogram."""
        path = path if path in KNOWN_PATHS else "other"
        with self.lock:
            self.requests[(path, status)] = self.requests.get((path, status), 0) + 1
            if seconds is not None:
                i = next((k for k, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))
                self.buckets[i] += 1
                self.lat_sum += seconds
                self.lat_count += 1

    def add_tokens(self, n: int) -> None:
        if n:
            with self.lock:
                self.tokens += n

    def add_forward(self) -> None:
        with self.lock:
            self.forwards += 1

    def add_prompt_tokens(self, n: int) -> None:
        with self.lock:
            self.prompt_tokens += n

    def safety(self, event: dict) -> None:
        """Count a safety rail's intervention (an event from llmctl.safety)."""
        key = (event["rail"], event["action"])
        with self.lock:
            self.interventions[key] = self.interventions.get(key, 0) + 1

    def set_queue(self, n: int) -> None:
        self.queue = n

    def set_running(self, n: int) -> None:
        self.running = n

    def render(self) -> str:
        def block(name: str, kind: str, help_: str, rows: list[str]) -> list[str]:
            return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *rows]

        with self.lock:
            req_rows = [f'llmctl_requests_total{{path="{p}",status="{s}"}} {n}' for (p, s), n in sorted(self.requests.items())]
            errors = sum(n for (_, s), n in self.requests.items() if s >= 400)
            hist, acc = [], 0
            for b, n in zip(LATENCY_BUCKETS, self.buckets):
                acc += n
                hist.append(f'llmctl_request_latency_seconds_bucket{{le="{b}"}} {acc}')
            acc += self.buckets[-1]
            hist += [
                f'llmctl_request_latency_seconds_bucket{{le="+Inf"}} {acc}',
                f"llmctl_request_latency_seconds_sum {self.lat_sum:.6f}",
                f"llmctl_request_latency_seconds_count {self.lat_count}",
            ]
            safety_rows = [f'llmctl_safety_interventions_total{{rail="{r}",action="{a}"}} {n}' for (r, a), n in sorted(self.interventions.items())]
            lines = (
                block("llmctl_requests_total", "counter", "HTTP requests by path and status.", req_rows)
                + block("llmctl_errors_total", "counter", "Requests answered with a 4xx or 5xx status.", [f"llmctl_errors_total {errors}"])
                + block("llmctl_tokens_generated_total", "counter", "Completion tokens generated (including those of cancelled requests).", [f"llmctl_tokens_generated_total {self.tokens}"])
                + block("llmctl_forward_passes_total", "counter", "Model forward passes (prefills and decoding steps); tokens per pass shows batching at work.", [f"llmctl_forward_passes_total {self.forwards}"])
                + block("llmctl_prompt_tokens_total", "counter", "Prompt tokens accepted.", [f"llmctl_prompt_tokens_total {self.prompt_tokens}"])
                + block("llmctl_queue_depth", "gauge", "Sequences waiting for a slot in the running batch.", [f"llmctl_queue_depth {self.queue}"])
                + block("llmctl_running_sequences", "gauge", "Sequences in the running batch.", [f"llmctl_running_sequences {self.running}"])
                + block("llmctl_request_latency_seconds", "histogram", "Latency of successful completion requests (to the last byte).", hist)
                + block("llmctl_safety_interventions_total", "counter", "Safety rail interventions (flag, redact, block) by rail and action.", safety_rows)
            )
        return "\n".join(lines) + "\n"
