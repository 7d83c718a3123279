"""QJL: 1-bit quantized Johnson-Lindenstrauss sketch of a key (Zandieh et al., arXiv 2406.03482).

Store sign(S k) (m bits) and |k|. The score estimate keeps the query unquantized (asymmetric):

    q . k  ~  |k| * scale / m * <S q, sign(S k)>,     scale = 1 / E|<s, u>|   (rotation.py)

which is unbiased over the draw of S. Quantizing q too would estimate the angle and be biased.
S is orthogonalised by default (the QJL paper's own choice, 2.75x lower variance than i.i.d.
Gaussian rows at m = d); ``projection="gaussian"`` gives the textbook i.i.d. N(0,1) sketch.

Codes: ``QjlCodes(signs [..., ceil(m/8)] uint8, norm [..., 1] f16)``. ``dequantize`` returns the
unbiased but noisy reconstruction |k| * scale/m * S^T sign(S k) (useful for values only as a
baseline).

The same sign-sketch estimator is the second stage of TurboQuant_prod (turboquant.py), which applies
it to the residual of an MSE quantizer instead of to the key itself.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax.quant.base import META_DTYPE, Quantizer, itemsize, safe_norm, to_meta
from kvjax.quant.packing import pack_signs, packed_size, unpack_signs
from kvjax.quant.rotation import projection, sign_estimator_scale


class QjlCodes(NamedTuple):
    signs: jax.Array  # [..., ceil(m/8)] uint8, bit i = [ (S k)_i >= 0 ]
    norm: jax.Array  # [..., 1] meta dtype, |k|


@struct.dataclass
class QjlQuantizer(Quantizer):
    sketch: np.ndarray | jax.Array  # [m, head_dim] QJL matrix S
    head_dim: int = struct.field(pytree_node=False)
    scale: float = struct.field(pytree_node=False)  # 1 / E|<s, u>|
    meta_dtype: object = struct.field(pytree_node=False, default=META_DTYPE)

    @classmethod
    def build(
        cls, head_dim: int, seed: int = 0, sketch_dim: int | None = None, kind: str = "orthogonal"
    ) -> QjlQuantizer:
        m = sketch_dim or head_dim
        return cls(
            sketch=projection(kind, seed, m, head_dim),
            head_dim=head_dim,
            scale=sign_estimator_scale(kind, head_dim),
        )

    @property
    def sketch_dim(self) -> int:
        return self.sketch.shape[0]

    def quantize(self, x: jax.Array) -> QjlCodes:
        """x: [..., head_dim] -> QjlCodes"""
        x = jnp.asarray(x, jnp.float32)
        return QjlCodes(
            signs=pack_signs(x @ jnp.asarray(self.sketch).T),
            norm=to_meta(safe_norm(x), self.meta_dtype),
        )

    def prepare_query(self, q: jax.Array) -> jax.Array:
        """q: [..., head_dim] -> S q [..., m], computed once per query."""
        return jnp.asarray(q, jnp.float32) @ jnp.asarray(self.sketch).T

    def scores_prepared(self, pq: jax.Array, codes: QjlCodes) -> jax.Array:
        s = unpack_signs(codes.signs, self.sketch_dim)
        c = self.scale / self.sketch_dim
        return c * codes.norm[..., 0].astype(jnp.float32) * jnp.sum(pq * s, axis=-1)

    def dequantize(self, codes: QjlCodes) -> jax.Array:
        s = unpack_signs(codes.signs, self.sketch_dim)
        c = self.scale / self.sketch_dim
        return c * codes.norm.astype(jnp.float32) * (s @ jnp.asarray(self.sketch))

    def bytes_per_token(self) -> float:
        return packed_size(self.sketch_dim, 1) + itemsize(self.meta_dtype)
