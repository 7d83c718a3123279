"""Sampler cost per step: `python -m kvjax.bench.sampler [--vocab 49152] [--batch-sizes 8,32]`.

Times `kvjax.sampling.sample_batch` on [B, vocab] f32 logits (normal, sigma --sigma: ~4 looks like
a language model's peaked rows, ~0.3 like flat ones that push top-p onto the exact bisection path)
for greedy, temperature, top_p=0.9, top_k=50, penalties + logit_bias, and logprobs rows; median of
--repeats calls after one compile. Compare a row with the model step time of the same batch
(`python -m kvjax.bench.decode`).
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
from absl import flags

from kvjax import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_integer("vocab", 49152, "Vocabulary size (SmolLM2: 49152).", lower_bound=2)
    flags.DEFINE_list("batch_sizes", ["1", "8", "32"], "Batch rows.")
    flags.DEFINE_float("sigma", 4.0, "Standard deviation of the random logits.")
    flags.DEFINE_integer("repeats", 7, "Timed calls per case (median).", lower_bound=1)


CASES = {
    "greedy": {},
    "temperature 0.8": {"temperature": 0.8},
    "top_p 0.9": {"temperature": 0.8, "top_p": 0.9},
    "top_k 50": {"temperature": 0.8, "top_k": 50},
    "penalties + bias": {"temperature": 0.8, "presence_penalty": 0.5, "frequency_penalty": 0.5,
                         "logit_bias": ((1, 5.0), (2, -5.0))},
    "logprobs 5": {"logprobs": 5},
}


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import jax
    import jax.numpy as jnp

    from kvjax.sampling import pack, sample_batch_jit

    v = FLAGS.vocab
    print(f"sample_batch on {jax.devices()[0].device_kind}, vocab {v}, logits sigma {FLAGS.sigma}")
    print("| batch | rows | ms per call |")
    print("|---|---|---|")
    for b in (int(x) for x in FLAGS.batch_sizes):
        rng = np.random.default_rng(0)
        logits = jnp.asarray(rng.normal(0, FLAGS.sigma, (b, v)).astype(np.float32))
        for name, kw in CASES.items():
            row = SimpleNamespace(**{"temperature": 0.0, "top_k": 0, "top_p": 1.0, **kw})
            sb, fl = pack([row] * b, b, [0] * b, list(range(b)))
            if fl.penalties:
                sb = sb._replace(output_counts=jnp.zeros((b, v), jnp.int32),
                                 prompt_mask=jnp.zeros((b, v), bool))
            sample_batch_jit(logits, sb, fl).tokens.block_until_ready()
            times = []
            for _ in range(FLAGS.repeats):
                t0 = time.perf_counter()
                sample_batch_jit(logits, sb, fl).tokens.block_until_ready()
                times.append(time.perf_counter() - t0)
            print(f"| {b} | {name} | {1e3 * float(np.median(times)):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
