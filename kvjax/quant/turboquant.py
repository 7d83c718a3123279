"""TurboQuant (Zandieh et al., arXiv 2504.19874): TurboQuant_mse, TurboQuant_prod, fractional
widths.

TurboQuant_mse, b bits (Algorithm 1):
  1. nu = |x|, stored in the metadata dtype; x_hat = x / nu.
  2. y = Pi x_hat with Pi a Haar-random rotation (rotation.py). Each y_j then follows the sphere
     marginal f_d (codebooks.py), whatever x was.
  3. idx_j = nearest of the 2^b Lloyd-Max centroids for f_d at the real head_dim; packed LSB-first.
  Dequantize: nu * Pi^T c[idx]. Expected |x_hat - deq|^2 = d * C(f_d, b): 0.3609, 0.1160, 0.0340,
  0.0093 at d=128 for b = 1..4 (tests check these).
  Codes: ``TurboMseCodes(idx [..., ceil(d*b/8)] uint8, norm [..., 1] f16)``.

TurboQuant_prod, b bits (Algorithm 2): (b-1)-bit TurboQuant_mse, then 1-bit QJL (qjl.py) of the
residual r = y - c[idx] and its norm gamma = |r|. MSE-optimal codes shrink inner products by about
(1 - D_mse) (a multiplicative bias); the QJL term removes it:

    q . k  ~  nu * ( <Pi q, c[idx]>  +  scale/m * gamma * <S Pi q, sign(S r)> )

We apply S in the rotated basis (S Pi has the same distribution as S), so quantization needs no
inverse rotation, and a query is rotated and projected once (``prepare_query``), then scored against
any number of keys with a gather-dot and a +-1 dot. S is orthogonalised by default (QJL's choice,
variance d*Var = (pi/2 - 1) D_mse(b-1) instead of (pi/2 - 1/d) D_mse(b-1) for i.i.d. Gaussian rows,
turboquant.md 3.2 note 3); the scale makes either exactly unbiased. b=1 is pure QJL on x.
Codes: ``TurboProdCodes(idx [..., ceil(d*(b-1)/8)], signs [..., ceil(m/8)], norm [..., 1],
res_norm [..., 1])``.

Fractional widths (2.5, 3.5 bits), ``ChannelSplit``: the paper splits the *original* channels into
an outlier set and the rest and runs an independent TurboQuant instance (own rotation, own codebook
at its own dimension, own norm) on each, the outliers at b+1 bits. How outliers are chosen is not
in the paper. We choose them by calibration: ``calibrate(x)`` takes the n channels with the largest
mean square over a sample (e.g. the prompt's keys of that layer/head); outliers are then static per
quantizer. Uncalibrated, the first n channels are used and a warning is raised. The count makes the
code bits average exactly B: n = (B - floor B) * d, i.e. half the channels for 2.5 and 3.5 bits.
(The paper's "32 channels at 3 bits + 96 at 2" for d=128 is 2.25 code bits, 2.5 only when its two
fp16 norms are counted; pass ``n_outliers=32`` to get that split.)

Rotation ``"hadamard"`` (two randomized Hadamard rounds) is offered for power-of-two dims; it
matches Haar on random inputs but one round is 2.2x worse on one-hot inputs at b=2 (rotation.py).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax.quant.base import META_DTYPE, Quantizer, bucketize, itemsize, safe_norm, to_meta
from kvjax.quant.codebooks import sphere_codebook
from kvjax.quant.packing import pack_bits, pack_signs, packed_size, unpack_bits, unpack_signs
from kvjax.quant.rotation import projection, rotation, sign_estimator_scale


class TurboMseCodes(NamedTuple):
    idx: jax.Array  # [..., ceil(d*b/8)] uint8, packed centroid indices of the rotated unit vector
    norm: jax.Array  # [..., 1] meta dtype, |x|


class TurboProdCodes(NamedTuple):
    idx: jax.Array  # [..., ceil(d*(b-1)/8)] uint8, (b-1)-bit TurboQuant_mse indices
    signs: jax.Array  # [..., ceil(m/8)] uint8, sign bits of S r (r = rotated residual)
    norm: jax.Array  # [..., 1] meta dtype, |x|
    res_norm: jax.Array  # [..., 1] meta dtype, |r| for the unit vector x/|x|


def _unit(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    nu = safe_norm(x)
    return x / jnp.where(nu > 0, nu, 1.0), nu


@struct.dataclass
class TurboMse(Quantizer):
    rot: np.ndarray | jax.Array  # [d, d] orthogonal Pi; y = x @ rot.T
    centroids: np.ndarray | jax.Array  # [2^b] float32
    thresholds: np.ndarray | jax.Array  # [2^b - 1] float32
    head_dim: int = struct.field(pytree_node=False)
    bits: int = struct.field(pytree_node=False)
    meta_dtype: object = struct.field(pytree_node=False, default=META_DTYPE)
    # Norm correction (vLLM's "nc"): store |x| / |c[idx]| instead of |x|, so the dequantized
    # vector has exactly the input's length (undoes the (1 - D_mse) shrinkage of MSE codes, down
    # to sqrt(1 - D_mse) along x). "unbiased": store |x| / <y, c[idx]> (y = the rotated unit
    # input), so the dequantized vector's component along x is exactly |x| and the error is
    # orthogonal to x: no shrinkage of q.k at all (zero-mean over the rotation). Only the stored
    # number changes: dequantize, scores and the kernels read it as before.
    norm_correct: bool | str = struct.field(pytree_node=False, default=False)

    @classmethod
    def build(
        cls, head_dim: int, bits: int, seed: int = 0, rotation_kind: str = "haar",
        norm_correct: bool | str = False,
    ) -> TurboMse:
        if norm_correct not in (False, True, "unbiased"):
            raise ValueError(f"norm_correct must be False, True or 'unbiased', got "
                             f"{norm_correct!r}")
        cb = sphere_codebook(head_dim, bits)
        return cls(
            rot=rotation(rotation_kind, seed, head_dim),
            centroids=cb.centroids.astype(np.float32),
            thresholds=cb.thresholds.astype(np.float32),
            head_dim=head_dim,
            bits=bits,
            norm_correct=norm_correct,
        )

    def quantize_rotated(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x: [..., d] -> (indices uint8 [..., d], rotated unit vector y [..., d], |x| [..., 1])."""
        xu, nu = _unit(jnp.asarray(x, jnp.float32))
        y = xu @ jnp.asarray(self.rot).T
        return bucketize(y, jnp.asarray(self.thresholds)), y, nu

    def quantize(self, x: jax.Array) -> TurboMseCodes:
        """x: [..., head_dim] -> TurboMseCodes"""
        idx, y, nu = self.quantize_rotated(x)
        if self.norm_correct:
            c = jnp.asarray(self.centroids)[idx]
            c_norm = safe_norm(c)
            scale = jnp.where(c_norm > 0, c_norm, 1.0)
            if self.norm_correct == "unbiased":  # <y, c> ~ sqrt(1 - D) |c| > 0; guard x = 0
                dot = jnp.sum(y * c, axis=-1, keepdims=True)
                scale = jnp.where(dot > 0.5 * scale * scale, dot, scale)
            nu = nu / scale
        return TurboMseCodes(idx=pack_bits(idx, self.bits), norm=to_meta(nu, self.meta_dtype))

    def rotated_values(self, codes: TurboMseCodes) -> jax.Array:
        """Centroids of the rotated unit vector. -> [..., d]"""
        return jnp.asarray(self.centroids)[unpack_bits(codes.idx, self.bits, self.head_dim)]

    def dequantize(self, codes: TurboMseCodes) -> jax.Array:
        y = self.rotated_values(codes) @ jnp.asarray(self.rot)
        return codes.norm.astype(jnp.float32) * y

    def prepare_query(self, q: jax.Array) -> jax.Array:
        """q: [..., d] -> Pi q [..., d]"""
        return jnp.asarray(q, jnp.float32) @ jnp.asarray(self.rot).T

    def scores_prepared(self, pq: jax.Array, codes: TurboMseCodes) -> jax.Array:
        dot = jnp.sum(pq * self.rotated_values(codes), axis=-1)
        return codes.norm[..., 0].astype(jnp.float32) * dot

    def bytes_per_token(self) -> float:
        return packed_size(self.head_dim, self.bits) + itemsize(self.meta_dtype)


