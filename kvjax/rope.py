"""Rotary position embedding in the rotate-half layout (Llama, Qwen, SmolLM2): the one formula
the model's queries and keys, the cache's RoPE-aware key centring and the eviction path's key
re-rotation all use, so that they agree to the bit.

The Pallas kernels form the same angles in-kernel (kvjax/pallas_kernels/turboquant_attention.py)
and calibrate.py's float64 inverse (`unrotate_keys`) stays in numpy: both are tested against this.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rotate_half(x: jax.Array, positions: jax.Array, inv_freq: jax.Array,
                scale: float = 1.0) -> jax.Array:
    """x [..., d] turned by RoPE at positions [...] (broadcast against x.shape[:-1]) with
    frequencies inv_freq [d / 2]; angles in f32. scale multiplies cos and sin (YaRN's attention
    factor). The result is f32 when x is bf16 (the caller casts back)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., d / 2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
