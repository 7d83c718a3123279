"""TurboQuant paged decode attention: scores straight from codebook indices (+ the QJL term),
values accumulated in the rotated basis and rotated back once per step.

Once per step, outside the kernel (``prepare_q``): q_rot = Pi q for each part (a part is the
whole head, or one side of a fractional-width channel split) and, for TurboQuant_prod keys,
q_sk = S q_rot; both permuted into the phase order of their packed codes (see _core).

Per KV tile, in the kernel (reads: b-bit indices, m sign bits for prod, f16 norms):
  score_t = |k_t| * ( <q_rot, c[idx_t]>  +  scale/m * gamma_t * <q_sk, sign_t> )
with the 2^b centroids looked up by a select chain (<= 16 entries, no gather), signs as +-1.
Values (TurboQuant_mse): acc += (p_t |v_t|) @ c[idx_t] in the rotated basis; after the split
combine, out = acc @ Pi once per step (and the channel split undone). The window, when there is
one, is attended in the same call in the original basis.

Reference: kvjax.attention.paged_attention (dequantize + attend) and the quantizers'
``prepare_query``/``scores_prepared`` (kvjax/quant/turboquant.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.layout import PoolSpec
from kvjax.pallas_kernels import _core
from kvjax.pallas_kernels._core import (
    KeyFormat,
    ValueFormat,
    code_tiles,
    dot_nn,
    dot_nt,
    from_phases,
    lookup,
    n_tiles,
    q_tiles,
)
from kvjax.quant import ChannelSplit, TurboMse, TurboProd
from kvjax.sharding import local_kv_heads

_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Part:
    """One TurboQuant instance over `n` channels (all of them, or one side of a split)."""

    kind: str  # "mse" | "prod"
    bits: int  # bits of the MSE indices (prod: its first stage)
    n: int
    centroids: tuple[float, ...]
    leaf0: int  # index of its first leaf among the pool's leaves
    channels: tuple[int, ...] | None  # None: every channel in order
    m: int = 0  # prod: sketch dim
    qjl_scale: float = 0.0  # prod: scale / m
    rot: Any = dataclasses.field(default=None, compare=False, hash=False)  # [n, n]
    sketch: Any = dataclasses.field(default=None, compare=False, hash=False)  # [m, n]

    @property
    def leaves(self) -> int:
        return 4 if self.kind == "prod" else 2


def _parts(qz, leaf0: int = 0, channels=None) -> tuple[Part, ...]:
    if isinstance(qz, ChannelSplit):
        hi = _parts(qz.hi, leaf0, tuple(qz.hi_channels))
        lo = _parts(qz.lo, leaf0 + sum(p.leaves for p in hi), tuple(qz.lo_channels))
        return hi + lo
    if isinstance(qz, TurboProd):
        mse = qz.mse
        if mse.bits < 1:
            raise NotImplementedError("TurboQuant_prod with 1 bit (pure QJL) has no kernel")
        return (Part("prod", mse.bits, qz.head_dim, tuple(float(c) for c in mse.centroids),
                     leaf0, channels, m=qz.sketch_dim, qjl_scale=qz.scale / qz.sketch_dim,
                     rot=np.asarray(mse.rot), sketch=np.asarray(qz.sketch)),)
    if isinstance(qz, TurboMse):
        return (Part("mse", qz.bits, qz.head_dim, tuple(float(c) for c in qz.centroids), leaf0,
                     channels, rot=np.asarray(qz.rot)),)
    raise TypeError(f"not a TurboQuant quantizer: {type(qz).__name__}")


def _select(x: jax.Array, channels) -> jax.Array:
    return x if channels is None else x[..., np.asarray(channels)]


def _norm_col(ld, leaf: int) -> jax.Array:
    """Per-token f16 norms [T, 1] f32 (applied to tiles as a column: no [T,1] -> [1,T] reshape,
    which Mosaic cannot do)."""
    return ld.floats(leaf, jnp.float16)


MU_LANES = 16  # the <q, k_mean> column is dotted as a [Gp, 16] x [T, 16] tile (Triton: dims >= 16)
ROPE_LANES = 16  # RoPE-centred keys: cos / sin tiles of [T, 16] (d128 as one [T, 64]: spills)


@dataclasses.dataclass(frozen=True)
class Calibrated:
    """A calibrated pool's per-layer / KV-head metadata (kvjax/calibrate.py, PoolSpec): `layer`
    (segment-relative) + first_layer indexes its arrays. Hashed by the calibration's digest."""

    cal: Any  # kvjax.calibrate.KVCalibration
    first_layer: int
    centred: bool  # keys: per-token flag in the sign bit of leaf `flag_leaf` (a norm)
    reordered: bool  # channels stored outliers-first, order[L, h] (keys: k_order, values: v_order)
    flag_leaf: int = -1
    rope: bool = False  # keys centred on R(p) k_mean_rope (format-2 calibration), not k_mean

    def at(self, arr, layer: jax.Array, n_local: int) -> jax.Array:
        """arr[layer + first_layer] for the caller's n_local KV heads: [n_local, ...]. Under
        kvjax.sharding.shard_attention that is this device's share, whose rows local_kv_heads
        cuts out (the arrays are per model KV head); elsewhere all of them."""
        return local_kv_heads(jnp.asarray(arr)[layer + self.first_layer], n_local)

    def per_head(self, arr, layer: jax.Array, like: jax.Array) -> jax.Array:
        """arr[L] [kv_heads, D] shaped to broadcast against `like` [B, kv_heads, ..., D]."""
        x = self.at(arr, layer, like.shape[1])
        return x.reshape((1, x.shape[0]) + (1,) * (like.ndim - 3) + (x.shape[-1],))


