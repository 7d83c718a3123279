"""KIVI paged decode attention: 2/4-bit keys per channel over groups of G tokens, values per
token over groups of G channels, the full-precision window attended in the same kernel call.

Reads per token: b*d/8 bytes of key codes + 2*d f16 / G of per-channel key scale and zero (one row
per group of G tokens, shared by the page), b*d/8 bytes of value codes + 2*d/G f16 of value scale
and zero. Nothing dequantized is written to memory:

* keys: codes are split into phases in registers (see _core); the group's per-channel scale and
  zero are applied to the tile in registers (k = c * s + z, one multiply-add per element) and the
  tile is dotted with the phase-ordered query.
* values: the per-token, per-channel-group scale goes into the softmax weights (p_t s_t) and the
  zero into one extra weight sum (sum_t p_t z_t) per channel group, so the codes are dotted as
  they are: acc[g, c] = sum_t (p_t s_t,grp(c)) c_t,c + sum_t p_t z_t,grp(c).
* window: the last W tokens (W >= page size: unsealed key pages are never read) come from the
  bf16 ring in the same pallas_call (an extra program per sequence and head).

Reference: kvjax.attention.paged_attention.
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
    ValueFormat,
    code_tiles,
    dot_nn,
    dot_nt,
    from_phases,
    n_tiles,
    phases_of,
    to_phases,
    unpack_channels,
    unpack_phases,
)
from kvjax.quant import KiviKeyQuantizer, KiviValueQuantizer


def _per_token(x: jax.Array, group: int) -> jax.Array:
    """Per-group rows [R, n] -> per-token rows [R * group, n]."""
    r, n = x.shape
    return jnp.broadcast_to(x.reshape(r, 1, n), (r, group, n)).reshape(r * group, n)


@dataclasses.dataclass(frozen=True)
class KiviKey(KeyFormat):
    bits: int
    head_dim: int
    group: int
    leaves: int = 3  # q [.., page_size, d*b/8], scale / zero [.., page_size // G, d] (f16 bits)
    per_token_rows = False  # scale / zero rows are per group of G tokens
    # gather launchers: codes as one channel-order tile and the per-channel scale / zero rows
    # read whole, instead of P strided phase reads of them (2-byte loads, one per element)
    channel_order: bool = False

    def prepare_q(self, q):
        if self.channel_order:
            return (q,)
        ph = to_phases(q, phases_of(self.bits))
        return tuple(ph[..., r, :] for r in range(ph.shape[-2]))

    def score(self, qs, ld):
        if self.channel_order:
            c = unpack_channels(ld, 0, self.bits, self.head_dim).astype(jnp.float32)
            sc = _per_token(ld.floats(1, jnp.float16), self.group)
            zr = _per_token(ld.floats(2, jnp.float16), self.group)
            return dot_nt(qs[0], c * sc + zr)
        p = phases_of(self.bits)
        n = self.head_dim // p
        codes = unpack_phases(ld, 0, self.bits, self.head_dim)
        s = 0.0
        for r, (qr, c) in enumerate(zip(qs, codes, strict=True)):
            sc = _per_token(ld.floats(1, jnp.float16, r, n, p), self.group)
            zr = _per_token(ld.floats(2, jnp.float16, r, n, p), self.group)
            s = s + dot_nt(qr, c.astype(jnp.float32) * sc + zr)
        return s


@dataclasses.dataclass(frozen=True)
class KiviValue(ValueFormat):
    bits: int
    head_dim: int
    group: int
    leaves: int = 3  # q [.., page_size, d*b/8], scale / zero [.., page_size, d // G] (f16 bits)
    channel_order: bool = False  # gather launchers: a group's <= 16-column phases as one tile

    @property
    def n_groups(self) -> int:
        return self.head_dim // self.group

    def acc_shapes(self, gp):
        p = n_tiles(self.bits, self.group, self.channel_order)
        return ((gp, self.group // p),) * (p * self.n_groups)

    def accumulate(self, p, valid_col, ld):
        gbytes = self.group * self.bits // 8
        out = []
        for gi in range(self.n_groups):
            sc = ld.floats(1, jnp.float16, gi, 1)  # [T, 1]
            zr = ld.floats(2, jnp.float16, gi, 1)
            for c in code_tiles(ld.shifted(gi * gbytes), 0, self.bits, self.group,
                                self.channel_order):
                # dequantized in registers (a column multiply-add; no [T,1] -> [1,T] reshape)
                out.append(dot_nn(p, jnp.where(valid_col, c.astype(jnp.float32) * sc + zr, 0.0)))
        return tuple(out)

    def finalize(self, accs):
        p = n_tiles(self.bits, self.group, self.channel_order)
        groups = [from_phases(jnp.stack(accs[gi * p:(gi + 1) * p], axis=-2))
                  for gi in range(self.n_groups)]
        return jnp.concatenate(groups, axis=-1)


def formats(spec: PoolSpec) -> tuple[KeyFormat | None, ValueFormat | None] | None:
    qz = spec.quantizer
    if isinstance(qz, KiviKeyQuantizer):
        return KiviKey(qz.bits, spec.head_dim, qz.group_size), None
    if isinstance(qz, KiviValueQuantizer):
        return None, KiviValue(qz.bits, spec.head_dim, qz.group_size)
    return None


@functools.partial(jax.jit, static_argnames=("backend", "k_splits", "pages_per_block",
                                             "num_warps", "num_stages"))
def kivi_decode_attention(q, seg, layer, page_table, lengths, window_slots=None, *,
                          backend: str = "auto", k_splits: int = 0, pages_per_block: int = 0,
                          num_warps: int = 0, num_stages: int = 2):
    """Decode attention over one layer of a KIVI segment (kivi2 / kivi4 keys and values).

    q: [batch, 1, num_heads, head_dim]; seg: kvjax.cache.paged.Segment with KIVI pools and a
    window; layer: int32 scalar; page_table: [batch, max_pages] int32; lengths: [batch] int32;
    window_slots: [batch] int32. Returns [batch, 1, num_heads, head_dim] in q's dtype.
    """
    kf, vf = formats(seg.k_spec), formats(seg.v_spec)
    if kf is None or vf is None or kf[0] is None or vf[1] is None:
        raise ValueError(f"kivi_decode_attention needs KIVI keys and values; got keys "
                         f"{seg.k_spec.method!r}, values {seg.v_spec.method!r}")
    if seg.window < seg.k_spec.page_size:
        raise ValueError(f"KIVI needs a window >= page_size ({seg.k_spec.page_size}): unsealed "
                         f"key pages are read from it; got window {seg.window}")
    return _core.decode(q, seg, layer, page_table, lengths, window_slots, kf[0], vf[1],
                        backend=backend, k_splits=k_splits, pages_per_block=pages_per_block,
                        num_warps=num_warps, num_stages=num_stages)
