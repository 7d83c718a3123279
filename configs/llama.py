"""Llama 3.1 8B and 70B (GQA, untied embeddings, llama3 RoPE scaling, 128K context)."""

from kvjax.config import CacheConfig, Config, MeshConfig, ModelConfig, RopeScaling

LLAMA3_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position=8192)

LLAMA31_8B = ModelConfig(
    arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
    num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE,
    max_position=131072, rms_norm_eps=1e-5, tie_embeddings=False,
)

LLAMA31_70B = ModelConfig(
    arch="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
    num_heads=64, num_kv_heads=8, head_dim=128, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE,
    max_position=131072, rms_norm_eps=1e-5, tie_embeddings=False,
)

# "turbo" variants: TurboQuant at 3.5 bits (4.1x smaller than bf16 at head_dim 128) with the most
# recent 128 tokens of each sequence kept in bf16 (42 MB per sequence at 70B, 0.4% of a 128K
# context's compressed KV), the lever that recovers most of TurboQuant's loss (BENCHMARKS.md).
TURBO = CacheConfig("turbo3.5", window=128)
CONFIGS = {
    "llama8b_bf16": Config(name="llama8b_bf16", model=LLAMA31_8B),
    "llama8b_turbo": Config(name="llama8b_turbo", model=LLAMA31_8B, cache=TURBO),
    "llama70b_bf16": Config(name="llama70b_bf16", model=LLAMA31_70B, mesh=MeshConfig(tensor=8)),
    "llama70b_turbo": Config(name="llama70b_turbo", model=LLAMA31_70B, mesh=MeshConfig(tensor=8),
                             cache=TURBO),
}
