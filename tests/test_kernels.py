"""Pallas decode kernels against the XLA path (kvjax.attention) in interpret mode on the CPU, and
their lowering for cuda (Triton custom call) and tpu (Mosaic custom call) without the hardware.

Every case builds a real cache segment: pages poisoned with NaN bit patterns first (0xFF.. words
are NaN in bf16, f16 and fp8), then the sequences' tokens written through the cache's own write
path, so the slots past each length, unowned pages, the null page and the unwritten ring entries
all hold NaN. Page tables are shuffled, lengths ragged (one row shorter than the window, one a
whole page table long).
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import pallas_kernels
from kvjax.attention import attend, gather_kv, paged_attention_step
from kvjax.attention import paged_attention as xla_attention
from kvjax.cache.paged import init_cache, write_layer
from kvjax.calibrate import KVCalibration
from kvjax.config import CacheConfig, ModelConfig
from kvjax.pallas_kernels import kivi_attention, paged_decode, turboquant_attention
from kvjax.pool_formats import whole_operand


def _poison(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.full(x.shape, jnp.nan, x.dtype)
    return jnp.full(x.shape, -1, jnp.int32).astype(x.dtype)  # all bits set


def calibration_dir(tmp: str, *, layers: int, hkv: int, d: int, seed: int = 0,
                    rope: bool = False, mc: ModelConfig | None = None) -> str:
    """A KV calibration (kvjax/calibrate.py) with random channel orders per (layer, head) and a
    key mean near the test keys' (outlier channel 3 at +4), saved under tmp. rope: format 2,
    with the RoPE frequencies of mc (default: the kernel cases' model config)."""
    rng = np.random.default_rng(seed)
    k_mean = 0.3 * rng.standard_normal((layers, hkv, d)).astype(np.float32)
    k_mean[..., 3] += 4.0
    order = np.argsort(rng.random((2, layers, hkv, d)), axis=-1)
    extra = {}
    if rope:  # RoPE-centred keys (format 2): the same mean, taken as the pre-RoPE one
        from models.layers import rope_inv_freq

        theta = rope_inv_freq(mc or ModelConfig(num_layers=layers, num_heads=hkv,
                                                num_kv_heads=hkv, head_dim=d, hidden_size=64,
                                                intermediate_size=64, vocab_size=32))
        extra = dict(k_mean_rope=k_mean, rope_inv_freq=theta)
    KVCalibration(k_mean=k_mean, k_order=order[0], v_order=order[1], **extra).save(tmp)
    return tmp


def make_case(dtype: str, *, d: int, g: int, page_size: int, window: int | None = None,
              hkv: int = 2, max_pages: int = 6, layers: int = 2, lengths=None, seed: int = 0,
              calibration: str = "", sinks: int = -1):
    """(q [b,1,H,d], segment, page_table, lengths, window_slots) with layer 1 filled.
    sinks: CacheConfig.sink_tokens (exact sink tokens per sequence).
    calibration: a KV calibration directory; then every 5th key is a short "sink" (centring
    would lengthen it: stored uncentred), so both flag values occur."""
    assert layers >= 2
    rng = np.random.default_rng(seed)
    mc = ModelConfig(num_layers=layers, num_heads=g * hkv, num_kv_heads=hkv, head_dim=d,
                     hidden_size=64, intermediate_size=64, vocab_size=32)
    if window is None:  # no window, except KIVI's default (it needs one)
        window = -1 if dtype.startswith("kivi") else 0
    cc = CacheConfig(dtype=dtype, page_size=page_size, window=window, calibration=calibration,
                     sink_tokens=sinks)
    # Sequences longer than the window by a few pages: otherwise the ring holds every token and
    # the kernel never reads a page.
    max_pages = max(max_pages, cc.window_for(dtype) // page_size + 3)
    b = 3
    num_pages = b * max_pages + 3
    seg = jax.tree.map(_poison, init_cache(mc, cc, num_pages, num_slots=b).segments[0])
    cap = max_pages * page_size
    if lengths is None:
        lengths = [cap, int(rng.integers(1, 8)), int(rng.integers(cap // 3, cap))]
    lengths = np.asarray(lengths, np.int32)
    free = rng.permutation(np.arange(1, num_pages))
    pt = np.zeros((b, max_pages), np.int32)
    for i in range(b):
        need = -(-int(lengths[i]) // page_size)
        pt[i, :need] = free[i * max_pages: i * max_pages + need]
    pos = np.tile(np.arange(cap, dtype=np.int32), (b, 1))
    slots = rng.permutation(b).astype(np.int32)
    # Only layer 1 is written: layer 0 stays NaN, so reading the wrong layer shows.
    k = rng.standard_normal((b, cap, hkv, d)).astype(np.float32)
    v = rng.standard_normal((b, cap, hkv, d)).astype(np.float32)
    k[..., 3] += 4.0  # a persistent outlier channel, like real keys
    if calibration:
        k[:, ::5] *= 0.1
    seg = write_layer(seg, jnp.int32(1), jnp.asarray(k), jnp.asarray(v), jnp.asarray(pos),
                      jnp.asarray(lengths), jnp.asarray(pt), jnp.asarray(slots))
    q = jnp.asarray(rng.standard_normal((b, 1, g * hkv, d)).astype(np.float32))
    return q, seg, jnp.asarray(pt), jnp.asarray(lengths), jnp.asarray(slots)


# (dtype, head_dim, GQA ratio, page_size, window)
CASES = [
    ("bf16", 128, 8, 32, -1),
    ("fp8", 64, 1, 16, 32),
    ("int8", 128, 3, 16, -1),
    ("int4", 64, 8, 16, -1),
    ("k8v4turbo", 128, 3, 16, -1),
    ("kivi2", 64, 3, 32, 32),
    ("kivi4", 128, 8, 32, 64),
    ("turbo3", 64, 8, 16, 32),
    ("turbo2.5", 128, 3, 16, -1),
    ("turbo3.5", 64, 1, 16, -1),
    ("turbo3", 128, 3, 32, 32),  # Triton: blocks of half a page (16 of its 32 tokens)
]


def _check(case, backend: str, k_splits: int = 2, tol: float = 0.0, calibration: str = "",
           pinned: bool = False):
    dtype, d, g, ps, w = case
    q, seg, pt, lens, slots = make_case(dtype, d=d, g=g, page_size=ps, window=w,
                                        seed=zlib.crc32(repr(case).encode()),
                                        calibration=calibration)
    seg = seg.replace(pinned=pinned)
    if calibration:
        assert seg.k_spec.centred and pallas_kernels.supports(seg)
        assert seg.k_spec.rope_centred == seg.k_spec.calibration.rope_centred
    layer = jnp.int32(1)
    ref = xla_attention(q, seg, layer, pt, lens, (lens - 1)[:, None], slots)
    out = pallas_kernels.paged_attention(q, seg, layer, pt, lens,
                                         slots if seg.window or seg.sinks else None,
                                         backend=backend, k_splits=k_splits)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not np.isnan(np.asarray(ref)).any()
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=tol or 2e-5,
                               rtol=tol or 1e-5)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-d{c[1]}-g{c[2]}-p{c[3]}-w{c[4]}")
def test_gather_kernel_matches_xla(case):
    """The GPU (Triton) kernel body, run by the Pallas interpreter."""
    _check(case, "interpret")


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[5], CASES[9]],
                         ids=lambda c: f"{c[0]}-d{c[1]}-g{c[2]}")
def test_tpu_kernel_matches_xla(case):
    """The TPU (scalar prefetch, one page per grid step) kernel, run by the interpreter."""
    _check(case, "interpret_tpu", k_splits=3)


@pytest.mark.parametrize("case", [CASES[1], CASES[6]], ids=lambda c: f"{c[0]}-d{c[1]}-g{c[2]}")
def test_tpu_kernel_whole_pinned_pool(case):
    """A pinned pool (the Runner's on TPU) goes to the kernel whole where its layout allows
    (fp8 d64 codes; kivi4 d128's codes, its per-group scales sliced; rings sliced): the index
    maps then address layer 1 of the whole pool, whose layer 0 is NaN."""
    dtype, d = case[0], case[1]
    seg = make_case(dtype, d=d, g=case[2], page_size=case[3], window=case[4])[1]
    whole = [whole_operand(seg.replace(pinned=True), x) for x in (*seg.k, *seg.v)]
    assert any(whole) and not any(whole_operand(seg, x) for x in seg.k)
    _check(case, "interpret_tpu", k_splits=3, pinned=True)


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="compiled Triton kernels need a GPU (scripts/device_check.sh)")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-d{c[1]}-g{c[2]}-p{c[3]}-w{c[4]}")
def test_triton_kernel_matches_xla_on_gpu(case):
    """The compiled Triton kernel on a real GPU (TF32 dots on both sides: looser tolerance)."""
    _check(case, "triton", tol=2e-2)


# Windows 0 or 32 (not the 128-token default, which would cover these short sequences whole and
# leave the pages unread).
CALIBRATED = [("turbo2.5", 128, 3, 16, 0), ("turbo3.5", 64, 8, 16, 32), ("turbo4", 64, 1, 32, 0),
              ("turbo3", 128, 3, 32, 32)]


@pytest.mark.parametrize("backend", ["interpret", "interpret_tpu"])
@pytest.mark.parametrize("case", CALIBRATED, ids=lambda c: f"{c[0]}-d{c[1]}-g{c[2]}-p{c[3]}")
def test_calibrated_turbo_matches_xla(case, backend, tmp_path):
    """Calibrated TurboQuant pools (keys centred per token, channels reordered per layer and KV
    head; smollm2's default): the kernels read them like the XLA path does. Two of the cases
    centre keys on R(p) mu (RoPE-centred, format 2; among them the Triton half-page blocks):
    the kernels add back flag * <q, R(p) mu> from each token's position."""
    rope = (case, backend) in ((CALIBRATED[3], "interpret"), (CALIBRATED[2], "interpret_tpu"))
    cal = calibration_dir(str(tmp_path / "cal"), layers=2, hkv=2, d=case[1],
                          seed=zlib.crc32(repr(case).encode()), rope=rope)
    _check(case, backend, k_splits=3 if backend == "interpret_tpu" else 2, calibration=cal)


MASS = [("int8", 64, 3, 16, 32), ("turbo3.5", 64, 8, 16, 0), ("kivi4", 64, 3, 32, 32),
        ("bf16", 128, 1, 32, 0)]


@pytest.mark.parametrize("backend", ["interpret", "interpret_tpu"])
@pytest.mark.parametrize("case", MASS, ids=lambda c: f"{c[0]}-d{c[1]}-g{c[2]}-p{c[3]}-w{c[4]}")
def test_attention_mass_matches_numpy_and_xla(case, backend):
    """H2O's side output: per cached position, the softmax mass its key got this step summed
    over the query heads of its KV head; equals a numpy softmax of the same (dequantized) keys'
    scores and the XLA path's mass, window positions included; an idle row gets none."""
    dtype, d, g, ps, w = case
    q, seg, pt, lens, slots = make_case(dtype, d=d, g=g, page_size=ps, window=w,
                                        seed=zlib.crc32(repr(case).encode()))
    lens = lens.at[1].set(0)  # an idle batch slot
    layer, win = jnp.int32(1), slots if seg.window or seg.sinks else None
    out, mass = pallas_kernels.paged_attention(q, seg, layer, pt, lens, win, backend=backend,
                                               k_splits=3, with_mass=True)
    plain = pallas_kernels.paged_attention(q, seg, layer, pt, lens, win, backend=backend,
                                           k_splits=3)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))
    k, v = gather_kv(seg, layer, pt, lens, slots if seg.window or seg.sinks else None)
    _, ref = attend(q, k, v, lens, (lens - 1)[:, None], with_mass=True)
    b, _, nh, _ = q.shape
    kn = np.asarray(k, np.float64)  # [kvh, b, T, d]
    qn = np.asarray(q, np.float64).reshape(b, kn.shape[0], g, d) / np.sqrt(d)
    sc = np.einsum("bhgd,hbtd->bhgt", qn, np.nan_to_num(kn))
    valid = np.arange(kn.shape[2])[None, :] < np.asarray(lens)[:, None]  # [b, T]
    sc = np.where(valid[:, None, None], sc, -np.inf)
    p = np.exp(sc - np.where(valid.any(1), sc.max(-1).T, 0).T[..., None])
    want = (p / np.maximum(p.sum(-1, keepdims=True), 1e-30)).sum(2)  # [b, kvh, T]
    assert mass.shape == want.shape and not np.isnan(np.asarray(mass)).any()
    np.testing.assert_allclose(np.asarray(mass), want, atol=2e-6)
    np.testing.assert_allclose(np.asarray(mass), np.asarray(ref), atol=2e-6)
    np.testing.assert_allclose(np.asarray(mass).sum(-1)[lens > 0], g, rtol=1e-5)
    assert not np.asarray(mass[1]).any()


