"""The kernel bodies and their two launchers (gather: Triton / interpret; tpu: Mosaic with
scalar prefetch), the online softmax and the window program. Re-exported by _core."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kvjax.pallas_kernels import compat
from kvjax.pallas_kernels._formats import (
    KeyFormat,
    Loader,
    ValueFormat,
    bits_to,
    dot_nn,
    dot_nt,
    int_bits_to,
)

MASK = -1e30


# ----------------------------------------------------------------------------------------------
# The kernel body pieces.


def _cdiv(a, b: int):
    """Ceil division of an int32 scalar by a positive constant, without jnp's floor-division
    (its sign() has no Mosaic lowering off-TPU); negative a gives a value <= 0."""
    return jax.lax.div(a + (b - 1), jnp.int32(b))


def _online(carry, s, valid, accumulate):
    """One block of the online softmax. s [Gp, T] f32; valid [1, T] bool."""
    m, den, accs = carry
    s = jnp.where(valid, s, MASK)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))  # [Gp, 1]
    alpha = jnp.exp(m - m_new)
    p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
    l_new = alpha * den + jnp.sum(p, axis=1, keepdims=True)
    contrib = accumulate(p)
    accs = tuple(alpha * a + c for a, c in zip(accs, contrib, strict=True))
    return m_new, l_new, accs


WINDOW_CHUNK = 32  # ring tokens attended at once: a whole 128 x 128 ring tile spills on H100


def _window_update(carry, qw, fetch, length, w, convert, emit=None, ring_lo=0):
    """Attend the ring entries [W, D] (bf16 bits) of one sequence, WINDOW_CHUNK at a time
    (fetch(start, size) -> (keys, values) raw [size, D]): entry j holds the position p in
    [length - W, length) with p % W == j; entries with p < ring_lo (>= 0) are not read (empty,
    or not written by this sequence: its pages serve them). emit(i, s): gets chunk i's raw
    scores [Gp, WINDOW_CHUNK] (attention mass)."""
    lo = length - w
    lo_mod = jax.lax.rem(jax.lax.rem(lo, w) + w, w)
    c = min(w, WINDOW_CHUNK)

    def positions(j0, shape, dim):
        j = j0 + jax.lax.broadcasted_iota(jnp.int32, shape, dim)
        return lo + jax.lax.rem(j - lo_mod + w, w)

    def body(i, carry):
        j0 = i * c
        valid = positions(j0, (1, c), 1) >= ring_lo
        valid_col = positions(j0, (c, 1), 0) >= ring_lo  # an iota, not a reshape (Mosaic)
        wk, wv = fetch(j0, c)
        kt = jnp.where(valid_col, convert(wk, jnp.bfloat16), 0.0)
        vt = jnp.where(valid_col, convert(wv, jnp.bfloat16), 0.0)
        sc = dot_nt(qw, kt)
        if emit is not None:
            emit(i, sc)
        m, den, (acc,) = _online(carry, sc, valid, lambda p: (dot_nn(p, vt),))
        return m, den, (acc,)

    m, den, (acc,) = jax.lax.fori_loop(0, w // c, body, carry)
    return m, den, acc


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static shape plan of one call."""

    batch: int
    kv_heads: int
    num_pages: int  # per (layer, head)
    page_size: int
    gp: int  # padded query heads per KV head
    head_dim: int
    splits: int  # KV splits over the page table
    pages_per_split: int
    pages_per_block: int
    window: int  # 0: none
    ring_slots: int  # slots + 1 of the ring
    sub_blocks: int = 1  # gather launcher: blocks per page (a block is page_size // sub rows)
    mass: bool = False  # also write every score (attention mass for H2O, see mass_from_scores)


def _init_state(plan: Plan, vfmt: ValueFormat):
    m = jnp.full((plan.gp, 1), MASK, jnp.float32)
    den = jnp.zeros((plan.gp, 1), jnp.float32)
    accs = tuple(jnp.zeros(s, jnp.float32) for s in vfmt.acc_shapes(plan.gp))
    return m, den, accs


