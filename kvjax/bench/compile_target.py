"""Targets of ``python -m kvjax.bench.compile``: abstract TPU / H100 / H200 devices on a CPU-only
machine, the compile call, and what each backend reports about a compiled step.

* tpu-v5e / tpu-v6e / tpu-v5p: libtpu's compile-only client (``jax[tpu]``); a 2x2 topology for
  one-device cases, 2x4 (2x2x2 on v5p) for eight devices.
* h100 / h200: XLA's GPU compiler with a GpuTargetConfigProto (``jax[cuda13-local]``), which runs
  Triton's pipeline and ptxas; eight devices are a ``1x1x8`` topology (one host, eight GPUs).

Per-kernel figures that no Python API returns come from the compilers' own output:
* TPU scoped VMEM: libtpu's code generator logs, for every custom call it emits, the scoped
  memory it allocated (``callee HLO=kvjax_...: vmem.absolute(S)=[..] usage=N``) and the program's
  total (``XLA::TPU program VMEM usage: A / B``) at ``TPU_VMODULE=code_generator=2``; glog writes
  the file at process exit, so the driver reads it after the worker ends (``tpu_log_env`` /
  ``parse_tpu_log``).
* GPU registers / spills: ``ptxas -v`` on the dumped PTX; shared memory from XLA's thunk sequence.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import time

TPU_TOPOLOGIES = {"tpu-v5e": "v5e:2x2", "tpu-v6e": "v6e:2x2", "tpu-v5p": "v5p:2x2x1"}
TPU_TOPOLOGIES_8 = {"tpu-v5e": "v5e:2x4", "tpu-v6e": "v6e:2x4", "tpu-v5p": "v5p:2x2x2"}
# GpuTargetConfigProto fields (XLA's xla/backends/gpu/target_config/specs/{h100_sxm,h200}.txtpb,
# rate tables and model_str dropped: the compiler needs neither).
GPU_SPECS = {
    "h100": dict(name="NVIDIA H100 80GB HBM3", memory_bandwidth=3352320000000,
                 device_memory_size=84942979072),
    "h200": dict(name="NVIDIA H200 141GB HBM3e", memory_bandwidth=4800000000000,
                 device_memory_size=151397597184),
}
TARGETS = (*TPU_TOPOLOGIES, *GPU_SPECS)
EXTRA_HINT = 'pip install -e ".[compile]"'
# libtpu asks a metadata server for these when they are unset; a compile-only client needs none.
TPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
           "TPU_ACCELERATOR_TYPE": "v5litepod-4",
           "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}  # parallel workers: no /tmp/libtpu_lockfile

_GPU_TEXT = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {memory_bandwidth} l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: {device_memory_size} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 feature_extension: ACCELERATED_FEATURES }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
  thread_dim_limit_x: 1024 thread_dim_limit_y: 1024 thread_dim_limit_z: 64
  device_vendor: "NVIDIA Corporation" platform_version: "Compute Capability 9.0a"
  device_address_bits: 64 pcie_bandwidth: 34359738368 ecc_enabled: true name: "{name}"
  driver_version: "13.0.0" runtime_version: "13.0.0" compile_time_toolkit_version: "13.0.0"
  dnn_version: "9.10.0" device_interconnect_info {{ active_links: 18 }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 patch: 0 }}
device_description_str: "{name}"
"""


