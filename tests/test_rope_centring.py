"""RoPE-aware key centring (kvjax/calibrate.py format 2, kvjax/cache/layout.py): TurboQuant keys
centred on the position-rotated pre-RoPE mean R(p) mu instead of a post-RoPE mean."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.cache.layout import PoolSpec
from kvjax.calibrate import FILE_JSON, FILE_NPZ, from_samples, load_calibration, unrotate_keys
from models.layers import apply_rope

L, H, D = 2, 3, 64
INV_FREQ = (1.0 / 10000.0 ** (np.arange(0, D, 2) / D)).astype(np.float32)


def _rope(x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """The model's RoPE (models.layers.apply_rope) of x [n, H, D] at positions [n]."""
    return np.array(apply_rope(jnp.asarray(x)[None], jnp.asarray(pos)[None],
                                 jnp.asarray(INV_FREQ))[0])


def _samples(rng, t: int = 256):
    """Post-RoPE keys [L, H, t, D] at positions 0..t-1 whose pre-RoPE keys are mu + noise, with a
    large mean (the case the post-RoPE mean cannot remove from high-frequency pairs)."""
    mu = 4.0 * rng.standard_normal((L, H, D)).astype(np.float32)
    pre = mu[:, :, None] + rng.standard_normal((L, H, t, D)).astype(np.float32)
    k = np.stack([_rope(pre[li].transpose(1, 0, 2), np.arange(t)).transpose(1, 0, 2)
                  for li in range(L)])
    v = rng.standard_normal((L, H, t, D)).astype(np.float32)
    return k, v, pre


@pytest.fixture
def rng():
    return np.random.default_rng(606)


def test_pre_rope_mean_and_round_trip(rng, tmp_path):
    k, v, pre = _samples(rng)
    cal = from_samples(k, v, source="rope", inv_freq=INV_FREQ)
    assert cal.rope_centred
    # The derotated mean is the pre-RoPE keys' mean (f32 angles: ~1e-5).
    np.testing.assert_allclose(cal.k_mean_rope, pre.mean(2), atol=2e-4)
    np.testing.assert_allclose(unrotate_keys(k[0, 0], np.arange(k.shape[2]), INV_FREQ),
                               pre[0, 0], atol=2e-4)
    cal.save(tmp_path / "cal")
    assert json.loads((tmp_path / "cal" / FILE_JSON).read_text())["format"] == 2
    back = load_calibration(tmp_path / "cal")
    assert back == cal and back.rope_centred
    np.testing.assert_array_equal(back.k_mean_rope, cal.k_mean_rope)
    np.testing.assert_array_equal(back.rope_inv_freq, INV_FREQ)
    x = jnp.asarray(k[1, :, :40].transpose(1, 0, 2))
    pos = jnp.arange(40) + 1000
    for method in ("turbo3.5",):
        a = PoolSpec(method, "key", D, 16, calibration=cal)
        b = PoolSpec(method, "key", D, 16, calibration=back)
        assert a == b and a.rope_centred
        for ca, cb in zip(a._encode(x, jnp.int32(1), pos), b._encode(x, jnp.int32(1), pos),
                          strict=True):
            np.testing.assert_array_equal(np.asarray(ca), np.asarray(cb))
        with pytest.raises(ValueError, match="positions"):
            a._encode(x, jnp.int32(1))
    # Values are never centred; the model's RoPE must be the calibration's.
    assert not PoolSpec("turbo4", "value", D, 16, calibration=cal).rope_centred
    with pytest.raises(ValueError, match="RoPE frequencies"):
        cal.check_rope(INV_FREQ * 0.5)
    cal.check_rope(INV_FREQ.copy())


