"""The Triton (GPU) and interpret (CPU) launcher of the ragged paged-attention kernel
(ragged_attention.py: the module doc there says what is computed; this file says how it runs on a
GPU): grid (row, KV head, query block), one program per block of query rows, an in-kernel gather
through the page table over ``pages_per_block`` pages per iteration (split into ``sub_blocks``
row blocks where a page is longer than the format's token tile), then the ring and the chunk's own
keys (``ragged_attention.ring_and_chunk``, shared with the TPU launcher, ragged_tpu.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kvjax.pallas_kernels import compat
from kvjax.pallas_kernels._core import MASK, KeyFormat, Loader, ValueFormat, _online, bits_to
from kvjax.pallas_kernels.ragged_attention import RaggedPlan, _cdiv, ring_and_chunk, split_refs


def _kernel(*refs, plan: RaggedPlan, kfmt: KeyFormat, vfmt: ValueFormat, n_q: int):
    ((layer_ref, len_ref, rlo_ref, clen_ref, slot_ref, plo_ref, pt_ref), q_refs,
     (qw_ref, kc_ref, vc_ref),
     k_refs, v_refs, (wk_ref, wv_ref), acc_refs, (m_ref, l_ref, acc2_ref, m2_ref, l2_ref)
     ) = split_refs(refs, plan, kfmt, vfmt, n_q)

    h, qb = pl.program_id(1), pl.program_id(2)
    layer, length, ring_lo, clen = layer_ref[0], len_ref[0], rlo_ref[0], clen_ref[0]
    ctx_end = length - clen  # the chunk's first position
    page_end = ring_lo  # pages below the ring's part
    page_lo = plo_ref[0]  # and from the exact sink's end (merged outside the kernel)
    bq, rows, s, ppb, sub = plan.q_block, plan.rows, plan.page_size, plan.pages_per_block, \
        plan.sub_blocks
    active = qb * bq < clen  # query blocks past the row's chunk (idle rows) do nothing
    base = (layer * plan.kv_heads + h) * plan.num_pages
    rtok = s // sub

    # (1) pages [0, page_end), in the format's accumulators.
    n_blocks = jnp.where(active, _cdiv(_cdiv(page_end, s), ppb), jnp.int32(0))
    qs = tuple(r[...] for r in q_refs)

    def page_body(i, carry):
        j0 = jax.lax.div(i, jnp.int32(sub)) * ppb
        r0 = jax.lax.rem(i, jnp.int32(sub)) * rtok
        pages = base + pt_ref[pl.ds(j0, ppb)]

        def fetch(ref, lanes):
            if sub > 1:  # one page per block, part of its rows
                return ref[base + pt_ref[j0], pl.ds(r0, rtok), lanes]
            t = ref[pages, :, lanes]
            return t.reshape(t.shape[0] * t.shape[1], t.shape[2])

        tok0 = j0 * s + r0
        ldk, ldv = Loader(k_refs, fetch, tok0=tok0), Loader(v_refs, fetch)
        tok = tok0 + jax.lax.broadcasted_iota(jnp.int32, (1, ppb * rtok), 1)
        valid = (tok < page_end) & (tok >= page_lo)
        valid_col = tok0 + jax.lax.broadcasted_iota(jnp.int32, (ppb * rtok, 1), 0) < page_end
        return _online(carry, kfmt.score(qs, ldk), valid,
                       lambda p: vfmt.accumulate(p, valid_col, ldv))

    init = (jnp.full((rows, 1), MASK, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            tuple(jnp.zeros(sh, jnp.float32) for sh in vfmt.acc_shapes(rows)))
    m, den, accs = jax.lax.fori_loop(jnp.int32(0), (n_blocks * sub).astype(jnp.int32),
                                     page_body, init)
    for r, a in zip(acc_refs, accs, strict=True):
        r[...] = a
    m_ref[...] = m
    l_ref[...] = den

    # (2) + (3): ring and chunk, plain values, one more online softmax.
    ridx = (layer * plan.kv_heads + h) * plan.ring_slots + slot_ref[0] if plan.window else 0

    def fetch_ring(j0, c):
        return wk_ref[ridx, pl.ds(j0, c), :], wv_ref[ridx, pl.ds(j0, c), :]

    def fetch_chunk(k0, n):
        return kc_ref[pl.ds(k0, n), :], vc_ref[pl.ds(k0, n), :]

    m2, l2, acc2 = ring_and_chunk(qw_ref[...], plan, active=active, ring_lo=ring_lo,
                                  ctx_end=ctx_end, clen=clen, qb=qb, fetch_ring=fetch_ring,
                                  convert=bits_to, fetch_chunk=fetch_chunk)
    acc2_ref[...] = acc2
    m2_ref[...] = m2
    l2_ref[...] = l2


def warps_for(kfmt, warps: int, rows: int, d: int) -> int:
    """Warps for the Triton ragged kernel: 8 where a program's tile is >= 4096 elements, and for
    KIVI at head_dim >= 128, whose whole-scale-row key phases spilled 8 bytes at 168 registers
    over 4 warps on h100 (ragged kivi2/kivi4-d128-g1-p32; 8 warps: 166 registers, no spill),
    and for RoPE-centred TurboQuant keys at head_dim >= 128, whose in-kernel cos / sin
    (libdevice, with the large-angle path) spilled 48 bytes at 168 registers over 4 warps
    (calibrated ragged turbo2.5-d128-g3-p32; 8 warps: 197 registers, no spill)."""
    kivi_wide = "Kivi" in type(kfmt).__name__ and d >= 128
    rope_wide = getattr(getattr(kfmt, "calib", None), "rope", False) and d >= 128
    return max(warps, 8 if rows * d >= 4096 or kivi_wide or rope_wide else 4)


def launch(plan: RaggedPlan, kfmt, vfmt, qs, qw, kc, vc, k_leaves, v_leaves, ring, layer,
            scalars, page_table, *, backend: str, num_warps: int, num_stages: int):
    """scalars: the [B] int32 rows lengths, ring_lo, chunk_len, window slot, page_lo."""
    b, hkv, n_qb, rows, d = qw.shape
    acc_shapes = vfmt.acc_shapes(rows)
    out_shape = [jax.ShapeDtypeStruct((b, hkv, n_qb, *sh), jnp.float32)
                 for sh in (*acc_shapes, (rows, 1), (rows, 1), (rows, d), (rows, 1), (rows, 1))]

    def per_block(x):  # [B, Hkv, n_qb, ...] -> this program's block
        return pl.BlockSpec((None, None, None, *x.shape[3:]),
                            lambda bi, h, qb, n=x.ndim: (bi, h, qb) + (0,) * (n - 3))

    def per_head(x):  # [B, Hkv, ...] -> this (row, head)
        return pl.BlockSpec((None, None, *x.shape[2:]),
                            lambda bi, h, qb, n=x.ndim: (bi, h) + (0,) * (n - 2))

    def whole(x):
        return pl.BlockSpec(x.shape, lambda *_, n=x.ndim: (0,) * n)

    def per_row(_):
        return pl.BlockSpec((1,), lambda bi, h, qb: (bi,))

    in_specs = [pl.BlockSpec((1,), lambda bi, h, qb: (0,))] + [per_row(x) for x in scalars]
    in_specs += [pl.BlockSpec((None, page_table.shape[1]), lambda bi, h, qb: (bi, 0))]
    in_specs += [per_block(x) for x in (*qs, qw)] + [per_head(kc), per_head(vc)]
    in_specs += [whole(x) for x in (*k_leaves, *v_leaves, *ring)]
    out_specs = [per_block(x) for x in out_shape]
    kernel = functools.partial(_kernel, plan=plan, kfmt=kfmt, vfmt=vfmt, n_q=len(qs))
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(b, hkv, n_qb), in_specs=in_specs,
        out_specs=out_specs, interpret=backend == "interpret",
        compiler_params=compat.triton_params(num_warps, num_stages),
        name="kvjax_ragged_paged_attention",
    )(layer.reshape(1), *scalars, page_table, *qs, qw, kc, vc, *k_leaves, *v_leaves, *ring)
