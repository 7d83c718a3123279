"""Serving benchmark: `python -m kvjax.bench.serve --config smollm2 --random-weights`.

For each KV cache dtype (bf16, fp8, kivi4 and turbo3.5, those of them the build knows), one page
budget (`--kv-budget-mib`) is turned into pages of that dtype, and the engine serves
`--num-requests` requests of `--prompt-len` random prompt tokens and `--output-len` greedy output
tokens, keeping `--concurrency` in flight (a closed loop: a finished request is replaced at once).
It reports output and total token throughput, time to first token p50/p95, inter-token latency
p50, preemptions, and the maximum concurrency that fits the budget: budget / (whole pages of one
request + the per-sequence full-precision window some layouts keep). The engine is driven in
process (no HTTP), so the numbers are the scheduler's and the model's, not the JSON layer's.
Compilation is excluded: an untimed round with the same shapes runs first.

`--mode http` measures the whole server instead, as vLLM's benchmark_serving does: per dtype it
starts `python -m kvjax.serve` (timing its startup to a 200 from /health), then for each level of
`--concurrency-sweep` streams max(--min-requests, 2 x concurrency) completions of random prompt
token ids over aiohttp (kvjax/bench/loadgen.py) and prints output and total tok/s, requests/s,
TTFT p50/p99, ITL p50/p99 and end-to-end p50 per (dtype, concurrency). The load starts once the
server's background warmup has compiled every step shape (`--nowait_warm`: at once).
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
from absl import flags

from kvjax import cli
from kvjax.bench import loadgen
from kvjax.cache import bytes_per_token, window_bytes_per_sequence
from kvjax.config import KV_CACHE_DTYPES
from kvjax.engine import Engine, EngineConfig, SamplingParams

FLAGS = flags.FLAGS
DTYPES = ("bf16", "fp8", "kivi4", "turbo3.5")
MIB = 2**20


def define_flags() -> None:
    cli.define_config_flags()
    flags.DEFINE_string("weights", None, "GGUF file, HF checkpoint dir or kvjax orbax dir.")
    flags.DEFINE_bool("random_weights", False, "Random weights with the config's real shapes.")
    flags.DEFINE_list("dtypes", list(DTYPES), "Cache dtypes to compare (unknown ones skipped).")
    flags.DEFINE_integer("concurrency", 16, "Requests kept in flight.", lower_bound=1)
    flags.DEFINE_integer("num_requests", 64, "Requests in the timed run.", lower_bound=1)
    flags.DEFINE_integer("prompt_len", 256, "Prompt tokens per request.", lower_bound=1)
    flags.DEFINE_integer("output_len", 64, "Output tokens per request.", lower_bound=1)
    flags.DEFINE_float("kv_budget_mib", 256.0, "KV page budget shared by every dtype (MiB).")
    flags.DEFINE_integer("max_num_batched_tokens", 512, "Tokens per engine step.", lower_bound=1)
    flags.DEFINE_enum("mode", "engine", ["engine", "http"], "engine: drive the engine in "
                      "process; http: start `kvjax.serve` and load it over HTTP.")
    flags.DEFINE_list("concurrency_sweep", ["1", "4", "8", "16", "32", "64"],
                      "HTTP mode: concurrency levels.")
    flags.DEFINE_integer("min_requests", 4, "HTTP mode: fewest requests per level.",
                         lower_bound=1)
    flags.DEFINE_integer("startup_timeout", 1800, "HTTP mode: seconds to wait for /health.",
                         lower_bound=1)
    flags.DEFINE_list("server_args", [], "HTTP mode: extra flags for kvjax.serve "
                      "(e.g. --attention-impl=pallas).")
    flags.DEFINE_bool("wait_warm", True, "HTTP mode: time the load only after the server's "
                      "background warmup has compiled every step shape (logged per dtype).")


def run_load(eng: Engine, prompts: list[list[int]], output_len: int, concurrency: int,
             tag: str) -> dict:
    """Closed loop: keep `concurrency` requests in flight until all are done."""
    sp = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    pending = list(enumerate(prompts))
    live, done = [], []
    t0 = time.perf_counter()
    while pending or live:
        while pending and len(live) < concurrency:
            i, p = pending.pop(0)
            live.append(eng.add_request(eng.make_request(f"{tag}{i}", p, sp)))
        for req in eng.step():
            if req in live:
                live.remove(req)
                done.append(req)
    wall = time.perf_counter() - t0
    ttft = np.array([r.first_token_time - r.arrival for r in done])
    itl = np.array([(r.last_token_time - r.first_token_time) / max(len(r.output_ids) - 1, 1)
                    for r in done])
    out_tokens = sum(len(r.output_ids) for r in done)
    in_tokens = sum(len(r.prompt_ids) for r in done)
    return {"wall": wall, "out_tps": out_tokens / wall,
            "total_tps": (out_tokens + in_tokens) / wall,
            "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p95": float(np.percentile(ttft, 95)),
            "itl_p50": float(np.percentile(itl, 50))}


def bench_dtype(cfg, params, dtype: str, rng: np.random.Generator) -> str:
    cfg = cfg.replace_cache(dtype=dtype, page_size=0)  # 0: the dtype's default page size
    mc, cc = cfg.model, cfg.cache
    per_token = bytes_per_token(mc, cc)
    page_bytes = per_token * cc.page_size
    budget = FLAGS.kv_budget_mib * MIB
    pages = int(budget // page_bytes)
    per_req_tokens = FLAGS.prompt_len + FLAGS.output_len
    req_bytes = math.ceil(per_req_tokens / cc.page_size) * page_bytes
    window = window_bytes_per_sequence(mc, cc)
    fits = int(budget // (req_bytes + window))
    max_len = per_req_tokens + cc.page_size
    ecfg = EngineConfig(max_num_seqs=FLAGS.concurrency, max_model_len=max_len,
                        num_pages=pages + 1, max_num_batched_tokens=FLAGS.max_num_batched_tokens)
    eng = Engine(cfg, params, ecfg)
    vocab = mc.vocab_size

    def prompts(n):
        return [rng.integers(0, vocab, FLAGS.prompt_len).tolist() for _ in range(n)]

    eng.warmup(background=False)  # every shape now: no compile thread beside the timed runs
    run_load(eng, prompts(FLAGS.concurrency), FLAGS.output_len, FLAGS.concurrency, "warm")
    preempt0 = eng.metrics.counters["num_preemptions"]
    r = run_load(eng, prompts(FLAGS.num_requests), FLAGS.output_len, FLAGS.concurrency, "run")
    preempt = eng.metrics.counters["num_preemptions"] - preempt0
    return (f"| {dtype} | {per_token:,.0f} | {window / 1e6:.2f} | {pages:,} | "
            f"{pages * cc.page_size:,} | {fits} | {r['out_tps']:.1f} | {r['total_tps']:.1f} | "
            f"{1e3 * r['ttft_p50']:.0f} | {1e3 * r['ttft_p95']:.0f} | {1e3 * r['itl_p50']:.1f} | "
            f"{preempt} |")


def _warm(line: str) -> bool | None:
    """True: this log line says every warmup shape is compiled; False: it says the rest compile
    in the background (kvjax/engine/warmup.py); None: neither."""
    if "warmup:" not in line:
        return None
    return "wider ones compile in the background" not in line


def _wait_ready(proc: subprocess.Popen, timeout: float) -> tuple[str, float | None, bool]:
    """Read the server's log until /health answers 200; returns its URL, the logged startup s
    and whether the log already said that warmup is complete (or there is none)."""
    url, startup, deadline, warm = None, None, time.time() + timeout, True
    log_lines: list[str] = []
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise RuntimeError("the server exited:\n" + "".join(log_lines[-20:]))
        log_lines.append(line)
        m = re.search(r"startup took ([0-9.]+) s", line)
        if m:
            startup = float(m.group(1))
        if _warm(line) is not None:
            warm = _warm(line)
        if "Serving" in line and " on " in line:
            url = line.split(" on ")[1].split()[0]
            with urllib.request.urlopen(url + "/health", timeout=30) as r:
                if r.status == 200:
                    return url, startup, warm
    raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s")


def bench_http(cfg, dtype: str, rng: np.random.Generator) -> list[str]:
    levels = sorted(int(c) for c in FLAGS.concurrency_sweep)
    max_len = FLAGS.prompt_len + FLAGS.output_len + 16
    cmd = [sys.executable, "-m", "kvjax.serve", "--config", FLAGS.config, "--port", "0",
           "--kv-cache-dtype", dtype, "--max-num-seqs", str(max(levels)),
           "--max-model-len", str(max_len),
           "--max-num-batched-tokens", str(FLAGS.max_num_batched_tokens), *FLAGS.server_args]
    if FLAGS.weights:
        cmd += ["--weights", FLAGS.weights]
    if FLAGS.random_weights:
        cmd += ["--random-weights"]
    if FLAGS.num_layers:
        cmd += ["--num-layers", str(FLAGS.num_layers)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=env)
    rows = []
    try:
        url, logged, warm_line = _wait_ready(proc, FLAGS.startup_timeout)
        ready = time.perf_counter() - t0
        warm = threading_drain(proc, warm_line)
        model = json_get(url + "/v1/models")["data"][0]["id"]
        vocab = cfg.model.vocab_size
        print(f"# {dtype}: ready in {ready:.1f} s (server log: startup took "
              f"{logged if logged is not None else float('nan'):.1f} s)", flush=True)
        if FLAGS.wait_warm:
            # The server answers once one request's shapes are compiled and compiles the rest
            # on a background thread that shares the cores: timing before it ends measures the
            # compiler (kivi4's 2.8 s c=1 ITL in session 4), not the steady state.
            deadline = time.perf_counter() + max(FLAGS.startup_timeout - ready, 1.0)
            while not warm.wait(5.0):
                if proc.poll() is not None:  # its log's last lines say why
                    raise RuntimeError(f"the server exited (code {proc.returncode}) during its "
                                       "background warmup:\n" + "".join(warm.tail))
                if time.perf_counter() > deadline:
                    raise RuntimeError("the server's background warmup did not finish in time")
            print(f"# {dtype}: background warmup finished {time.perf_counter() - t0:.1f} s after "
                  "launch", flush=True)  # all shapes, or where the memory-map limit stopped it
        for c in levels:
            n = max(FLAGS.min_requests, 2 * c)
            warm = [rng.integers(0, vocab, FLAGS.prompt_len).tolist() for _ in range(c)]
            asyncio.run(loadgen.run(url, model, warm, 4, c))  # untimed: shapes, connections
            prompts = [rng.integers(0, vocab, FLAGS.prompt_len).tolist() for _ in range(n)]
            r = loadgen.summarize(*asyncio.run(loadgen.run(url, model, prompts,
                                                           FLAGS.output_len, c)))
            row = (f"| {dtype} | {c} | {r['completed']}/{n} | {r['out_tps']:.1f} | "
                   f"{r['total_tps']:.1f} | {r['req_s']:.2f} | {r['ttft_p50']:.0f} | "
                   f"{r['ttft_p99']:.0f} | {r['itl_p50']:.1f} | {r['itl_p99']:.1f} | "
                   f"{r['e2e_p50']:.1f} | {ready:.0f} |")
            if r["errors"]:
                row += f" errors: {'; '.join(r['errors'])}"
            print(row, flush=True)
            rows.append(row)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return rows


def threading_drain(proc: subprocess.Popen, warm: bool = False) -> threading.Event:
    """Keep reading the server's stderr so a full pipe never blocks it; the event is set once
    the log says that the background warmup is done (at once if `warm`)."""
    done = threading.Event()
    done.tail = collections.deque(maxlen=20)  # the last log lines, for an error message
    if warm:
        done.set()

    def drain() -> None:
        for line in proc.stderr:
            done.tail.append(line)
            if _warm(line):
                done.set()

    threading.Thread(target=drain, daemon=True).start()
    return done


def json_get(url: str) -> dict:
    import json

    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def main_http(cfg, dtypes: list[str]) -> int:
    print(f"config {cfg.name}, HTTP (kvjax.serve + aiohttp, streaming): {FLAGS.prompt_len} "
          f"prompt + {FLAGS.output_len} output tokens per request (ignore_eos, greedy), "
          f"max(2 x concurrency, {FLAGS.min_requests}) requests per level")
    print("| dtype | concurrency | requests | out tok/s | total tok/s | req/s | TTFT p50 ms | "
          "TTFT p99 ms | ITL p50 ms | ITL p99 ms | E2E p50 s | startup s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for dtype in dtypes:
        try:
            bench_http(cfg, dtype, rng)
        except RuntimeError as e:
            print(f"| {dtype} | error: {str(e).splitlines()[0]} |", flush=True)
            print("".join(f"#   {line}\n" for line in str(e).splitlines()[1:]), end="",
                  flush=True)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cfg = cli.config_from_flags()
    dtypes = [d for d in FLAGS.dtypes if d in KV_CACHE_DTYPES]
    if FLAGS.mode == "http":
        try:
            levels = [int(c) for c in FLAGS.concurrency_sweep]
        except ValueError:
            raise cli.UsageError("--concurrency-sweep takes integers") from None
        if not levels or min(levels) < 1:
            raise cli.UsageError("--concurrency-sweep takes integers >= 1")
        return main_http(cfg, dtypes)
    from kvjax.generate import load_model

    params, _ = load_model(cfg, FLAGS.weights, FLAGS.random_weights)
    skipped = [d for d in FLAGS.dtypes if d not in KV_CACHE_DTYPES]
    import jax

    print(f"config {cfg.name} on {jax.devices()[0].device_kind}: {FLAGS.num_requests} requests, "
          f"{FLAGS.prompt_len} prompt + {FLAGS.output_len} output tokens, concurrency "
          f"{FLAGS.concurrency}, KV page budget {FLAGS.kv_budget_mib:g} MiB"
          + (f" (skipped, not built: {', '.join(skipped)})" if skipped else ""))
    print("| dtype | KV B/token | window MB/seq | pages | KV tokens | max concurrency | "
          "out tok/s | total tok/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | preemptions |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for dtype in dtypes:
        try:
            print(bench_dtype(cfg, params, dtype, rng), flush=True)
        except (ValueError, cli.UsageError) as e:  # e.g. a layout this model's shapes can't take
            print(f"| {dtype} | error: {str(e).splitlines()[0]} |", flush=True)
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
