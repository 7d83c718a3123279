"""The common interface: registry, code layouts, bytes accounting, jit/vmap, score consistency."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.quant import VALID_NAMES, KiviKeyQuantizer, make_quantizer, stored_nbytes


@pytest.fixture
def rng():
    seed = int(np.random.SeedSequence().entropy % 2**31)
    print(f"random seed: {seed}")
    return np.random.default_rng(seed)


def _build(name, d, role):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # uncalibrated static FP8 / outlier splits
        return make_quantizer(name, d, seed=1, role=role)


def _quantize(qz, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return jax.jit(qz.quantize)(x)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("role", ["key", "value"])
def test_bytes_per_token_and_layout(rng, d, role):
    # [kv_heads=3, pages=2, page_size=32] tokens; KIVI keys come as [..., groups, G, d].
    x = rng.standard_normal((3, 2, 32, d)).astype(np.float32)
    for name in VALID_NAMES:
        qz = _build(name, d, role)
        kivi_key = isinstance(qz, KiviKeyQuantizer)
        codes = _quantize(qz, x)
        batch = (3, 2) if kivi_key else (3, 2, 32)
        for leaf in jax.tree_util.tree_leaves(codes):
            assert leaf.shape[: len(batch)] == batch, (name, leaf.shape)
            assert leaf.ndim == len(batch) + (2 if kivi_key and leaf.dtype == jnp.uint8 else 1)
        assert stored_nbytes(codes) / x[..., 0].size == qz.bytes_per_token(), name
        x_hat = np.asarray(qz.dequantize(codes))
        assert x_hat.shape == x.shape and np.all(np.isfinite(x_hat)), name


@pytest.mark.parametrize("role", ["key", "value"])
def test_scores_match_dequantized_dot_and_vmap(rng, role):
    d = 64
    k = rng.standard_normal((2, 32, d)).astype(np.float32)
    q = rng.standard_normal((5, 1, 1, d)).astype(np.float32)  # [heads, 1, 1] vs keys [2, 32]
    for name in VALID_NAMES:
        qz = _build(name, d, role)
        codes = _quantize(qz, k)
        k_hat = np.asarray(qz.dequantize(codes))
        if isinstance(qz, KiviKeyQuantizer):  # groups: q batch broadcasts against [2] groups
            s = qz.scores(q[:, :, 0], codes)
        else:
            s = jax.jit(qz.scores)(q, codes)
        np.testing.assert_allclose(
            s, np.sum(q * k_hat, -1), rtol=1e-4, atol=1e-4 * np.sqrt(d) * 10, err_msg=name
        )
        # vmap over the leading axis gives the same codes as the batched call.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vcodes = jax.vmap(qz.quantize)(k)
        jax.tree_util.tree_map(np.testing.assert_array_equal, vcodes, codes)


def test_bad_name_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: bf16, fp8_e4m3"):
        make_quantizer("turbo5", 128)
    with pytest.raises(TypeError):
        make_quantizer("int8", 128, group_size=4)
    assert make_quantizer("turbo", 128, bits=3).bits == 3
    assert make_quantizer("turbo3", 128, role="value").bits == 3  # mse for values
    assert make_quantizer("turbo3", 128).mse.bits == 2  # prod for keys: 2-bit mse + QJL


def test_fp8_int_accuracy_and_static_scale(rng):
    x = rng.standard_normal((256, 128)).astype(np.float32) * rng.uniform(0.01, 20, (256, 1))
    amax = np.abs(x).max(-1, keepdims=True)
    for name, rel in [("fp8_e4m3", 2**-4), ("fp8_e5m2", 2**-3)]:
        qz = make_quantizer(name, 128)
        err = np.abs(np.asarray(qz.dequantize(qz.quantize(x))) - x)
        # Relative error of a normal fp8 number, plus the subnormal floor near 0.
        assert np.all(err <= rel * np.abs(x) + amax * 2.0**-14), name
    for name, qmax in [("int8", 127), ("int4", 7)]:
        qz = make_quantizer(name, 128)
        err = np.abs(np.asarray(qz.dequantize(qz.quantize(x))) - x)
        assert np.all(err <= amax / qmax * 0.501 + 1e-6), name
    static = make_quantizer("fp8_e4m3_static", 128)
    with pytest.warns(UserWarning, match="left at 1.0"):
        static.quantize(x)
    cal = static.calibrate(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = np.asarray(cal.dequantize(cal.quantize(x * 3)))  # beyond the headroom: saturates
    assert np.all(np.isfinite(y))
    assert np.abs(y).max() <= np.abs(x).max() * 2 * 1.0001
