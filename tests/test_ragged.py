"""The full-precision-chunk rule (kvjax.attention) and the ragged paged-attention kernel
(kvjax/pallas_kernels/ragged_attention.py) against it, in interpret mode on the CPU: the
Triton/gather launcher and the TPU (Mosaic) launcher of ragged_tpu.py.

Every case builds a real segment: pools and ring poisoned with NaN bit patterns, each row's
earlier context written through the cache's write path, then one step mixing a fresh prefill
chunk, a decode row, a chunk after a context and a chunk after a prefix hit (its ring slot's
tags cleared mid-context: the ring holds only a suffix of the window) is written and attended.
Page tables are shuffled; lengths ragged; the step's padding rows are not compared.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.attention import gather_kv
from kvjax.attention import paged_attention as xla_attention
from kvjax.cache.paged import init_cache, write_layer
from kvjax.config import CacheConfig, ModelConfig
from kvjax.pallas_kernels import ragged_attention
from tests.test_kernels import _poison, calibration_dir


def make_step(dtype: str, *, d: int, g: int, page_size: int, window: int, t: int = 16,
              hkv: int = 2, seed: int = 0, calibration: str = "", sinks: int = -1):
    """(q, k_new, v_new [b, t, ...], segment holding layer 1's context before the step (the
    model attends before writing a chunk), page_table, lengths, positions, window slots).
    calibration: a KV calibration directory (TurboQuant); every 5th context key is then a short
    "sink" (stored uncentred), so both values of the centred flag occur. sinks: CacheConfig's
    sink_tokens."""
    rng = np.random.default_rng(seed)
    mc = ModelConfig(num_layers=2, num_heads=g * hkv, num_kv_heads=hkv, head_dim=d,
                     hidden_size=64, intermediate_size=64, vocab_size=32)
    cc = CacheConfig(dtype=dtype, page_size=page_size, window=window, calibration=calibration,
                     sink_tokens=sinks)
    w = cc.window_for(dtype)
    b = 4
    max_pages = (w + 2 * t) // page_size + 3
    cap = max_pages * page_size
    num_pages = b * max_pages + 3
    seg = jax.tree.map(_poison, init_cache(mc, cc, num_pages, num_slots=b).segments[0])
    # Rows: a fresh prefill chunk, a decode step, a chunk after a context, a chunk after a
    # prefix hit (context in two writes, the ring slot's tags cleared between them).
    ctx = np.array([0, int(rng.integers(w + 1, cap - t)), int(rng.integers(1, cap - t)),
                    int(rng.integers(w + 2, cap - t))], np.int32)
    n = np.array([t, 1, int(rng.integers(2, t)), int(rng.integers(2, t))], np.int32)
    lengths = ctx + n
    free = rng.permutation(np.arange(1, num_pages))
    pt = np.zeros((b, max_pages), np.int32)
    for i in range(b):
        need = -(-int(lengths[i]) // page_size)
        pt[i, :need] = free[i * max_pages: i * max_pages + need]
    slots = rng.permutation(b).astype(np.int32)
    layer = jnp.int32(1)

    def write(seg, k, v, pos, lens):
        return write_layer(seg, layer, jnp.asarray(k), jnp.asarray(v), jnp.asarray(pos),
                           jnp.asarray(lens), jnp.asarray(pt), jnp.asarray(slots))

    k = rng.standard_normal((b, cap, hkv, d)).astype(np.float32)
    v = rng.standard_normal((b, cap, hkv, d)).astype(np.float32)
    k[..., 3] += 4.0  # a persistent outlier channel, like real keys
    if calibration:
        k[:, ::5] *= 0.1
    pos = np.tile(np.arange(cap, dtype=np.int32), (b, 1))
    hit = ctx.copy()
    hit[3] = ctx[3] - int(rng.integers(1, max(2, w // 2)))  # the prefix hit's cached part
    seg = write(seg, k, v, pos, hit)
    if seg.window:
        seg = seg.replace(wpos=seg.wpos.at[:, slots[3]].set(-1))
    seg = write(seg, k, v, pos, ctx)  # the rest of row 3's context (others: rewritten alike)
    k_new = rng.standard_normal((b, t, hkv, d)).astype(np.float32)
    v_new = rng.standard_normal((b, t, hkv, d)).astype(np.float32)
    k_new[..., 3] += 4.0
    positions = ctx[:, None] + np.arange(t, dtype=np.int32)
    q = rng.standard_normal((b, t, g * hkv, d)).astype(np.float32)
    return (jnp.asarray(q), jnp.asarray(k_new), jnp.asarray(v_new), seg, jnp.asarray(pt),
            jnp.asarray(lengths), jnp.asarray(positions), jnp.asarray(slots))


def _valid(positions, lengths) -> np.ndarray:
    return np.asarray(positions < lengths[:, None])


def test_xla_rule_equals_dense_reference():
    """The oracle: every row of a multi-token step (the decode row too) attends to its chunk's
    own K/V as computed and to earlier positions dequantized (pages + window)."""
    q, kn, vn, seg, pt, lens, pos, slots = make_step("int4", d=64, g=3, page_size=16, window=32)
    layer = jnp.int32(1)
    got = np.asarray(xla_attention(q, seg, layer, pt, lens, pos, slots, chunk_kv=(kn, vn)))
    kc, vc = gather_kv(seg, layer, pt, pos[:, 0], slots)  # dequantized [hkv, b, L, d]
    kc, vc = np.asarray(kc), np.asarray(vc)
    b, t, nh, d = q.shape
    hkv = kn.shape[2]
    for i in range(b):
        start, length = int(pos[i, 0]), int(lens[i])
        kk = np.concatenate([kc[:, i, :start], np.moveaxis(np.asarray(kn[i, :length - start]),
                                                           1, 0)], 1)  # [hkv, length, d]
        vv = np.concatenate([vc[:, i, :start], np.moveaxis(np.asarray(vn[i, :length - start]),
                                                           1, 0)], 1)
        assert np.isfinite(kk).all() and np.isfinite(vv).all()
        for j in range(length - start):
            for h in range(nh):
                s = kk[h // (nh // hkv), : start + j + 1] @ np.asarray(q[i, j, h]) / np.sqrt(d)
                p = np.exp(s - s.max())
                want = (p / p.sum()) @ vv[h // (nh // hkv), : start + j + 1]
                np.testing.assert_allclose(got[i, j, h], want, rtol=2e-4, atol=2e-5)


# (dtype, head_dim, GQA ratio, page_size, window): every family the decode kernels read.
CASES = [
    ("bf16", 128, 8, 16, 0),
    ("fp8", 64, 3, 16, 32),
    ("int8", 128, 1, 32, 0),
    ("int4", 64, 8, 16, 32),
    ("kivi2", 64, 3, 32, 32),
    ("kivi4", 128, 1, 32, 64),
    ("turbo3.5", 64, 3, 16, 32),
    ("turbo4", 128, 8, 16, 0),
]


# The compiled Triton kernel on a real GPU: bf16, int8, kivi4, turbo3.5 at GQA 3 and 8, head_dim 64
# and 128 (each step mixes prefill chunks and a decode row). The cases not in CASES run through
# the same launcher in interpret mode on the CPU too (test_ragged_kernel_matches_xla), so on the
# GPU only the backend differs.
GPU_CASES = [
    ("bf16", 128, 8, 16, 0),
    ("int8", 64, 3, 16, 32),
    ("kivi4", 128, 8, 32, 64),
    ("turbo3.5", 64, 3, 16, 32),
    ("turbo3.5", 128, 8, 32, 0),
]
_ids = lambda c: f"{c[0]}-d{c[1]}-g{c[2]}-p{c[3]}-w{c[4]}"  # noqa: E731


def _assert_matches_xla(case: tuple, backend: str, q_block: int = 0, tol: float = 0.0,
                        pinned: bool = False) -> None:
    """One CASES step through the ragged kernel with `backend` == the XLA oracle on every
    valid query row (tol: atol and rtol for a GPU's TF32 dots; default 2e-5 / 1e-5); pinned:
    the segment marked as stored in the TPU's pinned layouts (whole-pool kernel operands)."""
    dtype, d, g, ps, w = case
    q, kn, vn, seg, pt, lens, pos, slots = make_step(
        dtype, d=d, g=g, page_size=ps, window=w, seed=zlib.crc32(repr(case).encode()))
    seg = seg.replace(pinned=pinned)
    layer = jnp.int32(1)
    slots = slots if seg.window or seg.sinks else None
    ref = np.asarray(xla_attention(q, seg, layer, pt, lens, pos, slots, chunk_kv=(kn, vn)))
    out = ragged_attention.ragged_paged_attention(q, kn, vn, seg, layer, pt, lens, pos, slots,
                                                  backend=backend, q_block=q_block)
    assert out.shape == q.shape and out.dtype == q.dtype
    out = np.asarray(out)
    assert np.isfinite(out).all()
    valid = _valid(pos, lens)
    assert np.isfinite(ref[valid]).all()
    np.testing.assert_allclose(out[valid], ref[valid], atol=tol or 2e-5, rtol=tol or 1e-5)


@pytest.mark.parametrize("case", CASES + [c for c in GPU_CASES if c not in CASES], ids=_ids)
def test_ragged_kernel_matches_xla(case):
    _assert_matches_xla(case, "interpret")


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="compiled Triton kernels need a GPU (scripts/device_check.sh)")
@pytest.mark.parametrize("case", GPU_CASES, ids=_ids)
def test_ragged_triton_kernel_matches_xla_on_gpu(case):
    """The Triton-compiled ragged kernel on a real GPU (TF32 dots on both sides: the decode
    kernels' GPU tolerance, tests/test_kernels.py)."""
    _assert_matches_xla(case, "triton", tol=2e-2)


