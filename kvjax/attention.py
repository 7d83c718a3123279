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
from kvjax.cache.paged import Segment


def _window_values(ring: jax.Array, layer: jax.Array, window_slots: jax.Array,
                   max_len: int) -> jax.Array:
    """Ring [layers, kv_heads, slots + 1, W, d] -> values at every position [kv_heads, batch,
    max_len, d]: position p reads ring entry p % W (meaningful only inside the window)."""
    w = ring.shape[3]
    per_seq = jnp.moveaxis(ring[layer, :, window_slots], 1, 0)  # [kv_heads, batch, W, d]
    vals = jnp.take(per_seq, jnp.arange(max_len) % w, axis=2)
    return from_storage(vals, jnp.bfloat16).astype(jnp.float32)


def gather_kv(seg: Segment, layer: jax.Array, page_table: jax.Array, lengths: jax.Array,
              window_slots: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Keys and values of every position the page table covers, dequantized, with positions in
    the last `window` tokens of each sequence taken from its full-precision ring.

    layer: index within the segment; page_table: [batch, max_pages]; lengths, window_slots:
    [batch]. Returns k, v: [kv_heads, batch, max_pages * page_size, head_dim] f32.
    """
    k = seg.k_spec.read(seg.k, layer, page_table)
    v = seg.v_spec.read(seg.v, layer, page_table)
    if seg.window:
        max_len = k.shape[2]
        in_window = jnp.arange(max_len)[None, :] >= (lengths - seg.window)[:, None]  # [b, len]
        in_window = in_window[None, :, :, None]
        k = jnp.where(in_window, _window_values(seg.wk, layer, window_slots, max_len), k)
        v = jnp.where(in_window, _window_values(seg.wv, layer, window_slots, max_len), v)
    return k, v


def attend(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
           q_positions: jax.Array) -> jax.Array:
    """Grouped-query attention with causal and length masks.

    q: [batch, tokens, num_heads, head_dim]; k, v: [kv_heads, batch, max_len, head_dim];
    lengths: [batch] valid tokens (this step's included); q_positions: [batch, tokens].
    Returns [batch, tokens, num_heads, head_dim] in q's dtype.
    """
    b, t, nh, d = q.shape
    kvh, _, max_len, _ = k.shape
    kv_pos = jnp.arange(max_len)
    kv_valid = kv_pos[None, :] < lengths[:, None]  # [batch, max_len]
    mask = kv_valid[:, None, :] & (kv_pos[None, None, :] <= q_positions[:, :, None])  # [b, t, s]

    qg = q.reshape(b, t, kvh, nh // kvh, d).astype(jnp.float32) * (d ** -0.5)
    scores = jnp.einsum("btkgd,kbsd->bkgts", qg, k)
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    # Safe softmax: a row with no valid key (an idle batch slot) yields zeros, not NaN.
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(scores - row_max)
    denom = jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-30)
    v = jnp.where(kv_valid[None, :, :, None], v, 0.0)  # 0 * NaN would still be NaN
    out = jnp.einsum("bkgts,kbsd->btkgd", weights / denom, v)
    return out.reshape(b, t, nh, d).astype(q.dtype)


def paged_attention(q: jax.Array, seg: Segment, layer: jax.Array, page_table: jax.Array,
                    lengths: jax.Array, q_positions: jax.Array,
                    window_slots: jax.Array | None = None, impl: str = "xla") -> jax.Array:
    """Attention of q [batch, tokens, num_heads, head_dim] over one layer of a cache segment.

    impl "pallas": decode steps (one token, the sequence's last) run the Pallas kernel
    (kvjax/pallas_kernels: Triton on GPU, Mosaic on TPU, interpret mode on CPU), reading the
    compressed pages directly; multi-token chunks (prefill) and formats without a kernel (polar)
    keep this XLA path."""
    if impl not in ("xla", "pallas"):
        raise ValueError(f"attention impl must be 'xla' or 'pallas', got {impl!r}")
    if impl == "pallas" and q.shape[1] == 1:
        from kvjax import pallas_kernels

        if pallas_kernels.supports(seg):
            return pallas_kernels.paged_attention(q, seg, layer, page_table, lengths,
                                                  window_slots if seg.window else None)
    k, v = gather_kv(seg, layer, page_table, lengths, window_slots)
    return attend(q, k, v, lengths, q_positions)
