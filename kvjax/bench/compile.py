"""Compile every decode-kernel case for a TPU or H100/H200 without the hardware.

    python -m kvjax.bench.compile --target tpu-v5e [--target h100 ...] [--cases all|NAME,...]
        [--models] [--jobs 2] [--json FILE]

Needs the compile extra (``pip install -e ".[compile]"``: libtpu and the CUDA plugin for the
jax already installed). Each case is compiled in its own process (``kvjax.bench.compile_case``):
a Mosaic CHECK failure aborts the process that hit it, and is reported as that case's first error
line. Prints one table per target:

  case     DTYPE-dHEAD_DIM-gGQA-pPAGE_SIZE (default: every dtype at d64/d128, GQA and page size
           rotating; ``--cases all`` = the full product, 144 cases)
  status   ok, or the first line of the compiler's error
  s        trace + lower + compile seconds (process start not included)
  code     TPU: generated code bytes of the step (memory_analysis)
  smem, regs, spill  GPU: the kernel's shared memory (XLA's thunk sequence), registers per
           thread and spill bytes (stores + loads) from ptxas -v on the dumped PTX
  temp     compiled temp bytes (memory_analysis); calls: kernel custom calls in the lowered step

``--models`` adds whole SmolLM2 decode steps on the kernels (kvjax/bench/compile_model.py):
kernel calls, cache / argument / temp bytes and, on TPU, cost_analysis bytes accessed per step
and its ratio to bf16's.

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
    EXTRA_HINT,
    GPU_SPECS,
    TARGETS,
    TPU_TOPOLOGIES,
    Case,
    all_cases,
    default_cases,
)

MODEL_CASES = ("smollm2-bf16", "smollm2-int8", "smollm2-int4", "smollm2-kivi4",
               "smollm2-turbo3.5")
# libtpu asks a metadata server for these when they are unset; a compile-only client needs none.
TPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
           "TPU_ACCELERATOR_TYPE": "v5litepod-4",
           "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}  # parallel workers: no /tmp/libtpu_lockfile


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
    env = dict(os.environ, JAX_PLATFORMS="cpu", **TPU_ENV)
    env.pop("XLA_FLAGS", None)  # the worker adds its own dump directory
    cmd = [sys.executable, "-m", "kvjax.bench.compile_case", "--target", target, "--case", case,
           "--json"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"case": case, "target": target, "ok": False, "error": f"timeout {timeout} s"}
    for line in reversed(r.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"case": case, "target": target, "ok": False,
            "error": f"crashed (rc {r.returncode}): {_first_error(r.stderr)}"}


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
    head = ("| case | status | s | " + ("smem | regs | spill |" if gpu else "code |")
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
            mid = f"{_fmt_bytes(r.get('code_bytes'))} |"
        rows.append(f"| {r['case']} | {status} | {r.get('seconds', '-')} | {mid} "
                    f"{_fmt_bytes(r.get('temp_bytes'))} | {r.get('kernel_calls', '-')} |")
    n_ok = sum(not failed(r) for r in results)
    rows.append(f"\n{target}: {n_ok}/{len(results)} compiled without spills")
    return "\n".join(rows)


def model_table(results: list[dict]) -> str:
    """Whole decode steps: compiled memory and (TPU) bytes accessed per step, also over bf16's
    at the same context."""
    base = {r["case"].split("-", 2)[-1] if r["case"].count("-") > 1 else "": r
            for r in results if "-bf16" in r["case"]}
    rows = ["\n| model step | status | s | kernel calls | cache | args | temp | bytes accessed "
            "| x bf16 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ctx = r["case"].split("-", 2)[-1] if r["case"].count("-") > 1 else ""
        b = base.get(ctx, {}).get("bytes_accessed")
        ratio = f"{r['bytes_accessed'] / b:.2f}" if b and r.get("bytes_accessed") else "-"
        status = "ok" if r.get("ok") else r.get("error", "failed").replace("|", "/")
        rows.append(f"| {r['case'][6:]} | {status} | {r.get('seconds', '-')} | "
                    f"{r.get('kernel_calls', '-')} | {_fmt_bytes(r.get('cache_bytes'))} | "
                    f"{_fmt_bytes(r.get('arg_bytes'))} | {_fmt_bytes(r.get('temp_bytes'))} | "
                    f"{_fmt_bytes(r.get('bytes_accessed'))} | {ratio} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", action="append", required=True, choices=TARGETS)
    ap.add_argument("--cases", default="default",
                    help="default | all | none | comma list of DTYPE-dD-gG-pP names")
    ap.add_argument("--models", action="store_true",
                    help=f"also compile whole model steps ({', '.join(MODEL_CASES)})")
    ap.add_argument("--jobs", type=int, default=2, help="cases compiled at once")
    ap.add_argument("--json", help="write every result to this file")
    args = ap.parse_args(argv)
    for t in args.target:
        if err := check_extra(t):
            print(err, file=sys.stderr)
            return 2
    if args.cases == "default":
        cases = [c.name for c in default_cases()]
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
        cases += [f"model:{m}" for m in MODEL_CASES]
    work = [(t, c) for t in args.target for c in cases]
    def one(tc):
        r = run_one(*tc)
        print(f"{r['target']} {r['case']}: {'FAILED' if failed(r) else 'ok'} "
              f"{r.get('seconds', '')}", file=sys.stderr, flush=True)  # progress, as they end
        return r

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(one, work))
    bad = 0
    for t in args.target:
        rs = [r for r in results if r["target"] == t]
        print(f"\n## {t}\n")
        kernels = [r for r in rs if not r["case"].startswith("model:")]
        if kernels:
            print(table(t, kernels), flush=True)
        models = [r for r in rs if r["case"].startswith("model:")]
        if models:
            print(model_table(models), flush=True)
        bad += sum(failed(r) for r in rs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
