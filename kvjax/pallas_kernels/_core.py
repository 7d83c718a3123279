"""Shared machinery of the paged decode kernels: launchers, online softmax, split-KV combine.

A kernel is a (key format, value format) pair over one layer of a cache segment (kvjax/cache):

* a *key format* turns the query into what its score needs, once per step, outside the kernel
  (``prepare_q``: GQA group padded, softmax scale folded in, channels permuted into the "phase"
  order of packed codes, TurboQuant's rotation/projection) and scores a tile of pages from its
  codes (``score`` -> [Gp, T]);
* a *value format* accumulates ``p @ values`` from the codes of a tile (``accumulate``), in
  whatever basis/order is cheapest (phase order, TurboQuant's rotated basis), and maps the
  accumulator back once per step, after the split combine (``finalize``).

Pool leaves [layers, kv_heads, num_pages, rows, n] are reshaped (free) to [layers * kv_heads *
num_pages, rows, n], and the kernel addresses page ``p`` of (layer, head) as ``(layer * kv_heads +
head) * num_pages + p``: the layer index is a runtime scalar (the model scans over layers), so no
per-layer slice of the pool is ever copied.

Packed codes (b bits LSB-first along head_dim, kvjax/quant/packing.py) are decoded without any
interleave: for b in {1, 2, 4, 8} byte j holds channels j*P + r (P = 8 / b) at bit b*r; for b = 3
each 3-byte group j holds channels 8j + r. Channel j*P + r is "phase r, column j": the query is
permuted into phases once per step, scores sum one dot per phase, values accumulate per phase and
are permuted back once per step. Only shifts, masks and dots run in the kernel.

Launchers (one kernel body, two ways to fetch a tile):

* ``gather`` (GPU Triton; CPU interpret): grid (batch, kv_heads, splits); each program loops over
  blocks of ``pages_per_block`` pages of its split with an in-kernel gather through the page table
  (an ordinary input: GPU lowerings have no scalar prefetch).
* ``tpu`` (Mosaic; also runs interpreted): ``PrefetchScalarGridSpec`` with the page table,
  lengths, layer and window slots in SMEM; grid (batch, kv_heads, splits, pages_per_split); the
  BlockSpec index_map fetches one page per step (past the sequence's last page it repeats the last
  page, which the pipeline does not re-fetch); m/l/acc live in VMEM scratch.

Both write per-split partial (m, l, acc); ``combine`` merges them with the log-sum-exp rule. A
segment with a full-precision window gets one extra program per (batch, head) that attends the
ring's valid entries (positions in [length - W, length)) with the original query; pages then only
serve positions below length - W.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kvjax.pallas_kernels import compat

MASK = -1e30
BACKENDS = ("auto", "triton", "tpu", "interpret", "interpret_tpu", "mosaic_gpu")


# backend "auto": the lowering is chosen per platform when the step is lowered
# (lax.platform_dependent), not from jax.default_backend(): a step traced on a CPU host for a TPU
# or GPU target (AOT compile, kvjax.bench.compile) must hold the Mosaic / Triton call.
AUTO_BACKENDS = {"cuda": "triton", "rocm": "triton", "tpu": "tpu", "cpu": "interpret"}


def resolve_backend(backend: str) -> str:
    """Validate an explicit backend; "auto" stays "auto" (resolved per platform in decode)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown Pallas backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "mosaic_gpu":
        raise NotImplementedError(
            "the Mosaic GPU paged kernels are not written yet; use backend='triton' on GPU "
            f"(Mosaic GPU available in this jax: {compat.has_mosaic_gpu()})")
    return backend


# ----------------------------------------------------------------------------------------------
# Tile helpers usable inside kernels (Triton, Mosaic and the interpreters).


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [M, K] . b [N, K]^T -> [M, N] f32. Triton dots need every dim >= 16: smaller ones
    multiply-and-reduce instead."""
    m, k = a.shape
    n = b.shape[0]
    if min(m, k, n) >= 16:
        return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32)
    return jnp.sum(a[:, None, :].astype(jnp.float32) * b[None, :, :].astype(jnp.float32), axis=-1)


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [M, K] . b [K, N] -> [M, N] f32 (see dot_nt)."""
    m, k = a.shape
    n = b.shape[1]
    if min(m, k, n) >= 16:
        return jnp.dot(a, b, preferred_element_type=jnp.float32)
    return jnp.sum(a[:, :, None].astype(jnp.float32) * b[None, :, :].astype(jnp.float32), axis=1)


