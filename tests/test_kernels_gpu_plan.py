"""The gather (Triton) launcher's plan and tile forms: split-KV sized to fill the GPU, packed codes
as one channel-order tile, the centroid select tree; each against its reference (the phase tiles,
the select chain, the XLA path)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.attention import paged_attention as xla_attention
from kvjax.pallas_kernels import _core, formats_for, turboquant_attention
from kvjax.pallas_kernels._formats import (
    Loader,
    from_phases,
    lookup,
    unpack_channels,
    unpack_phases,
)
from kvjax.quant.packing import pack_bits
from tests.test_kernels import make_case


def test_auto_splits_fill_the_gpu():
    programs = _core.GPU_SMS * _core.PROGRAMS_PER_SM
    # the bench's batch 1 x 8 KV heads at 128K (16-token pages, 32-token blocks): >= 528 programs
    s = _core.auto_splits(1, 8, 131072 // 32, 32)
    assert 8 * s >= programs and 8 * (s - 1) < programs
    assert _core.auto_splits(8, 8, 131072 // 32, 32) == 9  # batch 8: about as before (8)
    assert _core.auto_splits(1, 8, 4096 // 32, 32) == 4096 // _core.MIN_SPLIT_TOKENS
    assert _core.auto_splits(1, 1, 3, 32) == 1  # 96 tokens: one split
    assert _core.auto_splits(128, 8, 100, 32) == 1  # the grid is full without splits


class _Ref:
    """A tile source for Loader: lanes are pl.ds slices of a [T, n] array."""

    def __init__(self, x):
        self.x, self.shape, self.dtype = x, x.shape, x.dtype


def _fetch(ref, lanes):
    stop = lanes.start + lanes.size * lanes.stride
    return ref.x[:, lanes.start:stop:lanes.stride]


@pytest.mark.parametrize("bits,n", [(1, 64), (1, 128), (2, 32), (2, 64), (3, 64), (4, 32),
                                    (4, 128)])
def test_channel_order_tile_equals_the_codes(bits, n):
    codes = np.random.default_rng(bits * n).integers(0, 2 ** bits, (16, n)).astype(np.int32)
    packed = pack_bits(jnp.asarray(codes), bits)
    ld = Loader([_Ref(packed)], _fetch)
    got = np.asarray(unpack_channels(ld, 0, bits, n))
    np.testing.assert_array_equal(got, codes)
    phases = jnp.stack(unpack_phases(ld, 0, bits, n), axis=-2)  # the TPU form, re-interleaved
    np.testing.assert_array_equal(np.asarray(from_phases(phases)), codes)


@pytest.mark.parametrize("dtype", ["turbo4", "turbo3.5", "k8v4turbo"])  # 16-entry tables
def test_select_tree_equals_the_chain(dtype):
    _, seg, *_ = make_case(dtype, d=64, g=1, page_size=16)
    k, v = formats_for(seg)
    parts = [p for f in (k, v) for p in getattr(f, "parts", ())]
    assert parts and any(len(p.centroids) == 16 for p in parts)
    for p in parts:
        codes = jnp.arange(len(p.centroids), dtype=jnp.int32)[None, :]
        chain = np.asarray(lookup(codes, p.centroids))
        np.testing.assert_array_equal(np.asarray(lookup(codes, p.centroids, tree=True)), chain)
        np.testing.assert_array_equal(chain[0], np.float32(p.centroids))


@pytest.mark.parametrize("dtype,d,g,ps", [("bf16", 128, 8, 32), ("turbo3.5", 64, 3, 16),
                                          ("kivi2", 64, 1, 32)])
def test_auto_splits_kernel_matches_xla(dtype, d, g, ps, monkeypatch):
    """k_splits=0 (auto) with splits of a few blocks (MIN_SPLIT_TOKENS lowered: the test's
    contexts are short) on the gather launcher == the XLA path."""
    monkeypatch.setattr(_core, "MIN_SPLIT_TOKENS", 16)
    q, seg, pt, lens, slots = make_case(dtype, d=d, g=g, page_size=ps)
    kf, vf = formats_for(seg)
    win = slots if seg.window or seg.sinks else None
    with jax.default_matmul_precision("highest"):
        ref = xla_attention(q, seg, jnp.int32(1), pt, lens, (lens - 1)[:, None], win)
        out = _core.decode(q, seg, jnp.int32(1), pt, lens, win, kf, vf, backend="interpret")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=1e-5)


def test_gather_form_only_on_gather_launchers():
    _, seg, *_ = make_case("turbo3.5", d=64, g=1, page_size=16)
    k, v = formats_for(seg)
    assert isinstance(k, turboquant_attention.TurboKey) and not k.channel_order
    assert k.gather_form().channel_order and v.gather_form().channel_order
    # phase forms (TPU, ragged) keep their per-phase query inputs; the gather form merges the
    # 3-bit part's 4-column phases into one input
    q = jnp.ones((1, 1, 16, 64), jnp.float32)
    assert len(k.gather_form().prepare_q(q)) < len(k.prepare_q(q))
