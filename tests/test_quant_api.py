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


@jax.jit
def _run(qz, x, q):
    """Everything a test needs from one quantizer, in one compiled call per (quantizer, shape)."""
    codes = qz.quantize(x)
    x_hat = qz.dequantize(codes)
    if isinstance(qz, KiviKeyQuantizer):  # q's batch broadcasts against the [..., groups] axes
        scores = qz.scores(q[..., 0, :], codes)
    else:
        scores = qz.scores(q, codes)
    return codes, x_hat, scores, jax.vmap(qz.quantize)(x)


def _quantize(qz, x, q):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _run(qz, x, q)


# Value quantizers differ from key quantizers only for these names; the rest are checked as keys.
ROLE_DEPENDENT = [n for n in VALID_NAMES if n.startswith("kivi") or n[5:6].isdigit()]


@pytest.mark.parametrize(
    "d,role,names",
    [(64, "key", VALID_NAMES), (128, "key", VALID_NAMES), (64, "value", ROLE_DEPENDENT),
     (128, "value", ROLE_DEPENDENT)],
)
def test_interface_contract(rng, d, role, names):
    """Layout, bytes_per_token == stored bytes / tokens, scores == q . x_hat, vmap == batch."""
    # [kv_heads=3, pages=2, page_size=32] tokens; KIVI keys come as [..., groups, G, d].
    x = rng.standard_normal((3, 2, 32, d)).astype(np.float32)
    q = rng.standard_normal((5, 1, 1, 1, d)).astype(np.float32)  # 5 query heads vs every key
    for name in names:
        qz = _build(name, d, role)
        kivi_key = isinstance(qz, KiviKeyQuantizer)
        codes, x_hat, s, vcodes = _quantize(qz, x, q)
        batch = (3, 2) if kivi_key else (3, 2, 32)
        for leaf in jax.tree_util.tree_leaves(codes):
            assert leaf.shape[: len(batch)] == batch, (name, leaf.shape)
            assert leaf.ndim == len(batch) + (2 if kivi_key and leaf.dtype == jnp.uint8 else 1)
        assert stored_nbytes(codes) / x[..., 0].size == qz.bytes_per_token(), name
        x_hat = np.asarray(x_hat)
        assert x_hat.shape == x.shape and np.all(np.isfinite(x_hat)), name
        np.testing.assert_allclose(
            s, np.sum(q * x_hat, -1), rtol=1e-4, atol=1e-3 * np.sqrt(d), err_msg=name
        )
        jax.tree_util.tree_map(np.testing.assert_array_equal, vcodes, codes)


def test_bad_name_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: bf16, fp8_e4m3"):
        make_quantizer("turbo5", 128)
    with pytest.raises(TypeError):
        make_quantizer("int8", 128, group_size=4)
    assert make_quantizer("turbo", 128, bits=3).bits == 3
    assert make_quantizer("turbo3", 128, role="value").bits == 3  # mse for values
    key = make_quantizer("turbo3", 128)  # keys: mse too (QJL measured worse), norm-corrected
    assert key.bits == 3 and key.norm_correct
    assert make_quantizer("turbo_prod3", 128).mse.bits == 2  # the QJL form: 2-bit mse + QJL


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
