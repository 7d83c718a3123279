"""Hugging Face checkpoint directories: config.json, *.safetensors (one file or a sharded index),
tokenizer.json. Llama (2, 3, 3.1) and Qwen (2, 3)."""

from __future__ import annotations

import json
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
    try:
        scaling = None
        rs = c.get("rope_scaling") or {}
        if rs.get("rope_type", rs.get("type")) == "llama3":
            scaling = RopeScaling(factor=rs["factor"], low_freq_factor=rs["low_freq_factor"],
                                  high_freq_factor=rs["high_freq_factor"],
                                  original_max_position=rs["original_max_position_embeddings"])
        heads = c["num_attention_heads"]
        return ModelConfig(
            arch=arch, vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"], num_layers=c["num_hidden_layers"],
            num_heads=heads, num_kv_heads=c.get("num_key_value_heads", heads),
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            rope_theta=float(c.get("rope_theta", 10000.0)), rope_scaling=scaling,
            max_position=c["max_position_embeddings"], rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3")
    except KeyError as e:
        raise WeightsError(f"{path}/config.json: missing field {e}") from None
    except (AttributeError, TypeError, ValueError, ZeroDivisionError) as e:  # ConfigError too
        raise WeightsError(f"{path}/config.json: bad field ({e})") from None


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
