"""Real SmolLM2 queries, keys and values for the quantizer benchmark.

A dense f32 forward of the embedded SmolLM2-135M over the first `tokens` tokens of a text, keeping
every layer's post-RoPE q and k and its v: what the KV cache stores and what attention reads.
The default text is the Apache-2.0 license (/usr/share/common-licenses on Debian/Ubuntu, the
text the quality sweep in BENCHMARKS.md scores); elsewhere the repository's README.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from models.layers import apply_rope, rms_norm, rope_inv_freq, swiglu

DEFAULT_TEXTS = (Path("/usr/share/common-licenses/Apache-2.0"),
                 Path(__file__).resolve().parents[2] / "README.md")


def default_text() -> Path:
    for path in DEFAULT_TEXTS:
        if path.exists():
            return path
    raise FileNotFoundError("no default text: " + ", ".join(map(str, DEFAULT_TEXTS)))


def load_default_kv_samples(tokens: int = 512, text: Path | None = None) -> dict[str, np.ndarray]:
    """{'q': [layers, q_heads, T, d], 'k', 'v': [layers, kv_heads, T, d]} as float32 arrays."""
    from kvjax.config import load_config
    from kvjax.generate import load_model

    cfg = load_config("smollm2")
    params, tokenizer = load_model(cfg, None, False)
    ids = tokenizer.encode((text or default_text()).read_text())[:tokens]
    return _capture(cfg.model, {k: jnp.asarray(v, jnp.float32) for k, v in params.items()},
                    jnp.asarray(ids, jnp.int32))


@functools.partial(jax.jit, static_argnums=0)
def _capture(mc, params: dict[str, jax.Array], ids: jax.Array) -> dict[str, jax.Array]:
    """ids: [T] -> q [L, Hq, T, d], k/v [L, Hkv, T, d] of a causal dense forward (llama/qwen)."""
    t = ids.shape[0]
    pos = jnp.arange(t)[None]
    inv_freq = jnp.asarray(rope_inv_freq(mc))
    layers = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith("layers.")}
    mask = jnp.tril(jnp.ones((t, t), bool))

    def layer(x, p):
        h = rms_norm(x, p["attn_norm"], mc.rms_norm_eps)
        q, k, v = (h @ p[w] + (p["b" + w[1]] if mc.qkv_bias else 0.0) for w in ("wq", "wk", "wv"))
        q = q.reshape(1, t, mc.num_heads, mc.head_dim)
        k = k.reshape(1, t, mc.num_kv_heads, mc.head_dim)
        v = v.reshape(1, t, mc.num_kv_heads, mc.head_dim)
        if mc.qk_norm:
            q, k = rms_norm(q, p["q_norm"], mc.rms_norm_eps), rms_norm(k, p["k_norm"],
                                                                      mc.rms_norm_eps)
        q, k = apply_rope(q, pos, inv_freq)[0], apply_rope(k, pos, inv_freq)[0]  # [T, H, d]
        rep = mc.num_heads // mc.num_kv_heads
        s = jnp.einsum("qhd,khd->hqk", q, jnp.repeat(k, rep, axis=1)) / np.sqrt(mc.head_dim)
        a = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
        o = jnp.einsum("hqk,khd->qhd", a, jnp.repeat(v[0], rep, axis=1)).reshape(1, t, -1)
        x = x + o @ p["wo"]
        x = x + swiglu(rms_norm(x, p["mlp_norm"], mc.rms_norm_eps), p["w_gate"], p["w_up"],
                       p["w_down"])
        return x, {"q": q.transpose(1, 0, 2), "k": k.transpose(1, 0, 2),
                   "v": v[0].transpose(1, 0, 2)}

    _, out = jax.lax.scan(layer, params["embed"][ids][None], layers)
    return out