@dataclasses.dataclass(frozen=True)
class TurboKey(KeyFormat):
    parts: tuple[Part, ...]
    calib: Calibrated | None = None
    channel_order: bool = False  # gather launchers: under-16-column phase tiles merged

    @property
    def leaves(self) -> int:
        return sum(p.leaves for p in self.parts)

    @property
    def rope_chunks(self) -> int:
        """RoPE-centred keys: the D/2 rotary pairs in pieces of ROPE_LANES (one if D/2 is not
        a multiple of it)."""
        h = sum(p.n for p in self.parts) // 2
        return h // ROPE_LANES if h % ROPE_LANES == 0 else 1

    def prepare_q_layer(self, q, layer):
        """Calibrated keys: q [B, Hkv, ..., rows, D] permuted into the stored channel order of its
        KV head (<q, k> = <q[order], k[order]>), and <q, k_mean> per query row as the first lane
        of a [..., rows, MU_LANES] input: score += flag * <q, k_mean> for centred tokens.

        RoPE-centred keys (centred on R(p) mu, rotate-half RoPE, h = D/2, angles p theta_i):
        <q, R(p) mu> = sum_i a_i cos(p theta_i) + b_i sin(p theta_i) with a_i = q_i mu_i +
        q_{i+h} mu_{i+h}, b_i = q_{i+h} mu_i - q_i mu_{i+h}: three [..., rows, h] inputs a, b
        and theta (the calibration's rope_inv_freq, the same in every row); the kernel forms
        the angles f32(p) * theta per token, as the writer (PoolSpec._mean) did."""
        c = self.calib
        if c is None:
            return self.prepare_q(q)
        q_orig = q
        if c.reordered:
            order = c.per_head(c.cal.k_order, layer, q)
            q = jnp.take_along_axis(q, jnp.broadcast_to(order, q.shape), axis=-1)
        qs = self.prepare_q(q)
        if c.centred and c.rope:
            mu = c.per_head(c.cal.k_mean_rope, layer, q_orig)  # original channel order
            q1, q2 = jnp.split(q_orig, 2, axis=-1)
            m1, m2 = jnp.split(mu, 2, axis=-1)
            theta = jnp.broadcast_to(jnp.asarray(c.cal.rope_inv_freq), q1.shape)
            w = q1.shape[-1] // self.rope_chunks
            for x in (q1 * m1 + q2 * m2, q2 * m1 - q1 * m2, theta):
                qs += tuple(x[..., i * w:(i + 1) * w] for i in range(self.rope_chunks))
        elif c.centred:
            mu = c.per_head(c.cal.k_mean, layer, q_orig)  # original channel order
            qmu = jnp.sum(q_orig * mu, axis=-1, keepdims=True)
            qs += (jnp.pad(qmu, ((0, 0),) * (qmu.ndim - 1) + ((0, MU_LANES - 1),)),)
        return qs

    def prepare_q(self, q):
        out = []
        co = self.channel_order
        for part in self.parts:
            q_rot = jnp.matmul(_select(q, part.channels), jnp.asarray(part.rot).T, precision=_HI)
            out += q_tiles(q_rot, part.bits, co)
            if part.kind == "prod":
                q_sk = jnp.matmul(q_rot, jnp.asarray(part.sketch).T, precision=_HI)
                out += q_tiles(q_sk, 1, co)
        return tuple(out)

    def score(self, qs, ld):
        total, at = 0.0, 0
        flag_leaf = self.calib.flag_leaf if self.calib is not None and self.calib.centred else -1
        co = self.channel_order
        for part in self.parts:
            p_mse = n_tiles(part.bits, part.n, co)
            q_rot, at = qs[at:at + p_mse], at + p_mse
            leaf = part.leaf0 + (2 if part.kind == "prod" else 1)
            if leaf == flag_leaf:  # its sign bit is the centred flag, not the norm's sign
                raw = ld.tile(leaf)  # [T, 1] raw f16 bits
                norm = jnp.abs(ld.convert(raw, jnp.float16))
                flag = ((raw.astype(jnp.int32) >> 15) & 1).astype(jnp.float32)  # [T, 1]
                if self.calib.rope:  # + flag <q, R(p) mu>: [a; b] . flag [cos; sin](p theta)
                    pos = ld.positions(raw.shape[0]).astype(jnp.float32)  # [T, 1]
                    nc = self.rope_chunks
                    for i in range(nc):  # 16 lanes at a time: [T, D/2] cos + sin spilled
                        qa, qb, theta = qs[len(qs) - 3 * nc + i::nc][:3]
                        # theta's rows are equal: their max is the row, exactly (Triton
                        # lowers no slice)
                        ang = pos * jnp.max(theta, axis=0, keepdims=True)  # [T, 16]
                        total = (total + dot_nt(qa, flag * jnp.cos(ang))
                                 + dot_nt(qb, flag * jnp.sin(ang)))
                else:
                    lane = jax.lax.broadcasted_iota(jnp.int32, (raw.shape[0], MU_LANES), 1)
                    total = total + dot_nt(qs[-1], jnp.where(lane == 0, flag, 0.0))
            else:
                norm = _norm_col(ld, leaf)
            codes = code_tiles(ld, part.leaf0, part.bits, part.n, co)
            total = total + sum(dot_nt(qr, lookup(c, part.centroids, co) * norm)
                                for qr, c in zip(q_rot, codes, strict=True))
            if part.kind == "prod":
                p_sk = n_tiles(1, part.m, co)
                q_sk, at = qs[at:at + p_sk], at + p_sk
                w = part.qjl_scale * norm * _norm_col(ld, part.leaf0 + 3)  # |k| gamma scale/m
                signs = code_tiles(ld, part.leaf0 + 1, 1, part.m, co)
                total = total + sum(dot_nt(qk, (2 * c - 1).astype(jnp.float32) * w)
                                    for qk, c in zip(q_sk, signs, strict=True))
        return total