def test_h2o_step_takes_the_kernel_and_adds_the_same_mass():
    """paged_attention_step with impl "pallas" on a segment that tracks H2O mass runs the decode
    kernel (its side output) and accumulates the XLA path's mass per (page, head, slot)."""
    q, seg, pt, lens, slots = make_case("kivi2", d=64, g=3, page_size=32, window=32)
    seg = seg.replace(mass=jnp.asarray(
        np.random.default_rng(0).random((seg.k[0].shape[2], 2, 32)), jnp.float32))
    args = (q, seg, jnp.int32(1), pt, lens, (lens - 1)[:, None], slots)
    out_x, seg_x = paged_attention_step(*args, impl="xla")
    pallas_kernels.paged_attention.clear_cache()
    out_p, seg_p = paged_attention_step(*args, impl="pallas")
    assert pallas_kernels.paged_attention._cache_size() == 1  # the kernel ran (not XLA)
    np.testing.assert_allclose(np.asarray(out_p), np.asarray(out_x), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(seg_p.mass), np.asarray(seg_x.mass), atol=2e-6)
    assert float(jnp.sum(seg_p.mass - seg.mass)) == pytest.approx(3 * 2 * 3, rel=1e-5)


@pytest.mark.parametrize("backend", ["interpret", "interpret_tpu"])
def test_ring_entries_a_row_did_not_write_are_not_read(backend):
    """Window ring tags (seg.wpos): a position whose entry was not written by this sequence is
    read from its page, like the XLA path does. Row 0: entries of positions [64, 80) untagged
    and NaN (a prefix hit at 80 whose first chunk was 16 tokens); row 2: every entry tagged for
    another sequence's positions (a reused slot) and NaN. Output and H2O mass equal XLA's."""
    q, seg, pt, lens, slots = make_case("int8", d=64, g=3, page_size=16, window=32,
                                        lengths=[96, 40, 70])
    w, layer = seg.window, jnp.int32(1)
    wpos, wk, wv = seg.wpos, seg.wk, seg.wv
    nan = jnp.uint16(0xFFFF)
    for pos in range(64, 80):
        e, sl = pos % w, int(slots[0])
        wpos, wk, wv = (wpos.at[1, sl, e].set(-1), wk.at[1, :, sl, e].set(nan),
                        wv.at[1, :, sl, e].set(nan))
    sl = int(slots[2])
    wpos = wpos.at[1, sl].set(wpos[1, sl] + 7 * w)
    wk, wv = wk.at[1, :, sl].set(nan), wv.at[1, :, sl].set(nan)
    check_output_and_mass(q, seg.replace(wpos=wpos, wk=wk, wv=wv), layer, pt, lens, slots,
                          backend)


