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

Ring entries are indexed by a token's *absolute* position (`abs % window`), which eviction never
changes (cache positions shift down when pages are dropped), and each entry is tagged with the
absolute position it holds (`wpos`, -1 = nothing). Attention reads an entry only when its tag
matches, so a sequence never reads ring entries it did not write (a prefix hit whose first chunk
is shorter than the window, a slot's previous occupant, another tenant): such positions fall back
to the sequence's own pages. `reset_window_slot` clears a slot's tags when a sequence takes it.

Attention sink: a quantized segment may also keep each sequence's first `sinks` tokens (absolute
positions [0, sinks)) exact, in bf16 buffers `sk`, `sv` [layers, kv_heads, num_slots + 1, sinks,
head_dim] with the ring's slot indexing, tagged like the ring (`spos`: the absolute position an
entry holds, -1 = nothing; reset with the slot). The first token's key is a long, uncentred
vector that every later query reads, so its quantization error is a systematic shift of the
sink's softmax mass rather than noise that averages out over tokens (IntactKV, StreamingLLM).
The token is written to the pages too; a row whose sink tags all match reads positions
[0, sinks) from the sink and only [sinks, ...) from its pages (`sink_page_lo`), else (a prefix
hit, a slot's previous occupant, a sequence shorter than `sinks`) everything from its pages.

Absolute positions: without eviction they equal cache positions. After eviction the caller passes
`page_pos` [batch, max_pages], the absolute position of each page's first token (or, after
token-granular eviction, [batch, max_pages * page_size], each slot's: kvjax/cache/compact.py);
RoPE, the ring and the key re-rotation in kvjax/attention.py (StreamingLLM's positions within the
cache) use it.

H2O: a segment may carry `mass` [num_pages, kv_heads, page_size] f32, the softmax mass each
cached token received, summed over layers, query rows and the query heads of each KV head
(kvjax/attention.py accumulates it; a token's entry is zeroed when it is written).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax.cache.layout import PoolSpec, _heads, scatter_rows
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
    wpos: jax.Array | None = None  # ring tags [num_layers, num_slots + 1, window] int32 (-1: none)
    mass: jax.Array | None = None  # H2O attention mass [num_pages, kv_heads, page_size] f32
    sk: jax.Array | None = None  # exact sink [num_layers, kv_heads, num_slots + 1, sinks, d] bf16
    sv: jax.Array | None = None  # bits
    spos: jax.Array | None = None  # sink tags [num_layers, num_slots + 1, sinks] int32 (-1: none)
    # Stored in kvjax.pool_formats' pinned layouts (the Runner on TPU, `pool_formats.pin`): a
    # Mosaic kernel may then take a whole [layers, ...] leaf as its operand, the layer in its
    # index map, without XLA copying the layer's slice first (`pool_formats.whole_operand`).
    pinned: bool = struct.field(pytree_node=False, default=False)

    @property
    def window(self) -> int:
        return 0 if self.wk is None else self.wk.shape[3]

    @property
    def sinks(self) -> int:
        return 0 if self.sk is None else self.sk.shape[3]


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


def pool_specs(mc: ModelConfig, cc: CacheConfig, fmt: str, start: int = 0
               ) -> tuple[PoolSpec, PoolSpec]:
    """K and V layouts of the segment whose first layer is `start`."""
    from kvjax.config import KV_CACHE_DTYPES

    k_method, v_method = KV_CACHE_DTYPES[fmt]
    cal = None
    if cc.calibration and fmt not in ("bf16", "f32"):
        from kvjax.calibrate import cached_calibration

        cal = cached_calibration(cc.calibration)
        cal.check(mc.num_layers, mc.num_kv_heads, mc.head_dim)
        if cal.rope_centred:
            from models.layers import rope_inv_freq

            cal.check_rope(rope_inv_freq(mc))
    # Distinct seeds for K and V: their rotations and sketches must be independent.
    return (PoolSpec(k_method, "key", mc.head_dim, cc.page_size, seed=cc.seed,
                     calibration=cal, first_layer=start),
            PoolSpec(v_method, "value", mc.head_dim, cc.page_size, seed=cc.seed + 1,
                     calibration=cal, first_layer=start))


def init_cache(mc: ModelConfig, cc: CacheConfig, num_pages: int, num_slots: int = 1) -> KVCache:
    """An empty pool of `num_pages` pages (page 0 is the null page) and, for formats with a
    window, ring buffers for `num_slots` concurrent sequences."""
    segments = []
    for start, n, fmt in _segments(mc, cc):
        k_spec, v_spec = pool_specs(mc, cc, fmt, start)
        window = cc.window_for(fmt)
        ring = sink = None
        if window:
            shape = (n, mc.num_kv_heads, num_slots + 1, window, mc.head_dim)
            ring = jnp.zeros(shape, jnp.uint16)  # bf16 bits, like bf16 pages
        sinks = cc.sinks_for(fmt)
        if sinks:
            sink = jnp.zeros((n, mc.num_kv_heads, num_slots + 1, sinks, mc.head_dim), jnp.uint16)
        segments.append(Segment(
            k=k_spec.init(n, mc.num_kv_heads, num_pages), v=v_spec.init(n, mc.num_kv_heads,
                                                                        num_pages),
            wk=ring, wv=None if ring is None else jnp.zeros_like(ring),
            k_spec=k_spec, v_spec=v_spec, start=start, num_layers=n,
            wpos=None if ring is None else jnp.full((n, num_slots + 1, window), -1, jnp.int32),
            sk=sink, sv=None if sink is None else jnp.zeros_like(sink),
            spos=None if sink is None else jnp.full((n, num_slots + 1, sinks), -1, jnp.int32)))
    return KVCache(segments=tuple(segments), page_size=cc.page_size)


@functools.partial(jax.jit, donate_argnums=0)
def reset_window_slot(cache: KVCache, slot: jax.Array) -> KVCache:
    """Forget what ring slot `slot` holds (its ring and sink tags), for a sequence that takes
    the slot."""
    def reset(seg: Segment) -> Segment:
        if seg.wpos is not None:
            seg = seg.replace(wpos=seg.wpos.at[:, slot].set(-1))
        if seg.spos is not None:
            seg = seg.replace(spos=seg.spos.at[:, slot].set(-1))
        return seg
    return cache.replace(segments=tuple(reset(seg) for seg in cache.segments))


def with_attention_mass(cache: KVCache, zeros=jnp.zeros) -> KVCache:
    """The cache with H2O's per-token attention-mass accumulators (`zeros(shape, dtype)`: placed
    where the caller wants them, e.g. replicated over a mesh); a static switch: a cache without
    them compiles attention without the extra reduction."""
    return cache.replace(segments=tuple(
        seg if seg.mass is not None else seg.replace(mass=zeros(
            (seg.k[0].shape[2], seg.k[0].shape[1], cache.page_size), jnp.float32))
        for seg in cache.segments))


def attention_mass(cache: KVCache, pages: list[int] | np.ndarray) -> np.ndarray:
    """Accumulated mass of these pages' tokens, per KV head: [len(pages), kv_heads, page_size]."""
    idx = jnp.asarray(np.asarray(pages, np.int32))
    seg0 = cache.segments[0]
    total = np.zeros((len(idx), seg0.k[0].shape[1], cache.page_size), np.float32)
    for seg in cache.segments:
        if seg.mass is None:
            continue
        if seg.mass.is_fully_addressable:
            total += np.asarray(seg.mass[idx])
        else:  # over processes: the mass is replicated; read this process's replica
            total += np.asarray(seg.mass.addressable_data(0))[np.asarray(pages, np.int32)]
    return total


def absolute_positions(page_pos: jax.Array | None, positions: jax.Array, page_size: int,
                       max_pages: int | None = None) -> jax.Array:
    """Cache positions [batch, n] -> absolute positions (identity without `page_pos`).

    page_pos: [batch, max_pages] each page's first absolute position, or, after token-granular
    eviction, [batch, max_pages * page_size] each slot's (told apart by `max_pages`, the page
    table's width; the same thing when page_size is 1)."""
    if page_pos is None:
        return positions
    unit = 1 if max_pages is not None and page_pos.shape[1] != max_pages else page_size
    idx = jnp.clip(positions // unit, 0, page_pos.shape[1] - 1)
    return jnp.take_along_axis(page_pos, idx, axis=1) + positions % unit


def bytes_per_token(mc: ModelConfig, cc: CacheConfig) -> float:
    """Page bytes one token takes over all layers, K and V, metadata included (the window is a
    per-sequence constant, see `window_bytes_per_sequence`)."""
    total = 0.0
    for start, n, fmt in _segments(mc, cc):
        k_spec, v_spec = pool_specs(mc, cc, fmt, start)
        total += n * mc.num_kv_heads * (k_spec.bytes_per_token() + v_spec.bytes_per_token())
    return total


def window_bytes_per_sequence(mc: ModelConfig, cc: CacheConfig) -> int:
    """Bytes of the full-precision per-sequence buffers one running sequence holds: the bf16
    window rings and the exact sink (`sink_bytes_per_sequence`)."""
    return sum(2 * n * mc.num_kv_heads * cc.window_for(fmt) * mc.head_dim * 2
               for _, n, fmt in _segments(mc, cc)) + sink_bytes_per_sequence(mc, cc)


def sink_bytes_per_sequence(mc: ModelConfig, cc: CacheConfig) -> int:
    """Bytes of one sequence's exact sink tokens: bf16 K and V, and their int32 tags."""
    return sum(n * cc.sinks_for(fmt) * (2 * mc.num_kv_heads * mc.head_dim * 2 + 4)
               for _, n, fmt in _segments(mc, cc))


def sink_page_lo(seg: Segment, layer: jax.Array, slots: jax.Array) -> jax.Array:
    """[batch] int32: `seg.sinks` where the row's sink entries all hold their positions (tags
    0..sinks-1, written by this sequence), else 0: the first position its pages serve."""
    ok = jnp.all(seg.spos[layer, slots] == jnp.arange(seg.sinks), axis=1)
    return jnp.where(ok, seg.sinks, 0).astype(jnp.int32)


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


def ordered_after(index: jax.Array, deps: tuple[jax.Array, ...], size: int) -> jax.Array:
    """`index` (a scalar in [0, size)) unchanged, but computed from `deps`: a write at it runs
    after every read that `deps` were computed from.

    In place needs it: XLA orders a read and an in-place write of one buffer only by data
    dependencies (copy insertion runs before scheduling, and the CPU backend drops optimization
    barriers before that), so when a read does not feed the write it copies the whole buffer
    (every pool leaf, every layer, every step). min(index, size - 1 + flag) is `index` whatever
    the flag (0 or 1), and XLA cannot fold it: the flag is computed from all of `deps`."""
    total = sum(jnp.sum(d.astype(jnp.float32)) for d in deps)
    return jnp.minimum(index, size - 1 + jnp.isnan(total).astype(index.dtype))


def write_layer(seg: Segment, layer: jax.Array, k: jax.Array, v: jax.Array,
                positions: jax.Array, lengths: jax.Array, page_table: jax.Array,
                window_slots: jax.Array | None, abs_positions: jax.Array | None = None,
                after: jax.Array | None = None) -> Segment:
    """Quantize and write one layer's new keys and values into the segment, in place under jit.

    layer: index within the segment; k, v: [batch, tokens, kv_heads, head_dim];
    positions: [batch, tokens] cache positions; lengths: [batch] tokens valid after this step;
    page_table: [batch, max_pages]; window_slots: [batch] ring slot of each row (or None);
    abs_positions: [batch, tokens] absolute positions (index and tag the ring; default: cache);
    after: for a write after attention, a value computed from everything attention read of
    this segment (e.g. its output): the writes wait for it instead of copying the pool.
    """
    if after is not None:
        layer = ordered_after(layer, (after,), seg.num_layers)
    abs_positions = positions if abs_positions is None else abs_positions
    pages, slots = slot_mapping(page_table, positions, lengths, seg.k_spec.page_size)
    new = {}
    if seg.window:
        slot, idx = _window_targets(seg.window, seg.wk.shape[2] - 1, positions, abs_positions,
                                    lengths, window_slots)
    if seg.sinks:  # tokens at absolute positions [0, sinks) also go to the sink, exact
        trash = seg.sk.shape[2] - 1
        keep = (positions < lengths[:, None]) & (abs_positions < seg.sinks)
        if window_slots is None:
            window_slots = jnp.zeros(lengths.shape, jnp.int32)
        sslot = jnp.where(keep, window_slots[:, None], trash)
        sidx = jnp.where(keep, abs_positions, 0)
    if seg.mass is not None:  # a newly written token starts with no attention mass
        p, s = scatter_rows(pages.reshape(-1), slots.reshape(-1))
        m = seg.mass[p, :, s]  # [b*t, kv_heads]
        new["mass"] = seg.mass.at[p, :, s].set(jnp.where(layer == 0, 0.0, m))
    for name, x, spec, ring in (("k", k, seg.k_spec, seg.wk), ("v", v, seg.v_spec, seg.wv)):
        pool = getattr(seg, name)
        ring_layer = layer
        if spec.group == 1:
            pool = spec.write_tokens(pool, layer, x, pages, slots, abs_positions)
        else:
            pool, read = _seal_pages(spec, pool, layer, x, positions, lengths, pages, ring,
                                     window_slots, abs_positions)
            ring_layer = ordered_after(layer, read, seg.num_layers)  # the seal read the ring
        new[name] = pool
        if ring is not None:
            new["w" + name] = _write_window(ring, ring_layer, x, slot, idx)
        if seg.sinks:
            new["s" + name] = _write_window(getattr(seg, "s" + name), layer, x, sslot, sidx)
    if seg.sinks:
        tags = jnp.where(sslot < seg.spos.shape[1] - 1, abs_positions, -1)
        s, i, tags = scatter_rows(sslot.reshape(-1), sidx.reshape(-1), tags.reshape(-1))
        new["spos"] = seg.spos.at[layer, s, i].set(tags, mode="promise_in_bounds")
    if seg.wpos is not None:
        tags = jnp.where(slot < seg.wpos.shape[1] - 1, abs_positions, -1)
        s, i, tags = scatter_rows(slot.reshape(-1), idx.reshape(-1), tags.reshape(-1))
        new["wpos"] = seg.wpos.at[layer, s, i].set(tags, mode="promise_in_bounds")
    return seg.replace(**new)


def _window_targets(w: int, trash: int, positions: jax.Array, abs_positions: jax.Array,
                    lengths: jax.Array, window_slots: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(ring slot, entry) [batch, tokens] of each new token: tokens among the last W of their
    sequence go to entry abs_position % W of their slot; the rest (older tokens of a long chunk,
    padding) go to the spare last slot."""
    keep = (positions < lengths[:, None]) & (positions >= (lengths - w)[:, None])
    slot = jnp.where(keep, window_slots[:, None], trash)
    idx = jnp.where(keep, abs_positions % w, 0)
    return slot, idx


def _write_window(ring: jax.Array, layer: jax.Array, x: jax.Array, slot: jax.Array,
                  idx: jax.Array) -> jax.Array:
    b, t, h, d = x.shape
    words = jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    s, i, words = scatter_rows(slot.reshape(-1), idx.reshape(-1), words.reshape(b * t, h, d))
    # The KV head is a scatter index (one token's d values per window), as in the pool writes
    # (kvjax/cache/layout.py `_heads`): a [heads, d] window made XLA:TPU carry the ring with
    # heads on sublanes and copy it in and out of the layer loop on every step.
    return ring.at[layer, _heads(h), s[:, None], i[:, None]].set(words, mode="promise_in_bounds")


def _seal_pages(spec: PoolSpec, pool: tuple[jax.Array, ...], layer: jax.Array, x: jax.Array,
                positions: jax.Array, lengths: jax.Array, pages: jax.Array, ring: jax.Array,
                window_slots: jax.Array, abs_positions: jax.Array
                ) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """Grouped methods (KIVI keys): a token that fills the last slot of its page seals the page:
    the page's tokens (from this chunk, or from the ring for tokens of earlier steps) are
    quantized together and written at once. Returns the pool and what was computed from the
    ring (the ring's overwrite must wait for it, see `ordered_after`)."""
    s = spec.page_size
    b, t, h, d = x.shape
    # Only the chunk's candidate seal tokens (positions = s - 1 mod s; at most n = ceil(t / s)
    # of t contiguous positions), not every token: a page of values per token made the write of
    # a 512-token chunk build and quantize a [b, 512 * 32, h, d] f32 array (12.6 MB a layer on
    # SmolLM2) for 16 pages.
    n = -(-t // s)
    start = positions[:, :1, None]  # [b, 1, 1] the chunk's first position
    idx = (s - 1 - positions[:, :1] % s) % s + s * jnp.arange(n)[None, :]  # [b, n]
    in_chunk = idx < t
    idx = jnp.minimum(idx, t - 1)
    positions, pages, abs_positions = (jnp.take_along_axis(a, idx, axis=1)
                                       for a in (positions, pages, abs_positions))
    seals = in_chunk & ((positions % s) == s - 1) & (positions < lengths[:, None])  # [b, n]
    member = positions[:, :, None] - (s - 1) + jnp.arange(s)  # [b, n, s] positions in the page
    from_chunk = member >= start
    chunk_idx = jnp.clip(member - start, 0, t - 1).reshape(b, n * s)
    # Round this chunk's tokens to bf16 like the ring's, so a page quantizes the same values
    # whether it is sealed in one prefill chunk or token by token.
    x = x.astype(jnp.bfloat16).astype(jnp.float32)
    chunk_vals = jnp.take_along_axis(x, chunk_idx[:, :, None, None], axis=1)
    w = ring.shape[3]
    per_seq = ring[layer, :, window_slots]  # [b, kv_heads, W, d] (bf16 bits)
    # Pages are whole in absolute positions too (eviction drops whole pages): the ring entry of
    # a member is its absolute position % W.
    abs_member = member + (abs_positions - positions)[:, :, None]
    ring_vals = jnp.take_along_axis(per_seq, (abs_member % w).reshape(b, 1, n * s, 1), axis=2)
    ring_vals = jnp.moveaxis(
        jax.lax.bitcast_convert_type(ring_vals, jnp.bfloat16).astype(jnp.float32), 1, 2)
    vals = jnp.where(from_chunk.reshape(b, n * s, 1, 1), chunk_vals, ring_vals)
    vals = vals.reshape(b * n, s, h, d).transpose(0, 2, 1, 3)  # [b*n, kv_heads, page_size, d]
    target = jnp.where(seals, pages, NULL_PAGE).reshape(-1)
    return spec.write_pages(pool, layer, vals, target), (vals,)
