"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), jitted on device."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames=("top_k",))
def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array,
           top_k: int = 0) -> jax.Array:
    """logits: [batch, vocab] -> token ids [batch]. temperature 0 means greedy."""
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    if top_k > 0:
        kth = jax.lax.top_k(scaled, top_k)[0][..., -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    # Nucleus: keep the smallest set of tokens whose probability mass reaches top_p.
    sorted_logits = jnp.sort(scaled, axis=-1)[..., ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    keep = cum - jax.nn.softmax(sorted_logits, axis=-1) < top_p  # the first token always stays
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    scaled = jnp.where(scaled < threshold, -jnp.inf, scaled)
    drawn = jax.random.categorical(key, scaled, axis=-1)
    return jnp.where(temperature > 0, drawn, greedy)