def check_output_and_mass(q, seg, layer, pt, lens, slots, backend: str) -> jax.Array:
    """The decode kernel's output and H2O mass (k_splits 2) equal the XLA path's, which holds no
    NaN (poisoned entries the kernel must not read); returns the XLA output."""
    ref = xla_attention(q, seg, layer, pt, lens, (lens - 1)[:, None], slots)
    out, mass = pallas_kernels.paged_attention(q, seg, layer, pt, lens, slots, backend=backend,
                                               k_splits=2, with_mass=True)
    assert not np.isnan(np.asarray(ref)).any()
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=1e-5)
    k, v = gather_kv(seg, layer, pt, lens, slots)
    _, ref_mass = attend(q, k, v, lens, (lens - 1)[:, None], with_mass=True)
    np.testing.assert_allclose(np.asarray(mass), np.asarray(ref_mass), atol=2e-6)
    return ref


def test_one_split_and_idle_rows():
    """k_splits=1, and a zero-length row (an idle batch slot) gives zeros like the XLA path."""
    q, seg, pt, lens, slots = make_case("int8", d=64, g=3, page_size=16, lengths=[0, 17, 96])
    # device_check.sh runs this on the GPU too, where f32 dots default to TF32 (3e-4 apart)
    with jax.default_matmul_precision("highest"):
        ref = xla_attention(q, seg, jnp.int32(1), pt, lens, (lens - 1)[:, None], slots)
        out = pallas_kernels.paged_attention(q, seg, jnp.int32(1), pt, lens,
                                             backend="interpret", k_splits=1)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=1e-5)
    assert not np.asarray(out[0]).any()


