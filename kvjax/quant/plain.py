"""Uncompressed baseline: K/V stored in a float dtype (bf16 by default), ``PlainCodes(values)``."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.quant.base import Quantizer, itemsize


class PlainCodes(NamedTuple):
    values: jax.Array  # [..., head_dim] in the storage dtype


@struct.dataclass
class PlainQuantizer(Quantizer):
    head_dim: int = struct.field(pytree_node=False)
    dtype: object = struct.field(pytree_node=False, default=jnp.bfloat16)

    def quantize(self, x: jax.Array) -> PlainCodes:
        return PlainCodes(jnp.asarray(x).astype(self.dtype))

    def dequantize(self, codes: PlainCodes) -> jax.Array:
        return codes.values.astype(jnp.float32)

    def bytes_per_token(self) -> float:
        return self.head_dim * itemsize(self.dtype)
