"""The pallas_call of the paged decode kernels: grid, BlockSpecs and outputs of the two launchers
(gather: Triton / interpret; tpu: Mosaic with scalar prefetch) around the kernel bodies of
_launch.py. Re-exported by _core."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kvjax.pallas_kernels import _rowed, compat
from kvjax.pallas_kernels._formats import KeyFormat, ValueFormat
from kvjax.pallas_kernels._launch import (
    WINDOW_CHUNK,
    Plan,
    _cdiv,
    _gather_kernel,
    _tpu_kernel,
)


def _out_map(nd: int):
    """Output block (b, h, split, 0...) whatever else the grid and scalar prefetch pass."""
    def index_map(bi, h, k, *rest):
        return (bi, h, k) + (0,) * nd
    return index_map


def launch(plan: Plan, kfmt: KeyFormat, vfmt: ValueFormat, qs: tuple[jax.Array, ...],
           k_leaves: tuple[jax.Array, ...], v_leaves: tuple[jax.Array, ...],
           ring: tuple[jax.Array, jax.Array, jax.Array] | None, layer: jax.Array,
           lengths: jax.Array, ring_lo: jax.Array, slots: jax.Array, page_table: jax.Array,
           page_lo: jax.Array, *, backend: str,
           num_warps: int = 0, num_stages: int = 2):
    """Run the kernel; returns (accs, m, den, window, scores): accs each [B, Hkv, splits',
    *acc_shape], m, den [B, Hkv, splits', Gp, 1], window (acc [B, Hkv, Gp, D], m, den [B, Hkv,
    Gp, 1]) or None, scores (plan.mass: the pages' and the window's raw scores, layouts in
    mass_from_scores) or None. k_leaves/v_leaves are flat pools [layers * Hkv * pages, rows, n];
    ring = (q_win [B, Hkv, Gp, D] f32, wk, wv flat [layers * Hkv * slots', W, D] uint16);
    page_lo [B] int32: pages serve positions from it (an exact sink serves those below)."""
    nsplit = plan.splits + (1 if plan.window else 0)
    b, hkv, gp, d = plan.batch, plan.kv_heads, plan.gp, plan.head_dim
    s, pps = plan.page_size, plan.pages_per_split
    acc_shapes = vfmt.acc_shapes(gp)
    out_shape = [jax.ShapeDtypeStruct((b, hkv, nsplit, *sh), jnp.float32) for sh in acc_shapes]
    out_shape += [jax.ShapeDtypeStruct((b, hkv, nsplit, gp, 1), jnp.float32)] * 2
    if plan.window:
        out_shape += [jax.ShapeDtypeStruct((b, hkv, gp, d), jnp.float32),
                      jax.ShapeDtypeStruct((b, hkv, gp, 1), jnp.float32),
                      jax.ShapeDtypeStruct((b, hkv, gp, 1), jnp.float32)]
    tpu = backend in ("tpu", "interpret_tpu")
    n_main = len(out_shape)
    wchunk = min(plan.window, WINDOW_CHUNK)
    if plan.mass:
        # Scores, raw: TPU one [Gp, page] block per grid step; the gather launcher one
        # [Gp, pages_per_split * page] row block per split; the window [chunks, Gp, chunk].
        out_shape.append(jax.ShapeDtypeStruct((b, hkv, nsplit * pps, gp, s) if tpu else
                                              (b, hkv, nsplit, gp, pps * s), jnp.float32))
        if plan.window:
            out_shape.append(jax.ShapeDtypeStruct((b, hkv, plan.window // wchunk, gp, wchunk),
                                                  jnp.float32))
    inputs = [*qs, *k_leaves, *v_leaves]
    if plan.window:
        inputs += list(ring)
    n_q = len(qs)

    def zeros_map(nd):
        return lambda *a: (0,) * nd

    if backend in ("triton", "interpret"):
        def per_head(x):
            return pl.BlockSpec((None, None, *x.shape[2:]),
                                lambda bi, h, k, n=x.ndim: (bi, h) + (0,) * (n - 2))

        def whole(x):
            return pl.BlockSpec(x.shape, zeros_map(x.ndim))

        in_specs = [pl.BlockSpec((1,), lambda bi, h, k: (0,)),
                    pl.BlockSpec((1,), lambda bi, h, k: (bi,)),
                    pl.BlockSpec((1,), lambda bi, h, k: (bi,)),
                    pl.BlockSpec((1,), lambda bi, h, k: (bi,)),
                    pl.BlockSpec((None, page_table.shape[1]), lambda bi, h, k: (bi, 0)),
                    pl.BlockSpec((1,), lambda bi, h, k: (bi,))]
        in_specs += [per_head(x) for x in qs]
        in_specs += [whole(x) for x in (*k_leaves, *v_leaves)]
        if plan.window:
            in_specs += [per_head(ring[0]), whole(ring[1]), whole(ring[2])]
        out_specs = [pl.BlockSpec((None, None, None, *s),
                                  _out_map(len(s)))
                     for s in (*acc_shapes, (gp, 1), (gp, 1))]
        if plan.window:
            out_specs += [pl.BlockSpec((None, None, gp, d), lambda bi, h, k: (bi, h, 0, 0)),
                          pl.BlockSpec((None, None, gp, 1), lambda bi, h, k: (bi, h, 0, 0)),
                          pl.BlockSpec((None, None, gp, 1), lambda bi, h, k: (bi, h, 0, 0))]
        if plan.mass:
            out_specs.append(pl.BlockSpec((None, None, None, gp, pps * s), _out_map(2)))
            if plan.window:
                out_specs.append(pl.BlockSpec((None, None, *out_shape[-1].shape[2:]),
                                              lambda bi, h, k: (bi, h, 0, 0, 0)))
        kernel = functools.partial(_gather_kernel, plan=plan, kfmt=kfmt, vfmt=vfmt, n_q=n_q)
        out = pl.pallas_call(
            kernel, out_shape=out_shape, grid=(b, hkv, nsplit), in_specs=in_specs,
            out_specs=out_specs, interpret=backend == "interpret",
            compiler_params=compat.triton_params(num_warps, num_stages),
            name="kvjax_paged_decode",
        )(layer.reshape(1), lengths, ring_lo, slots, page_table, page_lo, *inputs)
    elif tpu:
        mp, w = page_table.shape[1], plan.window

        # A leaf is either its layer's slice [Hkv * pages, ...] (layer 0 of it) or the whole
        # pool [layers * Hkv * pages, ...] (kvjax/pool_formats.py whole_operand).
        def page_map(bi, h, k, i, layer_r, len_r, lo_r, slot_r, pt_r, plo_r, whole=True):
            limit = lo_r[bi] if w else len_r[bi]
            last = jnp.maximum(_cdiv(limit, s) - 1, 0)
            jj = jnp.minimum(k * plan.pages_per_split + i, last)
            lay = layer_r[0] if whole else 0
            return ((lay * hkv + h) * plan.num_pages + pt_r[bi * mp + jj], 0, 0)

        def ring_map(bi, h, k, i, layer_r, len_r, lo_r, slot_r, pt_r, plo_r, whole=True):
            lay = layer_r[0] if whole else 0
            return ((lay * hkv + h) * plan.ring_slots + slot_r[bi], 0, 0)

        def per_head(x):
            return pl.BlockSpec((None, None, *x.shape[2:]),
                                lambda bi, h, k, i, *_, n=x.ndim: (bi, h) + (0,) * (n - 2))

        def page_spec(x):
            whole = x.shape[0] > hkv * plan.num_pages
            return pl.BlockSpec((None, *x.shape[1:]), functools.partial(page_map, whole=whole))

        def ring_spec(x):
            whole = x.shape[0] > hkv * plan.ring_slots
            return pl.BlockSpec((None, *x.shape[1:]), functools.partial(ring_map, whole=whole))

        def page_index(bi, h, k, i, layer_r, len_r, lo_r, *_):  # page_map's clamped jj
            limit = lo_r[bi] if w else len_r[bi]
            return jnp.minimum(k * plan.pages_per_split + i,
                               jnp.maximum(_cdiv(limit, s) - 1, 0))

        leaves = (*k_leaves, *v_leaves)
        rowed = plan.rowed or (False,) * len(leaves)
        in_specs = [per_head(x) for x in qs]
        in_specs += [_rowed.row_spec(s, page_index) if r else page_spec(x)
                     for x, r in zip(leaves, rowed, strict=True)]
        if plan.window:
            in_specs += [per_head(ring[0]), ring_spec(ring[1]), ring_spec(ring[2])]
        out_specs = [pl.BlockSpec((None, None, None, *sh),
                                  _out_map(len(sh)))
                     for sh in (*acc_shapes, (gp, 1), (gp, 1))]
        if plan.window:
            out_specs += [pl.BlockSpec((None, None, gp, d), lambda bi, h, k, i, *_: (bi, h, 0, 0)),
                          pl.BlockSpec((None, None, gp, 1), lambda bi, h, k, i, *_: (bi, h, 0, 0)),
                          pl.BlockSpec((None, None, gp, 1), lambda bi, h, k, i, *_: (bi, h, 0, 0))]
        if plan.mass:
            out_specs.append(pl.BlockSpec((None, None, None, gp, s),
                                          lambda bi, h, k, i, *_: (bi, h, k * pps + i, 0, 0)))
            if plan.window:
                out_specs.append(pl.BlockSpec((None, None, *out_shape[-1].shape[2:]),
                                              lambda bi, h, k, i, *_: (bi, h, 0, 0, 0)))
        vmem = compat.pltpu.VMEM
        scratch = [vmem((gp, 1), jnp.float32), vmem((gp, 1), jnp.float32)]
        scratch += [vmem(sh, jnp.float32) for sh in acc_shapes]
        grid_spec = compat.PrefetchScalarGridSpec(
            num_scalar_prefetch=6, grid=(b, hkv, nsplit, plan.pages_per_split),
            in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch)
        kernel = functools.partial(_tpu_kernel, plan=plan, kfmt=kfmt, vfmt=vfmt, n_q=n_q)
        out = pl.pallas_call(
            kernel, out_shape=out_shape, grid_spec=grid_spec,
            interpret=backend == "interpret_tpu",
            compiler_params=compat.tpu_params(("parallel", "parallel", "arbitrary",
                                               "arbitrary")),
            name="kvjax_paged_decode",
        )(layer.reshape(1), lengths, ring_lo, slots, page_table.reshape(-1), page_lo, *inputs)
    else:
        raise ValueError(f"no launcher for backend {backend!r}")
    n_acc = len(acc_shapes)
    accs, (m, den) = tuple(out[:n_acc]), out[n_acc:n_acc + 2]
    window = tuple(out[n_acc + 2:n_main]) if plan.window else None
    scores = tuple(out[n_main:]) if plan.mass else None
    return accs, m, den, window, scores