@struct.dataclass
class TurboProd(Quantizer):
    mse: TurboMse  # the (b-1)-bit first stage
    sketch: np.ndarray | jax.Array  # [m, d] QJL matrix S, applied in the rotated basis
    head_dim: int = struct.field(pytree_node=False)
    bits: int = struct.field(pytree_node=False)
    scale: float = struct.field(pytree_node=False)  # 1 / E|<s, u>|, see rotation.py
    meta_dtype: object = struct.field(pytree_node=False, default=META_DTYPE)

    @classmethod
    def build(
        cls,
        head_dim: int,
        bits: int,
        seed: int = 0,
        rotation_kind: str = "haar",
        projection_kind: str = "orthogonal",
        sketch_dim: int | None = None,
    ) -> TurboProd:
        if bits < 1:
            raise ValueError("TurboQuant_prod needs at least 1 bit")
        m = sketch_dim or head_dim
        return cls(
            mse=TurboMse.build(head_dim, bits - 1, seed, rotation_kind),
            sketch=projection(projection_kind, seed, m, head_dim),
            head_dim=head_dim,
            bits=bits,
            scale=sign_estimator_scale(projection_kind, head_dim),
        )

    @property
    def sketch_dim(self) -> int:
        return self.sketch.shape[0]

    def quantize(self, x: jax.Array) -> TurboProdCodes:
        """x: [..., head_dim] -> TurboProdCodes"""
        idx, y, nu = self.mse.quantize_rotated(x)
        r = y - jnp.asarray(self.mse.centroids)[idx]  # residual, rotated basis  [..., d]
        return TurboProdCodes(
            idx=pack_bits(idx, self.bits - 1),
            signs=pack_signs(r @ jnp.asarray(self.sketch).T),
            norm=to_meta(nu, self.meta_dtype),
            res_norm=to_meta(safe_norm(r), self.meta_dtype),
        )

    def _parts(self, codes: TurboProdCodes) -> tuple[jax.Array, jax.Array]:
        mse_codes = TurboMseCodes(idx=codes.idx, norm=codes.norm)
        return self.mse.rotated_values(mse_codes), unpack_signs(codes.signs, self.sketch_dim)

    def dequantize(self, codes: TurboProdCodes) -> jax.Array:
        c, s = self._parts(codes)
        gamma = codes.res_norm.astype(jnp.float32)
        y = c + (self.scale / self.sketch_dim) * gamma * (s @ jnp.asarray(self.sketch))
        return codes.norm.astype(jnp.float32) * (y @ jnp.asarray(self.mse.rot))

    def prepare_query(self, q: jax.Array) -> tuple[jax.Array, jax.Array]:
        """q: [..., d] -> (Pi q [..., d], S Pi q [..., m]); done once per query, not per key."""
        q_rot = jnp.asarray(q, jnp.float32) @ jnp.asarray(self.mse.rot).T
        return q_rot, q_rot @ jnp.asarray(self.sketch).T

    def scores_prepared(self, pq: tuple[jax.Array, jax.Array], codes: TurboProdCodes) -> jax.Array:
        q_rot, q_sk = pq
        c, s = self._parts(codes)
        gamma = codes.res_norm[..., 0].astype(jnp.float32)
        qjl = (self.scale / self.sketch_dim) * gamma * jnp.sum(q_sk * s, axis=-1)
        return codes.norm[..., 0].astype(jnp.float32) * (jnp.sum(q_rot * c, axis=-1) + qjl)

    def with_sketch(self, sketch: jax.Array) -> TurboProd:
        """Same quantizer with another S [m, d] (tests vmap over many draws of S)."""
        return self.replace(sketch=sketch)

    def bytes_per_token(self) -> float:
        return (
            packed_size(self.head_dim, self.bits - 1)
            + packed_size(self.sketch_dim, 1)
            + 2 * itemsize(self.meta_dtype)
        )


