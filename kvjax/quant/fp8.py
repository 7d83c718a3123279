"""FP8 KV cache (e4m3 / e5m2) with per-token-head dynamic scales or a static per-tensor scale.

Stored value = fp8(x / scale), read = fp8 * scale (vLLM's convention, kivi-and-eviction.md 5.1).

* dynamic: one scale per vector (token x head), scale = max|x| / fp8_max, stored in the metadata
  dtype. Codes: ``FP8Codes(values [..., d] float8, scale [..., 1] f16)`` -> d + 2 bytes per token.
* static: one scale for the whole tensor, a constant of the quantizer; per token only the d fp8
  bytes are stored (``scale`` is None). Compute it from the first batch with ``calibrate(x)``:
  scale = max|x| / (fp8_max / STATIC_HEADROOM), leaving headroom for later tokens larger than
  anything in the first batch (vLLM: max/200 for e4m3 keys). Values beyond the range saturate at
  +-fp8_max: e4m3fn has no infinity and a plain cast of an out-of-range value gives NaN, so we clip
  first. An uncalibrated static quantizer uses scale 1.0, which is what vLLM silently does without
  calibration; we warn loudly because it wastes most of e4m3's precision on typical K/V magnitudes.
"""

from __future__ import annotations

import logging
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.quant.base import F16_TINY, META_DTYPE, Quantizer, itemsize, to_meta

STATIC_HEADROOM = 2.0
_FORMATS = {"e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}
_log = logging.getLogger(__name__)


class FP8Codes(NamedTuple):
    values: jax.Array  # [..., head_dim] float8
    scale: jax.Array | None  # [..., 1] meta dtype (dynamic) or None (static scale)


@struct.dataclass
class FP8Quantizer(Quantizer):
    head_dim: int = struct.field(pytree_node=False)
    fmt: str = struct.field(pytree_node=False, default="e4m3")  # "e4m3" | "e5m2"
    static: bool = struct.field(pytree_node=False, default=False)
    # Per-tensor scale for static mode; None = never calibrated (quantize then uses 1.0 and warns).
    static_scale: float | None = struct.field(pytree_node=False, default=None)
    meta_dtype: object = struct.field(pytree_node=False, default=META_DTYPE)

    @property
    def dtype(self):
        return _FORMATS[self.fmt]

    @property
    def fp8_max(self) -> float:
        return float(jnp.finfo(self.dtype).max)

    def calibrate(self, x: jax.Array) -> FP8Quantizer:
        """Static scale from a first batch: returns a new quantizer. x: [..., head_dim]"""
        amax = float(jnp.max(jnp.abs(x)))
        scale = max(amax, 1e-30) * STATIC_HEADROOM / self.fp8_max
        return self.replace(static=True, static_scale=scale)

    def quantize(self, x: jax.Array) -> FP8Codes:
        """x: [..., head_dim] -> FP8Codes"""
        x = jnp.asarray(x, jnp.float32)
        if self.static:
            scale = self.static_scale
            if scale is None:
                msg = (
                    f"FP8 {self.fmt} static KV scale was never calibrated and is left at 1.0: "
                    "call quantizer.calibrate(first_batch) (values are clipped to +-"
                    f"{self.fp8_max:g}; small K/V lose most of their precision)"
                )
                warnings.warn(msg, stacklevel=2)
                _log.warning(msg)
                scale = 1.0
            v = jnp.clip(x / scale, -self.fp8_max, self.fp8_max).astype(self.dtype)
            return FP8Codes(values=v, scale=None)
        amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
        scale = to_meta(jnp.maximum(amax / self.fp8_max, F16_TINY), self.meta_dtype)
        v = jnp.clip(x / scale.astype(jnp.float32), -self.fp8_max, self.fp8_max).astype(self.dtype)
        return FP8Codes(values=v, scale=scale)

    def dequantize(self, codes: FP8Codes) -> jax.Array:
        """-> [..., head_dim] float32"""
        v = codes.values.astype(jnp.float32)
        if codes.scale is None:
            return v * (1.0 if self.static_scale is None else self.static_scale)
        return v * codes.scale.astype(jnp.float32)

    def bytes_per_token(self) -> float:
        return self.head_dim + (0 if self.static else itemsize(self.meta_dtype))
