"""Llama 2 / 3 / 3.1 (and SmolLM2): the shared Transformer, no biases, no q/k norm.

Llama 3.1's RoPE scaling and GQA come from the config. This table maps our parameter names to the
tensor names of a Hugging Face checkpoint and of a llama.cpp GGUF (`{i}` is the layer index).
"""

HF_NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "layers.attn_norm": "model.layers.{i}.input_layernorm.weight",
    "layers.wq": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.wk": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.wv": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.wo": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.w_gate": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.w_up": "model.layers.{i}.mlp.up_proj.weight",
    "layers.w_down": "model.layers.{i}.mlp.down_proj.weight",
}

GGUF_NAMES = {
    "embed": "token_embd.weight",
    "final_norm": "output_norm.weight",
    "lm_head": "output.weight",
    "layers.attn_norm": "blk.{i}.attn_norm.weight",
    "layers.wq": "blk.{i}.attn_q.weight",
    "layers.wk": "blk.{i}.attn_k.weight",
    "layers.wv": "blk.{i}.attn_v.weight",
    "layers.wo": "blk.{i}.attn_output.weight",
    "layers.mlp_norm": "blk.{i}.ffn_norm.weight",
    "layers.w_gate": "blk.{i}.ffn_gate.weight",
    "layers.w_up": "blk.{i}.ffn_up.weight",
    "layers.w_down": "blk.{i}.ffn_down.weight",
}
