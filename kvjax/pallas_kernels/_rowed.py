"""TPU decode launcher: per-token scalar leaves (scales, norms) read as lane-dense rows.

A pool leaf with one value per token, [layers, kv_heads, pages, page_size, 1] (the f16 scale of
fp8/int8/int4 codes, TurboQuant's norms), is stored by XLA with pages on lanes. A Mosaic operand
must be row-major with 128-lane tiles, so handing that leaf to the kernel page by page made XLA
copy the layer's whole leaf into [page_size, 128]-padded blocks on every step: 128x its bytes
(4 KB per 16-token page for 32 B of scales), the largest relayout of every compressed format on
v5e (/work/notes/compile4.md: copy traffic 0.8-2.3x bf16's for 0.19-0.52x the cache).

Instead, outside the kernel, XLA gathers only the pages of this call's page table into
[batch, kv_heads, rows, 1, 128] int32 words: 128 / page_size pages per row, row-major, no
padding (gather_rows). The BlockSpec fetches the row holding the current page (once per
128 / page_size page steps: the pipeline skips a repeated block index) and the kernel picks the
page's page_size words out as the [page_size, 1] column the formats read (RowedRef: a select
and a lane sum, exact in f32 on 16-bit halves). Formats are unchanged: Loader.tile reads a
RowedRef like a page ref; the words are int32 holding the stored bits (zero-extended), which
the Mosaic Loader decodes with integer ops anyway (int_bits_to masks to the stored width).

Used by the paged decode kernel's TPU launcher only (kvjax/pallas_kernels/_core.decode);
the gather launchers (Triton, interpret) and the ragged kernel read pool leaves as before.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

ROW = 128  # lanes


def is_rowed(leaf: jax.Array, page_size: int) -> bool:
    """Whether a pool leaf [layers, kv_heads, pages, rows, n] goes to the TPU decode kernel as
    gathered rows: one value per token (rows == page_size, n == 1), pages that tile 128 lanes."""
    return (leaf.ndim == 5 and leaf.shape[-1] == 1 and leaf.shape[-2] == page_size
            and ROW % page_size == 0 and jnp.dtype(leaf.dtype).itemsize <= 4)


def gather_rows(leaf: jax.Array, layer: jax.Array, page_table: jax.Array) -> jax.Array:
    """leaf [layers, Hkv, pages, S, 1]; layer int32 scalar; page_table [B, mp] int32 (entries
    past a row's pages may be anything in range: the kernel never reads them) ->
    [B, Hkv, ceil(mp * S / 128), 1, 128] int32: page j's S words at row j * S // 128, lanes
    (j * S) % 128 onward."""
    x = jax.lax.dynamic_index_in_dim(leaf, layer, 0, keepdims=False)[..., 0]  # [Hkv, P, S]
    if jnp.dtype(x.dtype).itemsize == 4:
        x = jax.lax.bitcast_convert_type(x, jnp.int32)
    g = jnp.take(x, page_table, axis=1, mode="clip")  # [Hkv, B, mp, S]
    g = jnp.moveaxis(g, 1, 0).astype(jnp.int32)  # unsigned words zero-extend
    b, h, mp, s = g.shape
    per = ROW // s
    g = jnp.pad(g, ((0, 0), (0, 0), (0, -mp % per), (0, 0)))
    return g.reshape(b, h, -1, 1, ROW)


def row_spec(page_size: int, page_index) -> pl.BlockSpec:
    """BlockSpec of a gathered leaf: the row holding page page_index(*grid, *scalars)."""
    per = ROW // page_size

    def index_map(bi, h, k, i, *scalars):
        # lax.div (the index is >= 0): jnp's floor division lowers through sign(), which
        # Mosaic lowers by asking the device it runs on (none, in an AOT compile)
        return (bi, h, jax.lax.div(page_index(bi, h, k, i, *scalars), jnp.int32(per)), 0, 0)

    return pl.BlockSpec((None, None, None, 1, ROW), index_map)


class RowedRef:
    """A gathered leaf's row [1, 128] in the kernel, read as the current page's [S, 1] column:
    page j (its index in the page table) starts at lane (j % (128 // S)) * S."""

    def __init__(self, ref, j, page_size: int):
        self.ref = ref
        self.page_size = page_size
        self.off = jax.lax.rem(j, jnp.int32(ROW // page_size)) * page_size
        self.shape = (page_size, 1)
        self.dtype = jnp.dtype(jnp.int32)

    def __getitem__(self, idx):
        """ref[:, lanes] of a [S, 1] page leaf: the column (lanes can only be its one lane)."""
        s = self.page_size
        row = self.ref[...]  # [1, 128] int32
        hit = (jax.lax.broadcasted_iota(jnp.int32, (s, ROW), 1)
               == jax.lax.broadcasted_iota(jnp.int32, (s, ROW), 0) + self.off)

        def pick(half):  # 16-bit halves: exact in f32 (a 32-bit word is not)
            v = jnp.where(hit, half.astype(jnp.float32), 0.0)
            return jnp.sum(v, axis=1, keepdims=True).astype(jnp.int32)  # [S, 1]

        lo = pick(row & 0xFFFF)
        hi = pick((row >> 16) & 0xFFFF)
        return lo | (hi << 16)


def wrap(refs: tuple, rowed: tuple[bool, ...], j, page_size: int) -> tuple:
    """The kernel's leaf refs with the gathered ones read through RowedRef."""
    return tuple(RowedRef(r, j, page_size) if w else r
                 for r, w in zip(refs, rowed, strict=True))
