"""A Llama-family decoder in Flax NNX over the paged KV cache (Llama 2/3/3.1, Qwen2, Qwen3).

Layer parameters are stacked along a leading `layers` axis and the forward scans over them, so the
compiled program holds one layer's code whatever the depth. The model holds parameters only: the
cache is passed in and returned, and `forward` is a pure jitted function of
(params, tokens, positions, cache, page table, lengths) with the cache buffer donated.

Weight layout (the loaders produce exactly this): projections are [in, out]; q/k output columns
are head-major (head, head_dim) in the rotate-half RoPE layout of Hugging Face checkpoints.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from kvjax.attention import (
    pack_chunk,
    paged_attention,
    paged_attention_step,
    with_packed_chunk,
)
from kvjax.cache.paged import KVCache, absolute_positions, write_layer
from kvjax.config import ModelConfig
from kvjax.sharding import active_mesh, shard_attention
from models.layers import (
    apply_rope,
    layer_weights,
    linear,
    matmul,
    rms_norm,
    rope_attention_factor,
    rope_inv_freq,
    swiglu,
)

# Activation dtype; None = f32 on the CPU backend (slow bf16 matmuls there), bf16 elsewhere. Read
# at trace time: kvjax.plan70b sets bf16 to compile on CPU the step a GPU would run.
COMPUTE_DTYPE = None


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter (layer parameters carry a leading `layers` axis)."""
    n, h, d, f = cfg.num_layers, cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    qd, kvd = cfg.num_heads * d, cfg.num_kv_heads * d
    shapes = {
        "embed": (cfg.vocab_size, h),
        "final_norm": (h,),
        "layers.attn_norm": (n, h),
        "layers.wq": (n, h, qd),
        "layers.wk": (n, h, kvd),
        "layers.wv": (n, h, kvd),
        "layers.wo": (n, qd, h),
        "layers.mlp_norm": (n, h),
        "layers.w_gate": (n, h, f),
        "layers.w_up": (n, h, f),
        "layers.w_down": (n, f, h),
    }
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (h, cfg.vocab_size)
    if cfg.qkv_bias:
        shapes.update({"layers.bq": (n, qd), "layers.bk": (n, kvd), "layers.bv": (n, kvd)})
    if cfg.qk_norm:
        shapes.update({"layers.q_norm": (n, d), "layers.k_norm": (n, d)})
    return shapes


