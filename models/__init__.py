"""Flax NNX decoders: Llama (2, 3, 3.1) and Qwen (2, 3) share one scanned Transformer."""

from kvjax.config import ModelConfig
from models import llama, qwen
from models.transformer import Transformer, forward, param_shapes, random_params


def checkpoint_names(cfg: ModelConfig, fmt: str) -> dict[str, str]:
    """Our parameter name -> tensor name in a checkpoint of format "hf" or "gguf"."""
    module = llama if cfg.arch == "llama" else qwen
    table = module.HF_NAMES if fmt == "hf" else module.GGUF_NAMES
    return {name: table[name] for name in param_shapes(cfg)}


__all__ = ["Transformer", "checkpoint_names", "forward", "param_shapes", "random_params"]
