"""Bit packing of small integer codes into uint8, LSB-first, along the last axis only.

Layout: the codes of one vector form a little-endian bit stream. Code ``i`` of a vector occupies
bits ``[bits*i, bits*(i+1))`` of that stream, and stream bit ``j`` is bit ``j % 8`` of byte
``j // 8``. For 4 bits this is "element 2j in the low nibble of byte j"; for 3 bits it is vLLM's
"code j at bit 3j of a little-endian 24-bit group"; for 2 bits it matches KIVI's LSB-first,
contiguous-run packing (restricted to one byte instead of an int32 word). A code may straddle a byte
boundary (3 bits), and the stream is zero-padded to a whole byte.

Packing never crosses vectors: every axis but the last is a batch axis, so packed codes can be
stored in pages ``[kv_heads, num_pages, page_size, packed]`` and a token's bytes are its own.

The implementation expands codes to individual bits and regroups them by 8. That is the clearest
exact formulation, works for every width 1..8 and fuses into a few XLA elementwise ops; kernels are
free to use shift-and-mask on whole words instead, as long as they read this layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def packed_size(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take once packed (the stream is padded to a byte)."""
    if not 0 <= bits <= 8:
        raise ValueError(f"bits must be in 0..8, got {bits}")
    return (n * bits + 7) // 8


def pack_bits(codes: jax.Array, bits: int) -> jax.Array:
    """Pack integer codes (each < 2**bits) along the last axis into uint8, LSB-first.

    codes: integer array  # [..., n], values in [0, 2**bits)
    returns: uint8 array  # [..., packed_size(n, bits)]
    """
    n = codes.shape[-1]
    nbytes = packed_size(n, bits)
    batch = codes.shape[:-1]
    if bits == 0 or n == 0:
        return jnp.zeros((*batch, nbytes), jnp.uint8)
    if bits == 8:
        return codes.astype(jnp.uint8)
    c = codes.astype(jnp.uint32)
    shifts = jnp.arange(bits, dtype=jnp.uint32)
    stream = ((c[..., :, None] >> shifts) & 1).reshape(*batch, n * bits)  # [..., n*bits]
    pad = nbytes * 8 - n * bits
    if pad:
        stream = jnp.concatenate([stream, jnp.zeros((*batch, pad), jnp.uint32)], axis=-1)
    stream = stream.reshape(*batch, nbytes, 8)
    byte = jnp.sum(stream << jnp.arange(8, dtype=jnp.uint32), axis=-1)  # disjoint bits: sum == OR
    return byte.astype(jnp.uint8)


def unpack_bits(packed: jax.Array, bits: int, n: int) -> jax.Array:
    """Inverse of :func:`pack_bits`.

    packed: uint8 array  # [..., packed_size(n, bits)]
    returns: uint8 codes  # [..., n]
    """
    batch = packed.shape[:-1]
    if bits == 0 or n == 0:
        return jnp.zeros((*batch, n), jnp.uint8)
    if packed.shape[-1] != packed_size(n, bits):
        raise ValueError(
            f"packed has {packed.shape[-1]} bytes, expected {packed_size(n, bits)} "
            f"for {n} codes of {bits} bits"
        )
    if bits == 8:
        return packed.astype(jnp.uint8)
    p = packed.astype(jnp.uint32)
    stream = ((p[..., :, None] >> jnp.arange(8, dtype=jnp.uint32)) & 1).reshape(*batch, -1)
    stream = stream[..., : n * bits].reshape(*batch, n, bits)
    codes = jnp.sum(stream << jnp.arange(bits, dtype=jnp.uint32), axis=-1)
    return codes.astype(jnp.uint8)


def pack_signs(x: jax.Array) -> jax.Array:
    """Pack the signs of ``x`` as bits (1 where x >= 0, so sign(0) counts as +1).

    x: float array  # [..., m]
    returns: uint8  # [..., ceil(m/8)]
    """
    return pack_bits((x >= 0).astype(jnp.uint8), 1)


def unpack_signs(packed: jax.Array, m: int, dtype=jnp.float32) -> jax.Array:
    """Inverse of :func:`pack_signs` as +-1 values.

    packed: uint8  # [..., ceil(m/8)]
    returns: +-1 array of ``dtype``  # [..., m]
    """
    bits = unpack_bits(packed, 1, m).astype(dtype)
    return 2.0 * bits - 1.0
