"""Engine metrics and their Prometheus text exposition (format 0.0.4).

Written by hand rather than with prometheus_client: we need four metric kinds and one text format,
and prometheus_client's process-global registry gets in the way of several engines in one process
(tests start servers side by side). Names follow vLLM's with a `kvjax:` prefix, so dashboards
carry over: kv_cache_usage_perc, prefix_cache_queries/hits, num_requests_running/waiting,
num_preemptions, time_to_first_token_seconds, inter_token_latency_seconds.
"""

from __future__ import annotations

import bisect
import threading

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
               0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # last = +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def quantile(self, q: float) -> float:
        """Upper bucket bound at quantile q (coarse; the bench computes exact ones itself)."""
        target, acc = q * self.count, 0
        for bound, c in zip((*self.buckets, float("inf")), self.counts, strict=True):
            acc += c
            if acc >= target and c:
                return bound
        return float("nan")


class Metrics:
    """Counters the engine bumps under its own lock; `render` reads a consistent snapshot."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "num_preemptions": 0,
                         "request_success": 0, "prefill_kv_computed_tokens": 0}
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)

    def inc(self, name: str, value: int = 1) -> None:
        with self.lock:
            self.counters[name] += value


def _fmt(v: float) -> str:
    if v == float("inf"):
        return "+Inf"
    return repr(float(v)) if isinstance(v, float) else str(v)


def render(model_name: str, metrics: Metrics, pools: list[dict]) -> str:
    """pools: [{"pool": name, "usage": 0..1, "queries": n, "hits": n, "running": n,
    "waiting": n, "num_pages": n, "page_size": n, "dtype": str}]."""
    lines: list[str] = []
    base = f'model_name="{model_name}"'

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP kvjax:{name} {help_}")
        lines.append(f"# TYPE kvjax:{name} {kind}")
        for labels, value in samples:
            suffix = "_total" if kind == "counter" else ""
            lines.append(f"kvjax:{name}{suffix}{{{labels}}} {_fmt(value)}")

    def per_pool(key: str) -> list[tuple[str, float]]:
        return [(f'{base},pool="{p["pool"]}"', p[key]) for p in pools]

    metric("num_requests_running", "gauge", "Requests in the running batch.",
           [(base, sum(p["running"] for p in pools))])
    metric("num_requests_waiting", "gauge", "Requests waiting to be scheduled.",
           [(base, sum(p["waiting"] for p in pools))])
    metric("kv_cache_usage_perc", "gauge",
           "Fraction of KV cache pages in use by requests (1 = full).", per_pool("usage"))
    metric("prefix_cache_queries", "counter",
           "Prompt tokens looked up in the prefix cache.", per_pool("queries"))
    metric("prefix_cache_hits", "counter",
           "Prompt tokens found in the prefix cache.", per_pool("hits"))
    with metrics.lock:
        c = dict(metrics.counters)
        hists = [("time_to_first_token_seconds", "Time to first token.", metrics.ttft),
                 ("inter_token_latency_seconds", "Time between output tokens.", metrics.itl),
                 ("e2e_request_latency_seconds", "Request latency.", metrics.e2e)]
        hist_lines = []
        for name, help_, h in hists:
            hist_lines.append(f"# HELP kvjax:{name} {help_}")
            hist_lines.append(f"# TYPE kvjax:{name} histogram")
            acc = 0
            for bound, n in zip((*h.buckets, float("inf")), h.counts, strict=True):
                acc += n
                hist_lines.append(f'kvjax:{name}_bucket{{{base},le="{_fmt(bound)}"}} {acc}')
            hist_lines.append(f"kvjax:{name}_sum{{{base}}} {_fmt(h.sum)}")
            hist_lines.append(f"kvjax:{name}_count{{{base}}} {h.count}")
    metric("num_preemptions", "counter", "Requests preempted (pages freed, recomputed later).",
           [(base, c["num_preemptions"])])
    metric("prompt_tokens", "counter", "Prompt tokens processed.", [(base, c["prompt_tokens"])])
    metric("generation_tokens", "counter", "Tokens generated.", [(base, c["generation_tokens"])])
    metric("request_success", "counter", "Requests finished.", [(base, c["request_success"])])
    metric("request_prefill_kv_computed_tokens", "counter",
           "Prefill tokens whose KV was computed (not taken from the prefix cache).",
           [(base, c["prefill_kv_computed_tokens"])])
    metric("cache_config_info", "gauge", "KV cache pools.",
           [(f'{base},pool="{p["pool"]}",cache_dtype="{p["dtype"]}",'
             f'num_pages="{p["num_pages"]}",page_size="{p["page_size"]}"', 1) for p in pools])
    return "\n".join(lines + hist_lines) + "\n"
