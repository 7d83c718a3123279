"""Compile every attention-kernel case for a TPU or H100/H200 without the hardware.

    python -m kvjax.bench.compile --target tpu-v5e [--target h100 ...] [--cases all|NAME,...]
        [--models [NAME,...]] [--jobs 2] [--timeout 600] [--json FILE] [--from-json FILE]

Needs the compile extra (``pip install -e ".[compile]"``: libtpu and the CUDA plugin for the
jax already installed). Each case is compiled in its own process (``kvjax.bench.compile_case``):
a Mosaic CHECK failure aborts the process that hit it, and is reported as that case's first error
line. Prints one table per target:

  case     [KIND:]DTYPE-dHEAD_DIM-gGQA-pPAGE_SIZE (kvjax/bench/compile_case.py; default: every
           dtype at d64/d128, GQA and page size rotating, for the paged decode kernel (no prefix)
           and the ragged prefill+decode kernel (``ragged:``), plus one calibrated-TurboQuant and
           one attention-mass case per family (EXTRA_DEFAULT); ``--cases all`` = the product)
  status   ok, or the first line of the compiler's error
  s, cpu s trace + lower + compile seconds, wall and CPU (all threads; process start not
           included)
  vmem     TPU: the kernel's scoped VMEM, from libtpu's code generator (its log)
  code     TPU: generated code bytes of the step (memory_analysis)
  smem, regs, spill  GPU: the kernel's shared memory (XLA's thunk sequence), registers per
           thread and spill bytes (stores + loads) from ptxas -v on the dumped PTX
  temp     compiled temp bytes (memory_analysis); calls: kernel custom calls in the lowered step

``--models [NAME,...]`` adds whole model steps on the kernels (kvjax/bench/compile_model.py;
default MODEL_CASES: SmolLM2 decode per dtype at 32K and 128K, 512-token prefill chunks at 32K
and 128K, one Llama-3.1-70B layer over 8 devices (decode and a 512-token chunk at 32K and
128K)): kernel calls (none is a failure), compiled memory per device and, on TPU,
cost_analysis bytes accessed per step against bf16's x the KV byte ratio.

Exit status 1 if any case fails to compile or spills.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from kvjax.bench.compile_case import (
    DTYPES,
    EXTRA_DEFAULT,
    Case,
    all_cases,
    default_cases,
)
from kvjax.bench.compile_target import (
    EXTRA_HINT,
    GPU_SPECS,
    TARGETS,
    TPU_ENV,
    TPU_TOPOLOGIES,
    parse_tpu_log,
    tpu_log_env,
)

# Whole model steps compiled by `--models` (names: kvjax/bench/compile_model.py). XLA's
# cost_analysis counts a while loop's body once, not once per trip, so the bytes accessed of a
# model whose layers run in a scan are not the step's traffic: the per-dtype bytes table uses
# one-layer SmolLM2 steps (-l1: no loop; embedding + one layer + lm_head), the whole model is
# compiled for its memory and the kernel call.
MODEL_CASES = (
    [f"smollm2-{dt}-{ctx}-l1" for ctx in (32768, 131072) for dt in DTYPES]
    + [f"smollm2-{dt}-{ctx}" for ctx in (32768, 131072)
       for dt in ("bf16", "int8", "int4", "kivi4", "turbo3.5")]
    + [f"smollm2-{dt}-{ctx}-p512" for ctx in (32768, 131072) for dt in ("bf16", "turbo3.5")]
    + [f"llama70b_turbo-{dt}-{ctx}-l1-tp8" for ctx in (32768, 131072)
       for dt in ("bf16", "int8", "turbo3.5")]
    + [f"llama70b_turbo-{dt}-{ctx}-p512-l1-tp8" for ctx in (32768, 131072)
       for dt in ("bf16", "turbo3.5")]
)
FLAG_RATIO = 1.1  # issue 10: bytes > bf16 bytes x byte ratio x 1.1 is a defect to explain


def check_extra(target: str) -> str | None:
    """None when the target's compiler is installed, else the one-line error."""
    import importlib.util

    mod = "libtpu" if target in TPU_TOPOLOGIES else "jax_plugins.xla_cuda13"
    try:
        found = importlib.util.find_spec(mod) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        return f"compiling for {target} needs the compile extra ({mod} is missing): {EXTRA_HINT}"
    if target in GPU_SPECS and not _has_ptxas():
        return f"compiling for {target} needs CUDA's ptxas on PATH (CUDA 13 toolkit)"
    return None


