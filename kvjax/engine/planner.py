"""The memory planner: how many KV pages a pool gets (vLLM's recipe), per device on a mesh."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import jax

from kvjax import sharding
from kvjax.cache import bytes_per_token, window_bytes_per_sequence
from kvjax.config import Config
from kvjax.pool_formats import resident_bytes

if TYPE_CHECKING:
    from kvjax.engine.engine import EngineConfig

GIB = 2**30


def kv_split(cfg: Config, mesh: jax.sharding.Mesh | None) -> int:
    """Ways the KV heads (and so each page) are split across a device's tensor axis: 1 without a
    mesh or when tensor parallelism exceeds/does not divide the KV heads (they replicate)."""
    if mesh is None:
        return 1
    return mesh.shape[sharding.TENSOR] if sharding.axis_rules(cfg.model, mesh)["kv_heads"] else 1


def size_pool(cfg: Config, ecfg: EngineConfig, max_model_len: int, weight_bytes: int,
              mesh: jax.sharding.Mesh | None = None) -> tuple[int, str]:
    """Pages for the main pool and a log line about the memory it came from.

    On an accelerator: device memory x utilization - weights - an activation reserve (vLLM's
    recipe without the profiling run). On CPU, where "device memory" is the host's, the default is
    what max_num_seqs requests of max_model_len tokens need, capped at 4 GiB and by free RAM. On
    a mesh every byte figure is one device's (weight_bytes: its shards; a page: its KV-head
    share), and the pool is one data-parallel replica's (each holds the whole pool, sharding.py).
    On TPU a page counts the bytes it takes in the stored layout (`resident_bytes`: 2x-15x the
    logical figure for head_dim-64 leaves), so the pool fits the memory it was sized from.
    """
    mc = cfg.model
    split = kv_split(cfg, mesh)
    page_bytes = int(bytes_per_token(mc, cfg.cache) * cfg.cache.page_size) // split
    # Layouts with a full-precision window hold one ring per running sequence beside the pages.
    window_bytes = window_bytes_per_sequence(mc, cfg.cache) * ecfg.max_num_seqs // split
    if ecfg.num_pages:
        return ecfg.num_pages, f"KV cache pages: {ecfg.num_pages} (set by --num-kv-pages)"
    dev = jax.local_devices()[0]
    if dev.platform == "tpu":  # lane-padded there (kvjax/pool_formats.py): what it allocates
        page, slot = resident_bytes(cfg, dev)
        page_bytes = int(page) // split
        window_bytes = int(slot) * ecfg.max_num_seqs // split
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    # Activations: the sampled rows' logits in f32 (x2 for the sampler's sort) plus 1 GiB.
    reserve = ecfg.max_num_seqs * mc.vocab_size * 4 * 2 + GIB
    if stats and "bytes_limit" in stats:
        avail = (int(stats["bytes_limit"] * ecfg.gpu_memory_utilization) - weight_bytes - reserve
                 - window_bytes)
        if avail < 2 * page_bytes:
            raise ValueError("No available memory for the cache blocks. Try increasing "
                             "--gpu-memory-utilization or --num-kv-pages")
        return avail // page_bytes, f"Available KV cache memory: {avail / GIB:.2f} GiB"
    per_req = -(-max_model_len // cfg.cache.page_size)
    want = ecfg.max_num_seqs * per_req + 1
    # Fake CPU devices of one process share its RAM: count every local device's share. Like
    # vLLM's CPU backend (VLLM_CPU_KVCACHE_SPACE), the host pool defaults to at most 4 GiB
    # (KVJAX_CPU_KVCACHE_SPACE, GiB) but always holds one max_model_len request.
    host_page = page_bytes * jax.local_device_count()
    space = float(os.environ.get("KVJAX_CPU_KVCACHE_SPACE", "4")) * GIB
    want = min(want, max(int(space // host_page), per_req + 1))
    try:
        import psutil

        ram = int(psutil.virtual_memory().available * ecfg.gpu_memory_utilization) - reserve
        want = max(min(want, ram // host_page), 2)
    except ImportError:
        pass
    return want, f"Available KV cache memory: {want * page_bytes / GIB:.2f} GiB (host)"