def test_format_1_files_load_and_keep_post_rope_centring(rng, tmp_path):
    k, v, _ = _samples(rng)
    old = from_samples(k, v, source="post")
    rope = from_samples(k, v, source="post", inv_freq=INV_FREQ)
    old.save(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / FILE_JSON).read_text())
    assert meta["format"] == 1
    with np.load(tmp_path / "old" / FILE_NPZ) as z:
        assert sorted(z.files) == ["k_mean", "k_order", "v_order"]
    back = load_calibration(tmp_path / "old")
    assert not back.rope_centred and back.digest == old.digest != rope.digest
    spec = PoolSpec("turbo4", "key", D, 16, calibration=back)
    assert spec.centred and not spec.rope_centred
    x = jnp.asarray(k[0, :, :32].transpose(1, 0, 2))
    rt = jax.jit(spec.roundtrip)
    np.testing.assert_array_equal(np.asarray(rt(x, jnp.int32(0))),
                                  np.asarray(rt(x, jnp.int32(0), jnp.arange(32))))
    # A shipped name resolves and loads either way.
    from kvjax.calibrate import cached_calibration

    assert cached_calibration("smollm2").shape == (30, 3, 64)


def test_rotated_mean_is_exact_at_every_position(rng):
    """Keys equal to R(p) mu quantize with no error once centred (the centred key is 0), at any
    position up to 128K; the post-RoPE mean of the same keys leaves most of them."""
    k, v, _ = _samples(rng)
    cal = from_samples(k, v, inv_freq=INV_FREQ)
    layer = 1
    pos = np.concatenate([np.arange(0, 300), rng.integers(0, 131072, 200)]).astype(np.int32)
    mu = cal.k_mean_rope[layer]  # [H, D]
    x = _rope(np.broadcast_to(mu, (len(pos), H, D)).copy(), pos)
    post = from_samples(k, v)  # the same samples, post-RoPE mean only
    for method in ("turbo4", "turbo2.5"):
        new = PoolSpec(method, "key", D, 16, calibration=cal)
        got = np.asarray(jax.jit(new.roundtrip)(jnp.asarray(x), jnp.int32(layer),
                                                jnp.asarray(pos)))
        np.testing.assert_allclose(got, x, atol=1e-5 * np.abs(x).max())
        was = np.asarray(jax.jit(PoolSpec(method, "key", D, 16, calibration=post).roundtrip)(
            jnp.asarray(x), jnp.int32(layer)))
        assert np.abs(was - x).max() > 0.05 * np.abs(x).max()


def test_pool_write_read_uses_absolute_positions(rng):
    """write_tokens + read (the XLA path's gather) equal roundtrip at the same absolute positions,
    including positions that are not the cache positions (after eviction)."""
    k, v, pre = _samples(rng)
    cal = from_samples(k, v, inv_freq=INV_FREQ)
    spec = PoolSpec("turbo3.5", "key", D, 16, calibration=cal)
    t, layer = 40, 1
    abs_pos = np.concatenate([np.arange(20), 5000 + np.arange(20)]).astype(np.int32)
    x = _rope(pre[layer].transpose(1, 0, 2)[:t], abs_pos)  # keys at their absolute positions
    x[0] = 0.05 * rng.standard_normal((H, D))  # a sink: stays uncentred
    pages = 1 + np.arange(t) // 16
    pool = spec.init(L, H, int(pages.max()) + 1)
    pool = jax.jit(spec.write_tokens)(pool, jnp.int32(layer), jnp.asarray(x)[None],
                             jnp.asarray(pages)[None], jnp.asarray(np.arange(t) % 16)[None],
                             jnp.asarray(abs_pos)[None])
    table = jnp.arange(1, int(pages.max()) + 1, dtype=jnp.int32)[None]
    read_pos = np.zeros(table.shape[1] * 16, np.int32)
    read_pos[:t] = abs_pos
    read = jax.jit(spec.read)
    got = np.asarray(read(pool, jnp.int32(layer), table, jnp.asarray(read_pos)[None]))
    ref = np.asarray(jax.jit(spec.roundtrip)(jnp.asarray(x), jnp.int32(layer),
                                             jnp.asarray(abs_pos)))
    np.testing.assert_allclose(got[:, 0, :t].transpose(1, 0, 2), ref, atol=1e-6)
    # Reading at other positions adds another mean: the positions matter.
    wrong = np.asarray(read(pool, jnp.int32(layer), table,
                            jnp.asarray(np.arange(table.shape[1] * 16, dtype=np.int32))[None]))
    assert np.abs(wrong[:, 0, 20:t].transpose(1, 0, 2) - ref[20:]).max() > 0.1
