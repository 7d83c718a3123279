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


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x: [..., dim], weight: [dim]. Normalises in f32 whatever the input dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * weight.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim // 2], with Llama 3.1's wavelength-dependent scaling.

    Llama 3.1 leaves high frequencies alone, divides low frequencies by `factor`, and interpolates
    smoothly between the two bands (same formula as HF's `_compute_llama3_parameters`).
    """
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq.astype(np.float32)
    low_freq_wavelen = s.original_max_position / s.low_freq_factor
    high_freq_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """x: [batch, tokens, heads, head_dim]; positions: [batch, tokens]; inv_freq: [head_dim/2]."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, tokens, head_dim // 2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """x: [batch, tokens, hidden]; w_gate, w_up: [hidden, ffn]; w_down: [ffn, hidden]."""
    gate = jnp.einsum("bth,hf->btf", x, w_gate)
    up = jnp.einsum("bth,hf->btf", x, w_up)
    return jnp.einsum("btf,fh->bth", jax.nn.silu(gate) * up, w_down)
