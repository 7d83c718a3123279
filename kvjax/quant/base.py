"""The interface every KV quantizer implements, and helpers they share.

A quantizer is an immutable ``flax.struct`` dataclass: its constants (rotations, codebooks, sketch
matrices) are pytree leaves and its configuration (bits, head_dim, ...) is static. So it can be
closed over by a jitted function (constants are baked in), passed to one as an ordinary argument,
or vmapped over (tests vmap over thousands of QJL sketch matrices this way). Do not pass it as a
*static* jit argument: numpy arrays are not hashable.

Contract (x has shape ``[..., head_dim]``; for KIVI keys see kivi.py):
  quantize(x)        -> codes, a NamedTuple pytree. Every leaf has the batch shape of x in front and
                        its own per-vector size last, e.g. ``idx [..., packed]``, ``norm [..., 1]``,
                        so codes can be written into pages ``[kv_heads, num_pages, page_size, n]``.
  dequantize(codes)  -> x_hat ``[..., head_dim]`` float32.
  prepare_query(q)   -> whatever the score needs from the query, computed once per query
                        (TurboQuant: q rotated and projected). Identity for most methods.
  scores_prepared(pq, codes) -> estimate of <q, k> for every stored k, broadcasting q's batch shape
                        against the codes' batch shape (q ``[H, 1, d]`` vs codes of ``[T]`` keys ->
                        ``[H, T]``). Never materialises dequantized keys for
  TurboQuant/PolarQuant/QJL. scores(q, codes)   -> scores_prepared(prepare_query(q), codes).
  bytes_per_token()  -> bytes stored per token (per head), codes plus per-token or per-group
                        metadata. Constants shared by all tokens (rotations, codebooks, static
                        scales) are not counted. Tests check it equals stored_nbytes(codes) /
                        tokens.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Per-vector metadata (scales, zero points, norms) is stored as float16 unless a quantizer is built
# with another meta_dtype: the precision every reference implementation (KIVI, vLLM, QJL) uses.
META_DTYPE = jnp.float16
# Smallest positive normal float16. Scales are clamped to it so they never flush to zero.
F16_TINY = 2.0**-14


class Quantizer:
    """Base class; subclasses are flax.struct dataclasses with at least a static ``head_dim``."""

    head_dim: int
    # Tokens whose codes share metadata (KIVI keys: the group size G). 1 for per-token methods.
    tokens_per_group: int = 1

    def quantize(self, x: jax.Array) -> Any:
        raise NotImplementedError

    def dequantize(self, codes: Any) -> jax.Array:
        raise NotImplementedError

    def prepare_query(self, q: jax.Array) -> Any:
        """q: [..., head_dim] -> the query in the form scores_prepared consumes."""
        return jnp.asarray(q, jnp.float32)

    def scores_prepared(self, pq: Any, codes: Any) -> jax.Array:
        # Generic fallback: dequantize and dot. Methods with structure override this.
        return jnp.sum(pq * self.dequantize(codes), axis=-1)

    def scores(self, q: jax.Array, codes: Any) -> jax.Array:
        """q: [..., head_dim] -> estimated q . k, broadcast over q's and the codes' batch shapes."""
        return self.scores_prepared(self.prepare_query(q), codes)

    def bytes_per_token(self) -> float:
        raise NotImplementedError

    def bits_per_coord(self) -> float:
        """Stored bits per coordinate, metadata included."""
        return 8.0 * self.bytes_per_token() / self.head_dim


def stored_nbytes(codes: Any) -> int:
    """Bytes of every array in a codes pytree (what a cache would actually hold)."""
    return int(sum(np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves(codes)))


def itemsize(dtype: Any) -> int:
    return jnp.dtype(dtype).itemsize


def to_meta(x: jax.Array, meta_dtype: Any) -> jax.Array:
    """Round metadata to its storage dtype. Quantizers then use the *rounded* value, so what they
    dequantize with is exactly what they quantized against."""
    return x.astype(meta_dtype)


def safe_norm(x: jax.Array) -> jax.Array:
    """L2 norm over the last axis with keepdims. x: [..., d] -> [..., 1]"""
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


def bucketize(y: jax.Array, thresholds: jax.Array) -> jax.Array:
    """Index of the nearest centroid, given the sorted midpoints between centroids.

    y: [...] float, thresholds: [L-1] -> uint8 [...] in [0, L). A compare-and-count over at most 31
    thresholds vectorises better than a binary search or an argmin over L distances.
    """
    if thresholds.shape[0] == 0:
        return jnp.zeros(y.shape, jnp.uint8)
    return jnp.sum(y[..., None] > thresholds, axis=-1).astype(jnp.uint8)
