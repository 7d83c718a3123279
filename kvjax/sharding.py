"""Device mesh, logical-axis sharding rules, and the shard_map wrapper for attention kernels.

Mesh: two axes, ("data", "tensor"), built from the config's `MeshConfig` with `jax.make_mesh`
and `Auto` axis types. The model code carries no sharding annotations: parameters, the cache and
the per-step inputs are placed with `NamedSharding`s from the table below, the jitted forward pins
its outputs (logits replicated, the cache exactly where it came from, so donation updates it in
place), and XLA's SPMD partitioner propagates everything in between. Under `jax.distributed`
the same code is multi-controller: every process runs it over the global mesh.

Logical axes -> mesh axes live in one table, `LOGICAL_RULES`; every parameter and cache leaf
names its axes (`PARAM_AXES`, `CACHE_AXES`). A logical axis is sharded only when the mesh axis
divides its size counted in whole units (heads, not heads x head_dim columns); otherwise it is
replicated, which is always exact.

Tensor parallelism is Megatron's: wq/wk/wv (and Qwen2's biases) are column-parallel by heads and
wo row-parallel; w_gate/w_up column-parallel and w_down row-parallel, so each block ends in one
all-reduce. The embedding table is split on its hidden columns (the lookup stays local, then the
[batch, tokens, hidden] activations are gathered); an untied lm_head is split on vocab (logits
are gathered at the end); norms are replicated.
  * tensor degree > KV heads (or not dividing them): the KV heads, wk/wv and the cache pool are
    replicated on the tensor axis; every device computes and writes all KV heads (same values),
    and the query heads still shard when the degree divides them.
  * query heads not divisible (SmolLM2: 9 heads on 4 or 8 devices): the whole attention block is
    replicated and only the MLP and the embeddings shard.

Cache: every leaf shaped [layers, kv_heads, num_pages, page_size, ...] (any rank >= 4 whose axis 1
is the KV heads: K/V pages and, when they land, packed codes and their per-token side arrays)
shards axis 1 like the KV heads; anything else in the cache pytree (quantizer constants:
rotations, codebooks) is replicated.

Data parallelism: batch rows of tokens, positions, page tables and lengths are split on "data"
(when the data degree divides the batch; replicated otherwise). The page pool is *replicated*
across the data axis and sharded only on tensor: page ids stay global and the host allocator is
unchanged, each step's new K/V rows (a few KB) are all-gathered across "data" so every replica
writes every row, and attention reads its own rows' pages locally. That is the simplest correct
design; it spends one pool per data replica. Splitting num_pages over "data" (each replica owning
a page range, like independent engines) saves that memory but needs a per-replica allocator and
local page ids under shard_map: a scheduler-level change left for later.

Kernels: `shard_attention` wraps an attention function (a Pallas kernel, or the XLA reference)
in `shard_map` so each device runs it on its own query heads and KV heads, with page tables and
lengths data-sharded or replicated and everything else replicated.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kvjax.config import Config, ConfigError, MeshConfig, ModelConfig

try:  # jax >= 0.7 (0.10.2 here, 0.11.2 on the GPU image)
    from jax import shard_map as _shard_map
except ImportError:  # pragma: no cover - older jax
    from jax.experimental.shard_map import shard_map as _shard_map

DATA, TENSOR = "data", "tensor"

# Logical axis -> mesh axis (None: replicated). The one table to edit to re-shard.
LOGICAL_RULES: dict[str, str | None] = {
    "batch": DATA,  # rows of tokens, positions, page tables, lengths
    "layers": None,  # the scanned layer axis of stacked weights and of the cache
    "hidden": None,  # d_model of activations, norms and the row side of most weights
    "vocab": None,  # rows of the embedding table (the lookup index)
    "embed_hidden": TENSOR,  # hidden columns of the embedding table
    "vocab_out": TENSOR,  # columns of an untied lm_head
    "q_heads": TENSOR,  # query heads (columns of wq/bq, rows of wo)
    "kv_heads": TENSOR,  # KV heads (columns of wk/wv/bk/bv, axis 1 of cache leaves)
    "mlp": TENSOR,  # the MLP's intermediate axis
    "head_dim": None,
    "pages": None,  # the page pool: whole on every data replica (see above)
    "page_slots": None,
}

PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed_hidden"),
    "lm_head": ("hidden", "vocab_out"),
    "final_norm": ("hidden",),
    "layers.attn_norm": ("layers", "hidden"),
    "layers.mlp_norm": ("layers", "hidden"),
    "layers.wq": ("layers", "hidden", "q_heads"),
    "layers.wk": ("layers", "hidden", "kv_heads"),
    "layers.wv": ("layers", "hidden", "kv_heads"),
    "layers.wo": ("layers", "q_heads", "hidden"),
    "layers.w_gate": ("layers", "hidden", "mlp"),
    "layers.w_up": ("layers", "hidden", "mlp"),
    "layers.w_down": ("layers", "mlp", "hidden"),
    "layers.bq": ("layers", "q_heads"),
    "layers.bk": ("layers", "kv_heads"),
    "layers.bv": ("layers", "kv_heads"),
    "layers.q_norm": ("layers", "head_dim"),
    "layers.k_norm": ("layers", "head_dim"),
}

# Leading axes of every paged cache leaf; trailing axes (head_dim, packed codes) are unsharded.
CACHE_AXES = ("layers", "kv_heads", "pages", "page_slots")


def make_mesh(mesh_cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """The ("data", "tensor") mesh over the first data x tensor devices (all of them by default).

    The tensor axis is the minor one: with one process per host it stays inside a host whenever
    the tensor degree is at most the local device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = mesh_cfg.data * mesh_cfg.tensor
    if n < 1 or n > len(devices):
        raise ConfigError(f"mesh data={mesh_cfg.data} x tensor={mesh_cfg.tensor} needs {n} "
                          f"devices; {len(devices)} available")
    if jax.process_count() > 1 and n != len(devices):
        raise ConfigError(f"a multi-process mesh must use every device: {n} != {len(devices)}")
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((mesh_cfg.data, mesh_cfg.tensor), (DATA, TENSOR), axis_types=auto,
                         devices=devices[:n])