def target_devices(target: str, n: int = 1) -> list:
    """n abstract devices of the target (1 or 8), or SystemExit naming the missing extra."""
    from jax.experimental import topologies

    if n not in (1, 8):
        raise SystemExit(f"{n} devices: only 1 or 8 (a 2x2 / 2x4 TPU slice, 1 or 8 GPUs)")
    try:
        if target in TPU_TOPOLOGIES:
            import libtpu  # noqa: F401
            topo = (TPU_TOPOLOGIES if n == 1 else TPU_TOPOLOGIES_8)[target]
            return list(topologies.get_topology_desc(topo, "tpu").devices[:n])
        if target in GPU_SPECS:
            import jax_plugins.xla_cuda13  # noqa: F401
            text = _GPU_TEXT.format(**GPU_SPECS[target])
            return list(topologies.get_topology_desc("", "cuda", target_config=text,
                                                     topology=f"1x1x{n}").devices)
    except ImportError as e:
        raise SystemExit(f"compiling for {target} needs the compile extra ({e.name} is missing): "
                         f"{EXTRA_HINT}") from None
    raise SystemExit(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")


def target_device(target: str):
    """The target's first device (abstract)."""
    return target_devices(target, 1)[0]


def kernel_marker(target: str) -> str:
    """The custom-call target a Pallas kernel lowers to for this target."""
    return "tpu_custom_call" if target.startswith("tpu") else "__gpu$xla.gpu.triton"


def compile_fn(fn, args, target: str, marker_required: bool = True,
               pool_types: frozenset[str] = frozenset(), kv_check: tuple | None = None,
               **jit_kw) -> dict:
    """jit(fn, **jit_kw).trace(*args).lower().compile() with timing and what the target
    reports: kernel custom calls in the lowered step, memory_analysis (argument / output / alias
    / temp / code bytes), on TPU the HLO's copies (`hlo_copy_bytes`; pool_types: the HLO types
    of pool leaves, whose copies are also counted apart) and, where the backend gives one,
    cost_analysis bytes accessed. kv_check: (head_dim, min_elements, cache_leaves) to count
    float buffers shaped like context-sized K/V (`hlo_float_kv_buffers`)."""
    import jax

    t0, c0 = time.perf_counter(), time.process_time()
    # fn may be jitted already (with its own shardings and donation): traced as it is
    jitted = fn if hasattr(fn, "trace") and not jit_kw else jax.jit(fn, **jit_kw)
    lowered = jitted.trace(*args).lower()
    hlo = lowered.as_text()
    compiled = lowered.compile()
    # CPU seconds (all threads) beside the wall time: on a loaded machine the wall time says
    # more about the neighbours than about the compile.
    out = {"ok": True, "seconds": round(time.perf_counter() - t0, 2),
           "cpu_seconds": round(time.process_time() - c0, 2)}
    marker = kernel_marker(target)
    out["kernel_calls"] = hlo.count(marker)
    if marker_required and not out["kernel_calls"]:
        out.update(ok=False, error=f"no {marker} in the lowered step (kernels fell back to XLA)")
    mem = compiled.memory_analysis()
    if mem is not None:
        out["temp_bytes"] = int(mem.temp_size_in_bytes)
        out["arg_bytes"] = int(mem.argument_size_in_bytes)
        out["out_bytes"] = int(mem.output_size_in_bytes)
        out["alias_bytes"] = int(mem.alias_size_in_bytes)
        out["code_bytes"] = int(getattr(mem, "generated_code_size_in_bytes", 0))
    text = compiled.as_text() if target.startswith("tpu") or kv_check else ""
    if target.startswith("tpu"):
        out.update(hlo_copy_bytes(text, pool_types))
    if kv_check:
        out.update(hlo_float_kv_buffers(text, *kv_check))
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        if cost and "bytes accessed" in cost:
            out["bytes_accessed"] = float(cost["bytes accessed"])
    except Exception:  # noqa: BLE001 - GPU compile-only clients report no cost
        pass
    return out


_ITEM = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2,
         "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_COPY = re.compile(r"^\s*(?:ROOT )?%?[\w.-]+ = (\w+)\[([\d,]*)\]\{([\d,]*)(?::T\((\d+),(\d+)\)"
                   r"(?:\((\d+),1\))?)?[^}]*\} copy\(")


def hlo_copy_bytes(hlo: str, pool_types: frozenset[str] = frozenset()) -> dict:
    """The copy instructions of an optimized HLO module outside fusions: their count, logical
    bytes and bytes at their tiled layout (a copy in a loop body counts once). On TPU these are
    the relayouts XLA inserts, e.g. a pool leaf copied into the row-major 128-lane layout a
    Mosaic operand must have: such a copy reads ~its logical bytes and writes its tiled bytes.
    pool_copy_count / pool_copy_bytes: those of them whose HLO type (``s8[1,3,2049,16,64]``) is
    in pool_types (a pool leaf, or one layer of it, copied whole)."""
    import math

    n = logical = tiled = pool_n = pool_bytes = 0
    fused = False
    for line in hlo.splitlines():
        if line and not line[0].isspace():  # a computation header
            fused = line.lstrip("%").startswith("fused")
            continue
        m = _COPY.match(line)
        if fused or not m or m[1] not in _ITEM:
            continue
        dims = [int(d) for d in m[2].split(",") if d]
        order = [int(d) for d in m[3].split(",") if d]  # minor to major
        logical += _ITEM[m[1]] * math.prod(dims)
        if f"{m[1]}[{m[2]}]" in pool_types:
            pool_n += 1
            pool_bytes += _ITEM[m[1]] * math.prod(dims)
        if m[4] and len(order) >= 2:
            # T(r,128) tiles r rows of elements, whatever their width: the (k,1) sub-tiling of
            # narrow types packs k of those rows per 32-bit word and pads nothing further (v5e
            # memory report: a row-major s8[1,3,8193,16,64]{..:T(8,128)(4,1)} buffer takes
            # 48 MiB, 2x its 24 MiB for the lanes only, not 4x)
            rows, lanes = int(m[4]), int(m[5])
            dims[order[1]] = -(-dims[order[1]] // rows) * rows
            dims[order[0]] = -(-dims[order[0]] // lanes) * lanes
        n += 1
        tiled += _ITEM[m[1]] * math.prod(dims)
    return {"copy_count": n, "copy_bytes": logical, "copy_tiled_bytes": tiled,
            "pool_copy_count": pool_n, "pool_copy_bytes": pool_bytes}


_FLOATS = frozenset({"bf16", "f16", "f32", "f64", "f8e4m3fn", "f8e5m2"})
# Ops whose result is not a buffer of its own: views, aliases of a loop / call's result.
_NO_BUFFER = frozenset({"parameter", "get-tuple-element", "tuple", "bitcast", "constant",
                        "while", "conditional", "call", "opt-barrier", "copy-done",
                        "async-done", "slice-done"})
_VALUE = re.compile(r"^\s*(?:ROOT )?%?[\w.-]+ = (.+?) ([a-z][\w-]*)\(")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")


def hlo_float_kv_buffers(hlo: str, head_dim: int, min_elements: int,
                         cache_leaves: frozenset[tuple[str, int]] = frozenset()) -> dict:
    """Float buffers of a compiled step shaped like context-sized keys or values: results of
    instructions outside fused computations (a fusion's own result counts; what happens inside
    a fusion is not written to memory; parameters, tuples, bitcasts and loop results are not
    buffers of their own) in a float type, with a head_dim-sized dimension and at least
    min_elements elements (a model step passes one KV head's whole context), other than the
    cache's own leaves and their in-place updates (cache_leaves: (type, elements) of every
    leaf and of one layer of it). A dequantized copy of the pool or of a gathered context
    ([pages, page, heads, D] or [batch, context, heads, D] in bf16 / f32) is one; the chunk's
    own keys, queries and the kernels' outputs are far smaller.
    -> dequant_count, dequant_bytes, dequant_largest (its HLO type, "" when none)."""
    import math

    fusion_bodies = set(re.findall(r" fusion\(.*?calls=%?([\w.-]+)", hlo))
    n = total = big = 0
    largest, fused = "", False
    for line in hlo.splitlines():
        if line and not line[0].isspace():  # a computation header: "[ENTRY ]%name (..."
            name = line.removeprefix("ENTRY ").lstrip("%").split(" ", 1)[0]
            fused = name in fusion_bodies
            continue
        m = _VALUE.match(line)
        if fused or not m or m[2] in _NO_BUFFER:
            continue
        for dtype, dims_text in _ARRAY.findall(m[1]):
            dims = [int(d) for d in dims_text.split(",") if d]
            elems = math.prod(dims)
            if (dtype not in _FLOATS or head_dim not in dims or elems < min_elements
                    or (dtype, elems) in cache_leaves):
                continue
            size = elems * _ITEM.get(dtype, 4)
            n, total = n + 1, total + size
            if size > big:
                big, largest = size, f"{dtype}[{dims_text}]"
    return {"dequant_count": n, "dequant_bytes": total, "dequant_largest": largest}


def ptxas_report(dump: str, prefix: str = "kvjax") -> dict:
    """Registers / spills / stack of the Pallas kernels (entry names starting with prefix) in an
    XLA dump, via ptxas -v on the dumped PTX, and their shared memory from the thunk sequence;
    the max over kernels."""
    regs = spill = stack = smem = 0
    for ptx in glob.glob(os.path.join(dump, "*.ptx")):
        r = subprocess.run(["ptxas", "-arch=sm_90a", "-v", ptx, "-o", os.devnull],
                           capture_output=True, text=True)
        for block in re.split(r"Compiling entry function", r.stdout + r.stderr)[1:]:
            if not block.strip(" '").startswith(prefix):
                continue
            if m := re.search(r"Used (\d+) registers", block):
                regs = max(regs, int(m[1]))
            if m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", block):
                spill = max(spill, int(m[1]) + int(m[2]))
            if m := re.search(r"(\d+) bytes stack frame", block):
                stack = max(stack, int(m[1]))
    for f in glob.glob(os.path.join(dump, "*thunk_sequence.txt")):
        with open(f) as fh:
            for m in re.finditer(rf"{prefix}\w* grid: .*shared_memory: (\d+) bytes", fh.read()):
                smem = max(smem, int(m[1]))
    return {"registers": regs, "spill_bytes": spill, "stack_bytes": stack, "smem_bytes": smem}


def tpu_log_env(logdir: str) -> dict[str, str]:
    """Environment for a worker whose libtpu log (in logdir) should hold the scoped-VMEM
    figures: INFO to the file only (stderr keeps errors and CHECK failures), the code
    generator at level 2."""
    return {"TPU_LOG_DIR": logdir, "TPU_MIN_LOG_LEVEL": "0", "TPU_STDERR_LOG_LEVEL": "2",
            "TPU_VMODULE": "code_generator=2"}


_SIZE = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _size(text: str) -> int:
    m = re.fullmatch(r"([\d.]+)([KMG]?)", text.strip())
    return int(float(m[1]) * _SIZE[m[2]]) if m else 0


def parse_tpu_log(logdir: str, prefix: str = "kvjax") -> dict:
    """Scoped VMEM of the Pallas kernels (custom calls whose HLO name starts with prefix; the
    max over them), the default scoped-VMEM limit, and the program's VMEM use / capacity, from
    the libtpu INFO log a worker left in logdir. Empty when the log holds none of it."""
    out: dict = {}
    for path in glob.glob(os.path.join(logdir, "*.INFO.*")):
        with open(path, errors="replace") as f:
            lines = f.readlines()
        for i, line in enumerate(lines):
            if f"callee HLO={prefix}" in line and i + 1 < len(lines):
                if m := re.search(r"vmem\.absolute\(S\)=\S* usage=(\d+)", lines[i + 1]):
                    out["vmem_bytes"] = max(out.get("vmem_bytes", 0), int(m[1]))
            elif m := re.search(r"default scoped vmem \(from flag\): (\d+)", line):
                out["vmem_limit_bytes"] = int(m[1])
            elif m := re.search(r"program VMEM usage: (\S+) / (\S+)", line):
                out["program_vmem_bytes"] = _size(m[1])
                out["vmem_capacity_bytes"] = _size(m[2])
    return out
