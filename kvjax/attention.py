"""Paged attention: one entry point over the page pools, for prefill chunks and decode steps.

The XLA path here gathers a sequence's pages and runs masked softmax attention. It is the oracle
for the Pallas kernels and the fallback on every backend. Queries attend to keys at positions
`<= their own position` and `< length`; everything else (the null page, pages a sequence does not
own, slots past its length) is masked *before* it can touch the result, so garbage or NaN in an
unowned page never leaks in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.cache.paged import from_storage


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                    lengths: jax.Array, q_positions: jax.Array, layer: jax.Array | None = None
                    ) -> jax.Array:
    """Grouped-query attention over paged keys and values.

    q: [batch, tokens, num_heads, head_dim]
    k_pages, v_pages: [kv_heads, num_pages, page_size, head_dim] (one layer), or the whole pool
        [layers, kv_heads, num_pages, page_size, head_dim] with `layer` picking one: gathering a
        layer's pages straight from the pool avoids copying the layer out of it first.
    page_table: [batch, max_pages] int32; lengths: [batch] valid tokens per sequence (this
    step's tokens included); q_positions: [batch, tokens].
    Returns [batch, tokens, num_heads, head_dim] in q's dtype.
    """
    b, t, nh, d = q.shape
    if layer is not None:  # gather only the pages in use, from the whole pool
        k_pages = _layer_pages(k_pages, layer, page_table)
        v_pages = _layer_pages(v_pages, layer, page_table)
    else:
        k_pages, v_pages = k_pages[:, page_table], v_pages[:, page_table]
    kvh, _, _, page_size, _ = k_pages.shape
    groups = nh // kvh
    max_len = page_table.shape[1] * page_size

    # [kv_heads, batch, max_pages, page_size, head_dim] -> [kv_heads, batch, max_len, head_dim]
    k = from_storage(k_pages).reshape(kvh, b, max_len, d).astype(jnp.float32)
    v = from_storage(v_pages).reshape(kvh, b, max_len, d).astype(jnp.float32)

    kv_pos = jnp.arange(max_len)
    kv_valid = kv_pos[None, :] < lengths[:, None]  # [batch, max_len]
    mask = kv_valid[:, None, :] & (kv_pos[None, None, :] <= q_positions[:, :, None])  # [b, t, s]

    qg = q.reshape(b, t, kvh, groups, d).astype(jnp.float32) * (d ** -0.5)
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


def _layer_pages(pool: jax.Array, layer: jax.Array, page_table: jax.Array) -> jax.Array:
    """pool: [layers, kv_heads, num_pages, page_size, d]
    -> [kv_heads, batch, max_pages, page_size, d]."""
    return jnp.moveaxis(pool[layer, :, page_table], 2, 0)
