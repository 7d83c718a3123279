"""Device-local layouts for the KV cache's page pools on TPU (`pool_formats`).

Why: a jit parameter gets XLA's *default* device layout unless told otherwise, and on TPU the
default for an array whose last dim is under 128 lanes puts the pages on lanes (an int8 SmolLM2
code leaf s8[L, Hkv, pages, 16, 64] is stored `{2,4,3,1,0:T(32,128)}`), while the model's layer
loop carries the pool, and the Mosaic kernels read it, row-major (`{4,3,2,1,0:T(8,128)(4,1)}`).
So every step relayouted the whole pool into the loop at its entry and back at its exit (about
2x the pool's bytes of traffic per step, and a padded copy of the pool in temporaries). Storing
the pool in the layout the loop wants, and pinning it as every step's input and output layout
(so the donated buffer aliases), removes both copies.

The layouts are a fixed rule (not `Layout.AUTO` per executable: every step executable of a
Runner, and the jits that touch the cache between steps, must agree on one layout, or a step
would meet a cache in another layout). For a pool leaf [layers, kv_heads, pages, rows, n]:
* n > 1 (codes, KIVI's metadata): row-major, (8, 128) tiles, narrow types packed (4, 1) / (2, 1)
  as XLA tiles them; a size-1 `rows` dim goes major, so the tiles span (pages, n).
  This is the layout of the loop carry `Layout.AUTO` picks for these leaves (v5e, SmolLM2
  int8 / turbo3.5 / kivi4 one-layer decode steps, /work/notes/tpu6.md).
  KIVI keys sealed per page whose codes are narrower than the page (kivi2: [32, 16]) are
  stored transposed, n on sublanes and the page's 32 rows on lanes, as AUTO picks (their page
  write, `PoolSpec.write_pages`, produces that; kivi2 32K one layer: 3 pool copies -> 1, the
  per-layer relayout for the Mosaic operand that AUTO keeps too).
* n == 1 (per-token scales and norms): XLA's default (pages on lanes), what the kernels' rowed
  gather reads (kvjax/pallas_kernels/_rowed.py) and what AUTO keeps.
The bf16 window rings [layers, kv_heads, slots + 1, window, head_dim] follow the same rule
(written per (token, head) like the pools, kvjax/cache/paged.py `_write_window`, the loop carries
them row-major); the one-token sinks, tags and H2O mass keep the default layout (the sinks are
[.., slots + 1, 1, head_dim]: a few KB, and the loop carries them heads-minor).

Lane padding: a row-major leaf whose n is under 128 lanes takes 128 / n of its logical bytes
(int8 d64: 2x; KIVI's [32, 2] scales: 64x). The loop carried the pool in that form before too,
as a temporary beside the dense pool, so the step's peak memory does not grow (it shrinks by
the dense copy); the memory planner's bytes per token stay the logical figure on every backend.

CPU and GPU: no formats (their default layout is already row-major).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental.layout import Format, Layout
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

# XLA TPU's sub-tiling of narrow types inside an (8, 128) tile: k rows per 32-bit word.
_PACK = {1: (4, 1), 2: (2, 1)}


def pool_leaf_layout(shape: tuple[int, ...], dtype: Any) -> Layout | None:
    """The TPU layout for a pool leaf [layers, kv_heads, pages, rows, n] (or a ring [layers,
    kv_heads, slots, entries, head_dim]); None: the default."""
    if len(shape) != 5 or shape[4] == 1:
        return None
    itemsize = np.dtype(dtype).itemsize
    tiling = ((8, 128), _PACK[itemsize]) if itemsize in _PACK else ((8, 128),)
    order = (0, 3, 1, 2, 4) if shape[3] == 1 else (0, 1, 2, 3, 4)
    return Layout(major_to_minor=order, tiling=tiling)


def pin(cache: Any, platform: str) -> Any:
    """The cache (arrays or ShapeDtypeStructs) with every segment marked `pinned` where this
    module's formats apply (TPU; as is elsewhere). Mark it before building its formats: the
    mark is static pytree data, so formats and cache must agree on it."""
    if platform != "tpu":
        return cache
    return cache.replace(segments=tuple(s.replace(pinned=True) for s in cache.segments))


def whole_operand(seg: Any, leaf: Any, sealed: bool = False) -> bool:
    """Whether a Mosaic kernel takes this pool leaf [layers, kv_heads, pages, rows, n] of `seg`
    whole, the layer in its index map, rather than as its layer's slice (window rings: always
    sliced, see kvjax/pallas_kernels/_core.py).

    A slice of the layer loop's carry is a copy of that layer's every page (not just the
    batch's), made in every layer of every step: for bf16 SmolLM2 at 128K, 50 MB written and
    read again per layer. The whole leaf is no copy at all, but only where the loop carries the
    leaf in the layout it is stored in, which is the Mosaic operand's: pinned pools (`pin`) whose
    rows fill half a 128-lane tile or more (bf16 / int8 / fp8 codes at head_dim 64 and up; v5e
    whole-model decode, SmolLM2 32K: bf16 1,091 -> 821 MB a step, int8 786 -> 509). XLA carries
    narrower code leaves (u8[.., 16, 32]: int4, turbo4, kivi4 at head_dim 64) with pages on
    lanes, so a whole operand is relayouted in every layer (v5e whole-model decode, turbo4 32K:
    2.25 -> 3.00 GB a step whole). Those stay sliced, and so do KIVI keys stored transposed
    (`sealed` and n < rows) and n == 1 leaves (per-token scales: kvjax/pallas_kernels/_rowed.py,
    or KIVI's per-group ones)."""
    shape = tuple(leaf.shape)
    if not seg.pinned or len(shape) != 5 or shape[3] == 1 or shape[4] == 1:
        return False
    if sealed and shape[4] < shape[3]:
        return False
    return shape[4] * np.dtype(leaf.dtype).itemsize >= 64


def pool_formats(cache: Any, shardings: Any, platform: str) -> Any | None:
    """Per-leaf `Format`s (pool leaves) or shardings (the rest) for a cache pytree (a KVCache
    of arrays or ShapeDtypeStructs) placed on `shardings` (a matching pytree), for the step
    jits' cache output and the cache's placement on `platform`; None where the default layout
    is already right (every platform but TPU)."""
    if platform != "tpu":
        return None

    def pools(seg, seg_sh):
        def one(leaf, sh, sealed=False):  # sealed: KIVI keys (quantized per page)
            layout = pool_leaf_layout(tuple(leaf.shape), leaf.dtype)
            if layout is not None and sealed and 1 < leaf.shape[4] < leaf.shape[3]:
                layout = layout.update(major_to_minor=(0, 1, 2, 4, 3))
            return sh if layout is None else Format(layout, sh)
        sealed = seg.k_spec.group > 1
        rings = {n: one(getattr(seg, n), getattr(seg_sh, n)) for n in ("wk", "wv")
                 if getattr(seg, n) is not None}
        keys = zip(seg.k, seg_sh.k, strict=True)
        return seg_sh.replace(k=tuple(one(a, b, sealed) for a, b in keys),
                              v=tuple(map(one, seg.v, seg_sh.v)), **rings)

    return shardings.replace(segments=tuple(
        pools(seg, sh) for seg, sh in zip(cache.segments, shardings.segments, strict=True)))


def resident_bytes(cfg: Any, device: Any) -> tuple[float, float]:
    """(bytes per page, bytes per sequence slot) of cfg's KV cache as stored on `device` in the
    layouts above (all KV heads; a mesh splits them): pool leaves with their lane and sublane
    padding, window rings, sinks and tags. Off TPU the layouts are the default ones and this
    equals the logical figure. Measured, not modelled: an identity over abstract caches of two
    page counts and two slot counts is compiled (not run) and the compiler's argument bytes are
    differenced, so the figure is the one the device allocates (3 small compiles)."""
    from kvjax.cache import init_cache

    def size(pages: int, slots: int) -> int:
        cache = jax.eval_shape(lambda: init_cache(cfg.model, cfg.cache, pages, num_slots=slots))
        shards = jax.tree.map(lambda _: SingleDeviceSharding(device), cache)
        fmts = pool_formats(cache, shards, device.platform) or shards
        compiled = jax.jit(lambda c: c).lower(abstract(cache, fmts)).compile()
        return compiled.memory_analysis().argument_size_in_bytes

    # 128 pages apart: the per-token leaves keep pages on lanes, padded to 128 on TPU
    base = size(129, 1)
    return (size(257, 1) - base) / 128, float(size(129, 9) - base) / 8


def abstract(cache: Any, formats: Any) -> Any:
    """ShapeDtypeStructs of a cache (arrays or structs) carrying `formats` (from pool_formats)."""
    return jax.tree.map(lambda a, f: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=f),
                        cache, formats)


def pinned_forward(mesh: Any, formats: Any) -> Callable:
    """`models.forward` with the cache donated and returned in `formats` (its input layout is
    the committed cache's own, so input and output agree and the buffers alias); logits
    replicated over `mesh`, or on the first device without one. Same signature (and `.jitted`
    for ahead-of-time compiles) as `kvjax.sharding.sharded_forward`."""
    import models.transformer
    from kvjax import sharding

    logits = (SingleDeviceSharding(jax.devices()[0]) if mesh is None
              else NamedSharding(mesh, PartitionSpec()))
    jitted = jax.jit(models.transformer.forward.__wrapped__, static_argnames=("graphdef",),
                     donate_argnames=("cache",), out_shardings=(logits, formats))
    if mesh is None:
        return jitted

    def put(x):
        if x is None or (isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding)
                         and x.sharding.mesh == mesh):
            return x
        return sharding.put_batch(mesh, np.asarray(x))

    def forward(graphdef, params, tokens, positions, cache, *rest):
        with sharding.tracing_mesh(mesh):
            return jitted(graphdef, params, put(tokens), put(positions), cache,
                          *(put(x) for x in rest))

    forward.jitted = jitted
    return forward
