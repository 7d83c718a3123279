"""SmolLM2 decoding with --attention-impl pallas gives the same greedy tokens as xla, for each
cache dtype family. Both impls decode from the same prefilled cache (prefill always takes the XLA
path); the Pallas kernels run in interpret mode on the CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kvjax import pallas_kernels
from kvjax.config import load_config
from kvjax.loaders import load
from kvjax.runner import Runner

TEXT = "/usr/share/common-licenses/Apache-2.0"
STEPS = 6


@pytest.fixture(scope="module")
def smollm2():
    cfg = load_config("smollm2")
    params, tokenizer = load("smollm2", cfg.model)
    with open(TEXT) as f:
        ids = tokenizer.encode(f.read())
    return cfg, params, ids


def _greedy(runner: Runner, logits: jax.Array, steps: int) -> list[list[int]]:
    out = []
    for _ in range(steps):
        tokens = [int(t) for t in np.asarray(jnp.argmax(logits, axis=-1))]
        out.append(tokens)
        logits = runner.step([0, 1], [[t] for t in tokens])[:, 0]
    return out


@pytest.mark.parametrize("dtype", ["bf16", "fp8", "int8", "kivi2", "turbo3", "turbo3.5"])
def test_pallas_decode_gives_xla_greedy_tokens(smollm2, dtype):
    cfg, params, ids = smollm2
    # Per-token formats without a window, so the kernels read the prompt's pages, not the ring.
    # smollm2's default KV calibration stays on: turbo pools are centred (and turbo3.5's
    # channels reordered) per layer and head, and the kernels read them (asserted below: a
    # silent XLA fallback would make this comparison trivial).
    cfg = cfg.replace_cache(dtype=dtype, page_size=0,
                            window=-1 if dtype.startswith("kivi") else 0)
    prompts = [ids[:150], ids[200:270]]  # ragged; kivi2 reads sealed pages + its 128 window
    runner = Runner(cfg, params, max_seq_len=160 + STEPS, max_batch=2)
    assert all(pallas_kernels.supports(seg) for seg in runner.cache.segments)
    if dtype.startswith("turbo"):
        assert all(seg.k_spec.centred for seg in runner.cache.segments if seg.k_spec.calibrated)
        assert any(seg.k_spec.calibrated for seg in runner.cache.segments)
    last = jnp.stack([runner.prefill(i, p, chunk=64) for i, p in enumerate(prompts)])
    cache, lengths = jax.tree.map(jnp.copy, runner.cache), dict(runner.lengths)

    xla = _greedy(runner, last, STEPS)

    model = nnx.merge(runner.graphdef, runner.params)
    model.attention_impl = "pallas"
    runner.graphdef = nnx.split(model)[0]
    runner.cache, runner.lengths = cache, lengths
    pallas = _greedy(runner, last, STEPS)
    assert pallas == xla