LOWER = [("bf16", 128), ("fp8", 64), ("int4", 128), ("kivi2", 128), ("turbo3", 64),
         ("turbo3.5", 128)]


@pytest.mark.parametrize("platform,backend,marker", [
    ("cuda", "triton", "__gpu$xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")])
@pytest.mark.parametrize("dtype,d", LOWER)
def test_lowers_for_gpu_and_tpu(dtype, d, platform, backend, marker):
    window = 32 if dtype.startswith(("kivi", "turbo")) else -1
    q, seg, pt, lens, slots = make_case(dtype, d=d, g=3, page_size=32, window=window)

    def f(q, seg, pt, lens, slots):
        return pallas_kernels.paged_attention(q, seg, jnp.int32(1), pt, lens,
                                              slots if seg.window or seg.sinks else None,
                                              backend=backend)

    text = jax.jit(f).trace(q, seg, pt, lens, slots).lower(
        lowering_platforms=(platform,)).as_text()
    assert marker in text


def test_family_wrappers_validate():
    q, seg, pt, lens, slots = make_case("bf16", d=64, g=3, page_size=16)
    with pytest.raises(ValueError, match="one decode token"):
        paged_decode.paged_decode_attention(jnp.concatenate([q, q], 1), seg, jnp.int32(0),
                                               pt, lens, backend="interpret")
    with pytest.raises(ValueError, match="KIVI keys"):
        kivi_attention.kivi_decode_attention(q, seg, jnp.int32(0), pt, lens,
                                             backend="interpret")
    with pytest.raises(ValueError, match="TurboQuant"):
        turboquant_attention.turboquant_decode_attention(q, seg, jnp.int32(0), pt, lens,
                                                         backend="interpret")
    with pytest.raises(ValueError, match="page_table"):
        paged_decode.paged_decode_attention(q, seg, jnp.int32(0), pt[:1], lens,
                                               backend="interpret")
    with pytest.raises(ValueError, match="unknown Pallas backend"):
        pallas_kernels.paged_attention(q, seg, jnp.int32(0), pt, lens, backend="cuda")


