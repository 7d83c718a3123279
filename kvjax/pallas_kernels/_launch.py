"""The kernel bodies of the two launchers (gather: Triton / interpret; tpu: Mosaic with scalar
prefetch; their pallas_calls are in _pallas_call.py), the online softmax and the window program.
Re-exported by _core."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kvjax.pallas_kernels import _rowed
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
    """One block of the online softmax. s [R, T] f32; valid bool broadcastable to it ([1, T]
    here; the ragged kernels' [R, T] causal masks too)."""
    m, den, accs = carry
    s = jnp.where(valid, s, MASK)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))  # [Gp, 1]
    alpha = jnp.exp(m - m_new)
    p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
    l_new = alpha * den + jnp.sum(p, axis=1, keepdims=True)
    contrib = accumulate(p)
    accs = tuple(alpha * a + c for a, c in zip(accs, contrib, strict=True))
    return m_new, l_new, accs


def scratch_page_step(i, cond, scratch: tuple, step) -> None:
    """One grid step of a TPU launcher over its VMEM scratch (m, l, *accs): zeroed at the first
    page step (i == 0), then, where `cond`, one online-softmax block of step() -> (scores [R, T],
    valid, accumulate). The paged decode and the ragged kernels' TPU bodies share it."""
    m_sc, l_sc, *acc_sc = scratch

    @pl.when(i == 0)
    def _():
        m_sc[...] = jnp.full(m_sc.shape, MASK, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        for a in acc_sc:
            a[...] = jnp.zeros(a.shape, jnp.float32)

    @pl.when(cond)
    def _():
        sc, valid, accumulate = step()
        carry = (m_sc[...], l_sc[...], tuple(a[...] for a in acc_sc))
        m, den, accs = _online(carry, sc, valid, accumulate)
        m_sc[...] = m
        l_sc[...] = den
        for r, a in zip(acc_sc, accs, strict=True):
            r[...] = a


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
    rowed: tuple[bool, ...] = ()  # TPU: per key then value leaf, gathered rows (_rowed.py)


def _init_state(plan: Plan, vfmt: ValueFormat):
    m = jnp.full((plan.gp, 1), MASK, jnp.float32)
    den = jnp.zeros((plan.gp, 1), jnp.float32)
    accs = tuple(jnp.zeros(s, jnp.float32) for s in vfmt.acc_shapes(plan.gp))
    return m, den, accs


@dataclasses.dataclass
class Refs:
    """The kernel's refs by role, in the launchers' order: 6 scalars (layer, lengths, ring_lo,
    window slots, page table, page_lo: pages serve positions [page_lo, ring_lo)), inputs
    (q parts, key leaves, value leaves, then the ring's q, wk, wv), outputs (accs, m, l, then
    the window's acc, m, l, then with mass the pages' and the window's scores), and `scratch`:
    what is left (the TPU launcher's VMEM scratch)."""

    layer: Any
    lengths: Any
    ring_lo: Any
    slots: Any
    page_table: Any
    page_lo: Any
    q: tuple
    k: tuple
    v: tuple
    acc: tuple
    m: Any
    den: Any
    qw: Any = None
    wk: Any = None
    wv: Any = None
    accw: Any = None
    mw: Any = None
    lw: Any = None
    scores: Any = None  # gather: [Gp, pages_per_split * page]; tpu: [Gp, page]
    scores_w: Any = None  # the window's [chunks, Gp, chunk]
    scratch: tuple = ()


def _split_refs(refs, plan: Plan, kfmt: KeyFormat, vfmt: ValueFormat, n_q: int) -> Refs:
    it = iter(refs)

    def take(n):
        return tuple(next(it) for _ in range(n))

    out = Refs(*take(6), q=take(n_q), k=take(kfmt.leaves), v=take(vfmt.leaves),
               acc=(), m=None, den=None)
    if plan.window:
        out.qw, out.wk, out.wv = take(3)
    out.acc = take(len(vfmt.acc_shapes(plan.gp)))
    out.m, out.den = take(2)
    if plan.window:
        out.accw, out.mw, out.lw = take(3)
    if plan.mass:
        out.scores = next(it)
        if plan.window:
            out.scores_w = next(it)
    out.scratch = tuple(it)
    return out


def _gather_kernel(*refs, plan: Plan, kfmt: KeyFormat, vfmt: ValueFormat, n_q: int):
    rf = _split_refs(refs, plan, kfmt, vfmt, n_q)
    layer_ref, len_ref, lo_ref, slot_ref, pt_ref = (rf.layer, rf.lengths, rf.ring_lo, rf.slots,
                                                    rf.page_table)
    q_refs, k_refs, v_refs, acc_refs, m_ref, l_ref = rf.q, rf.k, rf.v, rf.acc, rf.m, rf.den
    sp_ref = rf.scores

    h, k = pl.program_id(1), pl.program_id(2)
    layer = layer_ref[0]
    length = len_ref[0]
    s, ppb = plan.page_size, plan.pages_per_block
    limit = lo_ref[0] if plan.window else length  # pages serve positions below the ring's
    page_lo = rf.page_lo[0]  # and from the exact sink's end (merged outside the kernel)
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

        tok0 = j0 * s + r0
        ldk, ldv = Loader(k_refs, fetch, tok0=tok0), Loader(v_refs, fetch)
        sc = kfmt.score(qs, ldk)
        if sp_ref is not None:
            sp_ref[:, pl.ds((j0 - first) * s + r0, ppb * rows)] = sc
        tok = tok0 + jax.lax.broadcasted_iota(jnp.int32, (1, ppb * rows), 1)
        valid = (tok < limit) & (tok >= page_lo)
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

            def fetch(j0, c):
                return rf.wk[ridx, pl.ds(j0, c), :], rf.wv[ridx, pl.ds(j0, c), :]

            _window_program(rf, plan, vfmt, fetch, length, bits_to, lo_ref[0])


def _tpu_kernel(*refs, plan: Plan, kfmt: KeyFormat, vfmt: ValueFormat, n_q: int):
    rf = _split_refs(refs, plan, kfmt, vfmt, n_q)  # layer, slots, page table: the index maps'
    len_ref, lo_ref = rf.lengths, rf.ring_lo
    q_refs, k_refs, v_refs, acc_refs, m_ref, l_ref = rf.q, rf.k, rf.v, rf.acc, rf.m, rf.den
    sp_ref = rf.scores
    m_sc, l_sc, *acc_sc = rf.scratch

    b, k, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    length = len_ref[b]
    s = plan.page_size
    limit = lo_ref[b] if plan.window else length
    page_lo = rf.page_lo[b]
    j = k * plan.pages_per_split + i

    def step():
        def fetch(ref, lanes):
            return ref[:, lanes]

        nk = len(k_refs)
        rowed = plan.rowed or (False,) * (nk + len(v_refs))
        ldk = Loader(_rowed.wrap(k_refs, rowed[:nk], j, s), fetch, int_floats=True,
                     tok0=j * s)
        ldv = Loader(_rowed.wrap(v_refs, rowed[nk:], j, s), fetch, int_floats=True)
        qs = tuple(r[...] for r in q_refs)
        sc = kfmt.score(qs, ldk)
        if sp_ref is not None:
            sp_ref[...] = sc
        tok = j * s + jax.lax.broadcasted_iota(jnp.int32, (1, s), 1)
        valid = (tok < limit) & (tok >= page_lo)
        valid_col = j * s + jax.lax.broadcasted_iota(jnp.int32, (s, 1), 0) < limit
        return sc, valid, lambda p: vfmt.accumulate(p, valid_col, ldv)

    scratch_page_step(i, (k < plan.splits) & (j * s < limit), (m_sc, l_sc, *acc_sc), step)

    @pl.when(i == plan.pages_per_split - 1)
    def _():
        for r, a in zip(acc_refs, acc_sc, strict=True):
            r[...] = a[...]
        m_ref[...] = m_sc[...]
        l_ref[...] = l_sc[...]

    if plan.window:
        @pl.when((k == plan.splits) & (i == 0))
        def _():
            def fetch(j0, c):
                return rf.wk[pl.ds(j0, c), :], rf.wv[pl.ds(j0, c), :]

            _window_program(rf, plan, vfmt, fetch, length, int_bits_to, lo_ref[b])


def _window_program(rf: Refs, plan: Plan, vfmt: ValueFormat, fetch, length, convert, ring_lo):
    """The window's program: attend the ring with the original query, write its (acc, m, l)."""
    m0, l0, _ = _init_state(plan, vfmt)
    carry = (m0, l0, (jnp.zeros((plan.gp, plan.head_dim), jnp.float32),))
    mw, lw, accw = _window_update(carry, rf.qw[...], fetch, length, plan.window, convert,
                                  _emitter(rf.scores_w), ring_lo)
    rf.accw[...] = accw
    rf.mw[...] = mw
    rf.lw[...] = lw


def _emitter(ref):
    """Window chunk scores -> ref [chunks, Gp, chunk] (a dynamic index on the leading, untiled
    dim: Mosaic stores at dynamic lane offsets are what this avoids)."""
    if ref is None:
        return None

    def emit(i, sc):
        ref[i] = sc
    return emit
