"""KV-cache capacity planning: `python -m kvjax.memory --config NAME`.

Bytes per token = 2 (K and V) x layers x kv_heads x head_dim x bytes per element. The pool that
fits is what is left of the devices' memory (times a utilization fraction, like vLLM's
--gpu-memory-utilization) after the weights and an activation reserve; it is reported in the
words vLLM users know: "KV cache size: N tokens", "Maximum concurrency for M tokens per request".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from absl import flags

from kvjax import cli
from kvjax.cache import bytes_per_token, window_bytes_per_sequence
from kvjax.config import Config
from kvjax.quant import weights as qweights

GIB = 2**30
_PARAM_BYTES = {"bf16": 2, "f32": 4}


@dataclass(frozen=True)
class Plan:
    kv_bytes_per_token: float
    bytes_per_request: int
    weight_bytes: int
    usable_bytes: int  # device memory x utilization, all devices
    kv_pool_bytes: int
    kv_tokens: int
    max_concurrency: float


def plan(cfg: Config, context: int, batch: int, device_memory_gib: float, devices: int,
         utilization: float = 0.9, activation_reserve_gib: float = 1.0,
         stored: tuple[float, float] | None = None) -> Plan:
    """stored: (bytes per token, bytes per sequence's window) as a device stores them
    (`stored_bytes`); default the logical figures, what GPU and CPU store."""
    mc = cfg.model
    per_token = stored[0] if stored else bytes_per_token(mc, cfg.cache)
    window = stored[1] if stored else window_bytes_per_sequence(mc, cfg.cache)
    # Projections at --weight-dtype (int8 / int4 + their scales), the rest at param_dtype.
    weights = qweights.weight_bytes(mc, _PARAM_BYTES[cfg.param_dtype])
    usable = int(device_memory_gib * GIB * devices * utilization)
    pool = max(usable - weights - int(activation_reserve_gib * GIB * devices), 0)
    # The pool holds whole pages: round the token count down to a page boundary.
    tokens = int(pool // per_token) // cfg.cache.page_size * cfg.cache.page_size
    # A request holds whole pages, plus its full-precision window where the dtype keeps one.
    per_request = int(per_token * math.ceil(context / cfg.cache.page_size) * cfg.cache.page_size
                      + window)
    return Plan(per_token, per_request, weights, usable, pool, tokens, pool / per_request)


def stored_bytes(cfg: Config, target: str) -> tuple[float, float]:
    """(KV bytes per token, window bytes per sequence) as a TPU target stores the pool: lane
    padding included (kvjax/pool_formats.py `resident_bytes`, compiled for the target without
    one; needs the compile extra)."""
    from kvjax.bench.compile_target import target_device
    from kvjax.pool_formats import resident_bytes

    page, slot = resident_bytes(cfg, target_device(target))
    return page / cfg.cache.page_size, slot


def fmt_num(x: float) -> str:
    """1234.0 -> "1,234"; 1234.5 -> "1,234.5"."""
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.1f}"


def format_plan(cfg: Config, p: Plan, context: int, batch: int, device_memory_gib: float,
                devices: int, target: str | None = None) -> str:
    mc = cfg.model
    bf16 = bytes_per_token(mc, dataclasses.replace(cfg.cache, dtype="bf16"))
    logical = bytes_per_token(mc, cfg.cache)
    lines = [
        f"config {cfg.name}: {mc.num_layers} layers, {mc.num_kv_heads} KV heads x head_dim "
        f"{mc.head_dim}, kv cache dtype {cfg.cache.dtype}, page size {cfg.cache.page_size}",
        f"KV bytes per token: {fmt_num(p.kv_bytes_per_token)} "
        f"({p.kv_bytes_per_token / bf16:.2f}x of bf16's {fmt_num(bf16)})"
        + (f" as {target} stores it ({p.kv_bytes_per_token / logical:.2f}x the logical "
           f"{fmt_num(logical)}: lane padding)" if target else ""),
        f"KV bytes per request at {context:,} tokens: {p.bytes_per_request:,} "
        f"({p.bytes_per_request / 1e9:.2f} GB)",
        f"KV bytes for batch {batch} at {context:,} tokens: {batch * p.bytes_per_request:,} "
        f"({batch * p.bytes_per_request / 1e9:.2f} GB)",
        f"weights: {mc.num_params():,} params, {p.weight_bytes / 1e9:.2f} GB in {cfg.param_dtype}"
        + ("" if mc.weight_dtype == "auto" else f" with {mc.weight_dtype} projections "
           f"({qweights.projection_params(mc):,} params)"),
        f"devices: {devices} x {device_memory_gib:g} GiB, {p.usable_bytes / 1e9:.2f} GB usable "
        "at 0.90 utilization",
        f"KV cache size: {p.kv_tokens:,} tokens",
        f"Maximum concurrency for {context:,} tokens per request: {p.max_concurrency:.2f}x",
    ]
    if batch * p.bytes_per_request > p.kv_pool_bytes:
        lines.append(f"warning: batch {batch} at {context:,} tokens does not fit; "
                     f"at most {int(p.max_concurrency)} such requests at once")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cfg = cli.config_from_flags()
    context = FLAGS.context or cfg.model.max_position
    devices = FLAGS.devices or cfg.mesh.data * cfg.mesh.tensor
    stored = stored_bytes(cfg, FLAGS.target) if FLAGS.target else None
    p = plan(cfg, context, FLAGS.batch, FLAGS.device_memory, devices, stored=stored)
    print(format_plan(cfg, p, context, FLAGS.batch, FLAGS.device_memory, devices, FLAGS.target))
    return 0


FLAGS = flags.FLAGS

if __name__ == "__main__":
    cli.define_config_flags()
    flags.DEFINE_integer("context", None, "Tokens per request (default: the model's context).",
                         lower_bound=1)
    flags.DEFINE_integer("batch", 1, "Concurrent requests.", lower_bound=1)
    flags.DEFINE_float("device_memory", 80.0, "Memory per device in GiB (H100: 80).",
                       lower_bound=0.0)
    flags.DEFINE_integer("devices", None, "Number of devices (default: the config's mesh, "
                         "data x tensor).", lower_bound=1)
    flags.DEFINE_enum("target", None, ["tpu-v5e", "tpu-v6e", "tpu-v5p"],
                      "Count the KV pool as this TPU stores it (lane padding of narrow leaves; "
                      "compiled here without a TPU, needs the compile extra). Default: logical "
                      "bytes, what GPUs and CPUs store.")
    cli.run(main)
