"""Quantized projection weights, kept quantized in memory and read quantized by the matmul.

`--weight-dtype int8`: symmetric int8 with one f32 scale per 32 input rows of each output column
(`Int8Weight`; llama.cpp's Q8_0 block, so GGUF Q8_0 tensors load bit for bit). Per output channel
(one scale per column, `quantize_int8(w, group=None)`) measured +2.2% perplexity on SmolLM2 against
-0.2% for groups of 32 (BENCHMARKS.md).

`--weight-dtype int4`: asymmetric 4-bit codes in groups of 32 along the input (`Int4Weight`):
w = code * scale + min, llama.cpp's Q4_1 block, so a GGUF's Q4_0 and Q4_1 tensors load into it bit
for bit (`from_gguf_q4`). Codes are packed two per byte with row r in the low nibble and row
r + in/2 in the high nibble, so unpacking is one `&` and one `>>` per half, with no interleave.

What XLA makes of it on the CPU (read off the optimized HLO of a SmolLM2 decode step): the dot
does not absorb the dequantization; one loop fusion per layer and projection reads the narrow
codes (and scales) and writes that layer's weight in f32, which the dot then reads, while it is
still in cache. The f32 path is not free of this either: it copies each layer's slice out of the
stacked weights before its dot. So the int8/int4 step reads 1 or 0.75 bytes per weight from
memory where f32 reads 4 (BENCHMARKS.md: decode speed). `models.layers.linear` keeps every
dequantizing op elementwise (one dot per nibble half, scales expanded with `jnp.repeat`) so that it
stays one fusion; f16 scales were slower than f32 ones (a software conversion in every fusion).

Embeddings and lm_head stay float (their quantization is not implemented), as do norms and biases.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.config import ConfigError, ModelConfig

GROUP = 32  # int4 group size along the input dim (llama.cpp's Q4 block)
# int4 scales and mins: f32, not f16 (exact for GGUF's f16 values either way): XLA's CPU backend
# converts f16 slowly, and the conversion sits in every dequantizing fusion.
SCALE_DTYPE = np.float32
QUANTIZED = ("layers.wq", "layers.wk", "layers.wv", "layers.wo", "layers.w_gate", "layers.w_up",
             "layers.w_down")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Weight:
    """q: int8 [..., in, out]; scale: f32 [..., in/group, out] (group = in: one scale per output
    channel). w = q * scale of the row's group."""

    q: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    @property
    def group(self) -> int:
        return self.shape[-2] // self.scale.shape[-2]

    def __getitem__(self, index):  # `param[...]` reads the value, as for a plain array
        if index is not Ellipsis:
            raise TypeError("quantized weights support only [...]")
        return self


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int4Weight:
    """packed: uint8 [..., in/2, out] (row r low nibble, row r + in/2 high nibble);
    scale, min: f32 [..., in/GROUP, out]. w = code * scale + min per group of GROUP rows."""

    packed: jax.Array
    scale: jax.Array
    min: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        s = tuple(self.packed.shape)
        return (*s[:-2], 2 * s[-2], s[-1])

    @property
    def group(self) -> int:
        return self.shape[-2] // self.scale.shape[-2]

    def __getitem__(self, index):
        if index is not Ellipsis:
            raise TypeError("quantized weights support only [...]")
        return self


QuantizedWeight = Int8Weight | Int4Weight


def is_quantized(w) -> bool:
    return isinstance(w, Int8Weight | Int4Weight)


def quantize_int8(w: np.ndarray, group: int | None = GROUP) -> Int8Weight:
    """w: [..., in, out] float -> symmetric int8, one scale per `group` input rows of a column
    (None: per output channel)."""
    w = np.asarray(w, np.float32)
    group = group or w.shape[-2]
    if w.shape[-2] % group:
        raise ConfigError(f"int8 weights need the input dim ({w.shape[-2]}) to be a multiple of "
                          f"{group}")
    g = w.reshape(*w.shape[:-2], w.shape[-2] // group, group, w.shape[-1])
    amax = np.abs(g).max(axis=-2)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(g / scale[..., None, :]), -127, 127).astype(np.int8)
    return Int8Weight(q.reshape(w.shape), scale)


