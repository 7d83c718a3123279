"""Paged attention over any page layout: one entry point for prefill chunks and decode steps.

The XLA path here dequantizes a sequence's pages, overlays the full-precision window, and runs
masked softmax attention. It is the oracle for the Pallas kernels and the fallback on every
backend. Queries attend to keys at positions `<= their own position` and `< length`; everything
else (the null page, pages a sequence does not own, slots past its length) is masked *before* it
can touch the result, so garbage or NaN in an unowned page never leaks in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.cache.layout import from_storage
from kvjax.cache.paged import Segment, absolute_positions, sink_page_lo
from kvjax.rope import rotate_half


def _window_values(ring: jax.Array, layer: jax.Array, window_slots: jax.Array,
                   abs_pos: jax.Array) -> jax.Array:
    """Ring [layers, kv_heads, slots + 1, W, d] -> values at every position [kv_heads, batch,
    max_len, d]: a position reads ring entry abs_pos % W (meaningful only inside the window).
    abs_pos: [batch, max_len]."""
    w = ring.shape[3]
    per_seq = jnp.moveaxis(ring[layer, :, window_slots], 1, 0)  # [kv_heads, batch, W, d]
    vals = jnp.take_along_axis(per_seq, (abs_pos % w)[None, :, :, None], axis=2)
    return from_storage(vals, jnp.bfloat16).astype(jnp.float32)


def gather_kv(seg: Segment, layer: jax.Array, page_table: jax.Array, lengths: jax.Array,
              window_slots: jax.Array | None, page_pos: jax.Array | None = None
              ) -> tuple[jax.Array, jax.Array]:
    """Keys and values of every position the page table covers, dequantized, with positions in
    the last `window` tokens of each sequence taken from its full-precision ring when the ring
    entry holds that position (its tag matches: written by this sequence), else from its pages;
    and absolute positions [0, sinks) from the exact sink when all of the row's sink tags match
    (`sink_page_lo`), else from its pages.

    layer: index within the segment; page_table: [batch, max_pages]; lengths, window_slots:
    [batch]; page_pos: [batch, max_pages] absolute position of each page's first token (None:
    no eviction, absolute = cache position). Returns k, v: [kv_heads, batch, max_pages *
    page_size, head_dim] f32.
    """
    rope = seg.k_spec.rope_centred  # keys centred on R(p) mu: the read needs positions
    if seg.window or seg.sinks or rope:
        b, max_len = page_table.shape[0], page_table.shape[1] * seg.k_spec.page_size
        cache_pos = jnp.broadcast_to(jnp.arange(max_len), (b, max_len))
        abs_pos = absolute_positions(page_pos, cache_pos, seg.k_spec.page_size,
                                     page_table.shape[1])
        if window_slots is None:
            window_slots = jnp.zeros((b,), jnp.int32)
    k = seg.k_spec.read(seg.k, layer, page_table, abs_pos if rope else None)
    v = seg.v_spec.read(seg.v, layer, page_table)
    if seg.sinks:
        page_lo = sink_page_lo(seg, layer, window_slots)  # [b]: sinks or 0
        in_sink = (abs_pos < page_lo[:, None])[None, :, :, None]
        idx = jnp.minimum(abs_pos, seg.sinks - 1)
        k = jnp.where(in_sink, _window_values(seg.sk, layer, window_slots, idx), k)
        v = jnp.where(in_sink, _window_values(seg.sv, layer, window_slots, idx), v)
    if seg.window:
        tags = jnp.take_along_axis(seg.wpos[layer, window_slots], abs_pos % seg.window, axis=1)
        in_window = (cache_pos >= (lengths - seg.window)[:, None]) & (tags == abs_pos)
        in_window = in_window[None, :, :, None]
        k = jnp.where(in_window, _window_values(seg.wk, layer, window_slots, abs_pos), k)
        v = jnp.where(in_window, _window_values(seg.wv, layer, window_slots, abs_pos), v)
    return k, v


def rerotate_keys(k: jax.Array, page_pos: jax.Array, q_positions: jax.Array,
                  inv_freq: jax.Array) -> jax.Array:
    """Positions within the cache (StreamingLLM): keys are stored rotated for their absolute
    position; rotate each page's keys by (evicted tokens after it) so that every query-key pair
    is scored at its distance in the cache, as if keys sat at their cache positions. Pages after
    every evicted page (a StreamingLLM window) turn by 0; sinks by the evicted count.

    k: [kv_heads, batch, max_len, d] post-RoPE at absolute positions; page_pos: [batch,
    max_pages]; q_positions: [batch, tokens] cache positions of this step's queries (whose
    absolute positions are cache + evicted-so-far)."""
    max_len = k.shape[2]
    ps = max_len // page_pos.shape[1]
    evicted = (absolute_positions(page_pos, q_positions[:, :1], ps) - q_positions[:, :1])  # [b,1]
    page_shift = evicted - (page_pos - jnp.arange(page_pos.shape[1]) * ps)  # [b, max_pages]
    shift = jnp.repeat(page_shift, ps, axis=1)  # [b, max_len]
    return rotate_half(k, shift[None], inv_freq)  # k: [kv_heads, b, max_len, d]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
           q_positions: jax.Array, with_mass: bool = False
           ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Grouped-query attention with causal and length masks.

    q: [batch, tokens, num_heads, head_dim]; k, v: [kv_heads, batch, max_len, head_dim];
    lengths: [batch] valid tokens (this step's included); q_positions: [batch, tokens].
    Returns [batch, tokens, num_heads, head_dim] in q's dtype; with `with_mass` (static) also the
    softmax mass each key received, summed over query rows and the query heads of its KV head:
    [batch, kv_heads, max_len] f32.
    """
    kv_pos = jnp.arange(k.shape[2])
    kv_valid = kv_pos[None, :] < lengths[:, None]  # [batch, max_len]
    mask = kv_valid[:, None, :] & (kv_pos[None, None, :] <= q_positions[:, :, None])  # [b, t, s]
    return attend_masked(q, k, v, mask, kv_valid, lengths, q_positions, with_mass)


