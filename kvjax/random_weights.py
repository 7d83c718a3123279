"""Random weights with a model's real shapes, drawn straight into their shards (`--random-weights`).

`models.random_params` draws every parameter eagerly on one device: for the 70B-shaped smoke run
(`kvjax.serve --config llama70b_turbo --random-weights --num-layers 2 --tensor-parallel 8`) that
is every full parameter at once plus the RNG words of the largest (the embedding's 1.05 B
elements), and the run was OOM-killed at 19 GB on a 23 GB machine. Here each parameter is drawn
by jitted programs whose outputs carry its sharding, in its final dtype:

* A parameter of at most `BLOCK` elements is drawn whole, with `models.random_params`' key,
  scaling and dtype, so its values are bit-identical to it (tested): every test config (tiny,
  SmolLM2) is entirely in this case.
* A larger one is drawn in blocks of at most `BLOCK` elements along an axis no mesh ever shards
  (LOGICAL_RULES maps it to None), each block from its own key `fold_in(key_i, block)`, and
  written in place into the donated, sharded buffer. The block layout depends only on the shape,
  so the values are the same on one device and on any mesh; they differ from
  `models.random_params` (which nothing of that size is compared with).

Why blocks: threefry is partitionable (each device computes only its shard's bits), but its
rounds keep ~4 words per element alive, and the fake CPU devices of one process run their shards
concurrently: drawing the 70B embedding whole needed 2.1 GB of temporaries per device, 17 GB in
all. A block of 2**25 elements keeps the temporaries of all devices together near 0.5 GB.

Excess precision is off in these programs and an optimization barrier separates the draw from its
scaling, so the bf16/f32 roundings are the eager draw's (XLA would otherwise fold the scale into
normal's own sqrt(2) factor).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from kvjax import sharding
from kvjax.config import ModelConfig

BLOCK = 1 << 25  # most elements one draw produces (all devices together)
_OPTIONS = {"xla_allow_excess_precision": False}


def _std(name: str, shape: tuple[int, ...]) -> float:
    """models.random_params' scaling: 0.02 for biases, 1 for the embedding, fan_in^-1/2 else."""
    if name.split(".")[-1].startswith("b"):
        return 0.02
    return 1.0 if name == "embed" else shape[-2] ** -0.5


def _normal(key: jax.Array, shape: tuple[int, ...], dtype, std: float) -> jax.Array:
    return std * jax.lax.optimization_barrier(jax.random.normal(key, shape, dtype))


def _whole(key: jax.Array, *, name: str, shape: tuple[int, ...], dtype) -> jax.Array:
    if name.endswith("norm"):
        return jnp.ones(shape, dtype)
    return _normal(key, shape, dtype, _std(name, shape))


def _block(buf: jax.Array, key: jax.Array, b: jax.Array, start: jax.Array, *, axis: int,
           rows: int, std: float) -> jax.Array:
    """buf with block b (rows [start, start + rows) of `axis`) drawn from fold_in(key, b)."""
    shape = buf.shape[:axis] + (rows,) + buf.shape[axis + 1:]
    block = _normal(jax.random.fold_in(key, b), shape, buf.dtype, std)
    at = [jnp.int32(0)] * buf.ndim
    at[axis] = start
    return jax.lax.dynamic_update_slice(buf, block, at)


def block_axis(name: str, shape: tuple[int, ...]) -> int:
    """The longest axis of the parameter that no mesh shards (its blocks stay device-local)."""
    free = [a for a, ax in enumerate(sharding.PARAM_AXES[name])
            if sharding.LOGICAL_RULES[ax] is None]
    return max(free, key=lambda a: shape[a])


def random_params(mc: ModelConfig, seed: int = 0, dtype=jnp.float32,
                  mesh: Mesh | None = None) -> dict[str, jax.Array]:
    """Every parameter of `mc` in `dtype`, placed by `sharding.param_shardings` on `mesh` (one
    device without one). Peak memory: the final shards plus one block's temporaries."""
    import models

    key = jax.random.key(seed)
    shardings = sharding.param_shardings(mc, mesh) if mesh is not None else {}
    out = {}
    for i, (name, shape) in enumerate(sorted(models.param_shapes(mc).items())):
        shape, s, k = tuple(shape), shardings.get(name), jax.random.fold_in(key, i)
        n = math.prod(shape)
        if n <= BLOCK or name.endswith("norm"):
            f = jax.jit(functools.partial(_whole, name=name, shape=shape, dtype=dtype),
                        out_shardings=s)
            out[name] = f.lower(k).compile(compiler_options=_OPTIONS)(k)
            continue
        axis = block_axis(name, shape)
        rows = max(1, BLOCK // (n // shape[axis]))
        buf = jax.jit(lambda shape=shape: jnp.zeros(shape, dtype), out_shardings=s)()
        f = jax.jit(functools.partial(_block, axis=axis, rows=rows, std=_std(name, shape)),
                    out_shardings=s, donate_argnums=0)
        zero = jnp.int32(0)
        exe = f.lower(buf, k, zero, zero).compile(compiler_options=_OPTIONS)
        for b in range(-(-shape[axis] // rows)):
            # The last block ends at the axis' end (overlapping its predecessor when the axis is
            # not a multiple of rows): one compiled shape, and still a function of the shape only.
            start = min(b * rows, shape[axis] - rows)
            buf = exe(buf, k, jnp.int32(b), jnp.int32(start))
        out[name] = buf
    return out


__all__ = ["BLOCK", "block_axis", "random_params"]