@dataclasses.dataclass(frozen=True)
class TurboValue(ValueFormat):
    parts: tuple[Part, ...]
    head_dim: int
    calib: Calibrated | None = None
    channel_order: bool = False  # gather launchers: under-16-column phase tiles merged

    def finalize_layer(self, accs, layer):
        """Calibrated values are stored in v_order[L, h]: out[order[j]] = out_stored[j].
        out: [B, Hkv, ..., D].

        The permutation is a one-hot [D, D] matmul per KV head (exact: one product by 1.0 per
        output at HIGHEST precision), not take_along_axis: that gather on the ragged kernel's
        [B, Hkv, blocks, rows, D] output sent libtpu's layout assignment
        (TpuLayoutAssignment::AddBackendConstraints) into a loop that had not ended after 5
        minutes (calibrated ragged turbo3.5-d64 for tpu-v5e; 14 s with the matmul)."""
        out = self.finalize(accs)
        if self.calib is None or not self.calib.reordered:
            return out
        inv = self.calib.at(np.argsort(self.calib.cal.v_order, axis=-1).astype(np.int32),
                            layer, out.shape[1])  # [Hkv, D]: out[..., e] = stored[..., inv[e]]
        d = out.shape[-1]
        onehot = (jnp.arange(d, dtype=jnp.int32)[None, :, None] == inv[:, None, :])
        rows = out.reshape(out.shape[0], out.shape[1], -1, d)
        return jnp.einsum("bhnd,hde->bhne", rows, onehot.astype(out.dtype),
                          precision=_HI).reshape(out.shape)

    @property
    def leaves(self) -> int:
        return sum(p.leaves for p in self.parts)

    def acc_shapes(self, gp):
        out = []
        for part in self.parts:
            p = n_tiles(part.bits, part.n, self.channel_order)
            out += [(gp, part.n // p)] * p
        return tuple(out)

    def accumulate(self, p, valid_col, ld):
        out = []
        for part in self.parts:
            norm = jnp.where(valid_col, _norm_col(ld, part.leaf0 + 1), 0.0)  # NaN-poisoned rows
            for c in code_tiles(ld, part.leaf0, part.bits, part.n, self.channel_order):
                out.append(dot_nn(p, lookup(c, part.centroids, self.channel_order) * norm))
        return tuple(out)

    def finalize(self, accs):
        pieces, order, at = [], [], 0
        for part in self.parts:
            p = n_tiles(part.bits, part.n, self.channel_order)
            y = from_phases(jnp.stack(accs[at:at + p], axis=-2))  # rotated basis [.., Gp, n]
            at += p
            pieces.append(jnp.matmul(y, jnp.asarray(part.rot), precision=_HI))
            order += list(part.channels) if part.channels is not None else list(range(part.n))
        out = jnp.concatenate(pieces, axis=-1)
        if order != list(range(self.head_dim)):
            out = out[..., np.argsort(np.asarray(order))]
        return out


def formats(spec: PoolSpec) -> tuple[KeyFormat | None, ValueFormat | None] | None:
    """Key and value formats of a TurboQuant pool (calibrated ones included: kvjax/calibrate.py
    keys centred per token, channels reordered per layer/head), None for other methods."""
    qz = spec.quantizer
    base = qz.hi if isinstance(qz, ChannelSplit) else qz
    if not isinstance(base, TurboMse | TurboProd):
        return None
    parts = _parts(qz)
    calib = None
    if spec.transformed:
        calib = Calibrated(spec.calibration, spec.first_layer, spec.centred, spec.reordered,
                           spec._flag_leaf if spec.centred else -1, spec.rope_centred)
    key = TurboKey(parts, calib)
    value = (TurboValue(parts, spec.head_dim, calib) if all(p.kind == "mse" for p in parts)
             else None)
    return key, value


@functools.partial(jax.jit, static_argnames=("backend", "k_splits", "pages_per_block",
                                             "num_warps", "num_stages"))
def turboquant_decode_attention(q, seg, layer, page_table, lengths, window_slots=None, *,
                                backend: str = "auto", k_splits: int = 0,
                                pages_per_block: int = 0, num_warps: int = 0,
                                num_stages: int = 2):
    """Decode attention over one layer of a TurboQuant segment (turbo2.5 ... turbo4: prod keys,
    mse values; fractional widths as channel splits).

    q: [batch, 1, num_heads, head_dim]; seg: kvjax.cache.paged.Segment; layer: int32 scalar;
    page_table: [batch, max_pages] int32; lengths: [batch] int32; window_slots: [batch] int32
    (segments with a window). Returns [batch, 1, num_heads, head_dim] in q's dtype.
    """
    kf, vf = formats(seg.k_spec), formats(seg.v_spec)
    if kf is None or vf is None or vf[1] is None:
        raise ValueError(f"turboquant_decode_attention needs TurboQuant keys and TurboQuant_mse "
                         f"values; got {seg.k_spec.method!r}, {seg.v_spec.method!r}")
    return _core.decode(q, seg, layer, page_table, lengths, window_slots, kf[0], vf[1],
                        backend=backend, k_splits=k_splits, pages_per_block=pages_per_block,
                        num_warps=num_warps, num_stages=num_stages)
