"""Compile a whole model decode step with attention on the kernels for a TPU / H100 target (the
``model:NAME`` cases of ``python -m kvjax.bench.compile``).

NAME is CONFIG-DTYPE[-CONTEXT], e.g. ``smollm2-turbo3.5`` (32K context) or
``smollm2-bf16-131072``: one decode step (batch 1, one new token) over CONTEXT tokens of pages,
abstract weights and cache on one device of the target, traced with bf16 activations. Reports
whether the lowered step holds the kernel's custom call (it must: a step that fell back to the XLA
path would not), compiled memory, and on TPU ``cost_analysis()`` bytes accessed.
"""

from __future__ import annotations

import math
import re


def parse(name: str) -> tuple[str, str, int]:
    m = re.fullmatch(r"([a-z0-9_]+)-([a-z0-9_.]+?)(?:-(\d+))?", name)
    if not m:
        raise ValueError(f"bad model case {name!r}; expected CONFIG-DTYPE[-CONTEXT]")
    return m[1], m[2], int(m[3] or 32768)


def run_model(name: str, target: str) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import models
    import models.transformer
    from kvjax import sharding
    from kvjax.bench.compile_case import compile_fn, target_device
    from kvjax.cache import init_cache
    from kvjax.config import MeshConfig, load_config

    config, dtype, context = parse(name)
    dev = target_device(target)
    # Default page size for the dtype (KIVI: 32), and no KV calibration: calibrated TurboQuant
    # pools (SmolLM2's default) have no kernel yet and would compile the XLA path.
    cfg = load_config(config).replace_cache(dtype=dtype, page_size=0, calibration="")
    mc = cfg.model
    mesh = sharding.make_mesh(MeshConfig(1, 1), devices=[dev])
    params = sharding.abstract_params(mc, mesh, jnp.bfloat16)
    graphdef, state = nnx.split(models.Transformer(mc, params, attention_impl="pallas"))
    batch = 1
    max_pages = math.ceil(context / cfg.cache.page_size)
    cache = jax.eval_shape(lambda: init_cache(mc, cfg.cache, batch * max_pages + 1,
                                              num_slots=batch))
    cache = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         cache, sharding.cache_shardings(cache, mc, mesh))

    def rows(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.int32,
                                    sharding=sharding.batch_sharding(mesh, len(shape), batch))

    args = (state, rows(batch, 1), rows(batch, 1), cache, rows(batch, max_pages), rows(batch),
            rows(batch))
    fwd = models.transformer.forward.__wrapped__

    def step(state, *rest):
        return fwd(graphdef, state, *rest)

    saved = models.transformer.COMPUTE_DTYPE
    models.transformer.COMPUTE_DTYPE = jnp.bfloat16
    try:
        with sharding.tracing_mesh(mesh):
            out = compile_fn(step, args, target, donate_argnums=(3,))  # the cache, as served
    finally:
        models.transformer.COMPUTE_DTYPE = saved
    out["cache_bytes"] = sharding.per_device_bytes(cache)
    return out
