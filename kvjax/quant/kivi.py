"""KIVI (Liu et al., ICML 2024): 2/4-bit asymmetric KV quantization with a full-precision window.

Quantizer (kivi-and-eviction.md 1.1): over a group, zero = min, scale = (max - min) / (2^b - 1),
q = round(clip((x - zero) / scale, 0, 2^b - 1)), x' = q * scale + zero. zero and scale are stored in
the metadata dtype (f16) and codes are computed against the *stored* values. A constant group has
scale 0: we divide by 1 instead (codes 0) and dequantize exactly to the stored zero, where KIVI's
reference code produces NaN.

* Keys are quantized per channel, grouped over G consecutive tokens of one sequence (keys have fixed
  outlier channels). ``KiviKeyQuantizer.quantize`` therefore takes *groups*: x ``[..., G, d]`` ->
  ``KiviKeyCodes(q [..., G, d*b/8] uint8, scale [..., d], zero [..., d])``. Codes are packed along
  head_dim per token (unlike KIVI's CUDA layout, which packs along tokens), so a page of
  ``page_size`` tokens (a multiple of G) holds whole groups and one token's codes stay contiguous.
  Scores fold the per-channel scales into q: q.k = sum_d (q_d s_d) c_td + sum_d q_d z_d.
* Values are quantized per token, grouped over G consecutive channels: x ``[..., d]`` ->
  ``KiviValueCodes(q [..., d*b/8], scale [..., d/G], zero [..., d/G])``.

Residual window (``KiviStream``), KIVI's code rules for R recent tokens kept in full precision:
* prefill of T tokens: keys [0, T - T % R) quantized, the last T % R kept (so T % R == 0 leaves no
  full-precision key: KIVI's quirk, reproduced); values [0, max(T - R, 0)) quantized, the rest kept.
* each decode token: the key joins the key residual; when it holds R keys they are sealed together
  (R/G groups) and it empties. The value joins a FIFO of R; when it overflows, the oldest value is
  quantized alone.
State is per sequence: groups are formed from one sequence's own tokens, so a group never spans two
sequences (batch by vmapping over states). The table in kivi-and-eviction.md 1.5 is a test.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.quant.base import META_DTYPE, Quantizer, itemsize, to_meta
from kvjax.quant.packing import pack_bits, packed_size, unpack_bits


def _asym_quantize(
    x: jax.Array, axis: int, bits: int, meta_dtype
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Min/scale quantization of x over ``axis`` (kept as size 1 in scale and zero)."""
    levels = (1 << bits) - 1
    zero = to_meta(jnp.min(x, axis=axis, keepdims=True), meta_dtype)
    mx = jnp.max(x, axis=axis, keepdims=True)
    scale = to_meta((mx - zero.astype(jnp.float32)) / levels, meta_dtype)
    s = scale.astype(jnp.float32)
    safe = jnp.where(s > 0, s, 1.0)  # constant group: codes 0, dequantizes to zero exactly
    q = jnp.round(jnp.clip((x - zero.astype(jnp.float32)) / safe, 0, levels))
    return q.astype(jnp.uint8), scale, zero


class KiviKeyCodes(NamedTuple):
    q: jax.Array  # [..., G, ceil(d*b/8)] uint8, packed along head_dim per token
    scale: jax.Array  # [..., d] meta dtype, per channel of the group
    zero: jax.Array  # [..., d] meta dtype


class KiviValueCodes(NamedTuple):
    q: jax.Array  # [..., ceil(d*b/8)] uint8
    scale: jax.Array  # [..., d/G] meta dtype, per channel group of the token
    zero: jax.Array  # [..., d/G] meta dtype


