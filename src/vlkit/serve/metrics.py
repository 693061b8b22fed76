"""What ``GET /metrics`` reports, in Prometheus' text exposition format (version 0.0.4), without a client library:
requests by endpoint and status, errors by endpoint and code, a latency histogram per endpoint, the batch sizes of
the micro-batchers, and gauges read at scrape time (queue depths, generation state, generated tokens per second).

All counters live in one process and are updated from the event loop and the batchers' worker threads, hence the lock.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable

# Seconds; wide enough for a tiny CLIP embedding (milliseconds) and a long NeVA answer (a minute).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKENS_WINDOW_S = 30.0  # generated tokens/s is averaged over this trailing window


class Histogram:
    """Cumulative bucket counts, sum and count of observations, per label value."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts: dict[str, list[int]] = defaultdict(lambda: [0] * (len(buckets) + 1))
        self.sums: dict[str, float] = defaultdict(float)

    def observe(self, label: str, value: float) -> None:
        counts = self.counts[label]
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                counts[i] += 1
        counts[-1] += 1  # +Inf, and the count
        self.sums[label] += value

    def lines(self, name: str, label_name: str) -> list[str]:
        out = []
        for label, counts in sorted(self.counts.items()):
            for bound, n in zip((*self.buckets, "+Inf"), counts):
                out.append(f'{name}_bucket{{{label_name}="{label}",le="{bound}"}} {n}')
            out.append(f'{name}_sum{{{label_name}="{label}"}} {self.sums[label]:.6f}')
            out.append(f'{name}_count{{{label_name}="{label}"}} {counts[-1]}')
        return out


class Metrics:
    """The server's counters; :meth:`render` is the body of ``GET /metrics``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.errors: dict[tuple[str, str], int] = defaultdict(int)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batch_sizes = Histogram(BATCH_BUCKETS)
        self.generated_tokens = 0
        self._token_times: deque[tuple[float, int]] = deque()  # (time, tokens) of finished answers
        self.gauges: dict[str, Callable[[], dict[str, float]]] = {}  # name -> {label value: value} at scrape time
        self.started = time.time()

    def request_done(self, endpoint: str, status: int, seconds: float, code: str | None = None) -> None:
        with self._lock:
            self.requests[endpoint, status] += 1
            self.latency.observe(endpoint, seconds)
            if status >= 400:
                self.errors[endpoint, code or str(status)] += 1

    def error_in_stream(self, endpoint: str, code: str) -> None:
        """A streamed answer that failed after its 200 was sent: an error, not another request."""
        with self._lock:
            self.errors[endpoint, code] += 1

    def batch_done(self, queue: str, size: int) -> None:
        with self._lock:
            self.batch_sizes.observe(queue, size)

    def tokens_generated(self, n: int) -> None:
        with self._lock:
            self.generated_tokens += n
            self._token_times.append((time.monotonic(), n))

    def tokens_per_second(self) -> float:
        """Tokens of the answers finished in the last TOKENS_WINDOW_S seconds, per second of that window (or of the
        uptime, when shorter)."""
        now = time.monotonic()
        with self._lock:
            while self._token_times and self._token_times[0][0] < now - TOKENS_WINDOW_S:
                self._token_times.popleft()
            tokens = sum(n for _, n in self._token_times)
        return tokens / max(min(TOKENS_WINDOW_S, time.time() - self.started), 1e-3)

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP vlkit_requests_total HTTP requests answered, by endpoint and status.",
                     "# TYPE vlkit_requests_total counter"]  # fmt: skip
            lines += [f'vlkit_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]  # fmt: skip
            lines += ["# HELP vlkit_errors_total Requests answered with an error (4xx/5xx), by endpoint and code.",
                      "# TYPE vlkit_errors_total counter"]  # fmt: skip
            lines += [f'vlkit_errors_total{{endpoint="{e}",code="{c}"}} {n}'
                      for (e, c), n in sorted(self.errors.items())]  # fmt: skip
            lines += ["# HELP vlkit_request_duration_seconds Time to the response's start (streams: the first byte).",
                      "# TYPE vlkit_request_duration_seconds histogram"]  # fmt: skip
            lines += self.latency.lines("vlkit_request_duration_seconds", "endpoint")
            lines += ["# HELP vlkit_batch_size Items per forward pass of the micro-batchers.",
                      "# TYPE vlkit_batch_size histogram"]  # fmt: skip
            lines += self.batch_sizes.lines("vlkit_batch_size", "queue")
            lines += ["# HELP vlkit_generated_tokens_total Tokens generated in chat answers.",
                      "# TYPE vlkit_generated_tokens_total counter",
                      f"vlkit_generated_tokens_total {self.generated_tokens}"]  # fmt: skip
        lines += ["# HELP vlkit_generated_tokens_per_second Generated tokens per second over the last 30 s.",
                  "# TYPE vlkit_generated_tokens_per_second gauge",
                  f"vlkit_generated_tokens_per_second {self.tokens_per_second():.3f}"]  # fmt: skip
        for name, read in sorted(self.gauges.items()):
            metric, _, label_name = name.partition(":")
            lines += [f"# TYPE {metric} gauge"]
            for label, value in sorted(read().items()):
                lines.append(f'{metric}{{{label_name}="{label}"}} {value}' if label_name else f"{metric} {value}")
        return "\n".join(lines) + "\n"
