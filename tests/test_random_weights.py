"""kvjax.random_weights (--random-weights): models.random_params' values, drawn into each device's
shards, with bounded memory.

Runs in a subprocess (8 fake CPU devices need XLA_FLAGS before jax starts):
* every tiny_llama_kv4 parameter (each under BLOCK elements) is bit-identical to the eager
  models.random_params: f32 on one device and on data 2 x tensor 4, bf16 on tensor 8;
* with a small BLOCK (the blocked path of the 70B-sized parameters) the values are the same on
  one device and on tensor 8, with the std the scaling asks for and no block left unwritten;
* peak memory: drawing ~400 MB of bf16 weights on the tensor-8 mesh raises the process's peak
  RSS by at most the weights + 24 bytes per element of one block (threefry keeps ~4 u32 words
  per element in flight: 16 B x BLOCK = 512 MB, measured 570 MB over the weights), where the
  eager draw holds every full parameter plus the largest one's RNG words.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import dataclasses, json, resource
import jax, jax.numpy as jnp, numpy as np
import models
from kvjax import random_weights as rw, sharding
from kvjax.config import MeshConfig, ModelConfig, load_config

meshes = [None, sharding.make_mesh(MeshConfig(2, 4)), sharding.make_mesh(MeshConfig(1, 8))]
bits = lambda a: np.asarray(a).view(np.uint16 if a.dtype == jnp.bfloat16 else np.uint32)
out = {"exact": [], "blocked": [], "std": {}, "zeros": 0}
mc = load_config("tiny_llama_kv4").model
for dtype, mesh in ((jnp.float32, None), (jnp.float32, meshes[1]), (jnp.bfloat16, meshes[2])):
    ref = models.random_params(mc, seed=3, dtype=dtype)
    got = rw.random_params(mc, 3, dtype, mesh)
    out["exact"].append(all(got[k].dtype == ref[k].dtype
                            and np.array_equal(bits(ref[k]), bits(got[k])) for k in ref))
block = rw.BLOCK
rw.BLOCK = 3000
mc = dataclasses.replace(load_config("tiny_llama").model, num_layers=2)
ref = rw.random_params(mc, 5, jnp.float32, None)
for mesh in meshes[2:]:
    got = rw.random_params(mc, 5, jnp.float32, mesh)
    out["blocked"].append(all(np.array_equal(bits(ref[k]), bits(got[k])) for k in ref))
out["std"] = {k: [float(np.std(np.asarray(v))), rw._std(k, v.shape)] for k, v in ref.items()
              if not k.endswith("norm")}
out["zeros"] = int(sum((np.asarray(v) == 0).sum() for v in ref.values()))
rw.BLOCK = block
out["block"] = block
big = ModelConfig(arch="llama", vocab_size=32768, hidden_size=2048, intermediate_size=8192,
                  num_layers=1, num_heads=16, num_kv_heads=8, head_dim=128, max_position=4096,
                  rms_norm_eps=1e-5, tie_embeddings=False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
params = rw.random_params(big, 0, jnp.bfloat16, meshes[2])
jax.block_until_ready(params)
out["peak_growth"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
out["weight_bytes"] = sum(v.size * 2 for v in params.values())
print("RESULT " + json.dumps(out))
"""


def test_random_weights_exact_sharded_and_bounded():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, res.stderr[-3000:]
    out = json.loads(line[0][len("RESULT "):])
    assert out["exact"] == [True] * 3
    assert out["blocked"] == [True]
    for name, (std, want) in out["std"].items():
        # >= 2048 draws per parameter: the sample std is within 15% of the target (>7 sigma).
        assert abs(std - want) < 0.15 * want, (name, std, want)
    assert out["zeros"] == 0
    print(out["peak_growth"] / 2**20, "MB peak growth for", out["weight_bytes"] / 2**20, "MB")
    assert out["peak_growth"] < out["weight_bytes"] + 24 * out["block"], out