@struct.dataclass
class KiviKeyQuantizer(Quantizer):
    """Per-channel key quantization over groups of G tokens. Input x: [..., G, head_dim]."""

    head_dim: int = struct.field(pytree_node=False)
    bits: int = struct.field(pytree_node=False, default=2)
    group_size: int = struct.field(pytree_node=False, default=32)
    meta_dtype: object = struct.field(pytree_node=False, default=META_DTYPE)

    @property
    def tokens_per_group(self) -> int:
        return self.group_size

    def quantize(self, x: jax.Array) -> KiviKeyCodes:
        """x: [..., G, head_dim] (G = group_size consecutive tokens of one sequence)."""
        x = jnp.asarray(x, jnp.float32)
        if x.shape[-2] != self.group_size:
            raise ValueError(f"KIVI keys come in groups of {self.group_size} tokens: {x.shape}")
        q, scale, zero = _asym_quantize(x, -2, self.bits, self.meta_dtype)
        return KiviKeyCodes(pack_bits(q, self.bits), scale[..., 0, :], zero[..., 0, :])

    def dequantize(self, codes: KiviKeyCodes) -> jax.Array:
        """-> [..., G, head_dim]"""
        c = unpack_bits(codes.q, self.bits, self.head_dim).astype(jnp.float32)
        s = codes.scale.astype(jnp.float32)[..., None, :]
        return c * s + codes.zero.astype(jnp.float32)[..., None, :]

    def prepare_query(self, q: jax.Array) -> jax.Array:
        """q: [..., head_dim] -> [..., 1, head_dim], broadcasting against the G token axis."""
        return jnp.asarray(q, jnp.float32)[..., None, :]

    def scores_prepared(self, pq: jax.Array, codes: KiviKeyCodes) -> jax.Array:
        """-> [..., G]: (q * scale) . codes + q . zero, per token of each group."""
        c = unpack_bits(codes.q, self.bits, self.head_dim).astype(jnp.float32)
        s = codes.scale.astype(jnp.float32)[..., None, :]
        z = codes.zero.astype(jnp.float32)[..., None, :]
        return jnp.sum((pq * s) * c, axis=-1) + jnp.sum(pq * z, axis=-1)

    def bytes_per_token(self) -> float:
        meta = 2 * self.head_dim * itemsize(self.meta_dtype) / self.group_size
        return packed_size(self.head_dim, self.bits) + meta


@struct.dataclass
class KiviValueQuantizer(Quantizer):
    """Per-token value quantization, channels grouped by G. Input x: [..., head_dim]."""

    head_dim: int = struct.field(pytree_node=False)
    bits: int = struct.field(pytree_node=False, default=2)
    group_size: int = struct.field(pytree_node=False, default=32)
    meta_dtype: object = struct.field(pytree_node=False, default=META_DTYPE)

    @property
    def n_groups(self) -> int:
        return self.head_dim // self.group_size

    def quantize(self, x: jax.Array) -> KiviValueCodes:
        """x: [..., head_dim] -> KiviValueCodes"""
        x = jnp.asarray(x, jnp.float32)
        g = x.reshape(*x.shape[:-1], self.n_groups, self.group_size)
        q, scale, zero = _asym_quantize(g, -1, self.bits, self.meta_dtype)
        q = q.reshape(x.shape)
        return KiviValueCodes(pack_bits(q, self.bits), scale[..., 0], zero[..., 0])

    def dequantize(self, codes: KiviValueCodes) -> jax.Array:
        c = unpack_bits(codes.q, self.bits, self.head_dim).astype(jnp.float32)
        c = c.reshape(*c.shape[:-1], self.n_groups, self.group_size)
        s = codes.scale.astype(jnp.float32)[..., None]
        x = c * s + codes.zero.astype(jnp.float32)[..., None]
        return x.reshape(*x.shape[:-2], self.head_dim)

    def bytes_per_token(self) -> float:
        return packed_size(self.head_dim, self.bits) + 2 * self.n_groups * itemsize(self.meta_dtype)


def build_kivi(
    head_dim: int, bits: int, role: str = "key", group_size: int = 32
) -> KiviKeyQuantizer | KiviValueQuantizer:
    if head_dim % group_size:
        raise ValueError(f"head_dim {head_dim} is not a multiple of the group size {group_size}")
    if role == "key":
        return KiviKeyQuantizer(head_dim=head_dim, bits=bits, group_size=group_size)
    if role == "value":
        return KiviValueQuantizer(head_dim=head_dim, bits=bits, group_size=group_size)
    raise ValueError(f"role must be 'key' or 'value', got {role!r}")