class SplitCodes(NamedTuple):
    hi: Any  # codes of the outlier channels (b+1 bits)
    lo: Any  # codes of the other channels (b bits)


@struct.dataclass
class ChannelSplit(Quantizer):
    """Two independent quantizers on disjoint channel sets: outliers (``hi``) and the rest (``lo``).

    Works with any per-token quantizer pair; used for TurboQuant's 2.5 / 3.5-bit widths.
    """

    hi: Quantizer
    lo: Quantizer
    head_dim: int = struct.field(pytree_node=False)
    hi_channels: tuple[int, ...] = struct.field(pytree_node=False)
    calibrated: bool = struct.field(pytree_node=False, default=False)

    @property
    def lo_channels(self) -> tuple[int, ...]:
        hi = set(self.hi_channels)
        return tuple(c for c in range(self.head_dim) if c not in hi)

    @property
    def _perm_inv(self) -> np.ndarray:
        return np.argsort(np.array(self.hi_channels + self.lo_channels))

    def calibrate(self, x: jax.Array) -> ChannelSplit:
        """Pick the outlier channels: the largest mean square over a sample x [..., head_dim]."""
        x = jnp.asarray(x, jnp.float32).reshape(-1, self.head_dim)
        ms = np.asarray(jnp.mean(jnp.square(x), axis=0))
        n = len(self.hi_channels)
        top = np.sort(np.argsort(-ms, kind="stable")[:n])
        return self.replace(hi_channels=tuple(int(c) for c in top), calibrated=True)

    def _split(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return x[..., np.array(self.hi_channels)], x[..., np.array(self.lo_channels)]

    def quantize(self, x: jax.Array) -> SplitCodes:
        """x: [..., head_dim] -> SplitCodes(hi=codes of x[..., hi_channels], lo=...)"""
        if not self.calibrated:
            warnings.warn(
                "ChannelSplit outlier channels are not calibrated; using channels "
                f"0..{len(self.hi_channels) - 1}. Call quantizer.calibrate(sample_keys).",
                stacklevel=2,
            )
        x_hi, x_lo = self._split(jnp.asarray(x, jnp.float32))
        return SplitCodes(hi=self.hi.quantize(x_hi), lo=self.lo.quantize(x_lo))

    def dequantize(self, codes: SplitCodes) -> jax.Array:
        x = jnp.concatenate([self.hi.dequantize(codes.hi), self.lo.dequantize(codes.lo)], axis=-1)
        return x[..., self._perm_inv]

    def prepare_query(self, q: jax.Array) -> tuple[Any, Any]:
        q_hi, q_lo = self._split(jnp.asarray(q, jnp.float32))
        return self.hi.prepare_query(q_hi), self.lo.prepare_query(q_lo)

    def scores_prepared(self, pq: tuple[Any, Any], codes: SplitCodes) -> jax.Array:
        return self.hi.scores_prepared(pq[0], codes.hi) + self.lo.scores_prepared(pq[1], codes.lo)

    def bytes_per_token(self) -> float:
        return self.hi.bytes_per_token() + self.lo.bytes_per_token()


def build_turbo(
    head_dim: int,
    bits: float,
    variant: str = "mse",
    seed: int = 0,
    rotation_kind: str = "haar",
    projection_kind: str = "orthogonal",
    n_outliers: int | None = None,
    norm_correct: bool | str = False,
) -> Quantizer:
    """TurboQuant_{variant} at ``bits`` (integer, or fractional via an outlier ChannelSplit).
    norm_correct (False, True or "unbiased") applies to mse quantizers (prod keeps |x|)."""

    def one(d: int, b: int, s: int) -> Quantizer:
        if variant == "mse":
            return TurboMse.build(d, b, s, rotation_kind, norm_correct)
        if variant == "prod":
            return TurboProd.build(d, b, s, rotation_kind, projection_kind)
        raise ValueError(f"unknown TurboQuant variant {variant!r}; valid: mse, prod")

    base = math.floor(bits)
    if bits == base and n_outliers is None:
        return one(head_dim, int(base), seed)
    n = round((bits - base) * head_dim) if n_outliers is None else n_outliers
    if not 0 < n < head_dim:
        raise ValueError(f"{n} outlier channels out of {head_dim} is not a split")
    # Independent instances: distinct seeds, and each rotation/codebook at its own dimension.
    return ChannelSplit(
        hi=one(n, int(base) + 1, seed),
        lo=one(head_dim - n, int(base), seed + 7919),
        head_dim=head_dim,
        hi_channels=tuple(range(n)),
    )
