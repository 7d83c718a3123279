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

from kvjax import cli
from kvjax.generate import load_model
from kvjax.runner import CHUNK_BUCKETS, Runner

FLAGS = flags.FLAGS


def bench(cfg, params, context: int, batch_sizes: list[int], steps: int) -> list[str]:
    rng = np.random.default_rng(0)
    vocab = cfg.model.vocab_size
    rows = []
    weight_bytes = sum(np.asarray(v).nbytes for v in params.values())
    for batch in batch_sizes:
        runner = Runner(cfg, params, max_seq_len=context + steps + 1, max_batch=batch)
        runner.warmup((1, CHUNK_BUCKETS[-1]), batch=1)
        runner.warmup((1,), batch=batch)
        prompts = [rng.integers(0, vocab, context).tolist() for _ in range(batch)]
        t0 = time.perf_counter()
        for sid, prompt in enumerate(prompts):
            runner.prefill(sid, prompt).block_until_ready()
        prefill_tps = batch * context / (time.perf_counter() - t0)
        seqs = list(range(batch))
        tokens = [[int(t)] for t in rng.integers(0, vocab, batch)]
        runner.step(seqs, tokens).block_until_ready()  # first step at this batch shape
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = runner.step(seqs, tokens)
        logits.block_until_ready()
        dt = time.perf_counter() - t0
        decode_tps = batch * steps / dt
        kv_read = (context + steps) * runner.kv_bytes_per_token
        moved = weight_bytes / batch + kv_read
        rows.append(f"| {batch} | {context} | {prefill_tps:.1f} | {decode_tps:.2f} | "
                    f"{1e3 * dt / steps:.1f} | {moved / 1e6:.1f} | "
                    f"{batch * steps * moved / dt / 1e9:.2f} |")
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
    for row in bench(cfg, params, FLAGS.context, batch_sizes, FLAGS.steps):
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    cli.define_config_flags()
    flags.DEFINE_integer("context", 512, "Tokens in the cache per sequence before decoding.",
                         lower_bound=1)
    flags.DEFINE_list("batch_sizes", ["1", "4", "16"], "Decode batch sizes.")
    flags.DEFINE_integer("steps", 16, "Timed decode steps per batch size.", lower_bound=1)
    flags.DEFINE_string("weights", None, "GGUF file, HF checkpoint dir or kvjax orbax dir.")
    flags.DEFINE_bool("random_weights", False, "Random weights with the config's real shapes.")
    cli.run(main)
