"""kvjax/pool_formats.py: the TPU layouts of the pool leaves (the rule, without compiling), and
the Runner's pinned-format path (run here on CPU with CPU layouts: the TPU path's plumbing,
ahead-of-time executables, slot resets and outside cache assignments) giving the tokens of the
plain path. That the TPU step then has no pool copy is tests/test_compile.py's
(`pool_copy_count` of the compiled SmolLM2 steps)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.experimental.layout import Format, Layout

import kvjax.runner
import models
from kvjax.cache import bytes_per_token, init_cache, window_bytes_per_sequence
from kvjax.config import load_config
from kvjax.engine.request import SamplingParams
from kvjax.generate import Decoder, warm_decode
from kvjax.pool_formats import pool_formats, resident_bytes
from kvjax.runner import Runner

ROOT = Path(__file__).resolve().parents[1]


def _formats(dtype: str, platform: str):
    cfg = load_config("smollm2").replace_cache(dtype=dtype, page_size=0)
    cache = jax.eval_shape(lambda: init_cache(cfg.model, cfg.cache, 65, num_slots=2))
    dev = jax.devices()[0]
    shards = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(dev), cache)
    return cache, pool_formats(cache, shards, platform)


@pytest.mark.parametrize("dtype", ["bf16", "int8", "turbo3.5", "kivi4", "kivi2"])
def test_tpu_pool_layouts(dtype):
    assert _formats(dtype, "cpu")[1] is None and _formats(dtype, "gpu")[1] is None
    cache, fmts = _formats(dtype, "tpu")
    seg, fseg = cache.segments[0], fmts.segments[0]
    pinned = 0
    keys = [True] * len(seg.k) + [False] * len(seg.v)
    for leaf, f, key in zip((*seg.k, *seg.v), (*fseg.k, *fseg.v), keys, strict=True):
        rows, n = leaf.shape[3:]
        if n == 1:  # per-token scales / norms keep XLA's default (what the rowed gather reads)
            assert not isinstance(f, Format)
            continue
        pinned += 1
        item = np.dtype(leaf.dtype).itemsize
        assert f.layout.tiling == ((8, 128), {1: (4, 1), 2: (2, 1)}[item])
        # row-major; a size-1 rows dim (KIVI's per-group key metadata [1, 64]) goes major;
        # kivi2's page-sealed key codes [32, 16] transposed
        want = ((0, 3, 1, 2, 4) if rows == 1 else
                (0, 1, 2, 4, 3) if key and seg.k_spec.group > 1 and n < rows else
                (0, 1, 2, 3, 4))
        assert f.layout.major_to_minor == want
        if dtype == "kivi2" and key and rows == 32:
            assert want == (0, 1, 2, 4, 3)
    assert pinned >= 2  # at least the K and V codes
    # bf16 rings [.., slots, window, d] row-major; sinks and tags default
    for name in ("wk", "wv"):
        if getattr(seg, name) is not None:
            assert getattr(fseg, name).layout.major_to_minor == (0, 1, 2, 3, 4)
    for name in ("wpos", "sk", "sv", "spos"):
        assert not isinstance(getattr(fseg, name), Format)


CFG = load_config("tiny_llama").replace_cache(dtype="int8")  # a window ring: slot resets run


def _cpu_pinned(cache, shards, platform):
    """pool_formats' structure with CPU layouts (row-major, untiled), so the pinned path runs
    on this machine."""
    fmts = pool_formats(cache, shards, "tpu")
    return jax.tree.map(
        lambda f: Format(Layout(f.layout.major_to_minor), f.sharding)
        if isinstance(f, Format) else f, fmts, is_leaf=lambda x: isinstance(x, Format))


def _greedy(runner: Runner, prompt: list[int], n: int) -> list[int]:
    sp = SamplingParams(temperature=0.0)
    warm_decode(runner, len(prompt), len(prompt) + n, sp, seed=0)  # the ahead-of-time path
    dec = Decoder(runner, sp, seed=0)
    out = [dec.prefill(prompt)]
    while len(out) < n:
        out.append(dec.step(out[-1]))
    return out


def test_runner_pinned_formats_give_the_plain_tokens(monkeypatch):
    params = models.random_params(CFG.model, seed=3)
    prompt = list(np.random.default_rng(1).integers(0, 256, 21))
    want = _greedy(Runner(CFG, params, max_seq_len=64), prompt, 12)
    monkeypatch.setattr(kvjax.runner, "pool_formats", _cpu_pinned)
    r = Runner(CFG, params, max_seq_len=64)
    assert r._formats is not None and r.forward is not kvjax.runner.models.forward
    assert _greedy(r, prompt, 12) == want
    # a cache assigned from outside (eviction's compaction) is placed in the formats; after
    # a reset the runner serves the same tokens again
    r.cache = jax.tree.map(lambda x: x + 0, r.cache)
    r.free(0)
    r.reset_cache()
    assert _greedy(r, prompt, 12) == want


_RESIDENT = """
import json
from kvjax.bench.compile_target import target_device
from kvjax.config import load_config
from kvjax.pool_formats import resident_bytes
dev = target_device("tpu-v5e")
out = {}
for d in ("bf16", "int8", "kivi4", "turbo3.5"):
    out[d] = resident_bytes(load_config("smollm2").replace_cache(dtype=d, page_size=0), dev)
cfg = load_config("tiny_llama").replace_cache(dtype="bf16", page_size=16, window=0)
out["d128"] = resident_bytes(cfg.replace_model(head_dim=128), dev)
print("RESULT " + json.dumps(out))
"""


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason='libtpu is not importable: pip install -e ".[compile-tpu]"')
def test_resident_bytes_count_tpu_padding():
    """The memory planner's TPU page size (`resident_bytes`, compiled for v5e without a TPU):
    head_dim 64 leaves are lane-padded to 128, head_dim 128 bf16 is not; the CPU figure is the
    logical one. Run in a subprocess: libtpu stays out of the test process."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _RESIDENT], env=env, capture_output=True,
                       text=True, timeout=600, cwd=ROOT)
    line = next((s for s in r.stdout.splitlines() if s.startswith("RESULT ")), None)
    assert r.returncode == 0 and line, r.stderr[-3000:]
    tpu = json.loads(line[len("RESULT "):])
    for d in ("bf16", "int8", "kivi4", "turbo3.5"):
        cfg = load_config("smollm2").replace_cache(dtype=d, page_size=0)
        logical = bytes_per_token(cfg.model, cfg.cache) * cfg.cache.page_size
        page, slot = resident_bytes(cfg, jax.devices()[0])  # CPU: default layouts
        assert page == logical
        assert slot >= window_bytes_per_sequence(cfg.model, cfg.cache)
        assert tpu[d][0] >= 1.9 * logical, (d, tpu[d][0], logical)  # d64: 64 of 128 lanes
    bf16 = load_config("smollm2").replace_cache(dtype="bf16", page_size=0)
    assert tpu["bf16"][0] == 2 * bytes_per_token(bf16.model, bf16.cache) * bf16.cache.page_size
    assert tpu["kivi4"][0] > 2 * tpu["bf16"][0]  # KIVI's narrow per-page leaves: ~10x
    d128 = load_config("tiny_llama").replace_model(head_dim=128)
    d128 = d128.replace_cache(dtype="bf16", page_size=16, window=0)
    assert tpu["d128"][0] == bytes_per_token(d128.model, d128.cache) * 16  # lanes full
