"""The forward writes the paged cache in place: no compiled step copies a cache leaf.

A step that copies a pool leaf pays the pool's size in memory and traffic on every step (a
70B-shaped 2-layer run on 8 devices: 0.69 GiB of temporaries per device instead of 0.21). XLA
copied the pool around a one-row write (a batch-1 decode step: its dynamic-update-slice was fused
into the same step's reads) and around a write after attention (a prefill chunk: the read did not
feed the write, so nothing ordered them); kvjax/cache/paged.py `ordered_after`, layout.py
`scatter_rows`.

One compile per step shape covers every cache dtype: a tiny model whose layers are segments of
every format (1 or 2 layers each: an unrolled segment and a scanned one), with abstract weights and
cache, compiled for a batch-1 decode step and a batch-1 prefill chunk.
"""

import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import models
from kvjax.bench.pool_copies import _shards, cache_copies
from kvjax.cache import init_cache
from kvjax.cache.paged import KVCache
from kvjax.config import KV_CACHE_DTYPES, CacheConfig, ModelConfig

PAGES = 1 << 17  # abstract: nothing is allocated; large, so a pool copy dwarfs the activations
PAGE = 32  # KIVI's group: one page size for every segment
# Copies and buffers are decided by XLA's HLO passes; LLVM's optimization level only makes the
# machine code (and halves this test's compile time).
FAST_CODEGEN = {"xla_backend_optimization_level": 0}


def _model(num_layers: int) -> ModelConfig:
    return ModelConfig(arch="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
                       num_layers=num_layers, num_heads=4, num_kv_heads=2, head_dim=64,
                       max_position=256, tie_embeddings=True)


def _every_format_cache() -> tuple[ModelConfig, KVCache]:
    """An abstract cache with one segment per KV cache dtype (1 or 2 layers, alternating)."""
    segments, start = [], 0
    for i, dtype in enumerate(KV_CACHE_DTYPES):
        n = 1 + i % 2
        cache = jax.eval_shape(lambda d=dtype, n=n: init_cache(
            _model(n), CacheConfig(dtype=d, page_size=PAGE), PAGES, num_slots=1))
        (seg,) = cache.segments
        segments.append(seg.replace(start=start))
        start += n
    return _model(start), KVCache(segments=tuple(segments), page_size=PAGE)


@pytest.mark.parametrize("t", [1, 16], ids=["decode", "prefill"])
def test_no_step_copies_the_cache(t):
    mc, cache = _every_format_cache()
    params = jax.eval_shape(lambda: models.random_params(mc, 0))
    graphdef, state = nnx.split(models.Transformer(mc, params, attention_impl="xla"))

    def ints(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.int32)

    # tokens, positions, cache, page table (8 pages), lengths, window slots, logits_index
    exe = models.forward.lower(graphdef, state, ints(1, t), ints(1, t), cache, ints(1, 8),
                               ints(1), ints(1), ints(1)).compile(FAST_CODEGEN)
    copies = cache_copies(exe.as_text(), cache)
    assert not copies, f"{len(copies)} cache leaves copied:\n" + "\n".join(copies[:8])
    # Any other whole-pool temporary (not an HLO copy) shows in the step's temporaries.
    smallest = min(math.prod(s) * d.itemsize for s, d in _shards(cache)
                   if len(s) == 5 and s[2] == PAGES)  # pool leaves (not the rings)
    temp = exe.memory_analysis().temp_size_in_bytes
    assert temp < smallest, (temp, smallest)