# The TPU (Mosaic) launcher, interpreted: every case once, half of them with 4-token query
# blocks (several blocks per row: the causal diagonal across blocks, blocks past a short chunk).
@pytest.mark.parametrize("case,q_block", [(c, 4 if i % 2 else 0) for i, c in enumerate(CASES)],
                         ids=lambda c: f"{c[0]}-d{c[1]}-g{c[2]}-p{c[3]}-w{c[4]}"
                         if isinstance(c, tuple) else f"qb{c}")
def test_ragged_tpu_launcher_matches_xla(case, q_block):
    _assert_matches_xla(case, "interpret_tpu", q_block)


@pytest.mark.parametrize("case", [CASES[1], CASES[5]], ids=_ids)
def test_ragged_tpu_launcher_whole_pinned_pool(case):
    """A pinned pool goes whole where its layout allows (fp8 d64 codes; kivi4 d128 codes, its
    per-group scales sliced; rings sliced): the index maps address layer 1 of it."""
    _assert_matches_xla(case, "interpret_tpu", 4, pinned=True)


@pytest.mark.parametrize("rope", [False, True], ids=["post", "rope"])
@pytest.mark.parametrize("backend", ["interpret", "interpret_tpu"])
def test_ragged_calibrated_turbo_matches_xla(backend, rope, tmp_path):
    """Calibrated TurboQuant pools (keys centred + channels reordered per layer and KV head,
    values reordered: smollm2's default) through both launchers == the oracle; keys centred on
    the post-RoPE mean or on R(p) mu (RoPE-centred, format 2)."""
    case = ("turbo3.5", 64, 3, 16, 32)
    cal = calibration_dir(str(tmp_path / "cal"), layers=2, hkv=2, d=64, seed=3, rope=rope)
    q, kn, vn, seg, pt, lens, pos, slots = make_step("turbo3.5", d=64, g=3, page_size=16,
                                                     window=32, seed=11, calibration=cal)
    assert seg.k_spec.transformed and seg.k_spec.centred and seg.k_spec.reordered, case
    assert seg.k_spec.rope_centred == rope
    layer = jnp.int32(1)
    ref = np.asarray(xla_attention(q, seg, layer, pt, lens, pos, slots, chunk_kv=(kn, vn)))
    out = np.asarray(ragged_attention.ragged_paged_attention(
        q, kn, vn, seg, layer, pt, lens, pos, slots, backend=backend))
    valid = _valid(pos, lens)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[valid], ref[valid], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("platform,marker", [("tpu", "tpu_custom_call"),
                                             ("cuda", "__gpu$xla.gpu.triton")])
