"""Weight dtypes side by side: `python -m kvjax.bench.weights [--kv-cache-dtype bf16]`.

Loads the model once per weight dtype (auto = f32 on the CPU, int8, int4), builds one Runner per
(weight dtype, batch size) over a cache already holding --context tokens per sequence, then times
decode steps in interleaved rounds (auto, int8, int4, auto, ...) so that the load other processes
put on a shared machine hits every dtype alike; reports the fastest round (the least disturbed:
on a loaded machine it is the better estimate of what the code costs) and the median. Also
prints the bytes the parameters occupy on the device and XLA's "bytes accessed" estimate for one
decode step.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from kvjax import cli
from kvjax.generate import load_model
from kvjax.quant import weights
from kvjax.runner import Runner

FLAGS = flags.FLAGS
DTYPES = ("auto", "int8", "int4")


def step_bytes_accessed(runner: Runner, batch: int) -> float:
    """XLA's cost-analysis estimate of bytes a decode step touches (the scanned layer body is
    counted once per layer only if XLA unrolls it; treat as relative)."""
    import models

    z = jnp.zeros((batch, 1), jnp.int32)
    compiled = models.forward.lower(
        runner.graphdef, runner.params, z, z, runner.cache,
        jnp.zeros((batch, runner.max_pages), jnp.int32), jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch,), jnp.int32)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("bytes accessed", float("nan")))


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    base = cli.config_from_flags()
    rng = np.random.default_rng(0)
    vocab = base.model.vocab_size
    batches = [int(b) for b in FLAGS.batch_sizes]
    runners: dict[tuple[str, int], Runner] = {}
    print(f"config {base.name} | kv {base.cache.dtype} | backend {jax.default_backend()} | "
          f"jax {jax.__version__} | context {FLAGS.context}")
    print("| weights | param bytes on device | XLA bytes accessed / step (batch 1) |")
    print("|---|---|---|")
    for wd in DTYPES:
        cfg = base.replace_model(weight_dtype=wd)
        params, _ = load_model(cfg, FLAGS.weights, FLAGS.random_weights)
        for b in batches:
            r = Runner(cfg, params, max_seq_len=FLAGS.context + FLAGS.steps * FLAGS.rounds + 2,
                       max_batch=b)
            for sid in range(b):
                r.prefill(sid, rng.integers(0, vocab, FLAGS.context).tolist())
            runners[wd, b] = r
        del params
        r1 = runners[wd, batches[0]]
        print(f"| {wd} | {weights.nbytes(r1.params) / 1e6:.1f} MB | "
              f"{step_bytes_accessed(r1, batches[0]) / 1e6:.1f} MB |", flush=True)
    times: dict[tuple[str, int], list[float]] = {k: [] for k in runners}
    for (_, b), r in runners.items():  # compile + first step
        r.step(list(range(b)), [[1]] * b).block_until_ready()
    for _ in range(FLAGS.rounds):
        for (wd, b), r in runners.items():
            t0 = time.perf_counter()
            for _ in range(FLAGS.steps):
                logits = r.step(list(range(b)), [[1]] * b)
            logits.block_until_ready()
            times[wd, b].append((time.perf_counter() - t0) / FLAGS.steps)
    print()
    print("| weights | batch | decode tok/s (fastest round) | step ms fastest / median "
          "| speed vs auto (fastest) |")
    print("|---|---|---|---|---|")
    for b in batches:
        ref = min(times["auto", b])
        for wd in DTYPES:
            ms, med = min(times[wd, b]), statistics.median(times[wd, b])
            print(f"| {wd} | {b} | {b / ms:.2f} | {1e3 * ms:.1f} / {1e3 * med:.1f} | "
                  f"{ref / ms:.2f}x |")
    return 0


if __name__ == "__main__":
    cli.define_config_flags()
    flags.DEFINE_integer("context", 256, "Tokens in the cache per sequence before decoding.",
                         lower_bound=1)
    flags.DEFINE_list("batch_sizes", ["1", "8"], "Decode batch sizes.")
    flags.DEFINE_integer("steps", 2, "Decode steps per timed round.", lower_bound=1)
    flags.DEFINE_integer("rounds", 30, "Interleaved rounds over the weight dtypes.",
                         lower_bound=1)
    flags.DEFINE_string("weights", None, "GGUF file, HF checkpoint dir or kvjax orbax dir.")
    flags.DEFINE_bool("random_weights", False, "Random weights with the config's real shapes.")
    cli.run(main)
