"""KV calibration (kvjax/calibrate.py) and calibrated TurboQuant pools (kvjax/cache/layout.py)."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.cache.layout import PoolSpec
from kvjax.calibrate import (
    FILE_JSON,
    KVCalibration,
    channel_order,
    from_samples,
    load_calibration,
)
from kvjax.quant import stored_nbytes

L, H, T, D = 2, 3, 256, 64


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def _planted(rng, n_out: int):
    """Keys/values [L, H, T, D] with n_out planted high-variance channels per (layer, head), and
    a large constant offset on other channels (a mean, not an outlier once centred)."""
    k = rng.standard_normal((L, H, T, D)).astype(np.float32)
    v = rng.standard_normal((L, H, T, D)).astype(np.float32)
    k_hi = np.zeros((L, H, n_out), np.int64)
    v_hi = np.zeros((L, H, n_out), np.int64)
    for li in range(L):
        for h in range(H):
            k_hi[li, h] = np.sort(rng.choice(D, n_out, replace=False))
            v_hi[li, h] = np.sort(rng.choice(D, n_out, replace=False))
            k[li, h, :, k_hi[li, h]] *= 8.0
            v[li, h, :, v_hi[li, h]] *= 8.0
            rest = np.setdiff1d(np.arange(D), k_hi[li, h])[:4]
            k[li, h, :, rest] += 20.0  # energy 400 uncentred, 1 centred
    return k, v, k_hi, v_hi


def test_planted_outlier_channels_are_found(rng):
    n_out = 16
    k, v, k_hi, v_hi = _planted(rng, n_out)
    cal = from_samples(k, v)
    assert cal.shape == (L, H, D)
    np.testing.assert_array_equal(np.sort(cal.k_order[..., :n_out], -1), k_hi)
    np.testing.assert_array_equal(np.sort(cal.v_order[..., :n_out], -1), v_hi)
    np.testing.assert_allclose(cal.k_mean, k.mean(2), atol=1e-5)
    # Orders are permutations; ties go to the lower channel.
    assert channel_order(np.array([1.0, 3.0, 3.0, 0.5])).tolist() == [1, 2, 0, 3]


def test_round_trip_same_codes(rng, tmp_path):
    k, v, _, _ = _planted(rng, 32)
    cal = from_samples(k, v, source="planted")
    cal.save(tmp_path / "cal")
    back = load_calibration(tmp_path / "cal")
    assert back == cal and hash(back) == hash(cal) and back.source == "planted"
    for name in ("k_mean", "k_order", "v_order"):
        np.testing.assert_array_equal(getattr(back, name), getattr(cal, name))
    x = jnp.asarray(k[1, :, :40].transpose(1, 0, 2))  # [40 tokens, H, D]
    for method in ("turbo3.5", "turbo4"):
        for role in ("key", "value"):
            a = PoolSpec(method, role, D, 16, calibration=cal, first_layer=0)
            b = PoolSpec(method, role, D, 16, calibration=back, first_layer=0)
            assert a == b  # same jit cache entry
            for ca, cb in zip(a._encode(x, jnp.int32(1)), b._encode(x, jnp.int32(1)),
                              strict=True):
                np.testing.assert_array_equal(np.asarray(ca), np.asarray(cb))
    # Tampered or mismatched files fail with a message.
    meta = json.loads((tmp_path / "cal" / FILE_JSON).read_text())
    meta["digest"] = "0" * 16
    (tmp_path / "cal" / FILE_JSON).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="digest"):
        load_calibration(tmp_path / "cal")
    with pytest.raises(FileNotFoundError, match="no KV calibration"):
        load_calibration(tmp_path / "missing")
    with pytest.raises(ValueError, match="layers"):
        cal.check(30, H, D)
    with pytest.raises(ValueError, match="layers"):
        cal.check(L, H + 1, D)
    cal.check(L - 1, H, D)  # --num-layers runs use the first layers
    with pytest.raises(ValueError, match="permutation"):
        KVCalibration(cal.k_mean, np.zeros_like(cal.k_order), cal.v_order)


@pytest.mark.parametrize("method", ["turbo2.5", "turbo3", "turbo3.5", "turbo4"])
def test_bytes_per_token_equals_stored_bytes(rng, method):
    k, v, _, _ = _planted(rng, 16)
    cal = from_samples(k, v)
    x = jnp.asarray(rng.standard_normal((24, H, D)), jnp.float32)
    for role in ("key", "value"):
        spec = PoolSpec(method, role, D, 16, calibration=cal)
        codes = spec._encode(x, jnp.int32(0))
        assert stored_nbytes(codes) == spec.bytes_per_token() * 24 * H
        # Calibration adds no per-token byte over the uncalibrated layout.
        assert spec.bytes_per_token() == PoolSpec(method, role, D, 16).bytes_per_token()
        pool = spec.init(L, H, 5)
        assert stored_nbytes(pool) == spec.bytes_per_token() * L * H * 5 * 16


def _write_read(spec: PoolSpec, x: np.ndarray, layer: int) -> np.ndarray:
    """Write x [T, H, D] as one sequence into pages 1.. of a fresh pool and read it back."""
    t = x.shape[0]
    pages = -(-t // spec.page_size)
    pool = spec.init(L, H, pages + 1)
    pos = np.arange(t)
    page_ids = jnp.asarray(1 + pos // spec.page_size)[None]
    pool = spec.write_tokens(pool, jnp.int32(layer), jnp.asarray(x)[None], page_ids,
                             jnp.asarray(pos % spec.page_size)[None])
    table = jnp.arange(1, pages + 1, dtype=jnp.int32)[None]
    out = spec.read(pool, jnp.int32(layer), table)  # [H, 1, pages * page_size, D]
    return np.asarray(out[:, 0, :t]).transpose(1, 0, 2)


def test_calibrated_read_equals_reference(rng):
    k, v, _, _ = _planted(rng, 32)
    cal = from_samples(k, v)
    layer = 1
    x = k[layer].transpose(1, 0, 2)[:48].copy()  # [48, H, D]
    mu = cal.k_mean[layer]
    x[0] = 0.05 * rng.standard_normal((H, D))  # a sink: short, far from the mean
    for method in ("turbo3.5", "turbo4"):
        spec = PoolSpec(method, "key", D, 16, calibration=cal, first_layer=0)
        got = _write_read(spec, x, layer)
        # Reference: centre where it shortens, order outliers-first, quantize, undo.
        centred = np.sum((x - mu) ** 2, -1) < np.sum(x ** 2, -1)  # [T, H]
        assert not centred[0].any() and centred[1:].mean() > 0.9
        y = np.where(centred[..., None], x - mu, x)
        qz = spec.quantizer
        if spec.reordered:
            order = cal.k_order[layer]
            y = np.take_along_axis(y, np.broadcast_to(order, y.shape), -1)
        want = np.asarray(qz.dequantize(qz.quantize(jnp.asarray(y))))
        if spec.reordered:
            want = np.take_along_axis(want, np.broadcast_to(np.argsort(order, -1), y.shape), -1)
        want = np.where(centred[..., None], want + mu, want)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
        rel = np.sum((got - x) ** 2) / np.sum((x - mu) ** 2)
        assert rel < (0.02 if method == "turbo4" else 0.06), (method, rel)


def test_pool_specs_carry_the_calibration(tmp_path):
    """--kv-calibration reaches every quantized segment with its first layer; bf16 segments and
    the byte count are unaffected; a calibration for another model shape is refused."""
    from kvjax.cache.paged import bytes_per_token, init_cache, pool_specs
    from kvjax.config import CacheConfig, ModelConfig

    mc = ModelConfig(arch="llama", vocab_size=64, hidden_size=64, intermediate_size=64,
                     num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e4,
                     max_position=256, rms_norm_eps=1e-5)
    r = np.random.default_rng(0)
    kk = r.standard_normal((3, 2, 64, 16)) + 3.0
    cal = from_samples(kk, r.standard_normal((3, 2, 64, 16)))
    cal.save(tmp_path / "c")
    cc = CacheConfig("turbo3.5", calibration=str(tmp_path / "c"), bf16_layers=(1,))
    specs = [pool_specs(mc, cc, "turbo3.5", start) for start in (0, 2)]
    assert specs[1][0].first_layer == 2 and specs[0][0].calibration == cal
    assert bytes_per_token(mc, cc) == bytes_per_token(mc, CacheConfig("turbo3.5",
                                                                      bf16_layers=(1,)))
    cache = init_cache(mc, cc, num_pages=4)
    assert cache.segments[0].k_spec.transformed and not cache.segments[1].k_spec.calibrated
    with pytest.raises(ValueError, match="layers"):
        pool_specs(mc.__class__(**{**mc.__dict__, "num_layers": 5}), cc, "turbo3.5")


# --- auto:BYTES: per-layer formats from measured layer sensitivities ---------------------------


def _tiny_mc(layers: int = 4):
    from kvjax.config import ModelConfig

    return ModelConfig(arch="llama", vocab_size=64, hidden_size=64, intermediate_size=64,
                       num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=16,
                       rope_theta=1e4, max_position=256, rms_norm_eps=1e-5)


def _with_sens(cal: KVCalibration, mc, kl: np.ndarray, formats: tuple[str, ...]):
    from kvjax.sensitivity import layer_bytes

    return KVCalibration(cal.k_mean, cal.k_order, cal.v_order, source="sens",
                         sens_formats=formats,
                         sens_bytes=tuple(layer_bytes(mc, f) for f in formats),
                         sens_kl=tuple(tuple(r) for r in kl))


def test_choose_formats_is_the_brute_force_optimum(rng):
    """The DP's pick equals exhaustive search over every assignment, for random sensitivities and
    every budget between the smallest and the largest."""
    import itertools

    from kvjax.layer_budget import budget_bytes, choose_formats

    mc = _tiny_mc(5)
    k = rng.standard_normal((5, 2, 32, 16))
    base = from_samples(k, rng.standard_normal((5, 2, 32, 16)))
    formats = ("bf16", "turbo4", "turbo3", "k3v2turbo")
    for _trial in range(3):
        kl = rng.exponential(1.0, (5, 4)) * np.array([0.0, 1.0, 3.0, 6.0])
        cal = _with_sens(base, mc, kl, formats)
        b = np.array(cal.sens_bytes)
        for budget in np.linspace(5 * b.min(), 5 * b.max(), 7):
            picks, used, loss = choose_formats(cal, budget)
            best = min((sum(kl[i, f] for i, f in enumerate(c)), sum(b[list(c)]))
                       for c in itertools.product(range(4), repeat=5)
                       if sum(b[list(c)]) <= budget + 1e-9)
            assert used <= budget + 1e-9 and loss == pytest.approx(best[0], abs=1e-12)
            assert loss == pytest.approx(sum(kl[i, formats.index(f)]
                                             for i, f in enumerate(picks)), abs=1e-12)
    assert budget_bytes(cal, "turbo3", 5) == 5 * cal.sens_bytes[2]
    assert budget_bytes(cal, "1234.5", 5) == 1234.5
    with pytest.raises(ValueError, match="below the smallest"):
        choose_formats(cal, 5 * b.min() - 1)
    with pytest.raises(ValueError, match="not a byte count"):
        budget_bytes(cal, "turbo9", 5)
    with pytest.raises(ValueError, match="no layer sensitivities"):
        choose_formats(base, 1e9)


def test_choose_formats_shrink_and_segment_cap_are_the_brute_force_optimum(rng):
    """With shrinkage toward each format's mean layer KL and a cap on runs of equal formats, the
    DP's pick equals exhaustive search over every assignment with at most that many runs."""
    import itertools

    from kvjax.layer_budget import choose_formats, count_segments

    mc = _tiny_mc(6)
    base = from_samples(rng.standard_normal((6, 2, 32, 16)), rng.standard_normal((6, 2, 32, 16)))
    formats = ("turbo4", "turbo3.5", "turbo3")
    kl = rng.exponential(1.0, (6, 3)) * np.array([1.0, 2.0, 4.0])
    cal = _with_sens(base, mc, kl, formats)
    b = np.array(cal.sens_bytes)
    for shrink, cap in ((0.0, 2), (0.5, 0), (0.5, 3), (1.0, 1)):
        kls = (1 - shrink) * kl + shrink * kl.mean(axis=0, keepdims=True)
        for budget in np.linspace(6 * b.min(), 6 * b.max(), 5):
            picks, used, loss = choose_formats(cal, budget, shrink=shrink, max_segments=cap)
            best = min(sum(kls[i, f] for i, f in enumerate(c))
                       for c in itertools.product(range(3), repeat=6)
                       if sum(b[list(c)]) <= budget + 1e-9
                       and (cap == 0 or count_segments(c) <= cap))
            assert used <= budget + 1e-9 and loss == pytest.approx(best, abs=1e-12)
            assert cap == 0 or count_segments(picks) <= cap
    with pytest.raises(ValueError, match="shrink"):
        choose_formats(cal, 1e9, shrink=1.5)


