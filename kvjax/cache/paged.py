"""The paged KV cache: a pytree of page pools, passed into the forward and returned by it.

Pages are head-major (DESIGN.md): every pool array is [layers, kv_heads, num_pages, rows, n]
(kvjax/cache/layout.py), so KV heads shard on the tensor axis and a page of one head is
contiguous. A sequence's token t sits at page `page_table[t // page_size]`, slot `t % page_size`.
Page 0 is the null page: padding tokens are written there and no sequence owns it, so attention
(which masks every position at or beyond a sequence's length) never reads it.

Layers are grouped into segments of one storage format: with `bf16_edge_layers=N`, the first and
last N layers keep bf16 pages and the layers between them use the quantized format (vLLM's
skip-layers). Each segment is scanned on its own.

A quantized segment may keep a full-precision window: the last `window` tokens of each sequence
in a small dense ring buffer `[layers, kv_heads, num_slots + 1, window, head_dim]`, one slot per
running sequence (the extra slot takes padding writes). Attention reads positions within the
window from the ring and older ones from the compressed pages (KIVI's residual; for TurboQuant it
recovers most of the quantization loss, see quality-baselines.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.cache.layout import PoolSpec
from kvjax.config import CacheConfig, ModelConfig, layer_formats

NULL_PAGE = 0


@struct.dataclass
class Segment:
    """Layers [start, start + num_layers) stored in one format."""

    k: tuple[jax.Array, ...]  # pool leaves, each [num_layers, kv_heads, num_pages, rows, n]
    v: tuple[jax.Array, ...]
    wk: jax.Array | None  # window ring [num_layers, kv_heads, num_slots + 1, window, head_dim]
    wv: jax.Array | None
    k_spec: PoolSpec = struct.field(pytree_node=False)
    v_spec: PoolSpec = struct.field(pytree_node=False)
    start: int = struct.field(pytree_node=False)
    num_layers: int = struct.field(pytree_node=False)

    @property
    def window(self) -> int:
        return 0 if self.wk is None else self.wk.shape[3]


@struct.dataclass
class KVCache:
    segments: tuple[Segment, ...]
    page_size: int = struct.field(pytree_node=False)

    @property
    def num_pages(self) -> int:
        return self.segments[0].k[0].shape[2]

    def nbytes(self) -> int:
        return sum(leaf.nbytes for leaf in jax.tree.leaves(self))


def _segments(mc: ModelConfig, cc: CacheConfig) -> list[tuple[int, int, str]]:
    """(start, num_layers, format) runs of consecutive layers with the same cache format."""
    formats = layer_formats(mc.num_layers, cc)
    runs: list[tuple[int, int, str]] = []
    for i, f in enumerate(formats):
        if runs and runs[-1][2] == f:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, f)
        else:
            runs.append((i, 1, f))
    return runs


def pool_specs(mc: ModelConfig, cc: CacheConfig, fmt: str) -> tuple[PoolSpec, PoolSpec]:
    from kvjax.config import KV_CACHE_DTYPES

    k_method, v_method = KV_CACHE_DTYPES[fmt]
    # Distinct seeds for K and V: their rotations and sketches must be independent.
    return (PoolSpec(k_method, "key", mc.head_dim, cc.page_size, seed=cc.seed),
            PoolSpec(v_method, "value", mc.head_dim, cc.page_size, seed=cc.seed + 1))


def init_cache(mc: ModelConfig, cc: CacheConfig, num_pages: int, num_slots: int = 1) -> KVCache:
    """An empty pool of `num_pages` pages (page 0 is the null page) and, for formats with a
    window, ring buffers for `num_slots` concurrent sequences."""
    segments = []
    for start, n, fmt in _segments(mc, cc):
        k_spec, v_spec = pool_specs(mc, cc, fmt)
        window = cc.window_for(fmt)
        ring = None
        if window:
            shape = (n, mc.num_kv_heads, num_slots + 1, window, mc.head_dim)
            ring = jnp.zeros(shape, jnp.uint16)  # bf16 bits, like bf16 pages
        segments.append(Segment(
            k=k_spec.init(n, mc.num_kv_heads, num_pages), v=v_spec.init(n, mc.num_kv_heads,
                                                                        num_pages),
            wk=ring, wv=None if ring is None else jnp.zeros_like(ring),
            k_spec=k_spec, v_spec=v_spec, start=start, num_layers=n))
    return KVCache(segments=tuple(segments), page_size=cc.page_size)


def bytes_per_token(mc: ModelConfig, cc: CacheConfig) -> float:
    """Page bytes one token takes over all layers, K and V, metadata included (the window is a
    per-sequence constant, see `window_bytes_per_sequence`)."""
    total = 0.0
    for _, n, fmt in _segments(mc, cc):
        k_spec, v_spec = pool_specs(mc, cc, fmt)
        total += n * mc.num_kv_heads * (k_spec.bytes_per_token() + v_spec.bytes_per_token())
    return total


def window_bytes_per_sequence(mc: ModelConfig, cc: CacheConfig) -> int:
    """Bytes of the full-precision ring buffers one running sequence holds."""
    return sum(2 * n * mc.num_kv_heads * cc.window_for(fmt) * mc.head_dim * 2
               for _, n, fmt in _segments(mc, cc))


def slot_mapping(page_table: jax.Array, positions: jax.Array, lengths: jax.Array,
                 page_size: int) -> tuple[jax.Array, jax.Array]:
    """Where each new token is written: (page ids, slots), both [batch, tokens].

    page_table: [batch, max_pages] int32; positions: [batch, tokens] absolute token positions;
    lengths: [batch] tokens valid after this step. Tokens at or beyond a sequence's length are
    padding and are sent to the null page, so they can never overwrite a live token.
    """
    page_index = jnp.clip(positions // page_size, 0, page_table.shape[1] - 1)
    pages = jnp.take_along_axis(page_table, page_index, axis=1)
    pages = jnp.where(positions < lengths[:, None], pages, NULL_PAGE)
    return pages, positions % page_size


def write_layer(seg: Segment, layer: jax.Array, k: jax.Array, v: jax.Array,
                positions: jax.Array, lengths: jax.Array, page_table: jax.Array,
                window_slots: jax.Array | None) -> Segment:
    """Quantize and write one layer's new keys and values into the segment, in place under jit.

    layer: index within the segment; k, v: [batch, tokens, kv_heads, head_dim];
    positions: [batch, tokens]; lengths: [batch] tokens valid after this step;
    page_table: [batch, max_pages]; window_slots: [batch] ring slot of each row (or None).
    """
    pages, slots = slot_mapping(page_table, positions, lengths, seg.k_spec.page_size)
    new = {}
    for name, x, spec, ring in (("k", k, seg.k_spec, seg.wk), ("v", v, seg.v_spec, seg.wv)):
        pool = getattr(seg, name)
        if spec.group == 1:
            pool = spec.write_tokens(pool, layer, x, pages, slots)
        else:
            pool = _seal_pages(spec, pool, layer, x, positions, lengths, pages, ring,
                               window_slots)
        new[name] = pool
        if ring is not None:
            new["w" + name] = _write_window(ring, layer, x, positions, lengths, window_slots)
    return seg.replace(**new)


def _write_window(ring: jax.Array, layer: jax.Array, x: jax.Array, positions: jax.Array,
                  lengths: jax.Array, window_slots: jax.Array) -> jax.Array:
    """Tokens among the last W of their sequence go to ring entry position % W of their slot;
    the rest (older tokens of a long chunk, padding) go to the spare last slot."""
    w, trash = ring.shape[3], ring.shape[2] - 1
    keep = (positions < lengths[:, None]) & (positions >= (lengths - w)[:, None])
    slot = jnp.where(keep, window_slots[:, None], trash)
    idx = jnp.where(keep, positions % w, 0)
    b, t, h, d = x.shape
    words = jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    return ring.at[layer, :, slot.reshape(-1), idx.reshape(-1)].set(
        words.reshape(b * t, h, d), mode="promise_in_bounds")


def _seal_pages(spec: PoolSpec, pool: tuple[jax.Array, ...], layer: jax.Array, x: jax.Array,
                positions: jax.Array, lengths: jax.Array, pages: jax.Array, ring: jax.Array,
                window_slots: jax.Array) -> tuple[jax.Array, ...]:
    """Grouped methods (KIVI keys): a token that fills the last slot of its page seals the page:
    the page's tokens (from this chunk, or from the ring for tokens of earlier steps) are
    quantized together and written at once. Runs before the ring is overwritten."""
    s = spec.page_size
    b, t, h, d = x.shape
    seals = ((positions % s) == s - 1) & (positions < lengths[:, None])  # [b, t]
    member = positions[:, :, None] - (s - 1) + jnp.arange(s)  # [b, t, s] positions in the page
    start = positions[:, :1, None]
    from_chunk = member >= start
    chunk_idx = jnp.clip(member - start, 0, t - 1).reshape(b, t * s)
    # Round this chunk's tokens to bf16 like the ring's, so a page quantizes the same values
    # whether it is sealed in one prefill chunk or token by token.
    x = x.astype(jnp.bfloat16).astype(jnp.float32)
    chunk_vals = jnp.take_along_axis(x, chunk_idx[:, :, None, None], axis=1)
    w = ring.shape[3]
    per_seq = ring[layer, :, window_slots]  # [b, kv_heads, W, d] (bf16 bits)
    ring_vals = jnp.take_along_axis(per_seq, (member % w).reshape(b, 1, t * s, 1), axis=2)
    ring_vals = jnp.moveaxis(
        jax.lax.bitcast_convert_type(ring_vals, jnp.bfloat16).astype(jnp.float32), 1, 2)
    vals = jnp.where(from_chunk.reshape(b, t * s, 1, 1), chunk_vals, ring_vals)
    vals = vals.reshape(b * t, s, h, d).transpose(0, 2, 1, 3)  # [b*t, kv_heads, page_size, d]
    target = jnp.where(seals, pages, NULL_PAGE).reshape(-1)
    return spec.write_pages(pool, layer, vals, target)