def test_auto_backend_lowers_to_the_kernel(platform, marker):
    """backend "auto" picks the lowering per platform: a step lowered for TPU holds the Mosaic
    call (not the XLA oracle), for GPU the Triton one."""
    q, kn, vn, seg, pt, lens, pos, slots = make_step("int4", d=64, g=3, page_size=16, window=32,
                                                     t=8)

    def f(q, kn, vn, seg, pt, lens, pos, slots):
        return ragged_attention.ragged_paged_attention(q, kn, vn, seg, jnp.int32(1), pt, lens,
                                                       pos, slots)

    text = jax.jit(f).trace(q, kn, vn, seg, pt, lens, pos, slots).lower(
        lowering_platforms=(platform,)).as_text()
    assert marker in text and "kvjax_ragged_paged_attention" in text


def test_ragged_rejects_bad_shapes():
    q, kn, vn, seg, pt, lens, pos, slots = make_step("bf16", d=64, g=1, page_size=16, window=0,
                                                     t=4)
    with pytest.raises(ValueError, match="k_new"):
        ragged_attention.ragged_paged_attention(q, kn[:, :2], vn, seg, jnp.int32(1), pt, lens,
                                                pos, backend="interpret")
    with pytest.raises(ValueError, match="backend"):
        ragged_attention.ragged_paged_attention(q, kn, vn, seg, jnp.int32(1), pt, lens, pos,
                                                backend="mosaic")