# ----------------------------------------------------------------------------------------------
# The streaming state machine (one sequence; vmap for a batch). Leaves carry optional leading batch
# axes ``[...]`` (e.g. kv_heads) in front of the token axes.


class KiviState(NamedTuple):
    k_codes: KiviKeyCodes  # q [..., max_len/G, G, packed], scale/zero [..., max_len/G, d]
    k_res: jax.Array  # [..., R, d] f32: keys not sealed yet, slots [0, n_k_res) valid
    v_codes: KiviValueCodes  # q [..., max_len, packed], scale/zero [..., max_len, d/G]
    v_res: jax.Array  # [..., R, d] f32 ring buffer: token t in slot t % R
    n_k_quant: jax.Array  # int32 [], quantized keys = tokens [0, n_k_quant)
    n_k_res: jax.Array  # int32 [], full-precision keys = tokens [n_k_quant, n_k_quant + n_k_res)
    n_v_quant: jax.Array  # int32 [], quantized values = tokens [0, n_v_quant)
    n_v_res: jax.Array  # int32 [], full-precision values = tokens [n_v_quant, n_v_quant + n_v_res)

    @property
    def length(self) -> jax.Array:
        return self.n_k_quant + self.n_k_res

    def counts(self) -> tuple[int, int, int, int]:
        """(#quantized keys, #fp keys, #quantized values, #fp values) as Python ints."""
        return tuple(int(c) for c in (self.n_k_quant, self.n_k_res, self.n_v_quant, self.n_v_res))