def mesh_for_run(cfg: Config, strict: bool = True) -> Mesh | None:
    """The mesh a run uses, or None for the plain single-device path.

    A multi-process run whose config leaves the mesh at 1 x 1 spreads tensor parallelism over
    every device, so `kvjax.launch ... -- --config smollm2` uses the whole global mesh. With
    strict=False a config mesh larger than the devices at hand (llama70b's tensor=8 on a one-GPU
    smoke run) falls back to one device instead of raising.
    """
    m = cfg.mesh
    if m.data * m.tensor == 1 and jax.process_count() > 1:
        m = MeshConfig(data=1, tensor=jax.device_count())
    if m.data * m.tensor == 1:
        return None
    if not strict and jax.process_count() == 1 and m.data * m.tensor > jax.device_count():
        return None
    return make_mesh(m)


def axis_rules(mc: ModelConfig, mesh: Mesh, batch: int | None = None) -> dict[str, str | None]:
    """LOGICAL_RULES with every axis the mesh cannot split evenly (in whole units) replicated."""
    units = {"q_heads": mc.num_heads, "kv_heads": mc.num_kv_heads, "mlp": mc.intermediate_size,
             "embed_hidden": mc.hidden_size, "vocab_out": mc.vocab_size,
             "head_dim": mc.head_dim, "hidden": mc.hidden_size, "vocab": mc.vocab_size}
    if batch is not None:
        units["batch"] = batch
    rules = {}
    for name, axis in LOGICAL_RULES.items():
        if axis is not None and name in units and units[name] % mesh.shape[axis]:
            axis = None
        if axis is not None and name == "batch" and batch is None:
            axis = None
        rules[name] = axis
    return rules


def logical_spec(axes: tuple[str, ...], rules: dict[str, str | None]) -> P:
    return P(*(rules[a] for a in axes))


def param_shardings(mc: ModelConfig, mesh: Mesh) -> dict[str, NamedSharding]:
    import models

    rules = axis_rules(mc, mesh)
    return {name: NamedSharding(mesh, logical_spec(PARAM_AXES[name], rules))
            for name in models.param_shapes(mc)}


def cache_leaf_spec(shape: tuple[int, ...], mc: ModelConfig, mesh: Mesh) -> P:
    """Leaves [layers, kv_heads, pages, page_size, ...] shard with the KV heads; rest replicate."""
    if len(shape) >= 4 and shape[1] == mc.num_kv_heads:
        return logical_spec(CACHE_AXES, axis_rules(mc, mesh))
    return P()


def cache_shardings(cache_shapes: Any, mc: ModelConfig, mesh: Mesh) -> Any:
    """NamedShardings for a cache pytree (of arrays or ShapeDtypeStructs), leaf by leaf."""
    return jax.tree.map(lambda a: NamedSharding(mesh, cache_leaf_spec(a.shape, mc, mesh)),
                        cache_shapes)


