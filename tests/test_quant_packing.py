"""Bit packing: exact round trips for every width, and the documented LSB-first layout."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kvjax.quant.packing import pack_bits, pack_signs, packed_size, unpack_bits, unpack_signs


@functools.partial(jax.jit, static_argnums=1)
def _round_trip(codes, bits):
    packed = pack_bits(codes, bits)
    return packed, unpack_bits(packed, bits, codes.shape[-1])


@st.composite
def codes_and_bits(draw):
    bits = draw(st.integers(1, 8))
    # Few distinct shapes (each compiles once); widths straddle byte boundaries for every b.
    shape = (draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 2, 5, 7, 8, 13, 64, 67])))
    codes = draw(hnp.arrays(np.uint8, shape, elements=st.integers(0, (1 << bits) - 1)))
    return codes, bits


@settings(max_examples=120, deadline=None)
@given(codes_and_bits())
def test_pack_unpack_round_trip(cb):
    codes, bits = cb
    packed, back = _round_trip(jnp.asarray(codes), bits)
    assert packed.dtype == jnp.uint8
    assert packed.shape == (*codes.shape[:-1], packed_size(codes.shape[-1], bits))
    np.testing.assert_array_equal(np.asarray(back), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_round_trip_every_width_exhaustive(bits):
    # Every code value at every position of a 3-D batch, for each width.
    n = 131
    codes = (np.arange(4 * 2 * n).reshape(4, 2, n) * 7919 % (1 << bits)).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(_round_trip(jnp.asarray(codes), bits)[1]), codes)


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        st.sampled_from([(5,), (2, 8), (3, 67)]),
        # XLA on CPU flushes subnormals to zero, and sign(0) is +1 by our convention.
        elements=st.floats(-10, 10, width=32, allow_subnormal=False),
    )
)
def test_sign_round_trip(x):
    s = jax.jit(lambda x: unpack_signs(pack_signs(x), x.shape[-1]))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(s), np.where(x >= 0, 1.0, -1.0))


def test_layout_is_lsb_first():
    # 2 bits: element i at bits [2i, 2i+2) of byte 0 (KIVI's order within a word).
    assert int(pack_bits(jnp.array([1, 2, 3, 0], jnp.uint8), 2)[0]) == 1 | 2 << 2 | 3 << 4
    # 4 bits: element 2j in the low nibble.
    np.testing.assert_array_equal(pack_bits(jnp.array([0xA, 0x3], jnp.uint8), 4), [0x3A])
    # 3 bits: code j at bit 3j of a little-endian stream, straddling bytes: 5 + 3*8 + 7*64 = 477.
    np.testing.assert_array_equal(pack_bits(jnp.array([5, 3, 7], jnp.uint8), 3), [477 & 255, 1])
    # Packing never mixes vectors: each row packs alone.
    rows = jnp.array([[1, 0, 1], [0, 1, 1]], jnp.uint8)
    np.testing.assert_array_equal(pack_bits(rows, 1), [[0b101], [0b110]])
