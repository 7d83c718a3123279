"""The 70B plan: compile the Llama-3.1-70B decode step for a mesh of fake CPU devices from
abstract shapes, and print its per-device memory beside the planner's figures.

    python -m kvjax.plan70b                        # llama70b_turbo, 8 devices, bf16 and turbo3.5
    python -m kvjax.plan70b --context 32768 --batch 8 --cache-dtypes bf16,turbo3.5,kivi2

No weight is materialized: params and the paged cache are `jax.ShapeDtypeStruct`s carrying the
NamedShardings of kvjax/sharding.py, and `jax.jit(...).lower(...).compile().memory_analysis()`
reports the compiled program of one device: its arguments (its weight shards and cache shard),
temporaries and outputs. The planner's rows are kvjax.memory's arithmetic divided over the devices.

Two CPU-compiler artifacts are kept out of the figures, so they describe the step a GPU runs:
  * the step is traced with bf16 activations (the CPU backend would otherwise compute in f32);
  * XLA's CPU backend has no bf16 dot: it upcasts the operands to f32, and while-loop-invariant
    code motion then hoists that upcast of *all* layers' stacked weights out of the layer loop
    (measured: +35 GB of temporaries per device for 70B on 8 devices). The plan compiles with that
    pass disabled (`xla_disable_hlo_passes`), leaving one layer's upcast per iteration.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

GB = 1e9
CPU_PLAN_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kvjax.plan70b", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="llama70b_turbo")
    p.add_argument("--devices", type=int, default=None,
                   help="fake CPU devices = the tensor degree (default: the config's mesh)")
    p.add_argument("--context", type=int, default=None,
                   help="tokens per sequence (default: the model's context)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded per step")
    p.add_argument("--cache-dtypes", default="bf16,turbo3.5")
    p.add_argument("--device-memory", type=float, default=80.0, help="GiB per device (H100: 80)")
    p.add_argument("--weight-dtype", default="auto", choices=["auto", "int8", "int4"],
                   help="projection weights: auto (param_dtype), int8 or int4")
    return p.parse_args(argv)


def quantized_abstract(params: dict, mc, mesh) -> dict:
    """The projections' ShapeDtypeStructs as int8/int4 weights (kvjax/quant/weights.py) with the
    weight's sharding on every leaf; an axis a leaf cannot split evenly is replicated."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from kvjax.quant import weights

    if mc.weight_dtype == "auto":
        return params

    def sds(shape: tuple[int, ...], dtype, like: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        spec = tuple(like.sharding.spec) + (None,) * (len(shape) - len(like.sharding.spec))

        def size(ax) -> int:
            return math.prod(mesh.shape[a] for a in (ax if isinstance(ax, tuple) else (ax,)))

        spec = tuple(ax if ax is None or shape[i] % size(ax) == 0 else None
                     for i, ax in enumerate(spec))
        return jax.ShapeDtypeStruct(shape, dtype,
                                    sharding=NamedSharding(mesh, PartitionSpec(*spec)))

    out = dict(params)
    for name in weights.QUANTIZED:
        w = params[name]
        n, i, o = w.shape
        if mc.weight_dtype == "int8":
            out[name] = weights.Int8Weight(sds((n, i, o), "int8", w),
                                           sds((n, i // weights.GROUP, o), "float32", w))
        else:
            g = (n, i // weights.GROUP, o)
            out[name] = weights.Int4Weight(sds((n, i // 2, o), "uint8", w),
                                           sds(g, weights.SCALE_DTYPE, w),
                                           sds(g, weights.SCALE_DTYPE, w))
    return out


def compile_step(cfg, mesh, context: int, batch: int) -> dict:
    """Compile one decode step (batch x 1 new token, `context` tokens of pages per sequence)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import models
    import models.transformer
    from kvjax import sharding
    from kvjax.cache import init_cache

    mc = cfg.model
    pdt = jnp.bfloat16 if cfg.param_dtype == "bf16" else jnp.float32
    params = quantized_abstract(sharding.abstract_params(mc, mesh, pdt), mc, mesh)
    graphdef, state = nnx.split(models.Transformer(mc, params))
    max_pages = math.ceil(context / cfg.cache.page_size)
    num_pages = batch * max_pages + 1
    cache = jax.eval_shape(lambda: init_cache(mc, cfg.cache, num_pages, num_slots=batch))
    cache = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         cache, sharding.cache_shardings(cache, mc, mesh))

    def rows(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.int32,
                                    sharding=sharding.batch_sharding(mesh, len(shape), batch))

    args = (rows(batch, 1), rows(batch, 1), cache, rows(batch, max_pages), rows(batch),
            rows(batch))
    saved = models.transformer.COMPUTE_DTYPE
    models.transformer.COMPUTE_DTYPE = jnp.bfloat16
    try:
        with sharding.tracing_mesh(mesh):
            lowered = sharding.jit_forward(mesh, cache).lower(graphdef, state, *args)
    finally:
        models.transformer.COMPUTE_DTYPE = saved
    m = lowered.compile(compiler_options=CPU_PLAN_OPTIONS).memory_analysis()
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)
    return {
        "weights": sharding.per_device_bytes(params),
        "cache": sharding.per_device_bytes(cache),
        "arguments": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "aliased": m.alias_size_in_bytes,
        "temp": m.temp_size_in_bytes,
        "peak": peak,
        "num_pages": num_pages,
    }


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    from kvjax.config import ConfigError, MeshConfig, load_config

    try:
        base = load_config(a.config).replace_model(weight_dtype=a.weight_dtype)
        devices = a.devices or base.mesh.data * base.mesh.tensor
        dtypes = [d.strip() for d in a.cache_dtypes.split(",") if d.strip()]
        cfgs = [base.replace_cache(dtype=d) for d in dtypes]
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_num_cpu_devices", devices)  # before anything starts the backend
    from kvjax import memory, sharding

    mc = base.model
    context = a.context or mc.max_position
    mesh = sharding.make_mesh(MeshConfig(data=1, tensor=devices))
    rules = sharding.axis_rules(mc, mesh)
    wd = "" if mc.weight_dtype == "auto" else f" ({mc.weight_dtype} projections)"
    print(f"{base.name}: {mc.num_params() / 1e9:.1f}B params in {base.param_dtype}{wd}, decode "
          f"step of batch {a.batch} x {context:,} tokens on a 1 x {devices} (data x tensor) "
          f"mesh of fake CPU devices (jax {jax.__version__})")
    print("tensor axis: " + ", ".join(k for k, v in rules.items() if v == sharding.TENSOR)
          + "; replicated: " + ", ".join(k for k, v in rules.items() if v is None))
    cols = []
    for cfg in cfgs:
        c = compile_step(cfg, mesh, context, a.batch)
        p = memory.plan(cfg, context, a.batch, a.device_memory, devices)
        c["plan_weights"] = p.weight_bytes / devices
        c["plan_cache"] = a.batch * p.bytes_per_request / devices
        c["plan_tokens"] = p.kv_tokens
        cols.append((cfg.cache.dtype, c))
    head = f"{'per device (GB)':<34}" + "".join(f"{d + ' cache':>16}" for d, _ in cols)
    print(head)
    print("-" * len(head))

    def row(label: str, key: str, scale: float = GB, fmt: str = "{:>16.2f}") -> None:
        print(f"{label:<34}" + "".join(fmt.format(c[key] / scale) for _, c in cols))

    row("weights (compiled arguments)", "weights")
    row("KV cache (compiled arguments)", "cache")
    row("compiled arguments", "arguments")
    row("compiled temporaries", "temp")
    row("compiled outputs (aliased: cache)", "outputs")
    row("compiled peak (args+out-alias+temp)", "peak")
    row("planner: weights / devices", "plan_weights")
    row("planner: KV of the batch / devices", "plan_cache")
    row(f"planner: KV tokens at {a.device_memory:g} GiB", "plan_tokens", 1, "{:>16,.0f}")
    for d, c in cols:
        budget = a.device_memory * 2**30
        print(f"{d}: peak {c['peak'] / 2**30:.2f} GiB of {a.device_memory:g} GiB per device "
              f"({'fits' if c['peak'] <= budget else 'does NOT fit'}); pool of "
              f"{c['num_pages']:,} pages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
