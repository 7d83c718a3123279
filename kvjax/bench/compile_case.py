"""Compile one kernel case (or one model step) for an accelerator this machine does not have.

    python -m kvjax.bench.compile_case --target tpu-v5e --case int4-d128-g8-p16 [--json]

The worker behind ``python -m kvjax.bench.compile``: a Mosaic CHECK failure aborts the whole
process, so the driver runs each case in its own process. Targets:

* tpu-v5e / tpu-v6e / tpu-v5p: libtpu's compile-only client (``jax[tpu]``), a 2x2 topology.
* h100 / h200: XLA's GPU compiler with a GpuTargetConfigProto (``jax[cuda13-local]``), which runs
  Triton's pipeline and ptxas; registers and spills come from ``ptxas -v`` on the dumped PTX.

Every argument is an abstract ``jax.ShapeDtypeStruct`` placed on the target's device, so nothing
is allocated and the kernels pick their lowering from the platform of the step (backend "auto").
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

TPU_TOPOLOGIES = {"tpu-v5e": "v5e:2x2", "tpu-v6e": "v6e:2x2", "tpu-v5p": "v5p:2x2x1"}
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

DTYPES = ("bf16", "fp8", "int8", "int4", "k8v4", "k8v4turbo", "kivi2", "kivi4", "turbo2.5",
          "turbo3", "turbo3.5", "turbo4")


@dataclass(frozen=True)
class Case:
    dtype: str
    head_dim: int
    gqa: int
    page_size: int
    window: int = -1  # bf16 ring tokens; -1: the config default (128 for compressed dtypes)

    @property
    def name(self) -> str:
        w = "" if self.window < 0 else f"-w{self.window}"
        return f"{self.dtype}-d{self.head_dim}-g{self.gqa}-p{self.page_size}{w}"

    @classmethod
    def parse(cls, name: str) -> Case:
        m = re.fullmatch(r"(.+)-d(\d+)-g(\d+)-p(\d+)(?:-w(\d+))?", name)
        if not m:
            raise ValueError(f"bad case {name!r}; expected DTYPE-dD-gG-pP[-wW], e.g. "
                             "int4-d128-g8-p16")
        return cls(m[1], int(m[2]), int(m[3]), int(m[4]), -1 if m[5] is None else int(m[5]))


def default_cases() -> list[Case]:
    """Every dtype at head_dim 64 and 128; GQA 1/3/8 and page sizes 16/32 (KIVI: 32/64, its
    group is 32 tokens) rotate through them so each value meets every format family."""
    out = []
    for i, dt in enumerate(DTYPES):
        for j, d in enumerate((64, 128)):
            g = (1, 3, 8)[(i + 2 * j) % 3]
            ps = (32, 64)[(i + j) % 2] if dt.startswith("kivi") else (16, 32)[(i + j) % 2]
            out.append(Case(dt, d, g, ps))
    return out


def all_cases() -> list[Case]:
    return [Case(dt, d, g, ps) for dt in DTYPES for d in (64, 128) for g in (1, 3, 8)
            for ps in ((32, 64) if dt.startswith("kivi") else (16, 32))]


def target_device(target: str):
    """The target's first device (abstract), or SystemExit naming the missing extra."""
    import jax
    from jax.experimental import topologies

    try:
        if target in TPU_TOPOLOGIES:
            import libtpu  # noqa: F401
            return topologies.get_topology_desc(TPU_TOPOLOGIES[target], "tpu").devices[0]
        if target in GPU_SPECS:
            import jax_plugins.xla_cuda13  # noqa: F401
            text = _GPU_TEXT.format(**GPU_SPECS[target])
            return topologies.get_topology_desc("", "cuda", target_config=text,
                                                topology="1x1x1").devices[0]
    except ImportError as e:
        raise SystemExit(f"compiling for {target} needs the compile extra ({e.name} is missing): "
                         f"{EXTRA_HINT}") from None
    raise SystemExit(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    del jax


def case_args(case: Case, dev, *, batch: int = 4, context: int = 4096):
    """Abstract (q, seg, page_table, lengths, window_slots) of a decode step on dev."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from kvjax.cache.paged import init_cache
    from kvjax.config import CacheConfig, ModelConfig

    hkv = 2
    mc = ModelConfig(num_layers=2, num_heads=case.gqa * hkv, num_kv_heads=hkv,
                     head_dim=case.head_dim, hidden_size=64, intermediate_size=64, vocab_size=32)
    cc = CacheConfig(dtype=case.dtype, page_size=case.page_size, window=case.window)
    max_pages = context // case.page_size
    cache = jax.eval_shape(lambda: init_cache(mc, cc, batch * max_pages + 1, num_slots=batch))
    seg = cache.segments[0]
    sh = SingleDeviceSharding(dev)

    def place(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)

    q = jax.ShapeDtypeStruct((batch, 1, case.gqa * hkv, case.head_dim), jnp.bfloat16,
                             sharding=sh)
    i32 = jnp.int32
    return (q, jax.tree.map(place, seg), place(jax.ShapeDtypeStruct((batch, max_pages), i32)),
            place(jax.ShapeDtypeStruct((batch,), i32)), place(jax.ShapeDtypeStruct((batch,), i32)))


def _ptxas(dump: str, prefix: str = "kvjax") -> dict:
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


def compile_fn(fn, args, target: str, marker_required: bool = True, **jit_kw) -> dict:
    """jit(fn, **jit_kw).trace(*args).lower().compile() with timing and what the target
    reports."""
    import jax

    t0 = time.perf_counter()
    lowered = jax.jit(fn, **jit_kw).trace(*args).lower()
    hlo = lowered.as_text()
    compiled = lowered.compile()
    out = {"ok": True, "seconds": round(time.perf_counter() - t0, 2)}
    marker = "tpu_custom_call" if target.startswith("tpu") else "__gpu$xla.gpu.triton"
    out["kernel_calls"] = hlo.count(marker)
    if marker_required and not out["kernel_calls"]:
        out.update(ok=False, error=f"no {marker} in the lowered step (kernels fell back to XLA)")
    mem = compiled.memory_analysis()
    if mem is not None:
        out["temp_bytes"] = int(mem.temp_size_in_bytes)
        out["arg_bytes"] = int(mem.argument_size_in_bytes)
        out["code_bytes"] = int(getattr(mem, "generated_code_size_in_bytes", 0))
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        if cost and "bytes accessed" in cost:
            out["bytes_accessed"] = float(cost["bytes accessed"])
    except Exception:  # noqa: BLE001 - GPU compile-only clients report no cost
        pass
    return out


def run_case(case: Case, target: str) -> dict:
    import jax.numpy as jnp

    from kvjax import pallas_kernels

    dev = target_device(target)
    args = case_args(case, dev)

    def step(q, seg, pt, lens, slots):
        return pallas_kernels.paged_attention(q, seg, jnp.int32(1), pt, lens,
                                              slots if seg.window else None)

    return compile_fn(step, args, target)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True, choices=TARGETS)
    ap.add_argument("--case", required=True, help="DTYPE-dD-gG-pP, or model:NAME (see compile)")
    ap.add_argument("--json", action="store_true", help="print one JSON line (for the driver)")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    dump = None
    if args.target in GPU_SPECS and "--xla_dump_to" not in os.environ.get("XLA_FLAGS", ""):
        dump = tempfile.mkdtemp(prefix="kvjax_compile_")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_dump_to={dump}").strip()
    if args.case.startswith("model:"):
        from kvjax.bench.compile_model import run_model
        res = run_model(args.case[len("model:"):], args.target)
    else:
        try:
            case = Case.parse(args.case)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        try:
            res = run_case(case, args.target)
        except SystemExit:
            raise
        except Exception as e:  # noqa: BLE001 - report the compiler's first line, like the CLI
            msg = str(e).strip().splitlines()
            res = {"ok": False, "error": f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]}
    if dump is not None:
        res.update(_ptxas(dump))
        import shutil
        shutil.rmtree(dump, ignore_errors=True)
    res.update(case=args.case, target=args.target)
    print(json.dumps(res) if args.json else res, flush=True)
    sys.exit(0 if res.get("ok") else 1)


if __name__ == "__main__":
    main()