def test_sensitivity_round_trip_and_old_files(rng, tmp_path):
    """The sensitivity block survives save/load; the npz and digest are unchanged by it, and a
    file without it (the earlier layout) still loads."""
    mc = _tiny_mc(4)
    base = from_samples(rng.standard_normal((4, 2, 32, 16)), rng.standard_normal((4, 2, 32, 16)))
    cal = _with_sens(base, mc, rng.random((4, 3)), ("turbo4", "turbo3", "turbo2.5"))
    assert cal.digest == base.digest
    base.save(tmp_path / "old")
    cal.save(tmp_path / "new")
    assert (tmp_path / "old" / "calibration.npz").read_bytes() == (
        tmp_path / "new" / "calibration.npz").read_bytes()
    back = load_calibration(tmp_path / "new")
    assert back.sens_formats == cal.sens_formats and back.sens_bytes == cal.sens_bytes
    np.testing.assert_array_equal(np.array(back.sens_kl), np.array(cal.sens_kl))
    assert load_calibration(tmp_path / "old").sens_formats == ()
    with pytest.raises(ValueError, match="sensitivity"):
        KVCalibration(base.k_mean, base.k_order, base.v_order, sens_formats=("turbo4",),
                      sens_bytes=(1.0,), sens_kl=((0.1,),) * 3)