def bits_to(x: jax.Array, dtype) -> jax.Array:
    """Raw storage words (uint8/uint16) -> their float of the same width, as f32 (native casts:
    Triton and the interpreters)."""
    dtype = jnp.dtype(dtype)
    if x.dtype != dtype:
        x = jax.lax.bitcast_convert_type(x, dtype)
    return x.astype(jnp.float32)


# (exponent bits, mantissa bits, has inf) of the narrow floats the pools store as raw bits.
_FLOAT_BITS = {"float16": (5, 10, True), "float8_e5m2": (5, 2, True),
               "float8_e4m3fn": (4, 3, False)}


def int_bits_to(x: jax.Array, dtype) -> jax.Array:
    """bits_to with 32-bit integer arithmetic only: Mosaic has no f16 / fp8 vector registers on
    v5e/v6e (a bitcast of i16 lanes to f16 fails with "Invalid vector register cast"). Exact for
    every value, subnormals, infinities and NaNs included."""
    name = jnp.dtype(dtype).name
    width = 8 * jnp.dtype(dtype).itemsize  # x may be the raw words or int32 holding them
    w = x.astype(jnp.int32)
    if width < 32:
        w = w & ((1 << width) - 1)
    if name == "float32":
        return jax.lax.bitcast_convert_type(w, jnp.float32)
    if name == "bfloat16":
        return jax.lax.bitcast_convert_type(w << 16, jnp.float32)
    if name not in _FLOAT_BITS:
        raise NotImplementedError(f"no integer decoding of {name}")
    eb, mb, has_inf = _FLOAT_BITS[name]
    bias = (1 << (eb - 1)) - 1
    top = 1 + eb + mb
    sign = (w >> (top - 1)) & 1
    e = (w >> mb) & ((1 << eb) - 1)
    m = w & ((1 << mb) - 1)
    normal = (sign << 31) | ((e + (127 - bias)) << 23) | (m << (23 - mb))
    emax = (1 << eb) - 1
    nan_bits = jnp.int32(0x7FC00000)
    if has_inf:  # IEEE: exponent all ones is inf (m == 0) or NaN
        special = (sign << 31) | jnp.int32(0x7F800000) | (m << (23 - mb))
        normal = jnp.where(e == emax, special, normal)
    else:  # e4m3fn: only all-ones exponent and mantissa is NaN, no infinities
        normal = jnp.where((e == emax) & (m == (1 << mb) - 1), nan_bits, normal)
    val = jax.lax.bitcast_convert_type(normal, jnp.float32)
    sub = m.astype(jnp.float32) * jnp.float32(2.0 ** (1 - bias - mb))
    sub = jnp.where(sign == 1, -sub, sub)
    return jnp.where(e == 0, sub, val)


def phases_of(bits: int) -> int:
    if bits == 3:
        return 8
    if bits in (1, 2, 4, 8):
        return 8 // bits
    raise NotImplementedError(f"{bits}-bit codes are not supported by the kernels")