def _gather_kernel(*refs, plan: Plan, kfmt: KeyFormat, vfmt: ValueFormat, n_q: int):
    layer_ref, len_ref, lo_ref, slot_ref, pt_ref = refs[:5]
    rest = refs[5:]
    q_refs, rest = rest[:n_q], rest[n_q:]
    k_refs, rest = rest[:kfmt.leaves], rest[kfmt.leaves:]
    v_refs, rest = rest[:vfmt.leaves], rest[vfmt.leaves:]
    if plan.window:
        qw_ref, wk_ref, wv_ref, *rest = rest
    n_acc = len(vfmt.acc_shapes(plan.gp))
    acc_refs, (m_ref, l_ref), rest = rest[:n_acc], rest[n_acc:n_acc + 2], rest[n_acc + 2:]
    if plan.window:
        (accw_ref, mw_ref, lw_ref), rest = rest[:3], rest[3:]
    sp_ref = sw_ref = None
    if plan.mass:  # scores of this split's pages [Gp, pages_per_split * page_size]; window's
        sp_ref, sw_ref = rest[0], (rest[1] if plan.window else None)

    h, k = pl.program_id(1), pl.program_id(2)
    layer = layer_ref[0]
    length = len_ref[0]
    s, ppb = plan.page_size, plan.pages_per_block
    limit = lo_ref[0] if plan.window else length  # pages serve positions below the ring's
    base = (layer * plan.kv_heads + h) * plan.num_pages
    first = k * plan.pages_per_split
    n_valid = _cdiv(limit, s)
    nblocks = jnp.clip(_cdiv(n_valid - first, ppb), 0, plan.pages_per_split // ppb)
    qs = tuple(r[...] for r in q_refs)
    sub = plan.sub_blocks
    rows = s // sub  # tokens of a page per block (all of them unless sub > 1, then ppb == 1)

    def body(i, carry):
        # lax div/rem (i >= 0): jnp's floor forms lower to selects Triton's rem rejects
        j0 = first + jax.lax.div(i, jnp.int32(sub)) * ppb
        r0 = jax.lax.rem(i, jnp.int32(sub)) * rows
        pages = base + pt_ref[pl.ds(j0, ppb)]

        def fetch(ref, lanes):
            if sub > 1:  # one page (ppb == 1), a scalar index
                return ref[base + pt_ref[j0], pl.ds(r0, rows), lanes]
            t = ref[pages, :, lanes]
            return t.reshape(t.shape[0] * t.shape[1], t.shape[2])

        ldk, ldv = Loader(k_refs, fetch), Loader(v_refs, fetch)
        sc = kfmt.score(qs, ldk)
        tok0 = j0 * s + r0
        if sp_ref is not None:
            sp_ref[:, pl.ds((j0 - first) * s + r0, ppb * rows)] = sc
        valid = tok0 + jax.lax.broadcasted_iota(jnp.int32, (1, ppb * rows), 1) < limit
        valid_col = tok0 + jax.lax.broadcasted_iota(jnp.int32, (ppb * rows, 1), 0) < limit
        return _online(carry, sc, valid, lambda p: vfmt.accumulate(p, valid_col, ldv))

    m, den, accs = jax.lax.fori_loop(0, nblocks * sub, body, _init_state(plan, vfmt))
    for r, a in zip(acc_refs, accs, strict=True):
        r[...] = a
    m_ref[...] = m
    l_ref[...] = den

    if plan.window:
        @pl.when(k == plan.splits)
        def _():
            ridx = (layer * plan.kv_heads + h) * plan.ring_slots + slot_ref[0]
            m0, l0, _ = _init_state(plan, vfmt)
            carry = (m0, l0, (jnp.zeros((plan.gp, plan.head_dim), jnp.float32),))
            def fetch(j0, c):
                return wk_ref[ridx, pl.ds(j0, c), :], wv_ref[ridx, pl.ds(j0, c), :]

            mw, lw, accw = _window_update(carry, qw_ref[...], fetch, length, plan.window,
                                          bits_to, _emitter(sw_ref), lo_ref[0])
            accw_ref[...] = accw
            mw_ref[...] = mw
            lw_ref[...] = lw


def _tpu_kernel(*refs, plan: Plan, kfmt: KeyFormat, vfmt: ValueFormat, n_q: int):
    layer_ref, len_ref, lo_ref, slot_ref, pt_ref = refs[:5]
    del slot_ref, pt_ref  # used by the index maps
    rest = refs[5:]
    q_refs, rest = rest[:n_q], rest[n_q:]
    k_refs, rest = rest[:kfmt.leaves], rest[kfmt.leaves:]
    v_refs, rest = rest[:vfmt.leaves], rest[vfmt.leaves:]
    if plan.window:
        qw_ref, wk_ref, wv_ref, *rest = rest
    n_acc = len(vfmt.acc_shapes(plan.gp))
    acc_refs, (m_ref, l_ref), rest = rest[:n_acc], rest[n_acc:n_acc + 2], rest[n_acc + 2:]
    if plan.window:
        accw_ref, mw_ref, lw_ref, *rest = rest
    sp_ref = sw_ref = None
    if plan.mass:  # this page's scores [Gp, page_size]; the window's [chunks, Gp, chunk]
        sp_ref, *rest = rest
        if plan.window:
            sw_ref, *rest = rest
    m_sc, l_sc, *acc_sc = rest

    b, k, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    del layer_ref
    length = len_ref[b]
    s = plan.page_size
    limit = lo_ref[b] if plan.window else length
    j = k * plan.pages_per_split + i

    @pl.when(i == 0)
    def _():
        m_sc[...] = jnp.full(m_sc.shape, MASK, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        for a in acc_sc:
            a[...] = jnp.zeros(a.shape, jnp.float32)

    @pl.when((k < plan.splits) & (j * s < limit))
    def _():
        def fetch(ref, lanes):
            return ref[:, lanes]

        ldk = Loader(k_refs, fetch, int_floats=True)
        ldv = Loader(v_refs, fetch, int_floats=True)
        qs = tuple(r[...] for r in q_refs)
        sc = kfmt.score(qs, ldk)
        if sp_ref is not None:
            sp_ref[...] = sc
        valid = j * s + jax.lax.broadcasted_iota(jnp.int32, (1, s), 1) < limit
        valid_col = j * s + jax.lax.broadcasted_iota(jnp.int32, (s, 1), 0) < limit
        carry = (m_sc[...], l_sc[...], tuple(a[...] for a in acc_sc))
        m, den, accs = _online(carry, sc, valid, lambda p: vfmt.accumulate(p, valid_col, ldv))
        m_sc[...] = m
        l_sc[...] = den
        for r, a in zip(acc_sc, accs, strict=True):
            r[...] = a

    @pl.when(i == plan.pages_per_split - 1)
    def _():
        for r, a in zip(acc_refs, acc_sc, strict=True):
            r[...] = a[...]
        m_ref[...] = m_sc[...]
        l_ref[...] = l_sc[...]

    if plan.window:
        @pl.when((k == plan.splits) & (i == 0))
        def _():
            m0, l0, _ = _init_state(plan, vfmt)
            carry = (m0, l0, (jnp.zeros((plan.gp, plan.head_dim), jnp.float32),))
            def fetch(j0, c):
                return wk_ref[pl.ds(j0, c), :], wv_ref[pl.ds(j0, c), :]

            mw, lw, accw = _window_update(carry, qw_ref[...], fetch, length, plan.window,
                                          int_bits_to, _emitter(sw_ref), lo_ref[b])
            accw_ref[...] = accw
            mw_ref[...] = mw
            lw_ref[...] = lw


def _emitter(ref):
    """Window chunk scores -> ref [chunks, Gp, chunk] (a dynamic index on the leading, untiled
    dim: Mosaic stores at dynamic lane offsets are what this avoids)."""
    if ref is None:
        return None

    def emit(i, sc):
        ref[i] = sc
    return emit


def _out_map(nd: int):
    """Output block (b, h, split, 0...) whatever else the grid and scalar prefetch pass."""
    def index_map(bi, h, k, *rest):
        return (bi, h, k) + (0,) * nd
    return index_map


def launch(plan: Plan, kfmt: KeyFormat, vfmt: ValueFormat, qs: tuple[jax.Array, ...],
           k_leaves: tuple[jax.Array, ...], v_leaves: tuple[jax.Array, ...],
           ring: tuple[jax.Array, jax.Array, jax.Array] | None, layer: jax.Array,
           lengths: jax.Array, ring_lo: jax.Array, slots: jax.Array, page_table: jax.Array, *,
           backend: str,
           num_warps: int = 0, num_stages: int = 2):
    """Run the kernel; returns (accs, m, den, window, scores): accs each [B, Hkv, splits',
    *acc_shape], m, den [B, Hkv, splits', Gp, 1], window (acc [B, Hkv, Gp, D], m, den [B, Hkv,
    Gp, 1]) or None, scores (plan.mass: the pages' and the window's raw scores, layouts in
    mass_from_scores) or None. k_leaves/v_leaves are flat pools [layers * Hkv * pages, rows, n];
    ring = (q_win [B, Hkv, Gp, D] f32, wk, wv flat [layers * Hkv * slots', W, D] uint16)."""
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
                    pl.BlockSpec((None, page_table.shape[1]), lambda bi, h, k: (bi, 0))]
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
        )(layer.reshape(1), lengths, ring_lo, slots, page_table, *inputs)
    elif tpu:
        mp, w = page_table.shape[1], plan.window

        def page_map(bi, h, k, i, layer_r, len_r, lo_r, slot_r, pt_r):
            limit = lo_r[bi] if w else len_r[bi]
            last = jnp.maximum(_cdiv(limit, s) - 1, 0)
            jj = jnp.minimum(k * plan.pages_per_split + i, last)
            return ((layer_r[0] * hkv + h) * plan.num_pages + pt_r[bi * mp + jj], 0, 0)

        def ring_map(bi, h, k, i, layer_r, len_r, lo_r, slot_r, pt_r):
            return ((layer_r[0] * hkv + h) * plan.ring_slots + slot_r[bi], 0, 0)

        def per_head(x):
            return pl.BlockSpec((None, None, *x.shape[2:]),
                                lambda bi, h, k, i, *_, n=x.ndim: (bi, h) + (0,) * (n - 2))

        def page_spec(x):
            return pl.BlockSpec((None, *x.shape[1:]), page_map)

        in_specs = [per_head(x) for x in qs]
        in_specs += [page_spec(x) for x in (*k_leaves, *v_leaves)]
        if plan.window:
            in_specs += [per_head(ring[0]),
                         pl.BlockSpec((None, *ring[1].shape[1:]), ring_map),
                         pl.BlockSpec((None, *ring[2].shape[1:]), ring_map)]
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
            num_scalar_prefetch=5, grid=(b, hkv, nsplit, plan.pages_per_split),
            in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch)
        kernel = functools.partial(_tpu_kernel, plan=plan, kfmt=kfmt, vfmt=vfmt, n_q=n_q)
        out = pl.pallas_call(
            kernel, out_shape=out_shape, grid_spec=grid_spec,
            interpret=backend == "interpret_tpu",
            compiler_params=compat.tpu_params(("parallel", "parallel", "arbitrary",
                                               "arbitrary")),
            name="kvjax_paged_decode",
        )(layer.reshape(1), lengths, ring_lo, slots, page_table.reshape(-1), *inputs)
    else:
        raise ValueError(f"no launcher for backend {backend!r}")
    n_acc = len(acc_shapes)
    accs, (m, den) = tuple(out[:n_acc]), out[n_acc:n_acc + 2]
    window = tuple(out[n_acc + 2:n_main]) if plan.window else None
    scores = tuple(out[n_main:]) if plan.mass else None
    return accs, m, den, window, scores