class Transformer(nnx.Module):
    """Parameters of one decoder; `__call__` runs a chunk of tokens through the paged cache."""

    def __init__(self, cfg: ModelConfig, params: dict[str, jax.Array],
                 attention_impl: str = "xla"):
        expected = param_shapes(cfg)
        missing = sorted(set(expected) - set(params))
        if missing:
            raise ValueError(f"missing parameters: {', '.join(missing)}")
        for name, shape in expected.items():
            if tuple(params[name].shape) != shape:
                raise ValueError(f"parameter {name} has shape {tuple(params[name].shape)}, "
                                 f"expected {shape}")
        self.cfg = cfg
        # "xla" | "pallas" (decode steps through kvjax/pallas_kernels); a plain attribute, so
        # it is static (part of the graphdef) under jit.
        self.attention_impl = attention_impl
        self.embed = nnx.Param(params["embed"])
        self.final_norm = nnx.Param(params["final_norm"])
        self.lm_head = nnx.Param(params["lm_head"]) if "lm_head" in expected else None
        self.layers = nnx.Dict({k.split(".", 1)[1]: nnx.Param(params[k])
                                for k in expected if k.startswith("layers.")})

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: KVCache,
                 page_table: jax.Array, lengths: jax.Array,
                 window_slots: jax.Array | None = None,
                 logits_index: jax.Array | None = None,
                 page_pos: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
        """tokens, positions: [batch, tokens]; page_table: [batch, max_pages]; lengths: [batch];
        window_slots: [batch] ring slot per row (caches with a full-precision window);
        logits_index: [batch] the one position per row whose logits are wanted (None: all);
        page_pos: [batch, max_pages] absolute position of each page's first token, after an
        eviction (RoPE at absolute positions; attention scores at positions within the cache).

        Returns logits [batch, tokens, vocab] (f32), or [batch, vocab] with logits_index, and the
        cache with this chunk written.
        """
        cfg = self.cfg
        compute = COMPUTE_DTYPE or (jnp.float32 if jax.default_backend() == "cpu"
                                    else jnp.bfloat16)
        x = self.embed[...][tokens].astype(compute)
        inv_freq = jnp.asarray(rope_inv_freq(cfg))
        layer_params = {k: v[...] for k, v in self.layers.items()}
        if window_slots is None:
            window_slots = jnp.zeros(tokens.shape[:1], jnp.int32)
        rope_positions = absolute_positions(page_pos, positions, cache.page_size,
                                            page_table.shape[1])

        def layer(carry, index):
            x, seg = carry
            # Read this layer's weights in the body (not as scan inputs) so one set of stacked
            # params serves every segment without slicing copies.
            # Quantized projections stay quantized here (`linear` dequantizes inside the dot).
            p = {k: layer_weights(w, seg.start + index, compute) for k, w in layer_params.items()}
            b, t, _ = x.shape
            h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
            q, k, v = linear(h, p["wq"]), linear(h, p["wk"]), linear(h, p["wv"])
            if cfg.qkv_bias:
                q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
            q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
            k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
            v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
            if cfg.qk_norm:
                q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
                k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
            # YaRN scales cos/sin of q and k; all of it on q leaves the cached keys plain RoPE.
            q = apply_rope(q, rope_positions, inv_freq, rope_attention_factor(cfg) ** 2)
            k = apply_rope(k, rope_positions, inv_freq)
            # A multi-token chunk attends to its own K/V at full precision and to the cache as
            # earlier steps left it (kvjax/attention.py), so it is written after attending;
            # a decode step reads its own token back from the cache, written first. (H2O: a
            # write zeroes its tokens' mass, so it goes first there too.)
            chunk_kv = (k, v) if t > 1 else None
            write_after = chunk_kv is not None and seg.mass is None
            if not write_after:
                seg = write_layer(seg, index, k, v, positions, lengths, page_table,
                                  window_slots, rope_positions)
            attention = functools.partial(paged_attention, impl=self.attention_impl)
            mesh = active_mesh()
            q_in = q
            if mesh is not None and self.attention_impl != "xla":  # kernels: one per device
                if chunk_kv is not None:  # the chunk's K/V travel with their query heads
                    attention, q_in = with_packed_chunk(attention), pack_chunk(q, k, v)
                    chunk_kv = None
                attention = shard_attention(attention, mesh, cfg, b)
            if page_pos is not None or seg.mass is not None:  # eviction / H2O: the XLA path
                o, seg = paged_attention_step(q, seg, index, page_table, lengths, positions,
                                              window_slots, self.attention_impl, page_pos,
                                              inv_freq, (k, v) if t > 1 else None)
            elif chunk_kv is None:
                o = attention(q_in, seg, index, page_table, lengths, positions, window_slots)
            else:
                o = attention(q_in, seg, index, page_table, lengths, positions, window_slots,
                              chunk_kv=chunk_kv)
            x = x + linear(o.reshape(b, t, -1), p["wo"])
            if write_after:  # after x (it needed every read of the pages): written in place
                seg = write_layer(seg, index, k, v, positions, lengths, page_table,
                                  window_slots, rope_positions, after=x)
            h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
            x = x + swiglu(h, p["w_gate"], p["w_up"], p["w_down"])
            return (x, seg), None

        segments = []
        for seg in cache.segments:  # one scan per run of layers with the same cache format
            (x, seg), _ = jax.lax.scan(layer, (x, seg), jnp.arange(seg.num_layers))
            segments.append(seg)
        cache = cache.replace(segments=tuple(segments))
        if logits_index is not None:  # the vocab projection only where a token is sampled
            x = jnp.take_along_axis(x, logits_index[:, None, None], axis=1)
        x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
        if self.lm_head is None:  # `matmul`: bf16 weights are not copied to f32 compute
            logits = matmul(x, self.embed[...], "oi")
        else:
            logits = matmul(x, self.lm_head[...])
        if logits_index is not None:
            logits = logits[:, 0]
        return logits.astype(jnp.float32), cache


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def forward(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, positions: jax.Array,
            cache: KVCache, page_table: jax.Array, lengths: jax.Array,
            window_slots: jax.Array | None = None,
            logits_index: jax.Array | None = None,
            page_pos: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """The pure, jitted forward: (params, tokens, positions, cache, page table, lengths) ->
    (logits [batch, tokens, vocab] or [batch, vocab] at logits_index, cache). The input cache
    buffer is donated and updated in place.
    """
    model = nnx.merge(graphdef, params)
    return model(tokens, positions, cache, page_table, lengths, window_slots, logits_index,
                 page_pos)


def random_params(cfg: ModelConfig, seed: int = 0, dtype=jnp.float32) -> dict[str, jax.Array]:
    """Random weights with the real shapes (scaled so activations stay O(1) through the stack)."""
    key = jax.random.key(seed)
    params = {}
    for i, (name, shape) in enumerate(sorted(param_shapes(cfg).items())):
        if name.endswith("norm"):
            params[name] = jnp.ones(shape, dtype)
        elif name.split(".")[-1].startswith("b"):
            params[name] = 0.02 * jax.random.normal(jax.random.fold_in(key, i), shape, dtype)
        else:
            fan_in = shape[-1] if name == "embed" else shape[-2]
            std = 1.0 if name == "embed" else fan_in ** -0.5
            params[name] = std * jax.random.normal(jax.random.fold_in(key, i), shape, dtype)
    return params
