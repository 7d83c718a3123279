"""Symmetric INT8 / INT4 KV quantization with one scale per token-head vector.

q = round(x / scale) clipped to [-qmax, qmax], qmax = 2^(bits-1) - 1, scale = max|x| / qmax.
The range is symmetric ([-7, 7] for int4, not [-8, 7]) so that 0 is exact and x -> -x is exact.

Codes: ``IntCodes(q, scale [..., 1] f16)``. int8: q is int8 ``[..., d]`` (ready for an int8 dot).
Narrower widths: q + qmax (in [0, 2 qmax]) packed LSB-first into uint8 ``[..., d*bits/8]``.
Scores fold the scale out of the sum: <q, k> ~ scale * <q, codes>.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.quant.base import F16_TINY, META_DTYPE, Quantizer, itemsize, to_meta
from kvjax.quant.packing import pack_bits, packed_size, unpack_bits


class IntCodes(NamedTuple):
    q: jax.Array  # int8 [..., head_dim] (bits=8) or uint8 [..., head_dim*bits/8] (packed, offset)
    scale: jax.Array  # [..., 1] meta dtype


@struct.dataclass
class IntQuantizer(Quantizer):
    head_dim: int = struct.field(pytree_node=False)
    bits: int = struct.field(pytree_node=False, default=8)
    meta_dtype: object = struct.field(pytree_node=False, default=META_DTYPE)

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def quantize(self, x: jax.Array) -> IntCodes:
        """x: [..., head_dim] -> IntCodes"""
        x = jnp.asarray(x, jnp.float32)
        amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
        scale = to_meta(jnp.maximum(amax / self.qmax, F16_TINY), self.meta_dtype)
        q = jnp.clip(jnp.round(x / scale.astype(jnp.float32)), -self.qmax, self.qmax)
        if self.bits == 8:
            return IntCodes(q=q.astype(jnp.int8), scale=scale)
        return IntCodes(q=pack_bits((q + self.qmax).astype(jnp.uint8), self.bits), scale=scale)

    def codes_as_int(self, codes: IntCodes) -> jax.Array:
        """Signed integer codes. -> int32 [..., head_dim]"""
        if self.bits == 8:
            return codes.q.astype(jnp.int32)
        return unpack_bits(codes.q, self.bits, self.head_dim).astype(jnp.int32) - self.qmax

    def dequantize(self, codes: IntCodes) -> jax.Array:
        return self.codes_as_int(codes).astype(jnp.float32) * codes.scale.astype(jnp.float32)

    def scores_prepared(self, pq: jax.Array, codes: IntCodes) -> jax.Array:
        c = self.codes_as_int(codes).astype(jnp.float32)
        return jnp.sum(pq * c, axis=-1) * codes.scale[..., 0].astype(jnp.float32)

    def bytes_per_token(self) -> float:
        return packed_size(self.head_dim, self.bits) + itemsize(self.meta_dtype)
