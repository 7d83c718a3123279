"""Engine metrics, exposed through prometheus_client under vLLM's names with a `kvjax:` prefix.

The engine bumps plain counters and histograms under one lock (cheap, no client-library calls in
the step loop); `render` hands a snapshot to prometheus_client through a custom collector on a
private `CollectorRegistry` per call, so several engines in one process (tests start servers side
by side) never collide in the process-global registry. Counters get `_total` from the library.
Names: num_requests_running/waiting, kv_cache_usage_perc, prefix_cache_queries/hits,
num_preemptions, prompt_tokens, generation_tokens, request_success, request_failure,
request_prefill_kv_computed_tokens, time_to_first_token_seconds, inter_token_latency_seconds,
e2e_request_latency_seconds, cache_config_info.
"""

from __future__ import annotations

import bisect
import collections
import threading

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
               0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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

    def cumulative(self) -> list[tuple[str, float]]:
        out, acc = [], 0
        for bound, c in zip((*self.buckets, float("inf")), self.counts, strict=True):
            acc += c
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), acc))
        return out


COUNTERS = ("prompt_tokens", "generation_tokens", "num_preemptions", "request_success",
            "request_failure", "prefill_kv_computed_tokens")


class Metrics:
    """Counters the engine bumps under its own lock; `render` reads a consistent snapshot.
    Unknown counter names are accepted (start at 0) so the engine can add one without a crash."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counters: collections.defaultdict[str, int] = collections.defaultdict(int)
        self.counters.update({k: 0 for k in COUNTERS})
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)

    def inc(self, name: str, value: int = 1) -> None:
        with self.lock:
            self.counters[name] += value


class _Snapshot:
    """A prometheus_client collector over one snapshot of the engine's numbers."""

    def __init__(self, model_name: str, metrics: Metrics, pools: list[dict]):
        self.model, self.pools = model_name, pools
        with metrics.lock:
            self.counters = dict(metrics.counters)
            self.hists = [(name, help_, h.cumulative(), h.sum) for name, help_, h in (
                ("time_to_first_token_seconds", "Time to first token.", metrics.ttft),
                ("inter_token_latency_seconds", "Time between output tokens.", metrics.itl),
                ("e2e_request_latency_seconds", "Request latency.", metrics.e2e))]

    def collect(self):
        m, pools = self.model, self.pools

        def gauge(name, help_, value):
            g = GaugeMetricFamily(f"kvjax:{name}", help_, labels=["model_name"])
            g.add_metric([m], value)
            return g

        def counter(name, help_, value):
            c = CounterMetricFamily(f"kvjax:{name}", help_, labels=["model_name"])
            c.add_metric([m], value)
            return c

        def per_pool(kind, name, help_, key):
            f = kind(f"kvjax:{name}", help_, labels=["model_name", "pool"])
            for p in pools:
                f.add_metric([m, p["pool"]], p[key])
            return f

        yield gauge("num_requests_running", "Requests in the running batch.",
                    sum(p["running"] for p in pools))
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.",
                    sum(p["waiting"] for p in pools))
        yield per_pool(GaugeMetricFamily, "kv_cache_usage_perc",
                       "Fraction of KV cache pages in use by requests (1 = full).", "usage")
        yield per_pool(CounterMetricFamily, "prefix_cache_queries",
                       "Prompt tokens looked up in the prefix cache.", "queries")
        yield per_pool(CounterMetricFamily, "prefix_cache_hits",
                       "Prompt tokens found in the prefix cache.", "hits")
        c = self.counters
        yield counter("num_preemptions", "Requests preempted (pages freed, recomputed later).",
                      c["num_preemptions"])
        yield counter("prompt_tokens", "Prompt tokens processed.", c["prompt_tokens"])
        yield counter("generation_tokens", "Tokens generated.", c["generation_tokens"])
        yield counter("request_success", "Requests finished (stop, length or abort).",
                      c["request_success"])
        yield counter("request_failure", "Requests failed by an engine error.",
                      c.get("request_failure", 0))
        yield counter("request_prefill_kv_computed_tokens",
                      "Prefill tokens whose KV was computed (not taken from the prefix cache).",
                      c["prefill_kv_computed_tokens"])
        for name, help_, buckets, total in self.hists:
            h = HistogramMetricFamily(f"kvjax:{name}", help_, labels=["model_name"])
            h.add_metric([m], buckets, total)
            yield h
        info = GaugeMetricFamily("kvjax:cache_config_info", "KV cache pools.",
                                 labels=["model_name", "pool", "cache_dtype", "num_pages",
                                         "page_size"])
        for p in pools:
            info.add_metric([m, p["pool"], str(p["dtype"]), str(p["num_pages"]),
                             str(p["page_size"])], 1)
        yield info


def render(model_name: str, metrics: Metrics, pools: list[dict]) -> str:
    """pools: [{"pool": name, "usage": 0..1, "queries": n, "hits": n, "running": n,
    "waiting": n, "num_pages": n, "page_size": n, "dtype": str}] -> Prometheus text 0.0.4."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(model_name, metrics, pools))
    return generate_latest(registry).decode()
