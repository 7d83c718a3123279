"""The paged-cache forward equals a dense forward with no cache (f32, tiny Llama and Qwen configs).

Chunked prefill then decode steps, two sequences of different lengths in one batch, shuffled page
tables and NaN-filled unused pages: any read of a page a sequence does not own, or of a slot at or
beyond its length, turns the logits into NaN or changes them.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from kvjax.cache import init_cache
from kvjax.cache.layout import to_storage
from kvjax.config import load_config
from models.layers import apply_rope, rms_norm, rope_inv_freq, swiglu


def dense_forward(cfg, params, tokens):
    """Plain causal attention over the whole sequence, no cache. tokens: [batch, seq]."""
    b, s = tokens.shape
    x = params["embed"][tokens]
    pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    causal = jnp.tril(jnp.ones((s, s), bool))
    for i in range(cfg.num_layers):
        p = {k.split(".", 1)[1]: v[i] for k, v in params.items() if k.startswith("layers.")}
        h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
        q, k, v = h @ p["wq"], h @ p["wk"], h @ p["wv"]
        if cfg.qkv_bias:
            q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
        q = q.reshape(b, s, cfg.num_heads, cfg.head_dim)
        k = k.reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
            k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
        q, k = apply_rope(q, pos, inv_freq), apply_rope(k, pos, inv_freq)
        rep = cfg.num_heads // cfg.num_kv_heads
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(cfg.head_dim)
        att = jax.nn.softmax(jnp.where(causal, att, -jnp.inf), axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, s, -1)
        x = x + o @ p["wo"]
        x = x + swiglu(rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps), p["w_gate"], p["w_up"],
                       p["w_down"])
    x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    return x @ (params["embed"].T if cfg.tie_embeddings else params["lm_head"])


@pytest.mark.parametrize("name,cache_dtype", [("tiny_llama", "f32"), ("tiny_qwen2", "f32"),
                                              ("tiny_qwen3", "f32"), ("tiny_llama", "bf16")])
def test_paged_prefill_and_decode_match_dense(name, cache_dtype):
    cfg = load_config(name)
    mc, page_size = cfg.model, cfg.cache.page_size
    rng = np.random.default_rng(20261130)  # seeded: a fixed draw, never a flaky one
    params = models.random_params(mc, seed=int(rng.integers(1 << 30)))
    graphdef, state = nnx.split(models.Transformer(mc, params))

    seq_lens = [37, 22]  # total tokens per sequence: prefill in chunks, then decode one by one
    prompt_lens = [21, 9]
    batch, max_pages, num_pages = 2, 6, 20
    tokens = rng.integers(0, mc.vocab_size, (batch, max(seq_lens)))
    dense = np.asarray(dense_forward(mc, params, jnp.asarray(tokens)))

    # Shuffled, disjoint page ownership; every page nobody owns (null page included) holds NaN.
    perm = rng.permutation(np.arange(1, num_pages))
    page_table = np.zeros((batch, max_pages), np.int32)
    for row in range(batch):
        owned = -(-seq_lens[row] // page_size)
        page_table[row, :owned] = perm[row * max_pages: row * max_pages + owned]
    cache = init_cache(mc, dataclasses.replace(cfg.cache, dtype=cache_dtype), num_pages)
    nan = {jnp.float32: jnp.float32(jnp.nan), jnp.uint16: to_storage(jnp.bfloat16(jnp.nan),
                                                                     jnp.uint16)}
    cache = jax.tree.map(lambda a: jnp.full_like(a, nan[a.dtype.type]), cache)
    # bf16 pages round K and V to 8 significant bits: allow that, and nothing more.
    rtol = 1e-5 if cache_dtype == "f32" else 3e-2

    def run(cache, start, chunk, n_valid):
        """Feed tokens [start, start + chunk) per row; rows write only their n_valid tokens."""
        pos = np.array([[s + j for j in range(chunk)] for s in start], np.int32)
        tok = np.take_along_axis(tokens, np.minimum(pos, tokens.shape[1] - 1), axis=1)
        lengths = np.array([s + n for s, n in zip(start, n_valid, strict=True)], np.int32)
        return models.forward(graphdef, state, jnp.asarray(tok), jnp.asarray(pos), cache,
                              jnp.asarray(page_table), jnp.asarray(lengths))

    # Ragged chunked prefill: chunks of 8 tokens; each row stops at its own prompt length.
    done = [0, 0]
    while any(d < p for d, p in zip(done, prompt_lens, strict=True)):
        n_valid = [min(8, p - d) for d, p in zip(done, prompt_lens, strict=True)]
        logits, cache = run(cache, done, 8, n_valid)
        for row in range(batch):
            for j in range(n_valid[row]):
                np.testing.assert_allclose(logits[row, j], dense[row, done[row] + j],
                                           rtol=rtol, atol=rtol * np.abs(dense).max())
        done = [d + n for d, n in zip(done, n_valid, strict=True)]
    # Decode steps, one token per row, until both sequences are complete.
    while any(d < s for d, s in zip(done, seq_lens, strict=True)):
        n_valid = [1 if d < s else 0 for d, s in zip(done, seq_lens, strict=True)]
        logits, cache = run(cache, done, 1, n_valid)
        for row in range(batch):
            if n_valid[row]:
                np.testing.assert_allclose(logits[row, 0], dense[row, done[row]],
                                           rtol=rtol, atol=rtol * np.abs(dense).max())
        done = [d + n for d, n in zip(done, n_valid, strict=True)]
    assert np.isfinite(np.asarray(logits)).all()
