"""Building blocks shared by every decoder: RMSNorm, RoPE (with Llama 3.1 scaling), SwiGLU MLP.

Pure functions of arrays. Q and K use the Hugging Face "rotate half" RoPE layout: a head's first
half holds the real parts and its second half the imaginary parts. The GGUF loader undoes
llama.cpp's interleaved row order so that every checkpoint lands in this one layout.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.config import ModelConfig
from kvjax.quant.weights import Int4Weight, Int8Weight, is_quantized
from kvjax.rope import rotate_half


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x: [..., dim], weight: [dim]. Normalises in f32 whatever the input dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * weight.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] for the config's RoPE type (the formulas of HF's
    modeling_rope_utils, computed in float64 and rounded once).

    llama3: high frequencies kept, low ones divided by `factor`, a smooth blend between.
    linear: all divided by `factor`. dynamic: plain RoPE (NTK only departs from it past the
    trained context, beyond max_position). yarn: per-dimension blend of interpolated (/factor)
    and original frequencies with a linear ramp between the beta_fast and beta_slow dims.
    """
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    s = cfg.rope_scaling
    if s is None or s.rope_type == "dynamic":
        return inv_freq.astype(np.float32)
    if s.rope_type == "linear":
        return (inv_freq / s.factor).astype(np.float32)
    if s.rope_type == "yarn":
        return _yarn_inv_freq(inv_freq, d, cfg.rope_theta, s).astype(np.float32)
    low_freq_wavelen = s.original_max_position / s.low_freq_factor
    high_freq_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn_inv_freq(inv_freq: np.ndarray, d: int, theta: float, s) -> np.ndarray:
    def correction_dim(rotations: float) -> float:
        return d * math.log(s.original_max_position / (rotations * 2 * math.pi)) / (
            2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # HF: avoid a zero-width ramp
    ramp = np.clip((np.arange(d // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # weight of the original frequency
    return inv_freq / s.factor * (1 - extrapolation) + inv_freq * extrapolation


def rope_attention_factor(cfg: ModelConfig) -> float:
    """YaRN's scale on cos and sin (so on q.k by its square); 1 for every other RoPE type."""
    s = cfg.rope_scaling
    return float(s.attention_factor) if s is not None and s.rope_type == "yarn" else 1.0


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array,
               scale: float = 1.0) -> jax.Array:
    """x: [batch, tokens, heads, head_dim]; positions: [batch, tokens]; inv_freq: [head_dim/2];
    scale: multiplies cos and sin (YaRN's attention factor, `rope_attention_factor`)."""
    out = rotate_half(x.astype(jnp.float32), positions[:, :, None], inv_freq, scale)
    return out.astype(x.dtype)


def swiglu(x: jax.Array, w_gate, w_up, w_down) -> jax.Array:
    """x: [batch, tokens, hidden]; w_gate, w_up: [hidden, ffn]; w_down: [ffn, hidden] (plain
    arrays or quantized weights, see `linear`)."""
    return linear(jax.nn.silu(linear(x, w_gate)) * linear(x, w_up), w_down)


def linear(x: jax.Array, w) -> jax.Array:
    """x: [..., in] @ w: [in, out] -> [..., out] in x's dtype. w is a plain array or a quantized
    weight (kvjax/quant/weights.py); quantized ones are dequantized inside the dot's operand so
    that XLA fuses the conversion into a matrix-vector dot and reads the narrow codes."""
    c = x.dtype
    if isinstance(w, Int8Weight):
        if w.scale.shape[0] == 1:  # per output channel: the scale applies after the dot
            return jnp.einsum("...i,io->...o", x, w.q.astype(c)) * w.scale[0].astype(c)
        scale = jnp.repeat(w.scale.astype(c), w.q.shape[0] // w.scale.shape[0], axis=0)
        return jnp.einsum("...i,io->...o", x, w.q.astype(c) * scale)
    if isinstance(w, Int4Weight):  # one dot per nibble half (a concatenate breaks the fusion)
        half, groups = w.packed.shape[0], w.scale.shape[0] // 2
        group = 2 * half // w.scale.shape[0]

        def part(codes: jax.Array, xs: jax.Array, sl: slice) -> jax.Array:
            scale = jnp.repeat(w.scale[sl].astype(c), group, axis=0)
            mn = jnp.repeat(w.min[sl].astype(c), group, axis=0)
            return jnp.einsum("...i,io->...o", xs, codes.astype(c) * scale + mn)

        return (part(w.packed & 15, x[..., :half], slice(None, groups))
                + part(w.packed >> 4, x[..., half:], slice(groups, None)))
    return matmul(x, w)


def matmul(x: jax.Array, w: jax.Array, w_axes: str = "io") -> jax.Array:
    """x: [..., in] times a plain weight w ([in, out] for w_axes "io", [out, in] for "oi")
    -> [..., out] in x's dtype.

    A weight narrower than x (bf16 weights under f32 compute: the CPU backend when f32 weights
    would not fit, `kvjax.runner.param_dtype`) stays narrow: x is rounded to w's dtype and the
    dot accumulates in f32. Casting the weight instead makes XLA materialise an f32 copy of it
    per call (a 70B layer is 0.43 GB per device of tensor 8, the lm_head 0.5 GB)."""
    spec = f"...i,{w_axes}->...o"
    if jnp.dtype(w.dtype).itemsize >= jnp.dtype(x.dtype).itemsize:
        return jnp.einsum(spec, x, w.astype(x.dtype))
    lead, rows = x.shape[:-1], math.prod(x.shape[:-1])
    x2 = x.reshape(rows, x.shape[-1]).astype(w.dtype)
    if rows == 1 and jax.default_backend() == "cpu":
        # XLA:CPU runs a one-row (matrix-vector) bf16 dot by converting the whole weight to
        # f32 first, a temporary the size of the weight; with two rows it stays a native bf16
        # dot (measured on jaxlib 0.10: 128 MB temp for a [4096, 8192] weight -> 16 KB). The
        # zero row costs less than the copy.
        x2 = jnp.pad(x2, ((0, 1), (0, 0)))
    y = jnp.einsum(f"ri,{w_axes}->ro", x2, w, preferred_element_type=jnp.float32)[:rows]
    return y.reshape(*lead, y.shape[-1]).astype(x.dtype)


def layer_weights(w, index: jax.Array, dtype) -> jax.Array:
    """Layer `index` of a stacked weight [layers, ...]: plain arrays cast to the compute dtype
    `dtype` unless they are narrower (those stay narrow and `matmul` dots them as they are),
    quantized weights sliced leaf by leaf and left quantized (`linear` dequantizes them)."""
    if is_quantized(w):
        return jax.tree_util.tree_map(
            lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False), w)
    a = jax.lax.dynamic_index_in_dim(w, index, keepdims=False)
    return a if jnp.dtype(a.dtype).itemsize < jnp.dtype(dtype).itemsize else a.astype(dtype)
