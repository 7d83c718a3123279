"""Quantized weights (kvjax/quant/weights.py): the codes against numpy, `linear` against a dot
with the dequantized weight, GGUF Q4_0/Q4_1 blocks bit for bit against the gguf package, and the
whole model with int8/int4 weights against the same model run on their dequantized values."""

import dataclasses
import secrets

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from test_loaders import TINY, random_params, write_gguf

from kvjax import loaders
from kvjax.config import load_config
from kvjax.quant import weights
from kvjax.runner import Runner
from models.layers import linear

GGUF = {"layers.wq": "attn_q", "layers.wk": "attn_k", "layers.wv": "attn_v",
        "layers.wo": "attn_output", "layers.w_gate": "ffn_gate", "layers.w_up": "ffn_up",
        "layers.w_down": "ffn_down"}


@pytest.fixture
def rng():
    seed = secrets.randbits(32)
    print(f"random seed {seed}")
    return np.random.default_rng(seed)


@pytest.mark.parametrize("group", [32, None])
def test_int8_codes(rng, group):
    w = rng.standard_normal((3, 96, 40)).astype(np.float32) * rng.uniform(0.1, 3, (1, 1, 40))
    q = weights.quantize_int8(w, group)
    n = 96 // (group or 96)
    assert q.q.dtype == np.int8 and q.scale.shape == (3, n, 40) and q.shape == w.shape
    g = w.reshape(3, n, 96 // n, 40)
    np.testing.assert_allclose(q.scale, np.abs(g).max(axis=2) / 127, rtol=1e-6)
    err = np.abs(weights.dequantize(q) - w)
    assert np.all(err <= np.repeat(q.scale, 96 // n, axis=1) / 2 * (1 + 1e-5))


def test_int4_group_codes_and_packing(rng):
    w = rng.standard_normal((2, 128, 24)).astype(np.float32)
    q = weights.quantize_int4(w)
    assert q.packed.dtype == np.uint8 and q.packed.shape == (2, 64, 24)
    assert q.scale.shape == q.min.shape == (2, 4, 24) and q.group == 32 and q.shape == w.shape
    g = w.reshape(2, 4, 32, 24)
    np.testing.assert_allclose(q.min, g.min(axis=2), rtol=1e-6)
    np.testing.assert_allclose(q.scale, (g.max(axis=2) - g.min(axis=2)) / 15, rtol=1e-5)
    err = np.abs(weights.dequantize(q) - w)
    assert np.all(err <= np.repeat(q.scale, 32, axis=1) / 2 * (1 + 1e-4))
    # Row r in the low nibble, row r + in/2 in the high nibble.
    codes = weights.unpack_int4(q)
    np.testing.assert_array_equal(q.packed & 15, codes[:, :64])
    np.testing.assert_array_equal(q.packed >> 4, codes[:, 64:])
    with pytest.raises(ValueError, match="multiple of 64"):
        weights.quantize_int4(w[:, :96])


@pytest.mark.parametrize("kind", ["int8", "int8_channel", "int4"])
@pytest.mark.parametrize("lead", [(1, 1), (2, 3)])
def test_linear_equals_dot_with_dequantized(rng, kind, lead):
    w = rng.standard_normal((192, 48)).astype(np.float32)
    q = weights.quantize_int8(w, None) if kind == "int8_channel" else weights.quantize(w, kind)
    x = rng.standard_normal((*lead, 192)).astype(np.float32)
    got = np.asarray(linear(jnp.asarray(x), jax_tree(q)))
    want = x.astype(np.float64) @ weights.dequantize(q).astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # and the plain path is the plain dot
    np.testing.assert_allclose(np.asarray(linear(jnp.asarray(x), jnp.asarray(w))), x @ w,
                               rtol=1e-4, atol=1e-4)


def jax_tree(q):
    return type(q)(*(jnp.asarray(getattr(q, f.name)) for f in dataclasses.fields(q)))


@pytest.mark.parametrize("qt", [QT.Q4_0, QT.Q4_1, QT.Q8_0])
def test_gguf_blocks_bit_for_bit(rng, qt):
    w = (rng.standard_normal((48, 128)) * rng.uniform(0.1, 2, (48, 1))).astype(np.float32)
    raw = gguf.quants.quantize(w, qt)
    want = gguf.quants.dequantize(raw, qt).reshape(48, 128)
    q = (weights.from_gguf_q8_0(raw, (48, 128)) if qt == QT.Q8_0
         else weights.from_gguf_q4(raw, qt.name, (48, 128)))
    assert q.shape == (128, 48)
    np.testing.assert_array_equal(weights.dequantize(q).T, want)


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_gguf_load_keeps_blocks_and_model_matches(tmp_path, rng, kind):
    """A GGUF with Q4_0/Q4_1/Q8_0 projections loads with --weight-dtype int4 (int8) into
    Int4Weights (Int8Weights): Q4 (Q8_0) blocks exactly, with llama's permuted Q/K rows undone
    (write_gguf permutes them), the others requantized; the model on them gives the logits of
    the model on their dequantized values."""
    mc = TINY["tiny_llama"]
    params = random_params(mc, rng)
    qtypes = {}
    for i in range(mc.num_layers):
        for j, n in enumerate(GGUF.values()):
            qtypes[f"blk.{i}.{n}.weight"] = (QT.Q4_0, QT.Q4_1, QT.Q8_0)[(i + j) % 3]
    path = str(write_gguf(tmp_path / "q.gguf", mc, params, qtypes=qtypes))
    f32, _ = loaders.load(path, mc)
    q4, _ = loaders.load(path, dataclasses.replace(mc, weight_dtype=kind))
    exact = (QT.Q8_0,) if kind == "int8" else (QT.Q4_0, QT.Q4_1)
    cls = weights.Int8Weight if kind == "int8" else weights.Int4Weight
    r = gguf.GGUFReader(path)
    raw = {t.name: t for t in r.tensors}
    for name in weights.QUANTIZED:
        assert isinstance(q4[name], cls), name
        deq = weights.dequantize(q4[name])
        for i in range(mc.num_layers):
            gname = f"blk.{i}.{GGUF[name]}.weight"
            if raw[gname].tensor_type in exact:
                np.testing.assert_array_equal(deq[i], f32[name][i], err_msg=gname)
            else:  # requantized: within half a step of its group
                step = np.repeat(np.asarray(q4[name].scale[i]), 32, axis=0)
                assert np.all(np.abs(deq[i] - f32[name][i]) <= step / 2 * 1.001), gname

    cfg = dataclasses.replace(load_config("tiny_llama"), model=mc)
    tokens = rng.integers(0, mc.vocab_size, 24).tolist()
    deq_params = {k: weights.dequantize(v) if weights.is_quantized(v) else v
                  for k, v in q4.items()}
    want = np.asarray(Runner(cfg, deq_params, 24).step([0], [tokens])[0])
    cfg4 = cfg.replace_model(weight_dtype=kind)
    got = np.asarray(Runner(cfg4, q4, 24).step([0], [tokens])[0])
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_runner_quantizes_float_params(rng, kind):
    """Float params + weight_dtype: the Runner quantizes the projections, holds them quantized,
    and its logits equal the float model's on the dequantized weights."""
    cfg = load_config("tiny_qwen2").replace_model(weight_dtype=kind)
    params = random_params(cfg.model, rng)
    runner = Runner(cfg, params, 16)
    held = dict(runner.params["layers"].items())
    assert all(weights.is_quantized(held[n.split(".")[1]].get_value())
               for n in weights.QUANTIZED)
    f32_bytes = sum(v.nbytes for v in params.values())
    assert weights.nbytes(runner.params) < (0.5 if kind == "int8" else 0.4) * f32_bytes
    deq = {k: (weights.dequantize(weights.quantize(v, kind)) if k in weights.QUANTIZED else v)
           for k, v in params.items()}
    tokens = rng.integers(0, cfg.model.vocab_size, 12).tolist()
    got = np.asarray(runner.step([0], [tokens])[0])
    want = np.asarray(Runner(cfg.replace_model(weight_dtype="auto"), deq, 16)
                      .step([0], [tokens])[0])
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