def test_polar_has_no_kernel_and_falls_back():
    q, seg, pt, lens, slots = make_case("polar", d=64, g=3, page_size=16, lengths=[20, 5, 9])
    assert not pallas_kernels.supports(seg)
    a = xla_attention(q, seg, jnp.int32(1), pt, lens, (lens - 1)[:, None], impl="pallas")
    b = xla_attention(q, seg, jnp.int32(1), pt, lens, (lens - 1)[:, None])
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tpu_call_takes_one_layer_of_the_pool():
    """The Mosaic call gets the layer's slice of each pool leaf, not the [layers, ...] pool: XLA
    relayouts TPU operands whose last dim is under 128 lanes, and a whole-pool operand made that
    a copy of every layer's pages in every layer (SmolLM2 bf16 at 128K did not fit v5e HBM)."""
    q, seg, pt, lens, slots = make_case("int8", d=64, g=3, page_size=16)
    n_layers, hkv, n_pages, rows, n = seg.k[0].shape  # [layers, kv_heads, pages, 16, 64]
    assert n_layers == 2

    def f(q, seg, pt, lens, slots):
        return pallas_kernels.paged_attention(q, seg, jnp.int32(1), pt, lens, slots,
                                              backend="tpu")

    text = jax.jit(f).trace(q, seg, pt, lens, slots).lower(lowering_platforms=("tpu",)).as_text()
    call = next(ln for ln in text.splitlines() if "tpu_custom_call" in ln)
    assert f"tensor<{hkv * n_pages}x{rows}x{n}xi8>" in call  # int8 codes
    # f16 scales: only the page table's pages, gathered into lane-dense [B, Hkv, R, 1, 128]
    # int32 rows (_rowed.py, 128 / page_size pages per row), never the layer's [.., 16, 1] leaf
    bsz, r = pt.shape[0], -(-pt.shape[1] * rows // 128)
    assert f"tensor<{bsz}x{hkv}x{r}x1x128xi32>" in call
    assert "xui16>" not in call and f"tensor<{n_layers * hkv * n_pages}x" not in call
