"""Server metrics in Prometheus' text exposition format (`GET /metrics`).

https://prometheus.io/docs/instrumenting/exposition_formats/ - one `# HELP` and `# TYPE`
line per metric family, then `name{label="value"} number` samples. Counters only grow;
gauges are read when scraped; the time-to-first-token histogram has cumulative buckets
(`_bucket{le="..."}`, `_sum`, `_count`).

The engine thread and the HTTP handlers both record here, so every update takes a lock.
"""

from __future__ import annotations

import threading
import time
from collections import deque

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds
DECODE_WINDOW = 10.0  # seconds of recent decode steps behind the tokens/s gauge


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}  # (route, status) -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.cancelled = 0  # requests whose client went away before the end
        self.decode_steps = 0
        self.decode_seconds = 0.0
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)  # per bucket, the last one is +Inf
        self.ttft_sum = 0.0
        self._recent_steps: deque[tuple[float, float, int]] = deque()  # (finished at, seconds, tokens)

    def request(self, route: str, status: int) -> None:
        with self._lock:
            key = (route, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1

    def tokens(self, prompt: int = 0, generated: int = 0) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.generation_tokens += generated

    def request_cancelled(self) -> None:
        with self._lock:
            self.cancelled += 1

    def time_to_first_token(self, seconds: float) -> None:
        with self._lock:
            bucket = next((i for i, le in enumerate(TTFT_BUCKETS) if seconds <= le), len(TTFT_BUCKETS))
            self.ttft_counts[bucket] += 1
            self.ttft_sum += seconds

    def decode_step(self, seconds: float, tokens: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.decode_steps += 1
            self.decode_seconds += seconds
            self._recent_steps.append((now, seconds, tokens))
            self._forget_old_steps(now)

    def _forget_old_steps(self, now: float) -> None:
        while self._recent_steps and self._recent_steps[0][0] < now - DECODE_WINDOW:
            self._recent_steps.popleft()

    def decode_tokens_per_second(self) -> float:
        """Tokens per second of decode-step time over the last DECODE_WINDOW seconds: the
        batch's aggregate speed while it was decoding (0 when idle)."""
        with self._lock:
            self._forget_old_steps(time.monotonic())
            seconds = sum(s for _, s, _ in self._recent_steps)
            tokens = sum(t for _, _, t in self._recent_steps)
        return tokens / seconds if seconds > 0 else 0.0

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The exposition text; `gauges`: name -> (help, value), read from the engine now."""
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[tuple[str, dict, float]]) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
            lines.extend(f"{sample}{_labels(labels)} {_number(value)}" for sample, labels, value in samples)

        rate = self.decode_tokens_per_second()
        with self._lock:
            requests = sorted(self.requests.items())
            family("lucid_requests_total", "counter", "HTTP requests answered, by route and status code.",
                   [("lucid_requests_total", {"route": r, "status": s}, n) for (r, s), n in requests])
            family("lucid_prompt_tokens_total", "counter", "Prompt tokens of generation requests.",
                   [("lucid_prompt_tokens_total", {}, self.prompt_tokens)])
            family("lucid_generation_tokens_total", "counter", "Tokens generated.",
                   [("lucid_generation_tokens_total", {}, self.generation_tokens)])
            family("lucid_cancelled_requests_total", "counter", "Generation requests whose client went away.",
                   [("lucid_cancelled_requests_total", {}, self.cancelled)])
            family("lucid_decode_steps_total", "counter", "Decode steps of the running batch.",
                   [("lucid_decode_steps_total", {}, self.decode_steps)])
            family("lucid_decode_seconds_total", "counter", "Seconds spent in decode steps.",
                   [("lucid_decode_seconds_total", {}, self.decode_seconds)])
            cumulative, buckets = 0, []
            for le, count in zip([*map(str, TTFT_BUCKETS), "+Inf"], self.ttft_counts):
                cumulative += count
                buckets.append(("lucid_time_to_first_token_seconds_bucket", {"le": le}, cumulative))
            family("lucid_time_to_first_token_seconds", "histogram",
                   "Seconds from accepting a generation request to its first token.",
                   buckets + [("lucid_time_to_first_token_seconds_sum", {}, self.ttft_sum),
                              ("lucid_time_to_first_token_seconds_count", {}, cumulative)])
        family("lucid_decode_tokens_per_second", "gauge",
               f"Tokens per second of the running batch over its decode steps of the last {DECODE_WINDOW:g} s.",
               [("lucid_decode_tokens_per_second", {}, rate)])
        for name, (help_text, value) in gauges.items():
            family(name, "gauge", help_text, [(name, {}, value)])
        return "\n".join(lines) + "\n"