def test_auto_dtype_segments_and_bytes(rng, tmp_path):
    """auto:BYTES lays layers out in the chosen formats (segments of mixed dtypes), within the
    budget; bytes per token equal the pools' stored bytes; auto without a calibration fails."""
    from kvjax.cache.paged import bytes_per_token, init_cache
    from kvjax.config import KV_CACHE_DTYPES, CacheConfig, ConfigError, layer_formats
    from kvjax.layer_budget import choose_formats

    mc = _tiny_mc(4)
    base = from_samples(rng.standard_normal((4, 2, 32, 16)) + 2.0,
                        rng.standard_normal((4, 2, 32, 16)))
    formats = ("bf16", "turbo4", "k4v3turbo", "turbo3.5", "turbo3", "k3v2turbo")
    kl = np.array([[0, 1, 2, 3, 4, 9], [0, 0.1, 0.2, 0.3, 0.4, 0.5],
                   [0, 2, 3, 5, 8, 20], [0, 0.01, 0.02, 0.03, 0.04, 0.05]], float)
    cal = _with_sens(base, mc, kl, formats)
    cal.save(tmp_path / "c")
    budget = 4 * cal.sens_bytes[formats.index("turbo3")]
    cc = CacheConfig(f"auto:{budget:g}", calibration=str(tmp_path / "c"))
    want, used, _ = choose_formats(cal, budget)
    assert layer_formats(4, cc) == want and len(set(want)) > 1
    assert layer_formats(4, CacheConfig("auto:turbo3", calibration=str(tmp_path / "c"))) == want
    assert bytes_per_token(mc, cc) == pytest.approx(used) and used <= budget
    cache = init_cache(mc, cc, num_pages=3)
    runs = [f for i, f in enumerate(want) if i == 0 or want[i - 1] != f]
    assert [s.k_spec.method for s in cache.segments] == [KV_CACHE_DTYPES[f][0] for f in runs]
    stored = sum(stored_nbytes(s.k) + stored_nbytes(s.v) for s in cache.segments)
    assert stored == bytes_per_token(mc, cc) * 3 * cc.page_size
    edge = CacheConfig("auto:turbo3", calibration=str(tmp_path / "c"), bf16_edge_layers=1)
    assert layer_formats(4, edge) == ["bf16"] + want[1:3] + ["bf16"]
    with pytest.raises(ConfigError, match="calibration"):
        CacheConfig("auto:4000")
    with pytest.raises(ConfigError, match="below the smallest"):
        layer_formats(4, CacheConfig("auto:10", calibration=str(tmp_path / "c")))


