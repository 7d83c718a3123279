"""Decode benchmark: `python -m kvjax.bench.decode --config smollm2`.

Prefill throughput for one prompt, then decode throughput at several batch sizes over a cache
already holding `--context` tokens per sequence, with the bytes each decoded token moves: the
weights (read once per step, shared by the batch) plus that sequence's KV cache. Weights come
from the config's default source, or random with the same shapes (--random-weights): speed does
not depend on their values. Timings exclude compilation (one warm-up step per shape).
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import flags

from kvjax import cli, sampling
from kvjax.engine.request import SamplingParams
from kvjax.engine.step import count_compiles, execute, fetch, prepare
from kvjax.generate import Decoder, load_model, warm_decode
from kvjax.quant import weights
from kvjax.runner import Runner

FLAGS = flags.FLAGS


def decode_step(runner: Runner, seqs: list[int], tokens: list[int], sb, flags) -> list[int]:
    """One decode step of every sequence, sampled on device; returns the new ids."""
    step = prepare(runner, seqs, [[t] for t in tokens])
    step.sample, step.flags = sb, flags
    return fetch(execute(runner, step), flags)[0].tolist()


def bench(cfg, params, context: int, batch_sizes: list[int], steps: int) -> list[str]:
    """Decode through the engine's step (kvjax.engine.step): logits at the last position only,
    greedy sampling on device, one transfer of the ids per step; every shape compiled first."""
    rng = np.random.default_rng(0)
    vocab = cfg.model.vocab_size
    rows = []
    greedy = SamplingParams()
    for batch in batch_sizes:
        runner = Runner(cfg, params, max_seq_len=context + steps + 2, max_batch=batch)
        weight_bytes = weights.nbytes(runner.params)  # as held: quantized weights packed
        warm_decode(runner, context, context + steps + 2, greedy, 0)  # batch-1 prefill shapes
        warm_decode(runner, context, context + steps + 2, greedy, 0, batch=batch)
        prompts = [rng.integers(0, vocab, context).tolist() for _ in range(batch)]
        t0 = time.perf_counter()
        for sid, prompt in enumerate(prompts):
            Decoder(runner, greedy, 0, seq_id=sid).prefill(prompt)
        prefill_tps = batch * context / (time.perf_counter() - t0)
        seqs = list(range(batch))
        tokens = rng.integers(0, vocab, batch).tolist()
        sb, flags = sampling.pack([greedy] * batch, batch, [0] * batch, [0] * batch)

        tokens = decode_step(runner, seqs, tokens, sb, flags)  # first step at this shape
        with count_compiles() as compiles:
            t0 = time.perf_counter()
            for _ in range(steps):
                tokens = decode_step(runner, seqs, tokens, sb, flags)
            dt = time.perf_counter() - t0
        if compiles():
            print(f"warning: {compiles()} compiles during the timed steps (batch {batch})")
        decode_tps = batch * steps / dt
        kv_read = (context + steps) * runner.kv_bytes_per_token
        moved = weight_bytes / batch + kv_read
        rows.append(f"| {batch} | {context} | {prefill_tps:.1f} | {decode_tps:.2f} | "
                    f"{1e3 * dt / steps:.1f} | {moved / 1e6:.1f} | "
                    f"{batch * steps * moved / dt / 1e9:.2f} |")
    return rows


def bench_engine(cfg, params, context: int, concurrencies: list[int], max_tokens: int
                 ) -> list[str]:
    """The serving engine in process: `c` requests of `context` random prompt tokens, each
    generating max_tokens (greedy, ignore_eos), submitted together. Each workload runs twice and
    the second run is timed (the first compiles its shapes). Reports output tok/s end to end
    (prefill included) and over the decode-only steps, comparable with the decode table's rows."""
    from kvjax.engine import Engine, EngineConfig

    rng = np.random.default_rng(1)
    vocab = cfg.model.vocab_size
    top = max(concurrencies)
    max_len = context + max_tokens + 1
    eng = Engine(cfg, params, EngineConfig(max_num_seqs=top, max_model_len=max_len,
                                           num_pages=top * (max_len // cfg.cache.page_size + 2)
                                           + 1, max_num_batched_tokens=512, chunk_size=256))
    rows = []
    for c in concurrencies:
        for attempt in range(2):
            reqs = [eng.make_request(f"c{c}-{attempt}-{i}", rng.integers(0, vocab, context)
                                     .tolist(), SamplingParams(max_tokens=max_tokens,
                                                               ignore_eos=True))
                    for i in range(c)]
            for r in reqs:
                eng.add_request(r)
            decode_s = decode_tokens = 0.0
            t0 = time.perf_counter()
            while any(not r.finished for r in reqs):
                before = eng.metrics.counters["prefill_kv_computed_tokens"]
                made = sum(len(r.output_ids) for r in reqs)
                t1 = time.perf_counter()
                eng.step()
                if eng.metrics.counters["prefill_kv_computed_tokens"] == before:
                    decode_s += time.perf_counter() - t1
                    decode_tokens += sum(len(r.output_ids) for r in reqs) - made
            wall = time.perf_counter() - t0
        rows.append(f"| {c} | {context} | {max_tokens} | {c * max_tokens / wall:.2f} | "
                    f"{decode_tokens / max(decode_s, 1e-9):.2f} | {wall:.1f} |")
    return rows


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cfg = cli.config_from_flags()
    params, _ = load_model(cfg, FLAGS.weights, FLAGS.random_weights)
    batch_sizes = [int(b) for b in FLAGS.batch_sizes]
    print(f"config {cfg.name} | kv {cfg.cache.dtype} | backend {jax.default_backend()} "
          f"({jax.devices()[0].device_kind}) | jax {jax.__version__}")
    print("| batch | context | prefill tok/s | decode tok/s | step ms | MB moved per token "
          "| effective GB/s |")
    print("|---|---|---|---|---|---|---|")
    if batch_sizes:
        for row in bench(cfg, params, FLAGS.context, batch_sizes, FLAGS.steps):
            print(row, flush=True)
    if FLAGS.engine_concurrency:
        print("\nengine (in process, second of two identical runs):")
        print("| concurrency | prompt tokens | output tokens | output tok/s (e2e) "
              "| decode-step tok/s | wall s |")
        print("|---|---|---|---|---|---|")
        for row in bench_engine(cfg, params, FLAGS.context,
                                [int(c) for c in FLAGS.engine_concurrency], FLAGS.max_tokens):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    cli.define_config_flags()
    flags.DEFINE_integer("context", 512, "Tokens in the cache per sequence before decoding.",
                         lower_bound=1)
    flags.DEFINE_list("batch_sizes", ["1", "4", "16"], "Decode batch sizes.")
    flags.DEFINE_integer("steps", 16, "Timed decode steps per batch size.", lower_bound=1)
    flags.DEFINE_list("engine_concurrency", [], "Also time the serving engine at these "
                      "concurrencies (e.g. 1,4,8,32).")
    flags.DEFINE_integer("max_tokens", 32, "Output tokens per engine request.", lower_bound=1)
    flags.DEFINE_string("weights", None, "GGUF file, HF checkpoint dir or kvjax orbax dir.")
    flags.DEFINE_bool("random_weights", False, "Random weights with the config's real shapes.")
    cli.run(main)
