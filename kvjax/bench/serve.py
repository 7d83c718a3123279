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
"""

from __future__ import annotations

import math
import time

import numpy as np
from absl import flags

from kvjax import cli
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

    eng.warmup()
    run_load(eng, prompts(FLAGS.concurrency), FLAGS.output_len, FLAGS.concurrency, "warm")
    preempt0 = eng.metrics.counters["num_preemptions"]
    r = run_load(eng, prompts(FLAGS.num_requests), FLAGS.output_len, FLAGS.concurrency, "run")
    preempt = eng.metrics.counters["num_preemptions"] - preempt0
    return (f"| {dtype} | {per_token:,.0f} | {window / 1e6:.2f} | {pages:,} | "
            f"{pages * cc.page_size:,} | {fits} | {r['out_tps']:.1f} | {r['total_tps']:.1f} | "
            f"{1e3 * r['ttft_p50']:.0f} | {1e3 * r['ttft_p95']:.0f} | {1e3 * r['itl_p50']:.1f} | "
            f"{preempt} |")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from kvjax.generate import load_model

    cfg = cli.config_from_flags()
    params, _ = load_model(cfg, FLAGS.weights, FLAGS.random_weights)
    dtypes = [d for d in FLAGS.dtypes if d in KV_CACHE_DTYPES]
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