def test_fractional_dtypes_are_per_layer_with_sensitivities(rng, tmp_path, capfd):
    """turbo3.5 / turbo2.5 mean auto:turbo3.5 / auto:turbo2.5 (same bytes) when the calibration
    has layer sensitivities; uniform:NAME and a calibration without them (or none) give the
    uniform layout, the latter with a one-line warning."""
    from kvjax.cache.paged import bytes_per_token
    from kvjax.config import CacheConfig, ConfigError, layer_formats

    mc = dataclasses.replace(_tiny_mc(4), head_dim=64)  # turbo4 > turbo3.5 > turbo3 > turbo2.5
    base = from_samples(rng.standard_normal((4, 2, 32, 64)) + 2.0,
                        rng.standard_normal((4, 2, 32, 64)))
    formats = ("turbo4", "turbo3.5", "turbo3", "turbo2.5", "k3v2turbo")
    kl = np.array([[1, 2, 3, 9, 12], [0.1, 0.2, 0.3, 0.4, 0.5], [2, 5, 8, 20, 30],
                   [0.01, 0.02, 0.03, 0.04, 0.05]])
    _with_sens(base, mc, kl, formats).save(tmp_path / "c")
    base.save(tmp_path / "plain")
    for d in ("turbo3.5", "turbo2.5"):
        cc = CacheConfig(d, calibration=str(tmp_path / "c"))
        auto = layer_formats(4, CacheConfig(f"auto:{d}", calibration=str(tmp_path / "c")))
        assert layer_formats(4, cc) == auto and len(set(auto)) > 1  # 4 layers: under the cap
        assert bytes_per_token(mc, cc) <= bytes_per_token(mc, CacheConfig(f"uniform:{d}"))
        assert layer_formats(4, CacheConfig(f"uniform:{d}", calibration=str(tmp_path / "c"))
                             ) == [d] * 4
    # Many layers whose best formats alternate: the plain name stays within the segment cap.
    from kvjax.layer_budget import PLAIN_MAX_SEGMENTS, count_segments

    many = dataclasses.replace(mc, num_layers=16)
    wide = from_samples(rng.standard_normal((16, 2, 32, 64)), rng.standard_normal((16, 2, 32, 64)))
    alt = np.tile([[1, 2, 3, 9, 12], [0.01, 0.02, 0.03, 0.04, 0.05]], (8, 1))
    _with_sens(wide, many, alt, formats).save(tmp_path / "alt")
    uncapped = layer_formats(16, CacheConfig("auto:turbo3.5", calibration=str(tmp_path / "alt")))
    plain = layer_formats(16, CacheConfig("turbo3.5", calibration=str(tmp_path / "alt")))
    assert count_segments(uncapped) > PLAIN_MAX_SEGMENTS >= count_segments(plain) > 1
    capfd.readouterr()
    assert layer_formats(4, CacheConfig("turbo3.5", calibration=str(tmp_path / "plain"))
                         ) == ["turbo3.5"] * 4
    assert layer_formats(3, CacheConfig("turbo2.5")) == ["turbo2.5"] * 3
    assert layer_formats(4, CacheConfig("turbo3.5", calibration=str(tmp_path / "plain"))
                         ) == ["turbo3.5"] * 4  # the same warning is not repeated
    # A calibration without sensitivities warns once; no calibration at all (the 70B configs) is
    # the documented uniform meaning and stays silent, so a later user error is stderr's only line.
    # (other stderr lines, e.g. from XLA in a fresh environment, are not ours to count)
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(err) == 1 and err[0].startswith("warning: turbo3.5")
    assert "no layer sensitivities" in err[0]
    with pytest.raises(ConfigError, match="uniform"):
        CacheConfig("uniform:turbo4")


@pytest.mark.parametrize("method", ["turbo3.5", "turbo4", "fp8_e4m3"])
def test_roundtrip_equals_write_then_read(rng, method):
    """PoolSpec.roundtrip (what sensitivity measurements use) gives what the pool reader gives."""
    k, v, _, _ = _planted(rng, 16)
    cal = from_samples(k + 3.0, v)
    x = (k[1].transpose(1, 0, 2)[:40] + 3.0).astype(np.float32)
    for role in ("key", "value"):
        spec = PoolSpec(method, role, D, 16, seed=3, calibration=cal)
        got = np.asarray(spec.roundtrip(jnp.asarray(x), jnp.int32(1)))
        np.testing.assert_array_equal(got, _write_read(spec, x, 1))


def test_sens_source_replaces_a_previous_measurement():
    from kvjax.calibrate import sens_source

    first = sens_source("smollm2, 1024 tokens of GPL-3", 768, "/x/GPL-3")
    assert first == "smollm2, 1024 tokens of GPL-3; layer sensitivities on 768 tokens of GPL-3"
    assert sens_source(first, 512, "/y/MPL-2.0") == ("smollm2, 1024 tokens of GPL-3; layer "
                                                     "sensitivities on 512 tokens of MPL-2.0")
