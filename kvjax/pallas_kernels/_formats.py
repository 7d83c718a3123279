"""Tile helpers usable inside the kernels (Triton, Mosaic and the interpreters), packed-code
phases, and the key / value format interface. Re-exported by _core (see its docstring for
how formats, phases and launchers fit together)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

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
    raw float bits to f32, with integer ops only when ``int_floats`` (Mosaic). ``tok0``: the
    cache position of the block's first row (rows are consecutive positions), for formats whose
    scores depend on a token's position (RoPE-centred TurboQuant keys); None where unknown."""

    def __init__(self, refs: Sequence[Any], fetch: Callable[[Any, Any], jax.Array],
                 offset: int = 0, int_floats: bool = False, tok0: jax.Array | None = None):
        self.refs = refs
        self.fetch = fetch
        self.offset = offset
        self.int_floats = int_floats
        self.tok0 = tok0

    def shifted(self, offset: int) -> Loader:
        """The same tiles with every lane index moved right by a static offset."""
        return Loader(self.refs, self.fetch, self.offset + offset, self.int_floats, self.tok0)

    def positions(self, rows: int) -> jax.Array:
        """[rows, 1] int32 cache positions of the block's rows (a column: from an iota)."""
        if self.tok0 is None:
            raise ValueError("this launcher gives its Loader no token positions (tok0)")
        return self.tok0 + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0)

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


def unpack_channels(ld: Loader, i: int, bits: int, n: int) -> jax.Array:
    """Packed b-bit codes of n channels in leaf i -> one int32 tile [T, n] in channel order (the
    gather launchers). Byte (3-bit: 3-byte group) j holds channels j*P + r at bit b*r, so the
    word tile [T, W] broadcast over its P phases, shifted by b*r and masked is [T, W, P], and
    merging its last two dims is channel order: one tile, one dot per format part (the per-phase
    tiles of unpack_phases have n/P columns: under 16 they miss Triton's dot and take the
    multiply-and-reduce fallback, hundreds of shuffles and barriers per block)."""
    if bits == 8:
        return ld.tile(i, 0, n).astype(jnp.int32)
    p = phases_of(bits)
    if bits == 3:
        x = [ld.tile(i, s, n // 8, 3).astype(jnp.int32) for s in range(3)]
        word = x[0] | (x[1] << 8) | (x[2] << 16)
    else:
        word = ld.tile(i, 0, n * bits // 8).astype(jnp.int32)
    t, w = word.shape
    shift = bits * jax.lax.broadcasted_iota(jnp.int32, (1, 1, p), 2)
    codes = (word[:, :, None] >> shift) & ((1 << bits) - 1)
    return codes.reshape(t, w * p)


def merged(bits: int, n: int, channel_order: bool) -> bool:
    """Whether n channels of b-bit codes are read as one channel-order tile: on the gather
    launchers (channel_order) when a phase tile would be 16 columns or fewer (under 16 misses
    Triton's dot minimum: multiply-and-reduce; 16 still takes P small dots). Wider phase tiles
    stay: merging costs a shared-memory layout conversion that 32+ columns do not win back
    (compiled for h100, PTX per loop iteration: int4 d128 700 -> 973, turbo3.5's 32-column
    4-bit part 2021 -> 2134; kivi4's 16-column value tiles 1944 -> 1179)."""
    return channel_order and bits != 8 and n // phases_of(bits) < 32


def code_tiles(ld: Loader, i: int, bits: int, n: int, channel_order: bool) -> list[jax.Array]:
    """The codes of leaf i as tiles: [one channel-order tile] (merged) or the P phase tiles."""
    if merged(bits, n, channel_order):
        return [unpack_channels(ld, i, bits, n)]
    return unpack_phases(ld, i, bits, n)


def q_tiles(q: jax.Array, bits: int, channel_order: bool) -> tuple[jax.Array, ...]:
    """q [..., n] as the kernel inputs matching code_tiles: itself, or its P phases."""
    if merged(bits, q.shape[-1], channel_order):
        return (q,)
    ph = to_phases(q, phases_of(bits))
    return tuple(ph[..., r, :] for r in range(ph.shape[-2]))


def n_tiles(bits: int, n: int, channel_order: bool) -> int:
    return 1 if merged(bits, n, channel_order) else phases_of(bits)


def lookup(codes: jax.Array, table: Sequence[float], tree: bool = False) -> jax.Array:
    """Centroid table lookup without gathers (tables have <= 16 entries): a chain of selects,
    2 instructions (compare, select) per entry; or with `tree` (the gather launchers) for a
    16-entry table symmetric about 0 (Lloyd-Max centroids are: c[15 - i] = -c[i], exactly) a
    select tree over the 8 magnitudes: j = i ^ (7 + top bit), 3 levels of (bit test, selects),
    then the sign: about 19 instructions instead of 30 per element."""
    n = len(table)
    t32 = [float(np.float32(v)) for v in table]
    if tree and n == 16 and all(t32[n - 1 - i] == -t32[i] for i in range(n)):
        half = n // 2
        top = codes >> 3  # 1: the positive half
        j = codes ^ (top + (half - 1))  # magnitude index: i - 8 or 7 - i
        vals = [jnp.float32(v) for v in t32[half:]]
        for k in range(3):
            bit = (j & (1 << k)) != 0
            vals = [jnp.where(bit, vals[2 * m + 1], vals[2 * m]) for m in range(len(vals) // 2)]
        return jnp.where(top != 0, vals[0], -vals[0])
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

    def prepare_q_layer(self, q: jax.Array, layer: jax.Array) -> tuple[jax.Array, ...]:
        """prepare_q for one layer of the segment (int32 scalar, segment-relative): formats with
        per-layer metadata (calibrated TurboQuant) override this."""
        del layer
        return self.prepare_q(q)

    def gather_form(self) -> KeyFormat:
        return _gather_form(self)


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

    def finalize_layer(self, accs: tuple[jax.Array, ...], layer: jax.Array) -> jax.Array:
        """finalize for one layer of the segment: accs each [B, Hkv, *acc_shape] -> [B, Hkv,
        Gp, D]; formats with per-layer metadata (calibrated TurboQuant) override this."""
        del layer
        return self.finalize(accs)

    def gather_form(self) -> ValueFormat:
        return _gather_form(self)


def _gather_form(fmt):
    """The form the gather (Triton / interpret) launchers run: packed formats (a dataclass field
    channel_order) unpack one channel-order tile per part (unpack_channels); the TPU launchers
    keep the phase tiles (Mosaic cannot merge a [T, W, P] tile's minor dims)."""
    if getattr(fmt, "channel_order", True):
        return fmt
    return dataclasses.replace(fmt, channel_order=True)


def sanitize(x: jax.Array, valid_col: jax.Array) -> jax.Array:
    """Zero the rows of a [T, n] tile that belong to invalid tokens (NaN-poisoned pages)."""
    return jnp.where(valid_col, x, 0.0)
