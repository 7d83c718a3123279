"""The TPU (Mosaic) launcher of the ragged paged-attention kernel (ragged_attention.py: the
module doc there says what is computed; this file says how it runs on a TPU).

Grid (row, KV head, query block, page) with the page table, lengths, ring bounds, chunk lengths,
window slots and the layer in SMEM (``PrefetchScalarGridSpec``), like the decode kernel's TPU
launcher (_launch.launch): each grid step's BlockSpec index map fetches one page of the row's
context for every key and value leaf (the pipeline double-buffers them), the format's
``score`` / ``accumulate`` decode it for every query row of the block (query tokens x GQA group,
128 rows: one MXU tile) with the Mosaic-safe Loader (``int_floats``: raw f16 / fp8 bits decoded
with 32-bit integer ops, strided 8/16-bit lanes picked by one-hot dots), and the page part's
online softmax lives in VMEM scratch across the page axis. The last page step also attends the
ring and the chunk's own keys (``ragged_attention.ring_and_chunk``: the same code as the Triton
kernel; the chunk [Tp, D] f32 and the row's ring [W, D] are VMEM blocks fetched once per (row,
head)). Steps past a row's context, and every step of a query block past the row's chunk, keep
the last page's block index (the pipeline does not fetch it again) and do no work.

Against tpu-inference's ragged paged attention v3 (the design this follows): the same split
(queries of a block x pages, online softmax, chunk causal), but pages arrive one per grid step
through BlockSpecs instead of RPA's manual multi-page async copies, and rows are padded per
sequence (grid over rows and query blocks) instead of packed as cumulative query lengths. Both
are the next steps for speed (a 16-token page per step is ~0.35 us of step overhead); this is the
layout the decode kernels already compile with for every format.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kvjax.pallas_kernels import compat
from kvjax.pallas_kernels._core import (
    KeyFormat,
    Loader,
    ValueFormat,
    _cdiv,
    int_bits_to,
    scratch_page_step,
)
from kvjax.pallas_kernels.ragged_attention import (
    N_SCALARS,
    RaggedPlan,
    ring_and_chunk,
    split_refs,
)


def _kernel(*refs, plan: RaggedPlan, kfmt: KeyFormat, vfmt: ValueFormat, n_q: int,
            n_steps: int):
    ((_, len_ref, rlo_ref, clen_ref, _, plo_ref, _), q_refs, (qw_ref, kc_ref, vc_ref), k_refs,
     v_refs,
     (wk_ref, wv_ref), acc_refs, rest) = split_refs(refs, plan, kfmt, vfmt, n_q)
    (m_ref, l_ref, acc2_ref, m2_ref, l2_ref), (m_sc, l_sc, *acc_sc) = rest[:5], rest[5:]

    b, qb, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    length, ring_lo, clen = len_ref[b], rlo_ref[b], clen_ref[b]
    ctx_end = length - clen  # the chunk's first position; pages serve [0, ring_lo)
    s = plan.page_size
    active = qb * plan.q_block < clen  # query blocks past the row's chunk do nothing

    def step():
        def fetch(ref, lanes):
            return ref[:, lanes]

        ldk = Loader(k_refs, fetch, int_floats=True, tok0=i * s)
        ldv = Loader(v_refs, fetch, int_floats=True)
        tok = i * s + jax.lax.broadcasted_iota(jnp.int32, (1, s), 1)
        valid = (tok < ring_lo) & (tok >= plo_ref[b])  # [page_lo, ring_lo): the sink is merged
        valid_col = i * s + jax.lax.broadcasted_iota(jnp.int32, (s, 1), 0) < ring_lo
        sc = kfmt.score(tuple(r[...] for r in q_refs), ldk)
        return sc, valid, lambda p: vfmt.accumulate(p, valid_col, ldv)

    scratch_page_step(i, active & (i * s < ring_lo), (m_sc, l_sc, *acc_sc), step)

    @pl.when(i == n_steps - 1)
    def _():
        for r, a in zip(acc_refs, acc_sc, strict=True):
            r[...] = a[...]
        m_ref[...] = m_sc[...]
        l_ref[...] = l_sc[...]

        def fetch_ring(j0, c):
            return wk_ref[pl.ds(j0, c), :], wv_ref[pl.ds(j0, c), :]

        def fetch_chunk(k0, n):
            k0 = pl.multiple_of(k0, n) if n % 8 == 0 else k0
            return kc_ref[pl.ds(k0, n), :], vc_ref[pl.ds(k0, n), :]

        m2, l2, acc2 = ring_and_chunk(qw_ref[...], plan, active=active, ring_lo=ring_lo,
                                      ctx_end=ctx_end, clen=clen, qb=qb,
                                      fetch_ring=fetch_ring, convert=int_bits_to,
                                      fetch_chunk=fetch_chunk)
        acc2_ref[...] = acc2
        m2_ref[...] = m2
        l2_ref[...] = l2


def launch(plan: RaggedPlan, kfmt: KeyFormat, vfmt: ValueFormat, qs: tuple[jax.Array, ...],
           qw: jax.Array, kc: jax.Array, vc: jax.Array, k_leaves: tuple[jax.Array, ...],
           v_leaves: tuple[jax.Array, ...], ring: tuple[jax.Array, ...], layer: jax.Array,
           scalars: tuple[jax.Array, ...], page_table: jax.Array, *, interpret: bool = False
           ) -> list[jax.Array]:
    """Run the kernel on a TPU (or the TPU interpreter). qs: the key format's prepared queries,
    each [B, Hkv, n_qb, rows, n]; qw [B, Hkv, n_qb, rows, D] f32 scaled queries; kc, vc [B,
    Hkv, Tp, D] f32 the chunk; k_leaves / v_leaves flat pools [layers * Hkv * pages, page, n]
    or one layer's [Hkv * pages, page, n]; ring (wk, wv) flat [layers * Hkv * slots', W, D]
    uint16 (or one layer's) or (); scalars: [B] int32 lengths,
    ring_lo, chunk lengths, window slots, page_lo; page_table [B, max_pages] int32. Returns the page
    part's accumulators, m, l and the ring+chunk part's acc, m, l, each [B, Hkv, n_qb, ...]
    (the Triton launcher's outputs)."""
    b, hkv, n_qb, rows, d = qw.shape
    mp, s = page_table.shape[1], plan.page_size
    n_steps = max(mp, 1)
    acc_shapes = vfmt.acc_shapes(rows)
    out_shape = [jax.ShapeDtypeStruct((b, hkv, n_qb, *sh), jnp.float32)
                 for sh in (*acc_shapes, (rows, 1), (rows, 1), (rows, d), (rows, 1), (rows, 1))]

    # A leaf is either its layer's slice [Hkv * pages, ...] (layer 0 of it) or the whole pool
    # [layers * Hkv * pages, ...] (kvjax/pool_formats.py whole_operand).
    def page_map(bi, h, qb, i, layer_r, len_r, lo_r, clen_r, slot_r, plo_r, pt_r, whole=True):
        # Past the row's last context page, or in a query block with no work: the last page
        # again (same block index: no new fetch).
        last = jnp.maximum(_cdiv(lo_r[bi], s) - 1, 0)
        jj = jnp.where(qb * plan.q_block < clen_r[bi], jnp.minimum(i, last), last)
        lay = layer_r[0] if whole else 0
        return ((lay * hkv + h) * plan.num_pages + pt_r[bi * mp + jj], 0, 0)

    def ring_map(bi, h, qb, i, layer_r, len_r, lo_r, clen_r, slot_r, plo_r, pt_r, whole=True):
        lay = layer_r[0] if whole else 0
        return ((lay * hkv + h) * plan.ring_slots + slot_r[bi], 0, 0)

    def spec(x, index_map, per_layer):
        whole = x.shape[0] > hkv * per_layer
        return pl.BlockSpec((None, *x.shape[1:]), functools.partial(index_map, whole=whole))

    def per_block(x):  # [B, Hkv, n_qb, ...] -> this program's block
        return pl.BlockSpec((None, None, None, *x.shape[3:]),
                            lambda bi, h, qb, i, *_, n=x.ndim: (bi, h, qb) + (0,) * (n - 3))

    def per_head(x):  # [B, Hkv, ...] -> this (row, head)
        return pl.BlockSpec((None, None, *x.shape[2:]),
                            lambda bi, h, qb, i, *_, n=x.ndim: (bi, h) + (0,) * (n - 2))

    in_specs = [per_block(x) for x in (*qs, qw)] + [per_head(kc), per_head(vc)]
    in_specs += [spec(x, page_map, plan.num_pages) for x in (*k_leaves, *v_leaves)]
    in_specs += [spec(x, ring_map, plan.ring_slots) for x in ring]
    vmem = compat.pltpu.VMEM
    scratch = [vmem((rows, 1), jnp.float32), vmem((rows, 1), jnp.float32)]
    scratch += [vmem(sh, jnp.float32) for sh in acc_shapes]
    grid_spec = compat.PrefetchScalarGridSpec(
        num_scalar_prefetch=N_SCALARS, grid=(b, hkv, n_qb, n_steps), in_specs=in_specs,
        out_specs=[per_block(x) for x in out_shape], scratch_shapes=scratch)
    kernel = functools.partial(_kernel, plan=plan, kfmt=kfmt, vfmt=vfmt, n_q=len(qs),
                               n_steps=n_steps)
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid_spec=grid_spec, interpret=interpret,
        # Query blocks and pages in order: a skipped block's repeated page index saves a fetch.
        compiler_params=compat.tpu_params(("parallel", "parallel", "arbitrary", "arbitrary")),
        name="kvjax_ragged_paged_attention",
    )(layer.reshape(1), *scalars, page_table.reshape(-1), *qs, qw, kc, vc, *k_leaves,
      *v_leaves, *ring)
