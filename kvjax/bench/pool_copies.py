"""Does a compiled step copy the KV cache? `python -m kvjax.bench.pool_copies --config smollm2`.

A forward updates the page pool in place (the cache is donated): a step that copies a pool leaf
pays the pool's size in memory and traffic on every step, whatever the batch. This compiles the
step the engine runs (`Runner.compile`'s signature: one logits row per sequence, the cache
donated) for each cache dtype and step shape on this machine's CPU without running it, with
abstract weights and cache (nothing is allocated, so 70B shapes fit), and prints per step:

  copies      HLO `copy` instructions whose result has the shape of a cache leaf (pool leaves,
              bf16 rings, ring tags), and their MiB per device
  temp        compiled temporaries per device (memory_analysis); a pool copy shows up here too
  cache       the cache's bytes per device

`--tensor-parallel N` lays the model out on N devices as kvjax/sharding.py serves it (run with
XLA_FLAGS=--xla_force_host_platform_device_count=N). Steps: `--batch B` sequences, a decode
step (1 token) and each `--chunks` length (prefill chunks), page table `--width` pages wide.

`--time_steps N` runs instead: the median time of N batch-1 decode steps per dtype with a pool of
`--num_pages` pages (random weights), for a before/after comparison of a pool-copying step.
"""

from __future__ import annotations

import math
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

_HLO = {np.dtype(d): n for d, n in ((np.uint8, "u8"), (np.uint16, "u16"), (np.uint32, "u32"),
                                    (np.int8, "s8"), (np.int16, "s16"), (np.int32, "s32"),
                                    (np.float32, "f32"), (np.float16, "f16"),
                                    (jnp.bfloat16, "bf16"), (jnp.float8_e4m3fn, "f8e4m3fn"))}
_COPY = re.compile(r"\s*(?:ROOT )?%\S+ = (\w+\[[\d,]*\])\S* copy\(")


def hlo_type(shape: tuple[int, ...], dtype) -> str:
    """How HLO text writes an array type: u8[2,3,1153,16,32]."""
    return f"{_HLO[np.dtype(dtype)]}[{','.join(map(str, shape))}]"


def _shards(cache) -> list[tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of each cache leaf as one device holds it."""
    out = []
    for leaf in jax.tree.leaves(cache):
        sharding = getattr(leaf, "sharding", None)
        shape = tuple(sharding.shard_shape(leaf.shape)) if sharding is not None else leaf.shape
        out.append((shape, np.dtype(leaf.dtype)))
    return out


def leaf_types(cache) -> dict[str, int]:
    """HLO type of each cache leaf as one device holds it -> its bytes."""
    return {hlo_type(s, d): math.prod(s) * d.itemsize for s, d in _shards(cache)}


def cache_bytes(cache) -> int:
    """The cache's bytes on one device."""
    return sum(math.prod(s) * d.itemsize for s, d in _shards(cache))


def cache_copies(hlo_text: str, cache) -> list[str]:
    """The `copy` instructions of a compiled module's text whose result is cache-leaf shaped."""
    types = leaf_types(cache)
    return [line.strip() for line in hlo_text.splitlines()
            if (m := _COPY.match(line)) and m[1] in types]


def compile_step(cfg, batch: int, t: int, width: int, num_pages: int, tensor: int = 1):
    """The engine's forward for one (batch, chunk, table width) shape, compiled from abstract
    weights and cache: (compiled executable, abstract cache)."""
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import models
    import models.transformer
    from kvjax import sharding
    from kvjax.cache import init_cache
    from kvjax.config import MeshConfig
    from kvjax.runner import compiler_options, param_dtype

    mc = cfg.model
    dtype = param_dtype(cfg)
    cache = jax.eval_shape(lambda: init_cache(mc, cfg.cache, num_pages, num_slots=batch))
    impl = cfg.resolved_attention_impl()
    if tensor == 1:  # the plain single-device path (no mesh), as Runner runs it
        params = jax.eval_shape(lambda: models.random_params(mc, 0, dtype))
        graphdef, state = nnx.split(models.Transformer(mc, params, attention_impl=impl))
        args = (state, *(jax.ShapeDtypeStruct(s, jnp.int32) for s in ((batch, t), (batch, t))),
                cache, *(jax.ShapeDtypeStruct(s, jnp.int32)
                         for s in ((batch, width), (batch,), (batch,), (batch,))))
        lowered = models.forward.lower(graphdef, *args)
    else:
        mesh = sharding.make_mesh(MeshConfig(1, tensor))
        params = sharding.abstract_params(mc, mesh, dtype)
        graphdef, state = nnx.split(models.Transformer(mc, params, attention_impl=impl))
        cache = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             cache, sharding.cache_shardings(cache, mc, mesh))

        def rows(*shape):
            return jax.ShapeDtypeStruct(shape, jnp.int32,
                                        sharding=sharding.batch_sharding(mesh, len(shape), batch))

        fwd = models.transformer.forward.__wrapped__
        out = (NamedSharding(mesh, P()), jax.tree.map(lambda a: a.sharding, cache))
        jitted = jax.jit(lambda state, *rest: fwd(graphdef, state, *rest), donate_argnums=(3,),
                         out_shardings=out)
        with sharding.tracing_mesh(mesh):
            lowered = jitted.lower(state, rows(batch, t), rows(batch, t), cache,
                                   rows(batch, width), rows(batch), rows(batch), rows(batch))
    return lowered.compile(compiler_options(dtype) or None), cache


