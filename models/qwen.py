"""Qwen2 (biases on q/k/v) and Qwen3 (per-head RMSNorm on q and k, no biases).

Same decoder as Llama; the config's `qkv_bias` / `qk_norm` switch the extra parameters on, and
these tables add their checkpoint names.
"""

from models import llama

HF_NAMES = {
    **llama.HF_NAMES,
    "layers.bq": "model.layers.{i}.self_attn.q_proj.bias",
    "layers.bk": "model.layers.{i}.self_attn.k_proj.bias",
    "layers.bv": "model.layers.{i}.self_attn.v_proj.bias",
    "layers.q_norm": "model.layers.{i}.self_attn.q_norm.weight",
    "layers.k_norm": "model.layers.{i}.self_attn.k_norm.weight",
}

GGUF_NAMES = {
    **llama.GGUF_NAMES,
    "layers.bq": "blk.{i}.attn_q.bias",
    "layers.bk": "blk.{i}.attn_k.bias",
    "layers.bv": "blk.{i}.attn_v.bias",
    "layers.q_norm": "blk.{i}.attn_q_norm.weight",
    "layers.k_norm": "blk.{i}.attn_k_norm.weight",
}
