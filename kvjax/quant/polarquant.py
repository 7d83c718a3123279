"""PolarQuant (Han et al., arXiv 2502.02617): rotation, recursive polar transform, angle codebooks.

1. Precondition: y = Pi x with a Haar rotation (PolarQuant-R; rotation.py). Then y is close to
   N(0, |x|^2 / d I) and the angles below follow known, independent distributions.
2. Recursive polar transform over blocks of 2^L coordinates (L = levels, default 4 as in the paper):
   level 1 pairs (y_2j, y_2j+1) -> angle atan2(y_2j+1, y_2j) in [0, 2 pi) and radius;
   level l >= 2 pairs the radii of two neighbouring half-blocks -> angle atan(r_2 / r_1) in [0,
   pi/2] and radius. After L levels one radius per block remains; it is stored in the metadata
dtype. 3. Each level's angles are quantized with their own Lloyd-Max codebook (codebooks.py): level
   1 is uniform (4 bits), level l has density ~ sin^(2^(l-1)-1)(2 psi) (2 bits each by default).
Per block of 16 coordinates: 8*4 + 4*2 + 2*2 + 1*2 = 46 angle bits + a 16-bit radius = 62 bits,
3.875 bits per coordinate. Expected D_mse ~ 0.032 at d = 128 (turboquant.md 5.3; a test).

Codes: ``PolarCodes(angles [..., sum_l ceil(d/2^l * b_l / 8)] uint8, radius [..., d / 2^L] f16)``:
each level's indices packed LSB-first, levels concatenated (level 1 first).
Scores: <Pi q, y_hat>, with Pi q computed once per query.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax.quant.base import META_DTYPE, Quantizer, bucketize, itemsize, to_meta
from kvjax.quant.codebooks import polar_angle_codebook
from kvjax.quant.packing import pack_bits, packed_size, unpack_bits
from kvjax.quant.rotation import rotation


class PolarCodes(NamedTuple):
    angles: jax.Array  # [..., angle bytes] uint8, all levels' packed indices, level 1 first
    radius: jax.Array  # [..., head_dim / 2^levels] meta dtype, one radius per block


@struct.dataclass
class PolarQuantizer(Quantizer):
    rot: np.ndarray | jax.Array  # [d, d]
    centroids: tuple  # per level: [2^b_l] float32 angle centroids
    thresholds: tuple  # per level: [2^b_l - 1] float32 (level 1 unused: uniform bucketing)
    head_dim: int = struct.field(pytree_node=False)
    level_bits: tuple[int, ...] = struct.field(pytree_node=False, default=(4, 2, 2, 2))
    meta_dtype: object = struct.field(pytree_node=False, default=META_DTYPE)

    @classmethod
    def build(
        cls,
        head_dim: int,
        seed: int = 0,
        level_bits: tuple[int, ...] = (4, 2, 2, 2),
        rotation_kind: str = "haar",
    ) -> PolarQuantizer:
        block = 1 << len(level_bits)
        if head_dim % block:
            raise ValueError(f"PolarQuant with {len(level_bits)} levels needs {block} | head_dim")
        cbs = [polar_angle_codebook(lv + 1, b) for lv, b in enumerate(level_bits)]
        return cls(
            rot=rotation(rotation_kind, seed, head_dim),
            centroids=tuple(cb.centroids.astype(np.float32) for cb in cbs),
            thresholds=tuple(cb.thresholds.astype(np.float32) for cb in cbs),
            head_dim=head_dim,
            level_bits=tuple(level_bits),
        )

    @property
    def levels(self) -> int:
        return len(self.level_bits)

    def _level_sizes(self) -> list[int]:
        return [self.head_dim >> (lv + 1) for lv in range(self.levels)]

    def _level_bytes(self) -> list[int]:
        sizes = zip(self._level_sizes(), self.level_bits, strict=True)
        return [packed_size(n, b) for n, b in sizes]

    def quantize(self, x: jax.Array) -> PolarCodes:
        """x: [..., head_dim] -> PolarCodes"""
        cur = jnp.asarray(x, jnp.float32) @ jnp.asarray(self.rot).T  # [..., d]
        packed = []
        for lv, bits in enumerate(self.level_bits):
            pairs = cur.reshape(*cur.shape[:-1], -1, 2)
            a, b = pairs[..., 0], pairs[..., 1]
            psi = jnp.arctan2(b, a)
            if lv == 0:
                step = 2 * math.pi / (1 << bits)
                psi = jnp.mod(psi, 2 * math.pi)
                idx = jnp.clip(jnp.floor(psi / step), 0, (1 << bits) - 1).astype(jnp.uint8)
            else:
                idx = bucketize(psi, jnp.asarray(self.thresholds[lv]))
            packed.append(pack_bits(idx, bits))
            cur = jnp.sqrt(a * a + b * b)
        return PolarCodes(jnp.concatenate(packed, axis=-1), to_meta(cur, self.meta_dtype))

    def rotated_values(self, codes: PolarCodes) -> jax.Array:
        """Reconstruction in the rotated basis. -> [..., head_dim]"""
        offsets = np.cumsum([0] + self._level_bytes())
        cur = codes.radius.astype(jnp.float32)
        for lv in reversed(range(self.levels)):
            n, bits = self._level_sizes()[lv], self.level_bits[lv]
            idx = unpack_bits(codes.angles[..., offsets[lv] : offsets[lv + 1]], bits, n)
            psi = jnp.asarray(self.centroids[lv])[idx]
            cur = jnp.stack([cur * jnp.cos(psi), cur * jnp.sin(psi)], axis=-1)
            cur = cur.reshape(*cur.shape[:-2], 2 * n)
        return cur

    def dequantize(self, codes: PolarCodes) -> jax.Array:
        return self.rotated_values(codes) @ jnp.asarray(self.rot)

    def prepare_query(self, q: jax.Array) -> jax.Array:
        return jnp.asarray(q, jnp.float32) @ jnp.asarray(self.rot).T

    def scores_prepared(self, pq: jax.Array, codes: PolarCodes) -> jax.Array:
        return jnp.sum(pq * self.rotated_values(codes), axis=-1)

    def bytes_per_token(self) -> float:
        return sum(self._level_bytes()) + (self.head_dim >> self.levels) * itemsize(self.meta_dtype)
