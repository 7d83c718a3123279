"""KIVI: quantizer error bounds, the residual-window bookkeeping table, per-sequence groups."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.quant import KiviStream, make_quantizer

D, R, G = 64, 128, 32
# kivi-and-eviction.md 1.5: (#quantized K, #fp K, #quantized V, #fp V) after prefill of T tokens and
# after the given number of decode steps.
STEPS = (0, 1, 28, 29, 100, 156, 157)
TABLE = {
    100: [(0, 100, 0, 100), (0, 101, 0, 101), (128, 0, 0, 128), (128, 1, 1, 128),
          (128, 72, 72, 128), (256, 0, 128, 128), (256, 1, 129, 128)],
    128: [(128, 0, 0, 128), (128, 1, 1, 128), (128, 28, 28, 128), (128, 29, 29, 128),
          (128, 100, 100, 128), (256, 28, 156, 128), (256, 29, 157, 128)],
    300: [(256, 44, 172, 128), (256, 45, 173, 128), (256, 72, 200, 128), (256, 73, 201, 128),
          (384, 16, 272, 128), (384, 72, 328, 128), (384, 73, 329, 128)],
    512: [(512, 0, 384, 128), (512, 1, 385, 128), (512, 28, 412, 128), (512, 29, 413, 128),
          (512, 100, 484, 128), (640, 28, 540, 128), (640, 29, 541, 128)],
}  # fmt: skip


@pytest.fixture
def rng():
    seed = int(np.random.SeedSequence().entropy % 2**31)
    print(f"random seed: {seed}")
    return np.random.default_rng(seed)


def _stream(bits=2, max_len=768):
    kq = make_quantizer(f"kivi{bits}", D, role="key")
    vq = make_quantizer(f"kivi{bits}", D, role="value")
    return KiviStream(key=kq, value=vq, max_len=max_len, residual=R)


@jax.jit
def _round_trip(qz, x):
    return qz.dequantize(qz.quantize(x))


def test_bookkeeping_table(rng):
    s = _stream()
    append, prefill = jax.jit(s.append), jax.jit(s.prefill)
    for t, expected in TABLE.items():
        kv = rng.standard_normal((2, 3, t + 157, D)).astype(np.float32)  # 3 kv heads
        st = prefill(kv[0, :, :t], kv[1, :, :t])
        got = [st.counts()]
        for i in range(157):
            st = append(st, kv[0, :, t + i], kv[1, :, t + i])
            if i + 1 in STEPS:
                got.append(st.counts())
        assert got == expected, t
        # What attention reads: full-precision tokens are exact, quantized ones come from groups
        # aligned to the sequence start (G-token key groups, never straddling the sealed boundary).
        k_hat, v_hat = (np.asarray(a) for a in jax.jit(s.materialize)(st))
        n_kq, n_kr, n_vq, n_vr = st.counts()
        length = t + 157
        np.testing.assert_array_equal(k_hat[:, n_kq:length], kv[0, :, n_kq:length])
        np.testing.assert_array_equal(v_hat[:, n_vq:length], kv[1, :, n_vq:length])
        assert not k_hat[:, length:].any() and not v_hat[:, length:].any()
        direct = _round_trip(s.key, kv[0, :, :n_kq].reshape(3, n_kq // G, G, D))
        np.testing.assert_array_equal(k_hat[:, :n_kq], np.asarray(direct).reshape(3, n_kq, D))
        np.testing.assert_array_equal(v_hat[:, :n_vq], _round_trip(s.value, kv[1, :, :n_vq]))


def test_sequences_never_share_groups(rng):
    # Two sequences of different lengths in one vmapped batch evolve exactly as they do alone.
    s = _stream()
    kv = rng.standard_normal((2, 2, 400, D)).astype(np.float32)
    lens = (100, 300)
    prefill = jax.jit(s.prefill)
    alone = [prefill(kv[0, b, :t], kv[1, b, :t]) for b, t in enumerate(lens)]
    batch = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *alone)
    append = jax.jit(s.append)
    vappend = jax.jit(jax.vmap(s.append))
    for i in range(40):
        k_new = np.stack([kv[0, b, t + i] for b, t in enumerate(lens)])
        v_new = np.stack([kv[1, b, t + i] for b, t in enumerate(lens)])
        batch = vappend(batch, k_new, v_new)
        alone = [append(st, k_new[b], v_new[b]) for b, st in enumerate(alone)]
    for b, st in enumerate(alone):
        mine = jax.tree_util.tree_map(lambda a, b=b: a[b], batch)
        jax.tree_util.tree_map(np.testing.assert_array_equal, mine, st)


@pytest.mark.parametrize("bits", [2, 4])
def test_quantizer_error_bound_and_scores(rng, bits):
    kq = make_quantizer(f"kivi{bits}", D, role="key")
    vq = make_quantizer(f"kivi{bits}", D, role="value")
    k = rng.standard_normal((4, G, D)).astype(np.float32) * rng.uniform(0.1, 10, size=D)
    kc = kq.quantize(k)
    k_hat = np.asarray(kq.dequantize(kc))
    step = np.asarray(kc.scale, np.float32)[:, None, :]  # per (group, channel)
    zero = np.abs(np.asarray(kc.zero, np.float32))[:, None, :]
    assert np.all(np.abs(k_hat - k) <= step / 2 + 1e-3 * (step + zero) + 1e-6)
    # Scores fold the per-channel scale into q; equal to q . dequantized keys.
    q = rng.standard_normal((5, 1, D)).astype(np.float32)  # batch [5, 1] vs 4 groups
    np.testing.assert_allclose(
        kq.scores(q, kc), np.sum(q[..., None, :] * k_hat, -1), rtol=1e-4, atol=1e-4 * D
    )
    v = rng.standard_normal((50, D)).astype(np.float32)
    vc = vq.quantize(v)
    step = np.repeat(np.asarray(vc.scale, np.float32), G, axis=-1)
    zero = np.repeat(np.abs(np.asarray(vc.zero, np.float32)), G, axis=-1)
    err = np.abs(np.asarray(vq.dequantize(vc)) - v)
    assert np.all(err <= step / 2 + 1e-3 * (step + zero) + 1e-6)


def test_constant_group_does_not_divide_by_zero(rng):
    kq = make_quantizer("kivi2", D, role="key")
    vq = make_quantizer("kivi2", D, role="value")
    # A constant exactly representable in the f16 zero point: scale 0, exact reconstruction.
    c = float(np.float16(rng.uniform(-3, 3)))
    codes = kq.quantize(np.full((G, D), c, np.float32))
    assert not np.asarray(codes.scale, np.float32).any()
    np.testing.assert_array_equal(kq.dequantize(codes), c)
    # Any other constant: finite, and within half an f16 ulp of the value.
    c = np.float32(rng.uniform(-3, 3))
    k_hat = np.asarray(kq.dequantize(kq.quantize(np.full((G, D), c, np.float32))))
    assert np.all(np.isfinite(k_hat)) and np.all(np.abs(k_hat - c) <= abs(c) * 2.0**-11)
    v_hat = np.asarray(vq.dequantize(vq.quantize(np.zeros((3, D), np.float32))))
    assert np.all(v_hat == 0)
