"""A minimal Prometheus text-format registry (counters, gauges, histograms with labels), thread-safe.

Enough for ``GET /metrics`` without another dependency; the exposition format is documented at
https://prometheus.io/docs/instrumenting/exposition_formats/ .
"""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(
        f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in sorted(labels.items())
    )
    return "{" + body + "}"


class Metrics:
    def __init__(self, prefix: str = "llm"):
        self.prefix = prefix
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}  # name -> (type, help)
        self._values: dict[str, dict[tuple, float]] = defaultdict(dict)
        self._hist: dict[str, dict[tuple, list]] = defaultdict(dict)  # name -> labels -> [bucket counts, sum, count]
        self._buckets: dict[str, tuple[float, ...]] = {}

    def _declare(self, name: str, kind: str, help_text: str, buckets=None):
        full = f"{self.prefix}_{name}"
        self._help.setdefault(full, (kind, help_text))
        if buckets is not None:
            self._buckets[full] = tuple(buckets)
        return full

    def inc(self, name: str, help_text: str, amount: float = 1.0, **labels):
        full = self._declare(name, "counter", help_text)
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[full][key] = self._values[full].get(key, 0.0) + amount

    def set(self, name: str, help_text: str, value: float, **labels):
        full = self._declare(name, "gauge", help_text)
        with self._lock:
            self._values[full][tuple(sorted(labels.items()))] = float(value)

    def observe(self, name: str, help_text: str, value: float, buckets=LATENCY_BUCKETS, **labels):
        full = self._declare(name, "histogram", help_text, buckets)
        key = tuple(sorted(labels.items()))
        with self._lock:
            counts, total, n = self._hist[full].get(key, ([0] * len(self._buckets[full]), 0.0, 0))
            counts = [c + (value <= b) for c, b in zip(counts, self._buckets[full])]
            self._hist[full][key] = (counts, total + value, n + 1)

    def get(self, name: str, **labels) -> float:
        """Current value of a counter/gauge (0 if never set); for tests and /health."""
        with self._lock:
            return self._values[f"{self.prefix}_{name}"].get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        lines = []
        with self._lock:
            for full, (kind, help_text) in sorted(self._help.items()):
                lines += [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}"]
                if kind == "histogram":
                    for key, (counts, total, n) in self._hist[full].items():
                        labels = dict(key)
                        for b, c in zip(self._buckets[full], counts):
                            lines.append(f"{full}_bucket{_labels({**labels, 'le': repr(float(b))})} {c}")
                        lines.append(f"{full}_bucket{_labels({**labels, 'le': '+Inf'})} {n}")
                        lines += [f"{full}_sum{_labels(labels)} {total}", f"{full}_count{_labels(labels)} {n}"]
                else:
                    for key, value in self._values[full].items():
                        lines.append(f"{full}{_labels(dict(key))} {value}")
        return "\n".join(lines) + "\n"