def _check_int4_shape(shape: tuple[int, ...], group: int, name: str = "weight") -> None:
    if shape[-2] % (2 * group):
        raise ConfigError(f"int4 weights need the input dim of {name} ({shape[-2]}) to be a "
                          f"multiple of {2 * group}")


def pack_int4(codes: np.ndarray, scale: np.ndarray, mn: np.ndarray) -> Int4Weight:
    """codes: uint8 [..., in, out] in 0..15; scale, min: [..., in/group, out]."""
    half = codes.shape[-2] // 2
    lo, hi = codes[..., :half, :], codes[..., half:, :]
    packed = (lo | (hi << 4)).astype(np.uint8)
    return Int4Weight(packed, np.asarray(scale, SCALE_DTYPE), np.asarray(mn, SCALE_DTYPE))


def quantize_int4(w: np.ndarray, group: int = GROUP) -> Int4Weight:
    """w: [..., in, out] float -> 4-bit codes, scale and min per group of `group` input rows
    (min-max, as llama.cpp's Q4_1)."""
    w = np.asarray(w, np.float32)
    _check_int4_shape(w.shape, group)
    g = w.reshape(*w.shape[:-2], w.shape[-2] // group, group, w.shape[-1])
    lo, hi = g.min(axis=-2), g.max(axis=-2)
    scale = ((hi - lo) / 15.0).astype(np.float32)
    s = np.where(scale > 0, scale, 1.0)
    codes = np.clip(np.rint((g - lo[..., None, :]) / s[..., None, :]), 0, 15)
    return pack_int4(codes.astype(np.uint8).reshape(w.shape), scale, lo)


def unpack_int4(w: Int4Weight) -> np.ndarray:
    """Codes uint8 [..., in, out]."""
    p = np.asarray(w.packed)
    return np.concatenate([p & 15, p >> 4], axis=-2)


def dequantize(w) -> np.ndarray:
    """The float weight [..., in, out] a quantized weight stands for (f32; plain arrays pass)."""
    if isinstance(w, Int8Weight):
        return np.asarray(w.q, np.float32) * np.repeat(np.asarray(w.scale, np.float32), w.group,
                                                       axis=-2)
    if isinstance(w, Int4Weight):
        codes = unpack_int4(w).astype(np.float32)
        rep = lambda a: np.repeat(np.asarray(a, np.float32), w.group, axis=-2)  # noqa: E731
        return codes * rep(w.scale) + rep(w.min)
    return np.asarray(w, np.float32)


def quantize(w: np.ndarray, weight_dtype: str):
    if weight_dtype == "int8":
        return quantize_int8(w)
    if weight_dtype == "int4":
        return quantize_int4(w)
    raise ConfigError(f"unknown weight dtype {weight_dtype!r}")


def _map_layers(w, fn):
    """Apply fn to every leaf (plain arrays and the arrays of quantized weights)."""
    return jax.tree_util.tree_map(fn, w)


def stack(ws: list):
    """Stack per-layer weights (all plain arrays or all of one quantized type) on a new axis 0."""
    return jax.tree_util.tree_map(lambda *a: np.stack(a), *ws)


def slice_layers(w, n: int):
    """The first n layers of a stacked weight."""
    return _map_layers(w, lambda a: a[:n])


def prepare(params: dict, mc: ModelConfig, dtype) -> dict:
    """Device arrays for the model: the projections quantized to mc.weight_dtype (unless the
    loader already did, e.g. GGUF Q4 blocks), everything else cast to the float `dtype`."""
    out = {}
    for name, v in params.items():
        if mc.weight_dtype != "auto" and name in QUANTIZED and not is_quantized(v):
            v = quantize(np.asarray(v, np.float32), mc.weight_dtype)
        out[name] = (_map_layers(v, jnp.asarray) if is_quantized(v)
                     else jnp.asarray(v, dtype))
    return out


def nbytes(params) -> int:
    """Bytes the params occupy (quantized weights at their packed size, scales included)."""
    return int(sum(np.dtype(a.dtype).itemsize * int(np.prod(a.shape))
                   for a in jax.tree_util.tree_leaves(params)))


def bytes_per_weight(weight_dtype: str, float_bytes: float, fan_in: int = 4096) -> float:
    """Stored bytes per projection weight, scales included: int8 one f32 scale per GROUP; int4
    half a byte plus an f32 scale and min per GROUP."""
    if weight_dtype == "int8":
        return 1.0 + 4.0 / GROUP
    if weight_dtype == "int4":
        return 0.5 + 8.0 / GROUP
    return float(float_bytes)


def projection_params(mc: ModelConfig) -> int:
    """Parameters in the projections (the tensors --weight-dtype quantizes)."""
    h, d, f = mc.hidden_size, mc.head_dim, mc.intermediate_size
    return mc.num_layers * (h * d * (2 * mc.num_heads + 2 * mc.num_kv_heads) + 3 * h * f)


def weight_bytes(mc: ModelConfig, float_bytes: float) -> int:
    """Bytes of all params with the projections at mc.weight_dtype and the rest at float_bytes."""
    proj = projection_params(mc)
    rest = mc.num_params() - proj
    return int(proj * bytes_per_weight(mc.weight_dtype, float_bytes, mc.hidden_size)
               + rest * float_bytes)


def from_gguf_q8_0(data: np.ndarray, shape_out_in: tuple[int, int], row_perm=None
                   ) -> Int8Weight:
    """A GGUF Q8_0 tensor ([out, in]; blocks of f16 d + 32 int8) as an Int8Weight [in, out] with
    groups of 32, bit for bit."""
    rows, cols = shape_out_in
    blocks = np.ascontiguousarray(data, np.uint8).reshape(rows, cols // 32, 34)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = blocks[..., 2:].copy().view(np.int8).reshape(rows, cols)
    if row_perm is not None:
        q, d = row_perm(q), row_perm(d)
    return Int8Weight(np.ascontiguousarray(q.T), np.ascontiguousarray(d.T))


# ---------------------------------------------------------------------------------------------
# GGUF blocks (ggml's block_q4_0 / block_q4_1: f16 d [, f16 m], 16 bytes of nibbles; element j of
# a block is the low nibble of byte j, element j + 16 the high nibble).

def gguf_q4_codes(data: np.ndarray, qtype_name: str, rows: int, cols: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw Q4_0/Q4_1 tensor bytes [rows, nbytes] -> codes uint8 [rows, cols], scale and min
    f16 [rows, cols / 32] with w = code * scale + min (Q4_0: min = -8 * scale, exact in f16)."""
    head = 2 if qtype_name == "Q4_0" else 4
    blocks = np.ascontiguousarray(data, np.uint8).reshape(rows, cols // 32, head + 16)
    d = blocks[..., :2].copy().view(np.float16)[..., 0]
    mn = (blocks[..., 2:4].copy().view(np.float16)[..., 0] if qtype_name == "Q4_1"
          else (-8 * d.astype(np.float32)).astype(np.float16))
    qs = blocks[..., head:]
    codes = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(rows, cols)
    return codes, d, mn


def from_gguf_q4(data: np.ndarray, qtype_name: str, shape_out_in: tuple[int, int],
                 row_perm=None) -> Int4Weight:
    """A GGUF Q4_0/Q4_1 tensor ([out, in] in numpy order) as an Int4Weight [in, out], without
    requantizing. row_perm: a function reordering rows of [out, ...] arrays (llama's Q/K)."""
    rows, cols = shape_out_in
    _check_int4_shape((cols, rows), GROUP)
    codes, d, mn = gguf_q4_codes(data, qtype_name, rows, cols)
    if row_perm is not None:
        codes, d, mn = row_perm(codes), row_perm(d), row_perm(mn)
    return pack_int4(codes.T, d.T, mn.T)
