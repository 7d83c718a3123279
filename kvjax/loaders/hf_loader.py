"""Hugging Face checkpoint directories: config.json, *.safetensors (one file or a sharded index),
tokenizer.json. Llama (2, 3, 3.1) and Qwen (2, 3)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from kvjax.config import ModelConfig, RopeScaling
from kvjax.loaders.gguf_loader import WeightsError
from models import checkpoint_names

_ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: cannot read JSON ({e})") from None


def model_config(path: str | Path) -> ModelConfig:
    c = _read_json(Path(path) / "config.json")
    if not isinstance(c, dict):
        raise WeightsError(f"{path}/config.json: expected a JSON object")
    archs = c.get("architectures") or []
    arch = next((_ARCHS[a] for a in archs if a in _ARCHS), None)
    if arch is None:
        raise WeightsError(f"{path}: unsupported architectures {archs}; expected one of "
                           f"{', '.join(_ARCHS)}")
    # Settings these families allow that the model does not implement: refused, never ignored.
    unsupported = [f"{k}={c[k]!r}" for k, ok in (
        ("hidden_act", "silu"), ("mlp_bias", False), ("use_sliding_window", False),
        ("attention_bias", arch == "qwen2")) if k in c and c[k] != ok]
    if unsupported:
        raise WeightsError(f"{path}/config.json: unsupported {', '.join(unsupported)}")
    try:
        theta, scaling = rope_settings(c)
        heads = c["num_attention_heads"]
        return ModelConfig(
            arch=arch, vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"], num_layers=c["num_hidden_layers"],
            num_heads=heads, num_kv_heads=c.get("num_key_value_heads", heads),
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            rope_theta=theta, rope_scaling=scaling,
            max_position=c["max_position_embeddings"], rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3")
    except WeightsError as e:  # from rope_settings: "config.json: ..."
        raise WeightsError(f"{path}/{e}") from None
    except KeyError as e:
        raise WeightsError(f"{path}/config.json: missing field {e}") from None
    except (AttributeError, TypeError, ValueError, ZeroDivisionError) as e:  # ConfigError too
        raise WeightsError(f"{path}/config.json: bad field ({e})") from None


def rope_settings(c: dict) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from a config.json in either style: transformers 5's
    `rope_parameters` {"rope_theta", "rope_type", ...}, or the older top-level `rope_theta` and
    `rope_scaling` {"rope_type" or "type", ...}. A RoPE type kvjax does not implement, or a partial
    rotary factor, is an error naming it: never a silent fallback to plain RoPE."""
    rp = c.get("rope_parameters")
    if rp is not None:
        if not isinstance(rp, dict) or "rope_theta" not in rp:
            raise WeightsError("config.json: rope_parameters without rope_theta (per-layer-type "
                               "RoPE is not supported)")
        theta, rs = rp["rope_theta"], rp
    else:
        # transformers' Llama/Qwen2/Qwen3 configs default rope_theta to 10000 when it is absent.
        theta, rs = c.get("rope_theta", 10000.0), c.get("rope_scaling") or {}
    if not isinstance(rs, dict):
        raise WeightsError(f"config.json: bad rope settings {rs!r}")
    kind = rs.get("rope_type", rs.get("type", "default"))
    partial = rs.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise WeightsError(f"config.json: partial_rotary_factor {partial} is not supported")
    orig = rs.get("original_max_position_embeddings") or c.get("max_position_embeddings")
    if kind == "default":
        return float(theta), None
    if kind == "llama3":
        return float(theta), RopeScaling(
            rope_type="llama3", factor=rs["factor"], low_freq_factor=rs["low_freq_factor"],
            high_freq_factor=rs["high_freq_factor"],
            original_max_position=rs["original_max_position_embeddings"])
    if kind in ("linear", "dynamic"):
        return float(theta), RopeScaling(rope_type=kind, factor=float(rs["factor"]),
                                         original_max_position=int(orig))
    if kind == "yarn":
        factor = rs.get("factor") or c["max_position_embeddings"] / orig
        attention = rs.get("attention_factor")
        if attention is None:  # HF: the paper's 0.1 ln(s) + 1, or DeepSeek's mscale ratio
            def mscale(m: float) -> float:
                return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0
            m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
            attention = mscale(m) / mscale(m_all) if m and m_all else mscale(1.0)
        return float(theta), RopeScaling(
            rope_type="yarn", factor=float(factor), original_max_position=int(orig),
            attention_factor=float(attention), beta_fast=float(rs.get("beta_fast") or 32),
            beta_slow=float(rs.get("beta_slow") or 1), truncate=bool(rs.get("truncate", True)))
    raise WeightsError(f"config.json: unsupported rope type {kind!r}; kvjax supports default, "
                       "linear, dynamic, yarn, llama3")


def _tensor_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        meta = _read_json(index)
        weight_map = meta.get("weight_map") if isinstance(meta, dict) else None
        if not isinstance(weight_map, dict):
            raise WeightsError(f"{index}: no weight_map")
        return {name: path / f for name, f in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{path}: no *.safetensors files")
    from safetensors import SafetensorError, safe_open

    found = {}
    for f in files:
        try:
            with safe_open(str(f), framework="numpy") as st:
                found.update({name: f for name in st.keys()})  # noqa: SIM118 (no iter)
        except (OSError, SafetensorError) as e:
            raise WeightsError(f"{f}: not a readable safetensors file ({e})") from None
    return found


def load_params(path: str | Path, cfg: ModelConfig, dtype=np.float32) -> dict[str, np.ndarray]:
    """Params in our layout: projections transposed to [in, out], layers stacked."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    where = _tensor_files(path)
    handles = {}

    def get(name: str) -> np.ndarray:
        if name not in where:
            raise WeightsError(f"{path}: missing tensor {name}")
        f = where[name]
        try:
            if f not in handles:
                handles[f] = safe_open(str(f), framework="numpy")
            return np.asarray(handles[f].get_tensor(name), dtype)
        except (OSError, SafetensorError) as e:
            raise WeightsError(f"{f}: cannot read tensor {name} ({e})") from None

    params: dict[str, np.ndarray] = {}
    names = checkpoint_names(cfg, "hf")
    if cfg.tie_embeddings:
        names.pop("lm_head", None)
    for ours, theirs in names.items():
        if ours.startswith("layers."):
            ws = [get(theirs.format(i=i)) for i in range(cfg.num_layers)]
            params[ours] = np.stack([w.T if w.ndim == 2 else w for w in ws])
        else:
            w = get(theirs)
            params[ours] = w.T if ours == "lm_head" else w
    return params
