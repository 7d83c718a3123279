"""Paged decode attention over bf16, FP8 and INT8/INT4 pages (GQA, split-KV, window overlay).

Per (sequence, KV head, split) one program loads each KV tile once for all the query heads that
share it (the GQA group, padded to 16 rows for the MXU/tensor cores) and runs an online softmax
over its pages; ``_core.combine`` merges the splits. What each tile read costs:

* bf16 (and f32): the page words, bitcast in registers.
* fp8 e4m3/e5m2: 1 byte per element + a per-token f16 scale. The key scale multiplies the score
  column (q . (c s) = (q . c) s), the value scale multiplies the softmax weight (sum_t p_t s_t c_t);
  static fp8 folds its per-tensor scale into q (keys) or the output (values).
* int8: int8 codes + per-token f16 scale, same folding. int4: two codes per byte (phase order,
  see _core), offset by 7.

Reference: kvjax.attention.paged_attention (the XLA path: dequantize, overlay the window, softmax).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from kvjax.cache.layout import PoolSpec
from kvjax.pallas_kernels import _core
from kvjax.pallas_kernels._core import (
    KeyFormat,
    Loader,
    ValueFormat,
    code_tiles,
    dot_nn,
    dot_nt,
    from_phases,
    n_tiles,
    q_tiles,
    sanitize,
)
from kvjax.quant import FP8Quantizer, IntQuantizer, PlainQuantizer

METHODS = ("bf16", "f32", "fp8_e4m3", "fp8_e5m2", "fp8_e4m3_static", "fp8_e5m2_static",
           "int8", "int4")


@dataclasses.dataclass(frozen=True)
class Dense:
    """One code per element, in a float (stored as raw bits) or int8, optional per-token scale."""

    dtype: str  # logical dtype of the codes: "bfloat16", "float32", "float8_e4m3fn", "int8", ...
    has_scale: bool
    static_scale: float = 1.0

    @property
    def leaves(self) -> int:
        return 2 if self.has_scale else 1

    def codes(self, ld: Loader) -> jax.Array:
        t = ld.tile(0)
        if jnp.issubdtype(jnp.dtype(self.dtype), jnp.integer):
            return t.astype(jnp.float32)
        return ld.convert(t, self.dtype)

    def scaled(self, ld: Loader) -> jax.Array:
        """Codes [T, D] f32, times the per-token scale column [T, 1] when there is one (a column
        multiply: Mosaic cannot turn the [T, 1] scales into a [1, T] row)."""
        c = self.codes(ld)
        return c * ld.floats(1, jnp.float16) if self.has_scale else c


@dataclasses.dataclass(frozen=True)
class DenseKey(Dense, KeyFormat):
    def prepare_q(self, q):
        return (q * self.static_scale,)

    def score(self, qs, ld):
        return dot_nt(qs[0], self.scaled(ld))


@dataclasses.dataclass(frozen=True)
class DenseValue(Dense, ValueFormat):
    head_dim: int = 0

    def acc_shapes(self, gp):
        return ((gp, self.head_dim),)

    def accumulate(self, p, valid_col, ld):
        return (dot_nn(p, sanitize(self.scaled(ld), valid_col)),)

    def finalize(self, accs):
        return accs[0] * self.static_scale


@dataclasses.dataclass(frozen=True)
class PackedInt:
    """Symmetric b-bit ints packed LSB-first (stored code = q + qmax) with a per-token scale."""

    bits: int
    head_dim: int
    leaves: int = 2
    channel_order: bool = False  # one [T, D] tile (gather launchers), else P phase tiles

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def phase_codes(self, ld: Loader) -> list[jax.Array]:
        """Per tile (code_tiles) f32 dequantized values (code - qmax) * scale."""
        sc = ld.floats(1, jnp.float16)
        return [(c - self.qmax).astype(jnp.float32) * sc
                for c in code_tiles(ld, 0, self.bits, self.head_dim, self.channel_order)]


@dataclasses.dataclass(frozen=True)
class PackedIntKey(PackedInt, KeyFormat):
    def prepare_q(self, q):
        return q_tiles(q, self.bits, self.channel_order)

    def score(self, qs, ld):
        return sum(dot_nt(qr, c) for qr, c in zip(qs, self.phase_codes(ld), strict=True))


@dataclasses.dataclass(frozen=True)
class PackedIntValue(PackedInt, ValueFormat):
    def acc_shapes(self, gp):
        p = n_tiles(self.bits, self.head_dim, self.channel_order)
        return ((gp, self.head_dim // p),) * p

    def accumulate(self, p, valid_col, ld):
        return tuple(dot_nn(p, sanitize(c, valid_col)) for c in self.phase_codes(ld))

    def finalize(self, accs):
        return from_phases(jnp.stack(accs, axis=-2))


def formats(spec: PoolSpec) -> tuple[KeyFormat, ValueFormat] | None:
    """(key format, value format) for a pool of one of METHODS, None for other methods."""
    qz = spec.quantizer
    d = spec.head_dim
    if isinstance(qz, PlainQuantizer):
        dt = jnp.dtype(qz.dtype).name
        return DenseKey(dt, False), DenseValue(dt, False, head_dim=d)
    if isinstance(qz, FP8Quantizer):
        dt = jnp.dtype(qz.dtype).name
        if qz.static:
            sc = 1.0 if qz.static_scale is None else float(qz.static_scale)
            return DenseKey(dt, False, sc), DenseValue(dt, False, sc, head_dim=d)
        return DenseKey(dt, True), DenseValue(dt, True, head_dim=d)
    if isinstance(qz, IntQuantizer):
        if qz.bits == 8:
            return DenseKey("int8", True), DenseValue("int8", True, head_dim=d)
        return PackedIntKey(qz.bits, d), PackedIntValue(qz.bits, d)
    return None


@functools.partial(jax.jit, static_argnames=("backend", "k_splits", "pages_per_block",
                                             "num_warps", "num_stages"))
def paged_decode_attention(q, seg, layer, page_table, lengths, window_slots=None, *,
                           backend: str = "auto", k_splits: int = 0, pages_per_block: int = 0,
                           num_warps: int = 0, num_stages: int = 2):
    """Decode attention over one layer of a bf16/f32/fp8/int8/int4 cache segment.

    q: [batch, 1, num_heads, head_dim]; seg: kvjax.cache.paged.Segment; layer: int32 scalar
    within the segment; page_table: [batch, max_pages] int32; lengths: [batch] int32;
    window_slots: [batch] int32 (segments with a full-precision window).
    Returns [batch, 1, num_heads, head_dim] in q's dtype.
    """
    kf, vf = formats(seg.k_spec), formats(seg.v_spec)
    if kf is None or vf is None:
        raise ValueError(f"paged_decode_attention handles {', '.join(METHODS)}; got keys "
                         f"{seg.k_spec.method!r}, values {seg.v_spec.method!r}")
    return _core.decode(q, seg, layer, page_table, lengths, window_slots, kf[0], vf[1],
                        backend=backend, k_splits=k_splits, pages_per_block=pages_per_block,
                        num_warps=num_warps, num_stages=num_stages)