@struct.dataclass
class KiviStream:
    """KIVI's cache for one sequence: fixed capacity ``max_len``, window ``residual`` (R)."""

    key: KiviKeyQuantizer
    value: KiviValueQuantizer
    max_len: int = struct.field(pytree_node=False)
    residual: int = struct.field(pytree_node=False, default=128)

    def __post_init__(self):
        g, r = self.key.group_size, self.residual
        if r % g or self.max_len % r:
            raise ValueError(f"need G | R | max_len, got G={g}, R={r}, max_len={self.max_len}")

    def init(self, batch_shape: tuple[int, ...] = ()) -> KiviState:
        d, g, n = self.key.head_dim, self.key.group_size, self.max_len
        kc = self.key.quantize(jnp.zeros((*batch_shape, n // g, g, d)))
        vc = self.value.quantize(jnp.zeros((*batch_shape, n, d)))
        zero = jnp.zeros((), jnp.int32)
        res = jnp.zeros((*batch_shape, self.residual, d), jnp.float32)
        return KiviState(kc, res, vc, res, zero, zero, zero, zero)

    def prefill(self, k: jax.Array, v: jax.Array) -> KiviState:
        """k, v: [..., T, d] with T static -> state after KIVI's prefill rules."""
        k = jnp.asarray(k, jnp.float32)
        v = jnp.asarray(v, jnp.float32)
        t, d, r, g = k.shape[-2], k.shape[-1], self.residual, self.key.group_size
        batch = k.shape[:-2]
        nb = len(batch)
        st = self.init(batch)
        n_kq = t - t % r
        k_codes = st.k_codes
        if n_kq:
            groups = self.key.quantize(k[..., :n_kq, :].reshape(*batch, n_kq // g, g, d))
            k_codes = jax.tree_util.tree_map(
                lambda dst, src: jax.lax.dynamic_update_slice_in_dim(dst, src, 0, nb),
                k_codes,
                groups,
            )
        k_res = st.k_res.at[..., : t - n_kq, :].set(k[..., n_kq:, :])
        n_vq = max(t - r, 0)
        v_codes = st.v_codes
        if n_vq:
            vq = self.value.quantize(v[..., :n_vq, :])
            v_codes = jax.tree_util.tree_map(
                lambda dst, src: jax.lax.dynamic_update_slice_in_dim(dst, src, 0, nb), v_codes, vq
            )
        slots = jnp.arange(n_vq, t) % r
        v_res = st.v_res.at[..., slots, :].set(v[..., n_vq:, :])
        i32 = lambda n: jnp.asarray(n, jnp.int32)  # noqa: E731
        return KiviState(
            k_codes, k_res, v_codes, v_res, i32(n_kq), i32(t - n_kq), i32(n_vq), i32(t - n_vq)
        )

    def append(self, state: KiviState, k: jax.Array, v: jax.Array) -> KiviState:
        """One decode token. k, v: [..., d]. Jittable; counters are traced."""
        r, g, d = self.residual, self.key.group_size, self.key.head_dim
        nb = k.ndim - 1
        k = jnp.asarray(k, jnp.float32)
        v = jnp.asarray(v, jnp.float32)

        # Keys: append to the residual; seal all R of them once it is full (after this step's
        # attention in KIVI's order; the state we return is the post-step state).
        k_res = jax.lax.dynamic_update_index_in_dim(state.k_res, k, state.n_k_res, nb)
        n_k_res = state.n_k_res + 1

        def seal(args):
            k_codes, k_res, n_kq, n_kr = args
            groups = self.key.quantize(k_res.reshape(*k_res.shape[:-2], r // g, g, d))
            at = n_kq // g
            k_codes = jax.tree_util.tree_map(
                lambda dst, src: jax.lax.dynamic_update_slice_in_dim(dst, src, at, nb),
                k_codes,
                groups,
            )
            return k_codes, jnp.zeros_like(k_res), n_kq + r, jnp.zeros_like(n_kr)

        k_codes, k_res, n_kq, n_kr = jax.lax.cond(
            n_k_res == r, seal, lambda a: a, (state.k_codes, k_res, state.n_k_quant, n_k_res)
        )

        # Values: a FIFO of R. If full, the oldest (token n_v_quant, slot n_v_quant % R) leaves it
        # quantized, and the new value takes its slot.
        full = state.n_v_res == r
        slot = (state.n_v_quant + state.n_v_res) % r
        oldest = jax.lax.dynamic_index_in_dim(state.v_res, slot, nb, keepdims=False)
        vq = self.value.quantize(oldest)
        v_codes = jax.tree_util.tree_map(
            lambda dst, src: jnp.where(
                full,
                jax.lax.dynamic_update_index_in_dim(dst, src, state.n_v_quant, nb),
                dst,
            ),
            state.v_codes,
            vq,
        )
        v_res = jax.lax.dynamic_update_index_in_dim(state.v_res, v, slot, nb)
        n_vq = state.n_v_quant + full.astype(jnp.int32)
        n_vr = state.n_v_res + (1 - full.astype(jnp.int32))
        return KiviState(k_codes, k_res, v_codes, v_res, n_kq, n_kr, n_vq, n_vr)

    def materialize(self, state: KiviState) -> tuple[jax.Array, jax.Array]:
        """What attention sees: (k_hat, v_hat), each [..., max_len, d]; tokens >= length are 0."""
        d, r = self.key.head_dim, self.residual
        k_q = self.key.dequantize(state.k_codes)
        k_q = k_q.reshape(*k_q.shape[:-3], self.max_len, d)
        v_q = self.value.dequantize(state.v_codes)
        t = jnp.arange(self.max_len)[:, None]  # [max_len, 1]
        nb = k_q.ndim - 2
        k_fp = jnp.take(state.k_res, jnp.clip(t[:, 0] - state.n_k_quant, 0, r - 1), axis=nb)
        v_fp = jnp.take(state.v_res, t[:, 0] % r, axis=nb)
        length = state.n_k_quant + state.n_k_res
        k_hat = jnp.where(t < state.n_k_quant, k_q, jnp.where(t < length, k_fp, 0.0))
        v_hat = jnp.where(t < state.n_v_quant, v_q, jnp.where(t < length, v_fp, 0.0))
        return k_hat, v_hat