def to_phases(x: jax.Array, p: int) -> jax.Array:
    """[..., n] in channel order -> [..., P, n/P], phase r holding channels r, r+P, r+2P, ..."""
    *lead, n = x.shape
    return jnp.swapaxes(x.reshape(*lead, n // p, p), -1, -2)


def from_phases(x: jax.Array) -> jax.Array:
    """Inverse of to_phases: [..., P, n/P] -> [..., n]."""
    *lead, p, m = x.shape
    return jnp.swapaxes(x, -1, -2).reshape(*lead, p * m)


class Loader:
    """Fetches tiles of the current block of pages from a tuple of leaf refs.

    ``tile(i, start, size, stride)`` -> leaf i's lanes offset+start, +stride, ... (size of them)
    for every row of the block: [rows_in_block, size], raw storage dtype. ``floats`` decodes
    raw float bits to f32, with integer ops only when ``int_floats`` (Mosaic)."""

    def __init__(self, refs: Sequence[Any], fetch: Callable[[Any, Any], jax.Array],
                 offset: int = 0, int_floats: bool = False):
        self.refs = refs
        self.fetch = fetch
        self.offset = offset
        self.int_floats = int_floats

    def shifted(self, offset: int) -> Loader:
        """The same tiles with every lane index moved right by a static offset."""
        return Loader(self.refs, self.fetch, self.offset + offset, self.int_floats)

    def tile(self, i: int, start: int = 0, size: int | None = None, stride: int = 1):
        ref = self.refs[i]
        if size is None:
            size = (ref.shape[-1] - start + stride - 1) // stride
        start += self.offset
        if stride == 1:
            return self.fetch(ref, pl.ds(start, size))
        if not self.int_floats or ref.dtype.itemsize == 4:
            return self.fetch(ref, pl.ds(start, size, stride))
        # Mosaic: no strided loads of 8/16-bit lanes. Load the span contiguously and pick every
        # stride-th lane with one-hot matmuls, a byte at a time (bytes are exact in bf16, and
        # each output sums one nonzero term); returns int32 words.
        span = (size - 1) * stride + 1
        raw = self.fetch(ref, pl.ds(start, span)).astype(jnp.int32)
        rows = jax.lax.broadcasted_iota(jnp.int32, (span, size), 0)
        cols = jax.lax.broadcasted_iota(jnp.int32, (span, size), 1)
        pick = (rows == stride * cols).astype(jnp.bfloat16)
        out = 0
        for b in range(ref.dtype.itemsize):
            byte = ((raw >> (8 * b)) & 255).astype(jnp.float32).astype(jnp.bfloat16)
            got = jnp.dot(byte, pick, preferred_element_type=jnp.float32).astype(jnp.int32)
            out = out | (got << (8 * b)) if b else got
        return out

    def floats(self, i: int, dtype, start: int = 0, size: int | None = None,
               stride: int = 1) -> jax.Array:
        """tile() decoded from raw float bits to f32."""
        return self.convert(self.tile(i, start, size, stride), dtype)

    def convert(self, x: jax.Array, dtype) -> jax.Array:
        return int_bits_to(x, dtype) if self.int_floats else bits_to(x, dtype)


def unpack_phases(ld: Loader, i: int, bits: int, n: int, signed: bool = False) -> list[jax.Array]:
    """Packed b-bit codes of n channels in leaf i -> P int32 tiles [T, n/P] (phase order)."""
    p = phases_of(bits)
    if bits == 8:
        return [ld.tile(i, 0, n).astype(jnp.int32)]
    mask = (1 << bits) - 1
    if bits == 3:
        x = [ld.tile(i, s, n // 8, 3).astype(jnp.int32) for s in range(3)]
        word = x[0] | (x[1] << 8) | (x[2] << 16)
    else:
        word = ld.tile(i, 0, n * bits // 8).astype(jnp.int32)
    return [(word >> (bits * r)) & mask for r in range(p)]


def lookup(codes: jax.Array, table: Sequence[float]) -> jax.Array:
    """Centroid table lookup as a chain of selects (tables have <= 16 entries; no gathers)."""
    out = jnp.full(codes.shape, float(table[0]), jnp.float32)
    for c, v in enumerate(table[1:], start=1):
        out = jnp.where(codes == c, jnp.float32(v), out)
    return out


# ----------------------------------------------------------------------------------------------
# Formats.


class KeyFormat:
    """Scores a tile of keys from their codes. Subclasses are frozen dataclasses (hashable)."""

    leaves: int  # pool leaves it reads, in PoolSpec order
    per_token_rows = True  # every leaf has one row per token (KIVI keys: one per group)

    def prepare_q(self, q: jax.Array) -> tuple[jax.Array, ...]:
        """q [B, Hkv, Gp, D] f32, softmax scale folded in -> kernel inputs [B, Hkv, ...]."""
        raise NotImplementedError

    def score(self, qs: tuple[jax.Array, ...], ld: Loader) -> jax.Array:
        """-> [Gp, T] f32 for the T tokens of the current block."""
        raise NotImplementedError


class ValueFormat:
    leaves: int
    per_token_rows = True

    def acc_shapes(self, gp: int) -> tuple[tuple[int, ...], ...]:
        raise NotImplementedError

    def accumulate(self, p: jax.Array, valid_col: jax.Array,
                   ld: Loader) -> tuple[jax.Array, ...]:
        """p [Gp, T] f32 (zero where invalid), valid_col [T, 1] bool (from an iota: Mosaic
        cannot reshape a [1, T] mask) -> contributions (acc_shapes)."""
        raise NotImplementedError

    def finalize(self, accs: tuple[jax.Array, ...]) -> jax.Array:
        """accs each [..., *acc_shape] (combined over splits) -> [..., Gp, D] f32."""
        raise NotImplementedError


def sanitize(x: jax.Array, valid_col: jax.Array) -> jax.Array:
    """Zero the rows of a [T, n] tile that belong to invalid tokens (NaN-poisoned pages)."""
    return jnp.where(valid_col, x, 0.0)


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


def _window_update(carry, qw, fetch, length, w, convert):
    """Attend the ring entries [W, D] (bf16 bits) of one sequence, WINDOW_CHUNK at a time
    (fetch(start, size) -> (keys, values) raw [size, D]): entry j holds the position p in
    [length - W, length) with p % W == j; entries with p < 0 are empty."""
    lo = length - w
    lo_mod = jax.lax.rem(jax.lax.rem(lo, w) + w, w)
    c = min(w, WINDOW_CHUNK)

    def positions(j0, shape, dim):
        j = j0 + jax.lax.broadcasted_iota(jnp.int32, shape, dim)
        return lo + jax.lax.rem(j - lo_mod + w, w)

    def body(i, carry):
        j0 = i * c
        valid = positions(j0, (1, c), 1) >= 0
        valid_col = positions(j0, (c, 1), 0) >= 0  # an iota, not a reshape of valid (Mosaic)
        wk, wv = fetch(j0, c)
        kt = jnp.where(valid_col, convert(wk, jnp.bfloat16), 0.0)
        vt = jnp.where(valid_col, convert(wv, jnp.bfloat16), 0.0)
        m, den, (acc,) = _online(carry, dot_nt(qw, kt), valid, lambda p: (dot_nn(p, vt),))
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


def _init_state(plan: Plan, vfmt: ValueFormat):
    m = jnp.full((plan.gp, 1), MASK, jnp.float32)
    den = jnp.zeros((plan.gp, 1), jnp.float32)
    accs = tuple(jnp.zeros(s, jnp.float32) for s in vfmt.acc_shapes(plan.gp))
    return m, den, accs


def _gather_kernel(*refs, plan: Plan, kfmt: KeyFormat, vfmt: ValueFormat, n_q: int):
    layer_ref, len_ref, slot_ref, pt_ref = refs[:4]
    rest = refs[4:]
    q_refs, rest = rest[:n_q], rest[n_q:]
    k_refs, rest = rest[:kfmt.leaves], rest[kfmt.leaves:]
    v_refs, rest = rest[:vfmt.leaves], rest[vfmt.leaves:]
    if plan.window:
        qw_ref, wk_ref, wv_ref, *rest = rest
    n_acc = len(vfmt.acc_shapes(plan.gp))
    acc_refs, (m_ref, l_ref), rest = rest[:n_acc], rest[n_acc:n_acc + 2], rest[n_acc + 2:]

    h, k = pl.program_id(1), pl.program_id(2)
    layer = layer_ref[0]
    length = len_ref[0]
    s, ppb = plan.page_size, plan.pages_per_block
    limit = jnp.maximum(length - plan.window, 0) if plan.window else length
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
        valid = tok0 + jax.lax.broadcasted_iota(jnp.int32, (1, ppb * rows), 1) < limit
        valid_col = tok0 + jax.lax.broadcasted_iota(jnp.int32, (ppb * rows, 1), 0) < limit
        return _online(carry, sc, valid, lambda p: vfmt.accumulate(p, valid_col, ldv))

    m, den, accs = jax.lax.fori_loop(0, nblocks * sub, body, _init_state(plan, vfmt))
    for r, a in zip(acc_refs, accs, strict=True):
        r[...] = a
    m_ref[...] = m
    l_ref[...] = den

    if plan.window:
        accw_ref, mw_ref, lw_ref = rest

        @pl.when(k == plan.splits)
        def _():
            ridx = (layer * plan.kv_heads + h) * plan.ring_slots + slot_ref[0]
            m0, l0, _ = _init_state(plan, vfmt)
            carry = (m0, l0, (jnp.zeros((plan.gp, plan.head_dim), jnp.float32),))
            def fetch(j0, c):
                return wk_ref[ridx, pl.ds(j0, c), :], wv_ref[ridx, pl.ds(j0, c), :]

            mw, lw, accw = _window_update(carry, qw_ref[...], fetch, length, plan.window,
                                          bits_to)
            accw_ref[...] = accw
            mw_ref[...] = mw
            lw_ref[...] = lw


def _tpu_kernel(*refs, plan: Plan, kfmt: KeyFormat, vfmt: ValueFormat, n_q: int):
    layer_ref, len_ref, slot_ref, pt_ref = refs[:4]
    del slot_ref, pt_ref  # used by the index maps
    rest = refs[4:]
    q_refs, rest = rest[:n_q], rest[n_q:]
    k_refs, rest = rest[:kfmt.leaves], rest[kfmt.leaves:]
    v_refs, rest = rest[:vfmt.leaves], rest[vfmt.leaves:]
    if plan.window:
        qw_ref, wk_ref, wv_ref, *rest = rest
    n_acc = len(vfmt.acc_shapes(plan.gp))
    acc_refs, (m_ref, l_ref), rest = rest[:n_acc], rest[n_acc:n_acc + 2], rest[n_acc + 2:]
    if plan.window:
        accw_ref, mw_ref, lw_ref, *rest = rest
    m_sc, l_sc, *acc_sc = rest

    b, k, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    del layer_ref
    length = len_ref[b]
    s = plan.page_size
    limit = jnp.maximum(length - plan.window, 0) if plan.window else length
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
                                          int_bits_to)
            accw_ref[...] = accw
            mw_ref[...] = mw
            lw_ref[...] = lw


def _out_map(nd: int):
    """Output block (b, h, split, 0...) whatever else the grid and scalar prefetch pass."""
    def index_map(bi, h, k, *rest):
        return (bi, h, k) + (0,) * nd
    return index_map


def launch(plan: Plan, kfmt: KeyFormat, vfmt: ValueFormat, qs: tuple[jax.Array, ...],
           k_leaves: tuple[jax.Array, ...], v_leaves: tuple[jax.Array, ...],
           ring: tuple[jax.Array, jax.Array, jax.Array] | None, layer: jax.Array,
           lengths: jax.Array, slots: jax.Array, page_table: jax.Array, *, backend: str,
           num_warps: int = 0, num_stages: int = 2):
    """Run the kernel; returns (accs, m, den, window): accs each [B, Hkv, splits', *acc_shape],
    m, den [B, Hkv, splits', Gp, 1], window (acc [B, Hkv, Gp, D], m, den [B, Hkv, Gp, 1]) or None.
    k_leaves/v_leaves are flat pools [layers * Hkv * pages, rows, n]; ring = (q_win
    [B, Hkv, Gp, D] f32, wk, wv flat [layers * Hkv * slots', W, D] uint16)."""
    nsplit = plan.splits + (1 if plan.window else 0)
    b, hkv, gp, d = plan.batch, plan.kv_heads, plan.gp, plan.head_dim
    acc_shapes = vfmt.acc_shapes(gp)
    out_shape = [jax.ShapeDtypeStruct((b, hkv, nsplit, *s), jnp.float32) for s in acc_shapes]
    out_shape += [jax.ShapeDtypeStruct((b, hkv, nsplit, gp, 1), jnp.float32)] * 2
    if plan.window:
        out_shape += [jax.ShapeDtypeStruct((b, hkv, gp, d), jnp.float32),
                      jax.ShapeDtypeStruct((b, hkv, gp, 1), jnp.float32),
                      jax.ShapeDtypeStruct((b, hkv, gp, 1), jnp.float32)]
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
        kernel = functools.partial(_gather_kernel, plan=plan, kfmt=kfmt, vfmt=vfmt, n_q=n_q)
        out = pl.pallas_call(
            kernel, out_shape=out_shape, grid=(b, hkv, nsplit), in_specs=in_specs,
            out_specs=out_specs, interpret=backend == "interpret",
            compiler_params=compat.triton_params(num_warps, num_stages),
            name="kvjax_paged_decode",
        )(layer.reshape(1), lengths, slots, page_table, *inputs)
    elif backend in ("tpu", "interpret_tpu"):
        s, mp, w = plan.page_size, page_table.shape[1], plan.window

        def page_map(bi, h, k, i, layer_r, len_r, slot_r, pt_r):
            limit = jnp.maximum(len_r[bi] - w, 0) if w else len_r[bi]
            last = jnp.maximum(_cdiv(limit, s) - 1, 0)
            jj = jnp.minimum(k * plan.pages_per_split + i, last)
            return ((layer_r[0] * hkv + h) * plan.num_pages + pt_r[bi * mp + jj], 0, 0)

        def ring_map(bi, h, k, i, layer_r, len_r, slot_r, pt_r):
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
        vmem = compat.pltpu.VMEM
        scratch = [vmem((gp, 1), jnp.float32), vmem((gp, 1), jnp.float32)]
        scratch += [vmem(sh, jnp.float32) for sh in acc_shapes]
        grid_spec = compat.PrefetchScalarGridSpec(
            num_scalar_prefetch=4, grid=(b, hkv, nsplit, plan.pages_per_split),
            in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch)
        kernel = functools.partial(_tpu_kernel, plan=plan, kfmt=kfmt, vfmt=vfmt, n_q=n_q)
        out = pl.pallas_call(
            kernel, out_shape=out_shape, grid_spec=grid_spec,
            interpret=backend == "interpret_tpu",
            compiler_params=compat.tpu_params(("parallel", "parallel", "arbitrary",
                                               "arbitrary")),
            name="kvjax_paged_decode",
        )(layer.reshape(1), lengths, slots, page_table.reshape(-1), *inputs)
    else:
        raise ValueError(f"no launcher for backend {backend!r}")
    n_acc = len(acc_shapes)
    accs, (m, den) = tuple(out[:n_acc]), out[n_acc:n_acc + 2]
    window = tuple(out[n_acc + 2:]) if plan.window else None
    return accs, m, den, window


def combine(vfmt: ValueFormat, accs, m, den, window) -> jax.Array:
    """Merge split partials (and the window's) with the log-sum-exp rule -> [B, Hkv, Gp, D]."""
    big = jnp.max(m, axis=2)  # [B, Hkv, Gp, 1]
    if window is not None:
        big = jnp.maximum(big, window[1])
    wts = jnp.exp(m - big[:, :, None])  # [B, Hkv, S, Gp, 1]
    denom = jnp.sum(wts * den, axis=2)

    def merge(a):  # a [B, Hkv, S, Gp, n]
        return jnp.sum(wts * a, axis=2)

    out = vfmt.finalize(tuple(merge(a) for a in accs))
    if window is not None:
        ww = jnp.exp(window[1] - big)
        out = out + ww * window[0]
        denom = denom + ww * window[2]
    return out / jnp.maximum(denom, 1e-30)


def triton_tuning(kfmt: KeyFormat, vfmt: ValueFormat, head_dim: int) -> tuple[int, int]:
    """(tokens per block, num_warps) for the Triton kernel, from `python -m kvjax.bench.compile
    --target h100` (ptxas registers and spills; 255 registers is the cap): TurboQuant tiles hold
    a code, a centroid select chain and (keys) 8 sign phases per channel, so they take 16 tokens
    over 8 warps; head_dim 128 takes 32 tokens, 64 takes 64."""
    if "Turbo" in type(kfmt).__name__ or "Turbo" in type(vfmt).__name__:
        # 8 warps for channel splits (turbo2.5/3.5: two sets of phases live at once) and d64;
        # at d128 one part keeps 164 registers over 4 warps (8 warps spilled at 128 registers)
        split = any(len(getattr(f, "parts", ())) > 1 for f in (kfmt, vfmt))
        return 16, 8 if split or head_dim <= 64 else 4
    return (64 if head_dim <= 64 else 32), 4


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _triton_ok(q: jax.Array, seg) -> bool:
    return all(_pow2(v) for v in (seg.k_spec.page_size, q.shape[-1], seg.window or 1))


def decode(q: jax.Array, seg, layer: jax.Array, page_table: jax.Array, lengths: jax.Array,
           window_slots: jax.Array | None, kfmt: KeyFormat, vfmt: ValueFormat, *,
           backend: str = "auto", k_splits: int = 8, pages_per_block: int = 0,
           num_warps: int = 0, num_stages: int = 2) -> jax.Array:
    """One decode step of attention over one layer of a cache segment (kvjax/cache/paged.py).

    q: [batch, 1, num_heads, head_dim]; layer: int32 scalar (index within the segment);
    page_table: [batch, max_pages] int32; lengths: [batch] int32 tokens valid (this step's
    included; the query is the sequence's last token); window_slots: [batch] ring slot per row
    (segments with a window). Returns [batch, 1, num_heads, head_dim] in q's dtype.
    """
    backend = resolve_backend(backend)
    if backend == "auto":
        def branch(name):
            if name == "triton" and not _triton_ok(q, seg):
                name = "interpret"  # non-power-of-two shapes: Triton cannot tile them

            def run(*a):
                return decode(*a, kfmt, vfmt, backend=name, k_splits=k_splits,
                              pages_per_block=pages_per_block, num_warps=num_warps,
                              num_stages=num_stages)
            return run

        branches = {p: branch(b) for p, b in AUTO_BACKENDS.items()}
        return jax.lax.platform_dependent(q, seg, layer, page_table, lengths, window_slots,
                                          default=branches["cpu"], **branches)
    if q.ndim != 4 or q.shape[1] != 1:
        raise ValueError(f"q must be [batch, 1, num_heads, head_dim] (one decode token), got "
                         f"{q.shape}; multi-token chunks go through the XLA path")
    bsz, _, nh, d = q.shape
    leaf = seg.k[0]
    n_layers, hkv, n_pages, s = leaf.shape[0], leaf.shape[1], leaf.shape[2], seg.k_spec.page_size
    if d != seg.k_spec.head_dim:
        raise ValueError(f"q head_dim {d} != the cache's {seg.k_spec.head_dim}")
    if nh % hkv:
        raise ValueError(f"{nh} query heads are not a multiple of {hkv} KV heads")
    if page_table.ndim != 2 or page_table.shape[0] != bsz:
        raise ValueError(f"page_table must be [batch={bsz}, max_pages], got {page_table.shape}")
    if lengths.shape != (bsz,):
        raise ValueError(f"lengths must be [batch={bsz}], got {lengths.shape}")
    window = seg.window
    if window and (window_slots is None or window_slots.shape != (bsz,)):
        raise ValueError(f"a segment with a window needs window_slots [batch={bsz}]")
    if backend in ("triton", "interpret"):
        for name, v in (("page_size", s), ("head_dim", d), ("window", window or 1)):
            if not _pow2(v):
                raise ValueError(f"the Triton kernel needs a power-of-two {name}, got {v}")
    g = nh // hkv
    gp = max(16, 1 << (g - 1).bit_length())
    mp = page_table.shape[1]
    sub = 1
    if backend in ("tpu", "interpret_tpu"):
        ppb = 1
    else:
        tokens, warps = triton_tuning(kfmt, vfmt, d)
        ppb = pages_per_block or max(1, tokens // s)
        num_warps = num_warps or warps
        if not pages_per_block and tokens < s and kfmt.per_token_rows and vfmt.per_token_rows:
            sub = s // tokens  # blocks of part of a page (every leaf has a row per token)
        ppb = min(ppb, 1 << (mp - 1).bit_length())
    splits = max(1, min(k_splits, -(-mp // ppb)))
    pps = -(-mp // (splits * ppb)) * ppb
    pad = splits * pps - mp
    pt = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, pad)))
    plan = Plan(batch=bsz, kv_heads=hkv, num_pages=n_pages, page_size=s, gp=gp, head_dim=d,
                splits=splits, pages_per_split=pps, pages_per_block=ppb, window=window,
                ring_slots=seg.wk.shape[2] if window else 0, sub_blocks=sub)

    qg = q.reshape(bsz, hkv, g, d).astype(jnp.float32) * (d ** -0.5)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    qs = kfmt.prepare_q(qg)

    def flat(x):
        return x.reshape(n_layers * hkv * x.shape[2], *x.shape[3:])

    ring = None
    if window:
        ring = (qg, flat(seg.wk), flat(seg.wv))
        slots = window_slots.astype(jnp.int32)
    else:
        slots = jnp.zeros((bsz,), jnp.int32)
    accs, m, den, win = launch(plan, kfmt, vfmt, qs, tuple(flat(x) for x in seg.k),
                             tuple(flat(x) for x in seg.v), ring,
                             jnp.asarray(layer, jnp.int32), lengths.astype(jnp.int32), slots, pt,
                             backend=backend, num_warps=num_warps, num_stages=num_stages)
    out = combine(vfmt, accs, m, den, win)  # [B, Hkv, Gp, D]
    return out[:, :, :g].reshape(bsz, 1, nh, d).astype(q.dtype)
