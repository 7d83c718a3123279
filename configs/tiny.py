"""Tiny configs for tests and smoke runs: real code paths, random weights, seconds to compile."""

from kvjax.config import CacheConfig, Config, ModelConfig, RopeScaling

_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
             num_kv_heads=2, head_dim=16, max_position=512, rms_norm_eps=1e-5)

TINY_LLAMA = ModelConfig(arch="llama", rope_theta=500000.0, tie_embeddings=False,
                         rope_scaling=RopeScaling(factor=8.0, original_max_position=64), **_TINY)
TINY_QWEN2 = ModelConfig(arch="qwen2", rope_theta=1e6, tie_embeddings=True, qkv_bias=True, **_TINY)
TINY_QWEN3 = ModelConfig(arch="qwen3", rope_theta=1e6, tie_embeddings=False, qk_norm=True, **_TINY)

_CACHE = CacheConfig(dtype="f32", page_size=8)
CONFIGS = {
    "tiny_llama": Config(name="tiny_llama", model=TINY_LLAMA, cache=_CACHE, param_dtype="f32"),
    "tiny_qwen2": Config(name="tiny_qwen2", model=TINY_QWEN2, cache=_CACHE, param_dtype="f32"),
    "tiny_qwen3": Config(name="tiny_qwen3", model=TINY_QWEN3, cache=_CACHE, param_dtype="f32"),
}

# Four KV heads (eight query heads): tensor parallelism of degree 4 splits the KV heads too.
TINY_LLAMA_KV4 = ModelConfig(arch="llama", rope_theta=500000.0, tie_embeddings=False,
                             **{**_TINY, "num_heads": 8, "num_kv_heads": 4})
CONFIGS["tiny_llama_kv4"] = Config(name="tiny_llama_kv4", model=TINY_LLAMA_KV4, cache=_CACHE,
                                   param_dtype="f32")