def init_sharded(init_fn: Callable[[], Any], mc: ModelConfig, mesh: Mesh | None) -> Any:
    """Run a cache constructor straight into its shardings (no full copy on any one device);
    without a mesh, just run it."""
    if mesh is None:
        return init_fn()
    shardings = cache_shardings(jax.eval_shape(init_fn), mc, mesh)
    return jax.jit(init_fn, out_shardings=shardings)()


def batch_sharding(mesh: Mesh, ndim: int, batch: int) -> NamedSharding:
    """Rows on "data" when the data degree divides the batch, replicated otherwise."""
    row = DATA if batch % mesh.shape[DATA] == 0 else None
    return NamedSharding(mesh, P(row, *([None] * (ndim - 1))))


def put_global(x: np.ndarray, sharding: NamedSharding, dtype=None) -> jax.Array:
    """A host array (identical on every process) -> a global array; each device gets its slice,
    so no process ever holds another's shards on device."""
    x = np.asarray(x)
    return jax.make_array_from_callback(
        x.shape, sharding, lambda idx: x[idx] if dtype is None else x[idx].astype(dtype))


def put_batch(mesh: Mesh, x: np.ndarray) -> jax.Array:
    return put_global(x, batch_sharding(mesh, x.ndim, x.shape[0]))


def load_sharded(source: str, cfg: Config, mesh: Mesh, dtype) -> tuple[dict, Any] | None:
    """(params, tokenizer) of a kvjax orbax checkpoint restored straight into its shardings, each
    process reading only its devices' shards; None for other formats (load them on the host and
    let `shard_params` slice them)."""
    from pathlib import Path

    from kvjax.loaders import check_compatible, orbax_ckpt

    if not (Path(source).is_dir() and orbax_ckpt.is_checkpoint(source)):
        return None
    found = orbax_ckpt.model_config(source)
    check_compatible(cfg.model, found, source)
    if found.num_layers != cfg.model.num_layers:
        return None  # a cut-down smoke run slices layers on the host
    params = orbax_ckpt.load_params(source, cfg.model, abstract_params(cfg.model, mesh, dtype))
    return params, orbax_ckpt.load_tokenizer(source)


def _on_mesh(x: Any, mesh: Mesh) -> bool:
    return (isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding)
            and x.sharding.mesh == mesh)


def shard_params(params: dict, mc: ModelConfig, mesh: Mesh, dtype) -> dict[str, jax.Array]:
    """Place params by PARAM_AXES. Host arrays are sliced per device; global arrays already
    restored into their shardings (orbax) are only cast."""
    shardings = param_shardings(mc, mesh)
    out = {}
    for name, x in params.items():
        s = shardings[name]
        if _on_mesh(x, mesh) and x.sharding == s and x.dtype == dtype:
            out[name] = x
        elif _on_mesh(x, mesh):
            out[name] = jax.jit(lambda a: a.astype(dtype), out_shardings=s)(x)
        else:
            out[name] = put_global(np.asarray(x), s, np.dtype(dtype))
    return out


