"""Compile a whole model step with attention on the kernels for a TPU / H100 target (the
``model:NAME`` cases of ``python -m kvjax.bench.compile``).

NAME is ``CONFIG-DTYPE[-CONTEXT][-pCHUNK][-lLAYERS][-tpT]``:

  CONTEXT  tokens of pages per sequence (default 32768); batch 1
  pCHUNK   a prefill chunk of CHUNK new tokens ending at CONTEXT (default: a decode step, one);
           a chunk's attention is the ragged prefill+decode kernel, a decode step's the
           paged decode kernel
  lLAYERS  only the first LAYERS decoder layers (a 70B layer fits this machine; the step's
           memory and bytes then describe those layers plus embeddings and lm_head)
  tpT      tensor parallel over T devices of the target (8: TPU 2x4 / v5p 2x2x2, GPU 1x1x8),
           laid out as kvjax/sharding.py places a served model (heads, MLP and pool on "tensor")

e.g. ``smollm2-turbo3.5-131072``, ``smollm2-bf16-32768-p512``,
``llama70b_turbo-turbo3.5-32768-l1-tp8``.
Abstract weights (bf16) and cache on the target's devices, bf16 activations, the cache donated
as served. Reports the kernel custom calls in the lowered step (a step without one fell back to
the XLA path: a failure), compiled memory per device, the cache's and weights' bytes per device,
KV bytes per token (for the byte ratio against bf16), the kernels' reads per step (pages of every
token + the bf16 ring, from the layout) and, on TPU, cost_analysis bytes accessed (XLA's traffic
outside the kernels: it does not count a Mosaic call's reads, and counts a scan body once).
The config's own KV calibration (SmolLM2's TurboQuant dtypes: the shipped one; the kernels read
calibrated pools), so a step is the one a user runs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelCase:
    config: str
    dtype: str
    context: int = 32768
    chunk: int = 1  # new tokens in the step: 1 = decode
    layers: int = 0  # 0: all of the config's
    tensor: int = 1

    @property
    def name(self) -> str:
        out = f"{self.config}-{self.dtype}-{self.context}"
        out += f"-p{self.chunk}" if self.chunk > 1 else ""
        out += f"-l{self.layers}" if self.layers else ""
        return out + (f"-tp{self.tensor}" if self.tensor > 1 else "")

    @property
    def group(self) -> str:
        """The name without the dtype: steps compared against each other (and bf16)."""
        return self.name.replace(f"-{self.dtype}-", "-*-", 1)


def parse(name: str) -> ModelCase:
    parts = name.split("-")
    if len(parts) < 2 or not re.fullmatch(r"[a-z0-9_]+", parts[0]):
        raise ValueError(f"bad model case {name!r}; expected CONFIG-DTYPE[-CONTEXT][-pCHUNK]"
                         "[-lLAYERS][-tpT]")
    kw: dict = {}
    for p in parts[2:]:
        m = re.fullmatch(r"(p|l|tp)?(\d+)", p)
        if not m:
            raise ValueError(f"bad model case {name!r}: {p!r} is not CONTEXT, pCHUNK, lLAYERS "
                             "or tpT")
        kw[{None: "context", "p": "chunk", "l": "layers", "tp": "tensor"}[m[1]]] = int(m[2])
    return ModelCase(parts[0], parts[1], **kw)


def run_model(name: str, target: str) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import models
    import models.transformer
    from kvjax import sharding
    from kvjax.bench.compile_target import compile_fn, target_devices
    from kvjax.bench.pool_copies import hlo_type
    from kvjax.cache import init_cache
    from kvjax.cache.paged import bytes_per_token, window_bytes_per_sequence
    from kvjax.config import MeshConfig, load_config
    from kvjax.pool_formats import (
        abstract,
        pin,
        pinned_forward,
        pool_formats,
        pool_leaf_layout,
    )

    mc_ = parse(name)
    devices = target_devices(target, mc_.tensor)
    # Default page size for the dtype (KIVI: 32); the config's calibration (see the docstring).
    cfg = load_config(mc_.config).replace_cache(dtype=mc_.dtype, page_size=0)
    if mc_.layers:
        cfg = cfg.replace_model(num_layers=mc_.layers)
    mc = cfg.model
    if mc_.chunk > mc_.context:
        raise ValueError(f"chunk {mc_.chunk} > context {mc_.context}")
    mesh = sharding.make_mesh(MeshConfig(1, mc_.tensor), devices=devices)
    params = sharding.abstract_params(mc, mesh, jnp.bfloat16)
    graphdef, state = nnx.split(models.Transformer(mc, params, attention_impl="pallas"))
    batch, t = 1, mc_.chunk
    max_pages = math.ceil(mc_.context / cfg.cache.page_size)
    cache = jax.eval_shape(lambda: pin(init_cache(mc, cfg.cache, batch * max_pages + 1,
                                                  num_slots=batch), devices[0].platform))
    # The pool in the device-local layout the Runner stores it in (kvjax/pool_formats.py: on
    # TPU the layer loop's row-major layout, so the step does not relayout the pool).
    shards = sharding.cache_shardings(cache, mc, mesh)
    formats = pool_formats(cache, shards, devices[0].platform) or shards
    cache = abstract(cache, formats)

    def rows(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.int32,
                                    sharding=sharding.batch_sharding(mesh, len(shape), batch))

    # tokens, positions [b, t] (the chunk ends at the context), cache, page table, lengths,
    # window slots, logits_index (the one row sampled, as the engine asks)
    args = (graphdef, state, rows(batch, t), rows(batch, t), cache, rows(batch, max_pages),
            rows(batch), rows(batch), rows(batch))
    # The Runner's step jit (kvjax/pool_formats.py pinned_forward): the cache donated, as
    # served, and returned in its formats; logits replicated.
    step = pinned_forward(mesh, formats).jitted
    # HLO types of the pool (and ring) leaves pool_formats pins, and of one layer of them: a
    # copy of one is the whole-pool relayout those layouts exist to avoid (`pool_copy_count`).
    leaves = [leaf for seg in cache.segments
              for leaf in (*seg.k, *seg.v, seg.wk, seg.wv) if leaf is not None]
    pool_types = frozenset(
        hlo_type(shape[i:], leaf.dtype) for leaf in leaves
        if pool_leaf_layout(tuple(leaf.shape), leaf.dtype) is not None
        for shape in [tuple(leaf.sharding.shard_shape(leaf.shape))] for i in (0, 1))
    # Float buffers shaped like one KV head's whole context or more, other than the cache's
    # own leaves (and one layer of them, and their in-place updates): a dequantized copy of
    # the pool (`dequant_count`; compile_target.hlo_float_kv_buffers).
    cache_leaves = frozenset(
        (hlo_type((), leaf.dtype)[:-2], math.prod(shape) // div)
        for leaf in jax.tree.leaves(cache)
        for shape in [tuple(leaf.sharding.shard_shape(leaf.shape))]
        for div in {1, max(shape[0], 1) if shape else 1})
    kv_check = (mc.head_dim, mc_.context * mc.head_dim, cache_leaves)
    saved = models.transformer.COMPUTE_DTYPE
    models.transformer.COMPUTE_DTYPE = jnp.bfloat16
    try:
        with sharding.tracing_mesh(mesh):
            out = compile_fn(step, args, target, pool_types=pool_types, kv_check=kv_check)
    finally:
        models.transformer.COMPUTE_DTYPE = saved
    # What the attention kernels read per step on one device: every token's pages (and the
    # bf16 ring), from the cache layout. XLA's cost_analysis does not count a Mosaic kernel's
    # traffic (its bytes accessed do not change with the pool's size), so this is added to it.
    split = mc_.tensor if sharding.axis_rules(mc, mesh)["kv_heads"] == sharding.TENSOR else 1
    bpt = bytes_per_token(mc, cfg.cache)
    kernel = batch * (mc_.context * bpt + window_bytes_per_sequence(mc, cfg.cache)) / split
    out.update(cache_bytes=sharding.per_device_bytes(cache),
               weight_bytes=sharding.per_device_bytes(params), kv_bytes_per_token=bpt,
               kernel_read_bytes=int(kernel), group=mc_.group, dtype=mc_.dtype,
               devices=len(devices))
    return out
