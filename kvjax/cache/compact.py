"""Token-granular eviction: move kept tokens down over the dropped ones, on device.

After a sequence drops tokens (kvjax/engine/eviction.py `tokens_to_drop`), its kept tokens are
packed in order into the first pages of its block table and the emptied tail pages go back to the
block manager (`BlockManager.drop_tokens` computes the moves). Every pool leaf of every segment
moves the same (page, slot) rows for all layers and KV heads at once: a per-token format's
codes and per-token metadata (bf16/fp8 words, int scales, TurboQuant codes and norms, KIVI
values) are copied bit for bit, so a moved token dequantizes exactly as before: no
re-quantization, no accumulated error. H2O's attention mass moves with its token.

What does not move: the full-precision ring (indexed and tagged by absolute position, which a
move does not change; the eviction window covers the ring window, so the ring's tokens are the
last ones and stay the last ones), and tokens before the first dropped one.

KIVI keys are quantized per channel over a page's tokens (their scale and zero are per page
group) and a page is sealed from the ring when its last slot is written. A token moved into
another page would need its page re-quantized (error compounding at every compaction: the
sinks' page would be re-quantized at each one, hundreds of times over a long session) and a
partly moved page could no longer be sealed from the ring (its earlier members are no longer
the positions just before it). So a cache with a grouped format evicts in units of a page
(`eviction_unit`): token granularity is page granularity there, exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.paged import NULL_PAGE, KVCache


def eviction_unit(cache: KVCache) -> int:
    """Tokens that must be evicted together: 1, or the page size when a segment stores a
    grouped format (KIVI keys)."""
    grouped = any(spec.group > 1 for seg in cache.segments for spec in (seg.k_spec, seg.v_spec))
    return cache.page_size if grouped else 1


@functools.partial(jax.jit, donate_argnums=0)
def _move(cache: KVCache, src_pages: jax.Array, src_slots: jax.Array, dst_pages: jax.Array,
          dst_slots: jax.Array) -> KVCache:
    ps = cache.page_size
    segments = []
    for seg in cache.segments:
        new = {}
        for name in ("k", "v"):
            leaves = []
            for leaf in getattr(seg, name):  # [layers, kv_heads, pages, rows, n]
                r = ps // leaf.shape[3]  # tokens per row (1; per-group leaves never move here)
                rows = leaf[:, :, src_pages, src_slots // r]  # gathered before any write
                leaves.append(leaf.at[:, :, dst_pages, dst_slots // r].set(
                    rows, mode="promise_in_bounds"))
            new[name] = tuple(leaves)
        if seg.mass is not None:  # [pages, kv_heads, page_size]
            new["mass"] = seg.mass.at[dst_pages, :, dst_slots].set(
                seg.mass[src_pages, :, src_slots], mode="promise_in_bounds")
        segments.append(seg.replace(**new))
    return cache.replace(segments=tuple(segments))


def compact(cache: KVCache, src_pages: np.ndarray, src_slots: np.ndarray,
            dst_pages: np.ndarray, dst_slots: np.ndarray) -> KVCache:
    """The cache (donated) with token (src_pages[i], src_slots[i]) copied to (dst_pages[i],
    dst_slots[i]) for every i, all layers, heads and leaves; every source is read before any
    destination is written. Moves are padded to a power of two (null page onto itself), so a
    session compiles a handful of shapes; a mesh's cache keeps its shardings."""
    n = len(src_pages)
    if n == 0:
        return cache
    size = 1 << max(n - 1, 0).bit_length()
    pad = np.full(size - n, NULL_PAGE, np.int32)
    args = [jnp.asarray(np.concatenate([np.asarray(a, np.int32), pad]))
            for a in (src_pages, src_slots, dst_pages, dst_slots)]
    shardings = jax.tree.map(lambda x: x.sharding, cache)
    out = _move(cache, *args)
    return jax.tree.map(lambda x, s: x if x.sharding == s else jax.device_put(x, s), out,
                        shardings)