def attend_masked(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                  kv_valid: jax.Array, lengths: jax.Array, q_positions: jax.Array,
                  with_mass: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """`attend` with an explicit mask [batch, tokens, keys] and key validity [batch, keys]
    (values of invalid keys are zeroed: 0 * NaN would still be NaN)."""
    b, t, nh, d = q.shape
    kvh = k.shape[0]
    qg = q.reshape(b, t, kvh, nh // kvh, d).astype(jnp.float32) * (d ** -0.5)
    scores = jnp.einsum("btkgd,kbsd->bkgts", qg, k)
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    # Safe softmax: a row with no valid key (an idle batch slot) yields zeros, not NaN.
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(scores - row_max)
    denom = jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-30)
    v = jnp.where(kv_valid[None, :, :, None], v, 0.0)
    probs = weights / denom
    out = jnp.einsum("bkgts,kbsd->btkgd", probs, v)
    out = out.reshape(b, t, nh, d).astype(q.dtype)
    if not with_mass:
        return out
    # Padding query rows (past the sequence's length) must not vote.
    q_valid = (q_positions < lengths[:, None]).astype(jnp.float32)  # [b, t]
    return out, jnp.einsum("bkgts,bt->bks", probs, q_valid)


def _attend_chunk(q: jax.Array, k: jax.Array, v: jax.Array, chunk_kv: tuple[jax.Array, jax.Array],
                  lengths: jax.Array, q_positions: jax.Array, with_mass: bool
                  ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Attention of a multi-token step: cached keys k, v [kv_heads, batch, max_len, d] below each
    row's first position, and the step's own chunk_kv = (k, v) [batch, tokens, kv_heads, d] as
    computed (f32 on CPU, bf16 on accelerators: never rounded through the page format)."""
    max_len = k.shape[2]
    kv_pos = jnp.arange(max_len)
    ctx_valid = kv_pos[None, :] < q_positions[:, :1]  # [b, max_len]: before the chunk
    ctx_mask = jnp.broadcast_to(ctx_valid[:, None, :], (*q_positions.shape, max_len))
    own_valid = q_positions < lengths[:, None]  # [b, t] the chunk's real tokens
    own_mask = own_valid[:, None, :] & (q_positions[:, None, :] <= q_positions[:, :, None])
    kc = jnp.moveaxis(chunk_kv[0].astype(jnp.float32), 2, 0)  # [kvh, b, t, d]
    vc = jnp.moveaxis(chunk_kv[1].astype(jnp.float32), 2, 0)
    res = attend_masked(q, jnp.concatenate([k, kc], axis=2), jnp.concatenate([v, vc], axis=2),
                        jnp.concatenate([ctx_mask, own_mask], axis=2),
                        jnp.concatenate([ctx_valid, own_valid], axis=1), lengths, q_positions,
                        with_mass)
    if not with_mass:
        return res
    out, mass = res  # mass [b, kvh, max_len + t]: the chunk's columns go to their positions
    b, kvh = mass.shape[:2]
    own = mass[:, :, max_len:]
    rows = jnp.arange(b)[:, None]
    ctx = mass[:, :, :max_len].at[rows, :, q_positions].add(jnp.moveaxis(own, 1, 2), mode="drop")
    return out, ctx


def paged_attention(q: jax.Array, seg: Segment, layer: jax.Array, page_table: jax.Array,
                    lengths: jax.Array, q_positions: jax.Array,
                    window_slots: jax.Array | None = None, impl: str = "xla",
                    page_pos: jax.Array | None = None, inv_freq: jax.Array | None = None,
                    chunk_kv: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Attention of q [batch, tokens, num_heads, head_dim] over one layer of a cache segment.

    chunk_kv: this step's own keys and values (k post-RoPE, v) [batch, tokens, kv_heads,
    head_dim], as computed, before quantization; given for a multi-token step (the
    full-precision-chunk rule, what serving engines do): every row's queries attend to its
    chunk's own K/V at full precision and to the positions before its chunk through the cache
    (pages + the full-precision window), so a chunk never pays the format's error on its own
    keys. `seg` may be the cache before the chunk is written (then the window still holds the W
    positions before the chunk: each query sees at least what a decode step would in bf16) or
    after. Without chunk_kv (decode steps) every key, the query's own included, is read back
    from the cache (written first), as the decode kernels do.

    impl "pallas": decode steps (one token, the sequence's last) run the Pallas decode kernel and
    multi-token chunks given chunk_kv the ragged kernel (kvjax/pallas_kernels: Triton on GPU,
    Mosaic on TPU, interpret mode on CPU), reading the compressed pages directly; formats without
    a kernel (polar) keep this XLA path, and so do steps after an eviction (`page_pos` given: the
    kernels do not re-rotate keys yet) and multi-token chunks that accumulate H2O mass
    (`seg.mass`; decode steps get it from the decode kernel's side output).

    page_pos: [batch, max_pages] absolute position of each page's first token, with inv_freq
    [head_dim / 2]: keys are re-rotated to positions within the cache (`rerotate_keys`).
    """
    return paged_attention_step(q, seg, layer, page_table, lengths, q_positions, window_slots,
                                impl, page_pos, inv_freq, chunk_kv)[0]


def paged_attention_step(q: jax.Array, seg: Segment, layer: jax.Array, page_table: jax.Array,
                         lengths: jax.Array, q_positions: jax.Array,
                         window_slots: jax.Array | None = None, impl: str = "xla",
                         page_pos: jax.Array | None = None, inv_freq: jax.Array | None = None,
                         chunk_kv: tuple[jax.Array, jax.Array] | None = None
                         ) -> tuple[jax.Array, Segment]:
    """`paged_attention` that also returns the segment, with this step's attention mass added
    to `seg.mass` when the segment tracks it (H2O; otherwise the segment is returned as is)."""
    if impl not in ("xla", "pallas"):
        raise ValueError(f"attention impl must be 'xla' or 'pallas', got {impl!r}")
    multi = q.shape[1] > 1 and chunk_kv is not None
    if impl == "pallas" and page_pos is None:
        from kvjax import pallas_kernels

        if (seg.window or seg.sinks) and window_slots is None:
            window_slots = jnp.zeros(page_table.shape[:1], jnp.int32)
        win = window_slots if seg.window or seg.sinks else None
        if q.shape[1] == 1 and pallas_kernels.supports(seg):
            if seg.mass is None:
                return pallas_kernels.paged_attention(q, seg, layer, page_table, lengths,
                                                      win), seg
            # H2O: the kernel also returns this step's mass per cached position
            out, mass = pallas_kernels.paged_attention(q, seg, layer, page_table, lengths, win,
                                                       with_mass=True)
            return out, _add_mass(seg, page_table, mass)
        if multi and seg.mass is None and pallas_kernels.supports(seg):
            from kvjax.pallas_kernels import ragged_attention

            return ragged_attention.ragged_paged_attention(
                q, chunk_kv[0], chunk_kv[1], seg, layer, page_table, lengths, q_positions,
                win), seg
    if (seg.window or seg.sinks) and window_slots is None:
        window_slots = jnp.zeros(page_table.shape[:1], jnp.int32)
    # A multi-token step reads the cache only below each row's chunk: as earlier steps left it
    # (models/transformer.py attends before writing the chunk, so the ring still holds the W
    # positions before it) or after the write (H2O: ring entries the chunk overwrote fail their
    # tag check and fall back to the pages).
    ctx_len = q_positions[:, 0] if multi else lengths
    k, v = gather_kv(seg, layer, page_table, ctx_len, window_slots, page_pos)
    if page_pos is not None:
        if inv_freq is None:
            raise ValueError("page_pos needs the model's RoPE inv_freq")
        # The chunk's own keys sit in the newest pages, which every eviction precedes: they
        # turn by 0 and are used as computed.
        k = rerotate_keys(k, page_pos, q_positions, inv_freq)
    with_mass = seg.mass is not None
    if multi:
        res = _attend_chunk(q, k, v, chunk_kv, lengths, q_positions, with_mass)
    else:
        res = attend(q, k, v, lengths, q_positions, with_mass=with_mass)
    if not with_mass:
        return res, seg
    out, mass = res
    return out, _add_mass(seg, page_table, mass)


def _add_mass(seg: Segment, page_table: jax.Array, mass: jax.Array) -> Segment:
    """seg with mass [b, kv_heads, max_len] (page-table order) added to seg.mass per token."""
    ps = seg.k_spec.page_size
    b, kvh, max_len = mass.shape
    pages = jnp.repeat(page_table, ps, axis=1)  # [b, max_len]; unowned columns: the null page
    slots = jnp.broadcast_to(jnp.arange(max_len) % ps, (b, max_len))
    added = seg.mass.at[pages, :, slots].add(jnp.moveaxis(mass, 1, 2), mode="promise_in_bounds")
    return seg.replace(mass=added)


def pack_chunk(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """q [b, t, heads, d] with the chunk's k, v [b, t, kv_heads, d] repeated to the query heads
    of their group, concatenated on the last axis -> [b, t, heads, 3 d]: one array that a
    head-sharded `shard_map` (kvjax.sharding.shard_attention) splits so that each device gets
    its query heads together with the chunk's keys and values of its own KV heads."""
    g = q.shape[2] // k.shape[2]
    return jnp.concatenate([q, jnp.repeat(k, g, axis=2).astype(q.dtype),
                            jnp.repeat(v, g, axis=2).astype(q.dtype)], axis=-1)


def with_packed_chunk(fn):
    """fn(q, seg, layer, *rows, chunk_kv=) -> f(pack_chunk(q, k, v), seg, layer, *rows): unpacks
    the (local) query heads and the chunk's K/V of the segment's (local) KV heads."""
    def unpacked(qkv: jax.Array, seg: Segment, layer: jax.Array, *rows):
        d = qkv.shape[-1] // 3
        g = max(1, qkv.shape[2] // seg.k[0].shape[1])  # local query heads per local KV head
        chunk = (qkv[:, :, ::g, d:2 * d], qkv[:, :, ::g, 2 * d:])
        return fn(qkv[..., :d], seg, layer, *rows, chunk_kv=chunk)
    return unpacked
