"""For every KV cache dtype, the paged forward equals a dense forward over the dequantized keys and
values: the cache plumbing (pages, metadata side arrays, page sealing, the full-precision window,
per-layer formats) adds no error beyond the quantizer's own.

The dense reference re-implements the protocol without pages: it keeps every layer's exact K/V,
and when a step of tokens is appended, each query attends to keys that are exact (rounded to
bf16) inside the last `window` tokens and quantize->dequantize outside it, with KIVI keys
quantized per page of G tokens. Two sequences of different lengths share one batch, page tables
are shuffled, and unowned pages hold NaN.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from kvjax.cache import init_cache
from kvjax.cache.layout import to_storage
from kvjax.cache.paged import pool_specs
from kvjax.config import KV_CACHE_DTYPES, CacheConfig, ModelConfig, layer_formats
from models.layers import apply_rope, rms_norm, rope_inv_freq, swiglu

MC = ModelConfig(arch="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
                 num_layers=3, num_heads=4, num_kv_heads=2, head_dim=64, max_position=256,
                 tie_embeddings=True)


def _bf16(x):
    return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))


@functools.lru_cache
def roundtrip_fn(spec):
    """jit(quantize -> dequantize) for a pool spec's quantizer (per-token codes, or KIVI keys'
    [.., groups, G, d] groups)."""
    qz = spec.quantizer
    return jax.jit(lambda x: qz.dequantize(qz.quantize(x)))


def _roundtrip(spec, x):
    """Quantize -> dequantize of per-token codes. x: [n, ..., head_dim]. Tokens are quantized
    independently, so x is zero-padded to a multiple of 64 tokens and one compile serves a
    growing sequence (run eagerly, every length compiled each op again: 62 of the polar case's
    92 s)."""
    x = np.asarray(x, np.float32)
    pad = np.zeros((-len(x) % 64, *x.shape[1:]), np.float32)
    return np.asarray(roundtrip_fn(spec)(jnp.asarray(np.concatenate([x, pad]))))[:len(x)]


def _seal(spec, keys):
    """KIVI keys: quantize each complete page of G tokens. keys: [n, kv_heads, d]."""
    s = spec.page_size
    out = np.full_like(keys, np.nan)
    for p0 in range(0, len(keys) - s + 1, s):
        page = jnp.asarray(_bf16(keys[p0:p0 + s]).transpose(1, 0, 2))  # [h, s, d]
        g = page.reshape(page.shape[0], s // spec.group, spec.group, -1)
        deq = np.asarray(roundtrip_fn(spec)(g)).reshape(page.shape)
        out[p0:p0 + s] = deq.transpose(1, 0, 2)
    return out


def _coarse(dtype: str) -> bool:
    """Formats whose one-level flip is large: 4 bits or fewer, or rotated codebooks."""
    return dtype.startswith(("turbo", "polar", "kivi", "int4", "k8v4"))


def reference(params, cc: CacheConfig, tokens, steps, multi=None):
    """Dense forward of one sequence fed in `steps` (chunk sizes); logits per token. Earlier
    positions are read dequantized (or from the bf16 window), a multi-token step's own K/V as
    computed. multi[i]: step i of the batch had more than one token (default: this row did); such
    a step attends before its chunk is written, so the window holds the W positions before it."""
    inv_freq = jnp.asarray(rope_inv_freq(MC))
    formats = layer_formats(MC.num_layers, cc)
    ks = [np.zeros((0, MC.num_kv_heads, MC.head_dim), np.float32) for _ in formats]
    vs = [np.zeros_like(k) for k in ks]
    out, start = [], 0
    for step, n in enumerate(steps):
        pos = np.arange(start, start + n)
        x = params["embed"][tokens[start:start + n]][None]
        length = start + n
        for i, fmt in enumerate(formats):
            p = {k.split(".", 1)[1]: v[i] for k, v in params.items() if k.startswith("layers.")}
            h = rms_norm(x, p["attn_norm"], MC.rms_norm_eps)
            q = (h @ p["wq"]).reshape(1, n, MC.num_heads, MC.head_dim)
            k = (h @ p["wk"]).reshape(1, n, MC.num_kv_heads, MC.head_dim)
            v = (h @ p["wv"]).reshape(1, n, MC.num_kv_heads, MC.head_dim)
            q = apply_rope(q, jnp.asarray(pos)[None], inv_freq)
            k = apply_rope(k, jnp.asarray(pos)[None], inv_freq)
            ks[i] = np.concatenate([ks[i], np.asarray(k[0])])
            vs[i] = np.concatenate([vs[i], np.asarray(v[0])])
            k_spec, v_spec = pool_specs(MC, cc, fmt)
            window = cc.window_for(fmt)
            kq = _seal(k_spec, ks[i]) if k_spec.group > 1 else _roundtrip(k_spec, ks[i])
            vq = _roundtrip(v_spec, vs[i])
            mt = n > 1 if multi is None else multi[step]
            last = start if mt else length  # the window ends where the cache read ends
            in_window = (np.arange(length) >= last - window)[:, None, None]
            # The exact sink: the first tokens stay bf16 once written (every sequence here
            # writes them in its first chunk).
            in_window = in_window | (np.arange(length) < cc.sinks_for(fmt))[:, None, None]
            k_hat = np.where(in_window, _bf16(ks[i]), kq)
            v_hat = np.where(in_window, _bf16(vs[i]), vq)
            # A chunk of more than one token reads its own K/V as computed, not back from the
            # pages (kvjax/attention.py: the full-precision-chunk rule).
            own = ((np.arange(length) >= start) & mt)[:, None, None]
            k_hat, v_hat = np.where(own, ks[i], k_hat), np.where(own, vs[i], v_hat)
            rep = MC.num_heads // MC.num_kv_heads
            kk, vv = np.repeat(k_hat, rep, axis=1), np.repeat(v_hat, rep, axis=1)
            att = np.einsum("qhd,khd->hqk", np.asarray(q[0]), kk) / np.sqrt(MC.head_dim)
            att = np.where(np.arange(length)[None, None] <= pos[None, :, None], att, -np.inf)
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            o = np.einsum("hqk,khd->qhd", att, vv).reshape(1, n, -1)
            x = x + o @ p["wo"]
            x = x + swiglu(rms_norm(x, p["mlp_norm"], MC.rms_norm_eps), p["w_gate"], p["w_up"],
                           p["w_down"])
        x = rms_norm(x, params["final_norm"], MC.rms_norm_eps)
        out.append(np.asarray(x @ params["embed"].T)[0])
        start += n
    return np.concatenate(out)


CASES = [(d, {}) for d in KV_CACHE_DTYPES if d not in ("bf16", "f32")] + [
    ("turbo4", {"window": 16}),  # a window on a per-token method
    ("int4", {"bf16_layers": (1,), "bf16_edge_layers": 0}),  # mixed formats -> 3 segments
    ("kivi4", {"window": 64, "bf16_edge_layers": 1}),
]


@pytest.mark.parametrize("dtype,extra", CASES, ids=[f"{d}-{sorted(e)}" for d, e in CASES])
def test_paged_forward_equals_dense_over_dequantized_kv(dtype, extra):
    # The default window (128) would hold these whole sequences in bf16: no window (KIVI: one
    # page, its minimum) so the quantized pages are read.
    window = {"window": 32 if dtype.startswith("kivi") else 0}
    cc = CacheConfig(dtype=dtype, **({"page_size": 32} | window | extra))
    _check(dtype, cc, [[40, 1, 1, 30, 1, 1], [9, 1, 1, 1, 60, 1]])  # chunked prefill + decode


def _check(dtype: str, cc: CacheConfig, seq_steps: list[list[int]]) -> None:
    """Two sequences fed `seq_steps` (chunk sizes per forward, one list per sequence) through the
    paged cache in one batch match the dense reference at every step."""
    rng = np.random.default_rng(20261130)  # seeded: a fixed draw, never a flaky one
    seed = int(rng.integers(1 << 30))
    params = models.random_params(MC, seed=seed)
    graphdef, state = nnx.split(models.Transformer(MC, params))

    page = cc.page_size
    totals = [sum(s) for s in seq_steps]
    tokens = rng.integers(0, MC.vocab_size, (2, max(totals)))
    multi = [max(s[i] for s in seq_steps) > 1 for i in range(len(seq_steps[0]))]
    expected = [reference(params, cc, tokens[b], seq_steps[b], multi) for b in range(2)]

    batch, max_pages = 2, -(-max(totals) // page)
    num_pages = batch * max_pages + 4  # spare pages stay unowned (and poisoned)
    perm = rng.permutation(np.arange(1, num_pages))
    table = np.zeros((batch, max_pages), np.int32)
    for b in range(batch):
        owned = -(-totals[b] // page)
        table[b, :owned] = perm[b * max_pages: b * max_pages + owned]
    cache = init_cache(MC, cc, num_pages, num_slots=2)
    # Poison everything: unowned pages must never be read, and the ring must be written first.
    nan = {np.dtype(np.uint16): to_storage(jnp.bfloat16(jnp.nan), jnp.uint16),
           np.dtype(np.uint8): to_storage(jnp.float8_e4m3fn(jnp.nan), jnp.uint8)}
    cache = jax.tree.map(lambda a: jnp.full_like(a, nan.get(a.dtype, 0)), cache)

    done = [0, 0]
    for i in range(len(seq_steps[0])):
        n = [seq_steps[b][i] for b in range(2)]
        t = max(n)
        pos = np.array([d + np.arange(t) for d in done], np.int32)
        tok = np.take_along_axis(tokens, np.minimum(pos, tokens.shape[1] - 1), axis=1)
        lengths = np.array([d + k for d, k in zip(done, n, strict=True)], np.int32)
        logits, cache = models.forward(graphdef, state, jnp.asarray(tok), jnp.asarray(pos),
                                       cache, jnp.asarray(table), jnp.asarray(lengths),
                                       jnp.asarray([0, 1], jnp.int32))
        for b in range(2):
            want = expected[b][done[b]: done[b] + n[b]]
            got = np.asarray(logits[b, : n[b]])
            msg = f"{dtype} seq {b} step {i} (seed {seed})"
            # A code flips when a coordinate sits within f32 rounding of a decision boundary
            # (a rounding midpoint, a codebook boundary, a QJL sign), and the reference computes
            # K/V with other matmul shapes. Measured: ~1 flip per few thousand coordinates;
            # one flip moves a few logits by up to ~1% on the 4-bit and rotated formats (seen
            # on int4 and k8v4 as well as turbo). A plumbing bug (wrong page, wrong metadata,
            # stale window) moves logits by tens of percent, so bound the max and the mean.
            err = np.abs(got - want) / np.abs(want).max()
            assert np.isfinite(got).all(), msg
            assert err.max() < 0.03 and err.mean() < 3e-3, (msg, err.max(), err.mean())
            if not _coarse(dtype):  # fine codes rarely flip: most logits agree tightly
                assert np.median(err) < 5e-4, (msg, np.median(err))
        done = [d + k for d, k in zip(done, n, strict=True)]


def test_bytes_per_token_counts_what_is_stored():
    """Page bytes per token equal the pool's nbytes divided by the token slots it holds."""
    from kvjax.cache import bytes_per_token

    for dtype in KV_CACHE_DTYPES:
        cc = CacheConfig(dtype=dtype, page_size=32, window=0 if "kivi" not in dtype else 32)
        cache = init_cache(MC, cc, num_pages=5, num_slots=1)
        pages = sum(leaf.nbytes for seg in cache.segments for leaf in (*seg.k, *seg.v))
        assert bytes_per_token(MC, cc) == pages / (5 * 32), dtype
    bf16 = bytes_per_token(MC, CacheConfig("bf16"))
    assert bf16 == 2 * MC.num_layers * MC.num_kv_heads * MC.head_dim * 2
    assert bytes_per_token(MC, CacheConfig("turbo3.5")) < bf16 / 3.5


def test_kivi_page_size_and_window_rules():
    from kvjax.config import ConfigError

    with pytest.raises(ConfigError):
        CacheConfig(dtype="kivi4", page_size=16)
    with pytest.raises(ConfigError):
        CacheConfig(dtype="kivi2", page_size=64, window=32)
    assert CacheConfig(dtype="kivi2").page_size == 32
    with pytest.raises(ConfigError):  # unsealed keys would have nowhere to live
        dataclasses.replace(CacheConfig(dtype="kivi2"), window=0)