def _has_ptxas() -> bool:
    import shutil

    return shutil.which("ptxas") is not None


def _first_error(stderr: str) -> str:
    """The line that says why a worker died (Mosaic CHECKs abort without a Python error)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for key in ("Check failed", "Error:", "error:", "Error", "Killed"):
        for ln in lines:
            if key in ln and "Logging before InitGoogle" not in ln:
                return ln[:200]
    return (lines[-1] if lines else "process died without output")[:200]


def run_one(target: str, case: str, timeout: int = 600) -> dict:
    """Compile one case in its own process; on TPU also read the kernel's scoped VMEM from the
    libtpu log the worker leaves (written at its exit, so read here)."""
    import shutil
    import tempfile

    env = dict(os.environ, JAX_PLATFORMS="cpu", **TPU_ENV)
    env.pop("XLA_FLAGS", None)  # the worker adds its own dump directory
    logdir = None
    if target in TPU_TOPOLOGIES:
        logdir = tempfile.mkdtemp(prefix="kvjax_tpu_log_")
        env.update(tpu_log_env(logdir))
    cmd = [sys.executable, "-m", "kvjax.bench.compile_case", "--target", target, "--case", case,
           "--json"]
    try:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"case": case, "target": target, "ok": False, "error": f"timeout {timeout} s"}
        res = None
        for line in reversed(r.stdout.splitlines()):
            if line.startswith("{"):
                res = json.loads(line)
                break
        if res is None:
            res = {"case": case, "target": target, "ok": False,
                   "error": f"crashed (rc {r.returncode}): {_first_error(r.stderr)}"}
        if logdir is not None and res.get("ok"):
            res.update(parse_tpu_log(logdir))
        return res
    finally:
        if logdir is not None:
            shutil.rmtree(logdir, ignore_errors=True)


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f}M"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.0f}K"
    return str(int(n))


def failed(res: dict) -> bool:
    return not res.get("ok") or res.get("spill_bytes", 0) > 0


def table(target: str, results: list[dict]) -> str:
    gpu = target in GPU_SPECS
    head = ("| case | status | s | cpu s | " + ("smem | regs | spill |" if gpu else "vmem | code |")
            + " temp | calls |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        status = "ok" if r.get("ok") else r.get("error", "failed").replace("|", "/")
        if r.get("ok") and r.get("spill_bytes", 0):
            status = f"SPILLS {r['spill_bytes']} B"
        if gpu:
            mid = (f"{_fmt_bytes(r.get('smem_bytes'))} | {r.get('registers', '-')} | "
                   f"{r.get('spill_bytes', '-')} |")
        else:
            mid = f"{_fmt_bytes(r.get('vmem_bytes'))} | {_fmt_bytes(r.get('code_bytes'))} |"
        rows.append(f"| {r['case']} | {status} | {r.get('seconds', '-')} | "
                    f"{r.get('cpu_seconds', '-')} | {mid} "
                    f"{_fmt_bytes(r.get('temp_bytes'))} | {r.get('kernel_calls', '-')} |")
    n_ok = sum(not failed(r) for r in results)
    rows.append(f"\n{target}: {n_ok}/{len(results)} compiled without spills")
    limits = [r for r in results if r.get("vmem_limit_bytes")]
    if limits:
        r = limits[0]
        rows.append(f"vmem: the kernel's scoped VMEM (libtpu's code generator); default scoped "
                    f"limit {_fmt_bytes(r['vmem_limit_bytes'])}, VMEM "
                    f"{_fmt_bytes(r.get('vmem_capacity_bytes'))}")
    return "\n".join(rows)


def _ratio(x, y) -> str:
    return f"{x / y:.2f}" if x and y else "-"


def _kv_floats(r: dict) -> str:
    n = r.get("dequant_count")
    if n is None:
        return "-"
    return f"**{n}: {_fmt_bytes(r['dequant_bytes'])}**" if n else "0"


def model_table(results: list[dict]) -> str:
    """Whole model steps: compiled memory per device and (TPU) bytes per step, against bf16's
    step of the same group (config, context, chunk, layers, devices):
      xla bytes     cost_analysis bytes accessed: XLA's traffic outside the kernels (weights,
                    writes, relayouts; a Mosaic call's reads are not counted, and a layer scan's
                    body is counted once: compare one-layer -l1 steps)
      kernel reads  what the attention kernels read: pages of every token + the bf16 ring
      total         xla bytes + kernel reads
      x bf16        total / bf16's total;  kv ratio: the dtype's KV bytes per token / bf16's
      /(bf16 x kv)  total / (bf16's total x kv ratio): > 1.1 flagged (issue 10)
      xla-w/cache   (xla bytes - weights) / cache: XLA traffic beyond the weights per cache byte
                    (a whole-cache copy per step shows as >= 2)
      dxla/cache    (xla bytes - bf16's xla bytes) / cache: the XLA traffic the format adds
                    (relayouts, side arrays) per byte of its cache; ~0 when only the kernel
                    differs
      copies        TPU: traffic of the step's copy instructions (compile_target.hlo_copy_bytes:
                    logical bytes read + tiled bytes written), i.e. the relayouts XLA inserts,
                    such as pool leaves narrower than 128 lanes copied into the row-major
                    128-lane layout a Mosaic operand must have
      rest/cache    (dxla - copies' difference from bf16's) / cache: what the format adds
                    beyond the copies; ~0 when the relayouts are the whole excess
      kv floats     float buffers shaped like one KV head's whole context or more, besides the
                    cache's own leaves (compile_target.hlo_float_kv_buffers): a dequantized
                    copy of K/V; 0 when the kernels read the pages and the write quantizes"""
    from kvjax.bench.compile_model import parse

    base = {}
    for r in results:
        m = parse(r["case"][len("model:"):])
        r.setdefault("group", m.group)
        r.setdefault("dtype", m.dtype)
        if r.get("bytes_accessed") and r.get("kernel_read_bytes") is not None:
            r["total_bytes"] = r["bytes_accessed"] + r["kernel_read_bytes"]
        if m.dtype == "bf16":
            base[r["group"]] = r
    rows = ["| model step | status | s | calls | cache | weights | args | temp | vmem "
            "| xla bytes | kernel reads | total | x bf16 | kv ratio | /(bf16 x kv) "
            "| xla-w/cache | dxla/cache | copies | rest/cache | kv floats |", "|" + "---|" * 20]
    flagged = []
    for r in results:
        if r.get("copy_tiled_bytes") is not None:
            r["copy_traffic"] = r["copy_bytes"] + r["copy_tiled_bytes"]
    for r in results:
        b = base.get(r["group"], {})
        tot, b_tot = r.get("total_bytes"), b.get("total_bytes")
        kv = _ratio(r.get("kv_bytes_per_token"), b.get("kv_bytes_per_token"))
        norm = "-"
        if tot and b_tot and kv != "-":
            x = tot / (b_tot * float(kv))
            norm = f"{x:.2f}"
            if x > FLAG_RATIO:
                norm = f"**{norm}**"
                flagged.append(f"{r['case'][6:]} ({x:.2f})")
        extra = "-"
        if r.get("bytes_accessed") and r.get("cache_bytes"):
            extra = f"{(r['bytes_accessed'] - r.get('weight_bytes', 0)) / r['cache_bytes']:.2f}"
        dxla = rest = "-"
        if r.get("bytes_accessed") and b.get("bytes_accessed") and r.get("cache_bytes"):
            d = r["bytes_accessed"] - b["bytes_accessed"]
            dxla = f"{d / r['cache_bytes']:.2f}"
            if r.get("copy_traffic") is not None and b.get("copy_traffic") is not None:
                d -= r["copy_traffic"] - b["copy_traffic"]
                rest = f"{d / r['cache_bytes']:.2f}"
        status = "ok" if r.get("ok") else r.get("error", "failed").replace("|", "/")
        rows.append(f"| {r['case'][6:]} | {status} | {r.get('seconds', '-')} | "
                    f"{r.get('kernel_calls', '-')} | {_fmt_bytes(r.get('cache_bytes'))} | "
                    f"{_fmt_bytes(r.get('weight_bytes'))} | {_fmt_bytes(r.get('arg_bytes'))} | "
                    f"{_fmt_bytes(r.get('temp_bytes'))} | {_fmt_bytes(r.get('vmem_bytes'))} | "
                    f"{_fmt_bytes(r.get('bytes_accessed'))} | "
                    f"{_fmt_bytes(r.get('kernel_read_bytes'))} | {_fmt_bytes(tot)} | "
                    f"{_ratio(tot, b_tot)} | {kv} | {norm} | {extra} | {dxla} | "
                    f"{_fmt_bytes(r.get('copy_traffic'))} | {rest} | {_kv_floats(r)} |")
    n_ok = sum(bool(r.get("ok")) for r in results)
    rows.append(f"\n{n_ok}/{len(results)} model steps compiled with the kernel call")
    if flagged:
        rows.append(f"total bytes > bf16's x kv ratio x {FLAG_RATIO}: " + ", ".join(flagged))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", action="append", required=True, choices=TARGETS)
    ap.add_argument("--cases", default="default",
                    help="default | all | none | comma list of [KIND:]DTYPE-dD-gG-pP names")
    ap.add_argument("--models", nargs="?", const="default", default="",
                    help="also compile whole model steps: the default list, or a comma list of "
                         "CONFIG-DTYPE[-CONTEXT][-pCHUNK][-lLAYERS][-tpT] names")
    ap.add_argument("--jobs", type=int, default=2, help="cases compiled at once")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per case (its process)")
    ap.add_argument("--json", help="write every result to this file (and each as it ends to "
                                   "FILE + 'l', JSON lines)")
    ap.add_argument("--from-json", metavar="FILE", help="compile nothing: print the tables of "
                    "the results saved in FILE (--json's file or its JSON lines)")
    args = ap.parse_args(argv)
    if args.from_json:
        return print_tables(args.target, _load(args.from_json))
    for t in args.target:
        if err := check_extra(t):
            print(err, file=sys.stderr)
            return 2
    if args.cases == "default":
        cases = [c.name for c in default_cases()] + EXTRA_DEFAULT
    elif args.cases == "all":
        cases = [c.name for c in all_cases()]
    elif args.cases == "none":
        cases = []
    else:
        cases = args.cases.split(",")
        for c in cases:
            try:
                Case.parse(c)
            except ValueError as e:
                print(e, file=sys.stderr)
                return 2
    if args.models:
        from kvjax.bench.compile_model import parse

        models = MODEL_CASES if args.models == "default" else args.models.split(",")
        for m in models:
            try:
                parse(m)
            except ValueError as e:
                print(e, file=sys.stderr)
                return 2
        cases += [f"model:{m}" for m in models]
    work = [(t, c) for t in args.target for c in cases]

    def one(tc):
        r = run_one(*tc, timeout=args.timeout)
        print(f"{r['target']} {r['case']}: {'FAILED' if failed(r) else 'ok'} "
              f"{r.get('seconds', '')}", file=sys.stderr, flush=True)  # progress, as they end
        if args.json:  # each result as it ends, so a run cut short keeps what it compiled
            with open(args.json + "l", "a") as f:
                f.write(json.dumps(r) + "\n")
        return r

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(one, work))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return print_tables(args.target, results)


def _load(path: str) -> list[dict]:
    with open(path) as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(ln) for ln in text.splitlines() if ln.strip()]


def print_tables(targets: list[str], results: list[dict]) -> int:
    """Print each target's kernel and model-step tables; 1 if any case failed or spilled."""
    bad = 0
    for t in targets:
        rs = [r for r in results if r["target"] == t]
        print(f"\n## {t}\n")
        kernels = [r for r in rs if not r["case"].startswith("model:")]
        if kernels:
            print(table(t, kernels), flush=True)
        models = [r for r in rs if r["case"].startswith("model:")]
        if models:
            print(("\n" if kernels else "") + model_table(models), flush=True)
        bad += sum(failed(r) for r in rs)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
