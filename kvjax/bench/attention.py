"""Paged decode attention benchmark: Pallas kernels vs the XLA path, every cache dtype.

    python -m kvjax.bench.attention [--contexts 4096,...,131072] [--batches 1,8,32]
        [--dtypes bf16,fp8,...] [--iters 20] [--small] [--backend auto] [--k-splits 0]

One layer of a Llama-70B-shaped attention per device (64 query heads, 8 KV heads, head_dim 128)
over pages filled with random codes; every sequence of the batch has the full context. Columns:
  ms          median time of one decode-attention call (Pallas)
  MB read     bytes the kernel must read: K/V codes + metadata of every valid token (+ q, out)
  GB/s, %copy achieved bandwidth, and against a measured device copy (read + write of 1 GiB)
  x bf16      bf16 Pallas time / this time (what compression buys)
  xla ms, x xla   the XLA path (dequantize + attend) time and its ratio; "-" when it would not
                  fit (it materializes f32 K/V of the whole batch)
  target      issue 5's H100 targets: bf16 >= 70% of copy at 32K+; compressed <= bf16 time x
              byte ratio x 1.5
On the CPU the kernels run in interpret mode: numbers only check that the harness runs (--small
picks tiny contexts). Run it on an H100/H200 for the table in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import pallas_kernels
from kvjax.attention import paged_attention as xla_attention
from kvjax.cache.paged import init_cache
from kvjax.config import CacheConfig, ModelConfig

DTYPES = ("bf16", "fp8", "int8", "int4", "kivi4", "kivi2", "turbo4", "turbo3", "turbo2.5")
MODEL = dict(num_heads=64, num_kv_heads=8, head_dim=128)


def _time(fn, iters: int) -> float:
    jax.block_until_ready(fn())
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def copy_bandwidth(nbytes: int = 1 << 30, iters: int = 10) -> float:
    """Bytes/s of a device copy (read + write)."""
    x = jnp.zeros((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda x: x + 1.0)
    return 2 * nbytes / _time(lambda: f(x), iters)


def _fill(seg, key):
    """Random codes in every pool leaf (floats as bits of N(0,1) values, ints as random bits)."""
    def one(leaf_key, leaf, logical):
        if jnp.issubdtype(jnp.dtype(logical), jnp.floating):
            v = jax.random.normal(leaf_key, leaf.shape, jnp.float32).astype(logical)
            return jax.lax.bitcast_convert_type(v, leaf.dtype) if v.dtype != leaf.dtype else v
        return jax.random.bits(leaf_key, leaf.shape, leaf.dtype) if leaf.dtype != jnp.int8 \
            else jax.random.randint(leaf_key, leaf.shape, -127, 128, jnp.int32).astype(jnp.int8)

    new = {}
    for name, spec in (("k", seg.k_spec), ("v", seg.v_spec)):
        _, info = spec._leaves
        leaves = []
        for i, (leaf, (_, _, dt)) in enumerate(zip(getattr(seg, name), info, strict=True)):
            leaves.append(one(jax.random.fold_in(key, hash((name, i)) % 2**31), leaf, dt))
        new[name] = tuple(leaves)
    return seg.replace(**new)


def bench_one(dtype: str, context: int, batch: int, iters: int, backend: str, xla: bool,
              k_splits: int = 0):
    mc = ModelConfig(num_layers=1, hidden_size=64, intermediate_size=64, vocab_size=32, **MODEL)
    # KIVI keeps its 128-token window (it cannot seal pages without one); others have none.
    cc = CacheConfig(dtype=dtype, page_size=0, window=-1 if dtype.startswith("kivi") else 0)
    s = cc.page_size
    pages = context // s
    num_pages = batch * pages + 1
    seg = init_cache(mc, cc, num_pages, num_slots=batch).segments[0]
    seg = _fill(seg, jax.random.key(0))
    pt = (1 + np.random.default_rng(0).permutation(batch * pages)).reshape(batch, pages)
    pt, lens = jnp.asarray(pt, jnp.int32), jnp.full((batch,), context, jnp.int32)
    q = jax.random.normal(jax.random.key(1), (batch, 1, MODEL["num_heads"], MODEL["head_dim"]),
                          jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32)
    layer = jnp.int32(0)
    slots = jnp.arange(batch, dtype=jnp.int32) if seg.window else None
    f = jax.jit(lambda q, seg: pallas_kernels.paged_attention(q, seg, layer, pt, lens, slots,
                                                              backend=backend,
                                                              k_splits=k_splits))
    t = _time(lambda: f(q, seg), iters)
    tx = None
    if xla:
        g = jax.jit(lambda q, seg: xla_attention(q, seg, layer, pt, lens, (lens - 1)[:, None],
                                                 slots))
        tx = _time(lambda: g(q, seg), iters)
    per_tok = MODEL["num_kv_heads"] * (seg.k_spec.bytes_per_token() + seg.v_spec.bytes_per_token())
    nbytes = per_tok * context * batch + 2 * q.size * q.dtype.itemsize
    nbytes += 2 * 2 * MODEL["num_kv_heads"] * seg.window * MODEL["head_dim"] * batch  # bf16 ring
    return t, tx, nbytes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="4096,8192,32768,131072")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--backend", default="auto", choices=pallas_kernels.BACKENDS)
    ap.add_argument("--k-splits", type=int, default=0,
                    help="KV splits per (row, KV head); 0: auto (fill the GPU; the first H200 "
                         "table, 2026-11-30, ran 8)")
    ap.add_argument("--small", action="store_true",
                    help="CPU smoke run: contexts 256,1024, batches 1,2, 2 iterations")
    ap.add_argument("--max-gb", type=float, default=24.0,
                    help="skip cases whose bf16 cache would exceed this many GB")
    args = ap.parse_args(argv)
    if args.small:
        args.contexts, args.batches, args.iters = "256,1024", "1,2", 2
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    dtypes = args.dtypes.split(",")
    dev = jax.devices()[0]
    copy = copy_bandwidth(1 << 26 if args.small else 1 << 30)
    print(f"# device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"copy bandwidth {copy / 1e9:.0f} GB/s, backend {args.backend}, "
          f"k_splits {args.k_splits or 'auto'}")
    print(f"# one layer, {MODEL['num_heads']} q heads / {MODEL['num_kv_heads']} KV heads, "
          f"head_dim {MODEL['head_dim']}; median of {args.iters}")
    print("| context | batch | dtype | ms | MB read | GB/s | %copy | x bf16 | xla ms | x xla "
          "| target |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for context in contexts:
        for batch in batches:
            bf16_bytes = 2 * 2 * MODEL["num_kv_heads"] * MODEL["head_dim"] * context * batch
            if bf16_bytes > args.max_gb * 1e9:
                continue
            xla = 4 * bf16_bytes <= args.max_gb * 1e9 / 2  # f32 K/V copies of the whole batch
            base = None
            for dtype in dtypes:
                t, tx, nbytes = bench_one(dtype, context, batch, args.iters, args.backend, xla,
                                          args.k_splits)
                if dtype == "bf16":
                    base = (t, nbytes)
                bw = nbytes / t
                target = ""
                if base is not None and context >= 32768:
                    if dtype == "bf16":
                        target = "ok" if bw >= 0.7 * copy else "MISS"
                    else:
                        target = "ok" if t <= base[0] * nbytes / base[1] * 1.5 else "MISS"
                print(f"| {context} | {batch} | {dtype} | {t * 1e3:.3f} | {nbytes / 1e6:.1f} "
                      f"| {bw / 1e9:.0f} | {100 * bw / copy:.0f}% "
                      f"| {'' if base is None else f'{base[0] / t:.2f}'} "
                      f"| {'-' if tx is None else f'{tx * 1e3:.3f}'} "
                      f"| {'-' if tx is None else f'{tx / t:.2f}'} | {target} |", flush=True)


if __name__ == "__main__":
    main()