def abstract_params(mc: ModelConfig, mesh: Mesh, dtype) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs with shardings for every parameter: restore targets and plans."""
    import models

    shardings = param_shardings(mc, mesh)
    return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[name])
            for name, shape in models.param_shapes(mc).items()}


_ACTIVE_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("kvjax_mesh",
                                                                          default=None)


def active_mesh() -> Mesh | None:
    """The mesh of the sharded forward being traced, None outside one. The model reads it to
    wrap calls XLA cannot partition (Pallas kernels) in `shard_attention`. Each sharded forward
    is its own jitted function, so a trace never outlives the mesh it saw."""
    return _ACTIVE_MESH.get()


@contextlib.contextmanager
def tracing_mesh(mesh: Mesh):
    """Make `mesh` the active_mesh while a sharded forward is traced (or lowered)."""
    token = _ACTIVE_MESH.set(mesh)
    try:
        yield mesh
    finally:
        _ACTIVE_MESH.reset(token)


def jit_forward(mesh: Mesh, cache: Any) -> Callable:
    """The jitted forward with its outputs pinned: logits replicated, the cache (a pytree of
    arrays or ShapeDtypeStructs carrying NamedShardings) where it came from, and donated."""
    import models.transformer

    out = (NamedSharding(mesh, P()), jax.tree.map(lambda a: a.sharding, cache))
    return jax.jit(models.transformer.forward.__wrapped__, static_argnames=("graphdef",),
                   donate_argnames=("cache",), out_shardings=out)


def sharded_forward(mesh: Mesh, cache: Any) -> Callable:
    """`models.forward` for this mesh, same signature: the cache is donated and comes back where
    it was (so it is updated in place and the next step sees the same layout), logits come back
    replicated (every process can read them). The per-step host inputs after the cache (page
    table, lengths, ...: all batch-major) and tokens/positions become global arrays with their
    rows on "data"; every process must pass the same values."""
    jitted = jit_forward(mesh, cache)

    def put(x):
        if x is None or _on_mesh(x, mesh):
            return x
        return put_batch(mesh, np.asarray(x))

    def forward(graphdef, params, tokens, positions, cache, *rest):
        with tracing_mesh(mesh):
            return jitted(graphdef, params, put(tokens), put(positions), cache,
                          *(put(x) for x in rest))

    forward.jitted = jitted  # for ahead-of-time compiles (Runner.compile)
    return forward


def shard_attention(fn: Callable, mesh: Mesh, mc: ModelConfig, batch: int) -> Callable:
    """Wrap an attention function `fn(q, cache, layer, *rows)` in `shard_map`.

    q: [batch, tokens, num_heads, head_dim]; cache: a pytree whose pool leaves are [layers,
    kv_heads, num_pages, ...] (placed as in `cache_leaf_spec`; other leaves replicated); layer: a
    scalar; rows: batch-major arrays (page table, lengths, positions, window slots; None allowed).
    Each device calls `fn` on its own query heads with the KV heads they read: its KV-head shard
    when the KV heads are split, or, when they are replicated on the tensor axis but the query
    heads are not, the one KV head its query heads share (sliced out locally). Rows are split on
    "data" when it divides the batch. Returns [batch, tokens, num_heads, head_dim] laid out as q.
    """
    rules = axis_rules(mc, mesh, batch)
    row, qh, kvh = rules["batch"], rules["q_heads"], rules["kv_heads"]
    groups = mc.num_heads // mc.num_kv_heads
    local_heads = mc.num_heads // mesh.shape[TENSOR] if qh else mc.num_heads
    if qh is not None and kvh is None and groups % local_heads:
        qh, local_heads = None, mc.num_heads  # a device's query heads would span KV heads
    pick_kv = qh is not None and kvh is None  # replicated KV heads, split query heads

    def is_pool(a):
        return a.ndim >= 4 and a.shape[1] == mc.num_kv_heads

    def local(q, cache, layer, *rows):
        if pick_kv:  # this device's query heads all belong to one KV head
            first = jax.lax.axis_index(TENSOR) * local_heads // groups
            cache = jax.tree.map(
                lambda a: jax.lax.dynamic_slice_in_dim(a, first, 1, axis=1) if is_pool(a) else a,
                cache)
        return fn(q, cache, layer, *rows)

    def wrapped(q, cache, layer, *rows):
        cache_specs = jax.tree.map(lambda a: cache_leaf_spec(a.shape, mc, mesh), cache)
        row_specs = tuple(None if r is None else P(row, *([None] * (r.ndim - 1))) for r in rows)
        q_spec = P(row, None, qh, None)
        return _shard_map(local, mesh=mesh, in_specs=(q_spec, cache_specs, P(), *row_specs),
                          out_specs=q_spec, check_vma=False)(q, cache, layer, *rows)

    return wrapped


def local_kv_heads(x: jax.Array, n_local: int) -> jax.Array:
    """x [kv_heads, ...], a per-KV-head constant (a KV calibration's key mean or channel order),
    cut to the n_local KV heads this device reads inside `shard_attention`: its block when the
    KV heads are split on "tensor", or the one KV head its query heads share when they are
    replicated. Both start at axis_index * kv_heads // tensor. x as is when n_local covers it."""
    h = x.shape[0]
    if n_local == h:
        return x
    first = jax.lax.axis_index(TENSOR) * h // jax.lax.axis_size(TENSOR)
    return jax.lax.dynamic_slice_in_dim(x, first, n_local, axis=0)


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs/arrays with NamedShardings."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return total


__all__ = ["CACHE_AXES", "DATA", "LOGICAL_RULES", "PARAM_AXES", "TENSOR", "abstract_params",
           "active_mesh", "axis_rules", "batch_sharding", "cache_leaf_spec", "cache_shardings",
           "init_sharded", "jit_forward", "load_sharded", "local_kv_heads", "make_mesh",
           "mesh_for_run", "per_device_bytes", "put_batch", "put_global", "shard_attention",
           "shard_params", "sharded_forward", "tracing_mesh"]
