"""Qwen2-7B (q/k/v biases) and Qwen3-8B (per-head q/k RMSNorm, no biases)."""

from kvjax.config import Config, ModelConfig

QWEN2_7B = ModelConfig(
    arch="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
    num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1000000.0, max_position=32768,
    rms_norm_eps=1e-6, tie_embeddings=False, qkv_bias=True,
)

QWEN3_8B = ModelConfig(
    arch="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
    num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1000000.0, max_position=40960,
    rms_norm_eps=1e-6, tie_embeddings=False, qk_norm=True,
)

CONFIGS = {
    "qwen2_7b_bf16": Config(name="qwen2_7b_bf16", model=QWEN2_7B),
    "qwen3_8b_bf16": Config(name="qwen3_8b_bf16", model=QWEN3_8B),
}