def time_decode(cfg, num_pages: int, context: int, steps: int) -> tuple[float, int]:
    """Median seconds of a batch-1 decode step (random weights, `num_pages` pool, a sequence of
    `context` tokens), and the pool's bytes: what a copied pool costs per step."""
    import time

    import models
    from kvjax.runner import Runner

    cfg = cfg.replace_cache(num_pages=num_pages)
    runner = Runner(cfg, models.random_params(cfg.model, 0), max_seq_len=context + steps + 3)
    rng = np.random.default_rng(0)
    runner.prefill(0, rng.integers(0, cfg.model.vocab_size, context).tolist())
    times = []
    for tok in rng.integers(0, cfg.model.vocab_size, steps + 2).tolist():
        t0 = time.perf_counter()
        runner.step([0], [[tok]]).block_until_ready()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[2:])), runner.cache.nbytes()  # the first two compile


FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    from kvjax.config import KV_CACHE_DTYPES, load_config

    del argv
    cfg = load_config(FLAGS.config)
    if FLAGS.num_layers:
        cfg = cfg.replace_model(num_layers=FLAGS.num_layers)
    dtypes = FLAGS.dtypes.split(",") if FLAGS.dtypes else list(KV_CACHE_DTYPES)
    if FLAGS.time_steps:
        for dtype in dtypes:
            sec, nbytes = time_decode(cfg.replace_cache(dtype=dtype, page_size=0),
                                      FLAGS.num_pages, FLAGS.context, FLAGS.time_steps)
            print(f"{FLAGS.config} {dtype} pages={FLAGS.num_pages} cache={nbytes / 2**20:.1f} MiB "
                  f"context={FLAGS.context}: decode step {sec * 1e3:.1f} ms (median of "
                  f"{FLAGS.time_steps})", flush=True)
        return
    steps = [1] + [int(c) for c in FLAGS.chunks.split(",") if c]
    print(f"{FLAGS.config} layers={cfg.model.num_layers} pages={FLAGS.num_pages} "
          f"batch={FLAGS.batch} width={FLAGS.width} tensor={FLAGS.tensor_parallel} "
          f"({jax.devices()[0].platform}, jax {jax.__version__})")
    print("| dtype | step | copies | copied MiB | temp MiB | cache MiB |")
    print("|---|---|---|---|---|---|")
    failed = False
    for dtype in dtypes:
        c = cfg.replace_cache(dtype=dtype, page_size=0)
        for t in steps:
            exe, cache = compile_step(c, FLAGS.batch, t, FLAGS.width, FLAGS.num_pages,
                                      FLAGS.tensor_parallel)
            types = leaf_types(cache)
            copies = cache_copies(exe.as_text(), cache)
            copied = sum(types[_COPY.match(line)[1]] for line in copies)
            temp = exe.memory_analysis().temp_size_in_bytes
            step = "decode" if t == 1 else f"prefill {t}"
            print(f"| {dtype} | {step} | {len(copies)} | {copied / 2**20:.2f} | "
                  f"{temp / 2**20:.2f} | {cache_bytes(cache) / 2**20:.2f} |", flush=True)
            failed |= bool(copies)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    flags.DEFINE_string("config", "smollm2", "named config (configs/)")
    flags.DEFINE_integer("num_layers", 0, "only the first N decoder layers (0: all)")
    flags.DEFINE_integer("num_pages", 1153, "pages in the pool")
    flags.DEFINE_integer("batch", 1, "sequences per step")
    flags.DEFINE_string("chunks", "256", "prefill chunk lengths to compile, comma-separated")
    flags.DEFINE_integer("width", 8, "page-table width (pages)")
    flags.DEFINE_integer("tensor_parallel", 1, "devices on the tensor axis")
    flags.DEFINE_string("dtypes", "", "cache dtypes, comma-separated (default: every one)")
    flags.DEFINE_integer("time_steps", 0, "instead: run and time this many batch-1 decode "
                         "steps per dtype (random weights, a --context-token sequence)")
    flags.DEFINE_integer("context", 512, "tokens in the sequence before the timed steps")
    app.run(main)
