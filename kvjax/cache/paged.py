"""The paged KV cache: a pytree of page pools, passed into the forward and returned by it.

Layout (head-major, DESIGN.md): `k`, `v`: [layers, kv_heads, num_pages, page_size, head_dim], so KV
heads shard on the tensor axis and one page of one head is contiguous. A sequence's tokens live in
the pages its row of the page table names: token t sits at page `page_table[t // page_size]`, slot
`t % page_size`. Page 0 is the null page: writes of padding tokens land there and no sequence owns
it, so attention (which masks every position at or beyond a sequence's length) never reads it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

NULL_PAGE = 0

# What each cache dtype is stored as. bf16 pages hold the raw 16-bit words (uint16): XLA's CPU
# backend widens bf16 arrays to f32 around a scatter, which turned every cache write into a copy
# of the whole pool (measured: 2.6 s per decode step at 2000 pages vs 0.03 ms as uint16). The
# bitcast back to bf16 on read is free on every backend.
_STORAGE_DTYPES = {"bf16": jnp.uint16, "f32": jnp.float32}


class KVCache(NamedTuple):
    """k, v: [layers, kv_heads, num_pages, page_size, head_dim]."""

    k: jax.Array
    v: jax.Array

    @property
    def page_size(self) -> int:
        return self.k.shape[3]

    @property
    def num_pages(self) -> int:
        return self.k.shape[2]

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def storage_dtype(name: str) -> jnp.dtype:
    return _STORAGE_DTYPES[name]


def to_storage(x: jax.Array, stored: jnp.dtype) -> jax.Array:
    """Values -> the words a pool of dtype `stored` holds (uint16 words are bf16 bits)."""
    if stored == jnp.uint16:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    return x.astype(stored)


def from_storage(pages: jax.Array) -> jax.Array:
    """Stored words -> values (uint16 words are bf16 bits)."""
    if pages.dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(pages, jnp.bfloat16)
    return pages


def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: str) -> int:
    """KV bytes of one token over all layers: 2 (K, V) x layers x kv_heads x head_dim x bytes."""
    return 2 * num_layers * num_kv_heads * head_dim * jnp.dtype(storage_dtype(dtype)).itemsize


def init_cache(num_layers: int, num_kv_heads: int, num_pages: int, page_size: int, head_dim: int,
               dtype: str = "bf16") -> KVCache:
    """An empty pool of `num_pages` pages (page 0 is the reserved null page)."""
    shape = (num_layers, num_kv_heads, num_pages, page_size, head_dim)
    # Two distinct buffers: the forward donates both, and one buffer cannot be donated twice.
    dt = storage_dtype(dtype)
    return KVCache(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt))


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


def write_layer(pool: jax.Array, layer: jax.Array, new: jax.Array, pages: jax.Array,
                slots: jax.Array) -> jax.Array:
    """Scatter new tokens into one layer of a page pool, in place under jit with donation.

    pool: [layers, kv_heads, num_pages, page_size, head_dim]; layer: scalar int;
    new: [batch, tokens, kv_heads, head_dim]; pages, slots: [batch, tokens].
    """
    b, t, h, d = new.shape
    # Advanced indices (layer, pages, slots) separated by a slice put the token axis first.
    # Page ids come from the page table and slots are `% page_size`: always in bounds, and
    # promising so spares XLA a bounds-check select over the whole pool.
    return pool.at[layer, :, pages.reshape(-1), slots.reshape(-1)].set(
        to_storage(new.reshape(b * t, h, d), pool.dtype), mode="promise_in_bounds")
