"""Issue cost of the Triton decode kernels without a GPU: compile ``pallas_kernels.paged_attention``
(backend "triton", one layer at bench.attention's shapes: 64 query / 8 KV heads, head_dim 128) for
an abstract H100 / H200 on this CPU and read XLA's dump: the kernel grid (thunk sequence), ptxas
registers and spills, and the PTX of the kernel's main loop (its largest backward branch).

    python -m kvjax.bench.kernel_isa --target h100 --dtypes bf16,turbo3.5,kivi2 \\
        --contexts 131072 --batches 8,1

Per row: grid (batch x KV heads x splits), threads, registers, spill bytes, PTX instructions of one
loop iteration, its mma / bar.sync / shfl counts, tokens per iteration, and warp-instructions per
token = loop PTX x warps / tokens (bf16 at d128: 71; far above it the kernel is issue-bound, not
memory-bound). Needs the compile extra (jax_plugins.xla_cuda13, ptxas): pip install -e ".[compile]".
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

HEADER = ("case", "grid", "threads", "regs", "spill", "loop_ptx", "mma", "bar", "shfl",
          "tok/iter", "warp-instr/tok")


def loop_counts(ptx: str) -> collections.Counter:
    """Opcode counts (base name: "mma", "bar", ...) of the largest backward branch of the first
    kvjax entry in `ptx`; the "" key is the instruction total."""
    body = ptx[ptx.index(".entry kvjax"):]
    lines = [ln.strip() for ln in body.splitlines()]
    labels = {ln[:-1]: i for i, ln in enumerate(lines) if re.match(r"^\$L__\w+:$", ln)}
    best = (0, -1)
    for i, ln in enumerate(lines):
        m = re.search(r"bra(?:\.uni)?\s+(\$L__\w+);", ln)
        if m and m[1] in labels and labels[m[1]] < i and i - labels[m[1]] > best[1] - best[0]:
            best = (labels[m[1]], i)
    counts: collections.Counter = collections.Counter()
    for ln in lines[best[0]: best[1] + 1]:
        if not ln or ln.startswith(("$", "//", "{", "}", ".")):
            continue  # labels, comments, scopes, directives
        op = (ln.split()[1] if ln.startswith("@") else ln.split()[0]).rstrip(";")
        counts[op.split(".")[0]] += 1
        counts[""] += 1
    return counts


def probe(target: str, dtype: str, batch: int, context: int, k_splits: int,
          heads: tuple[int, int, int] = (64, 8, 128)) -> dict:
    """Compile one decode step for `target` and return its kernel figures (see HEADER)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from kvjax import pallas_kernels
    from kvjax.bench.compile_target import compile_fn, target_device
    from kvjax.cache.paged import init_cache
    from kvjax.config import CacheConfig, ModelConfig
    from kvjax.pallas_kernels._core import triton_tuning

    hq, hkv, d = heads
    mc = ModelConfig(num_layers=1, num_heads=hq, num_kv_heads=hkv, head_dim=d, hidden_size=64,
                     intermediate_size=64, vocab_size=32)
    cc = CacheConfig(dtype=dtype, window=-1 if dtype.startswith("kivi") else 0)
    mp = context // cc.page_size
    seg = jax.eval_shape(lambda: init_cache(mc, cc, batch * mp + 1, num_slots=batch)).segments[0]
    sh = SingleDeviceSharding(target_device(target))

    def place(x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)

    i32 = jnp.int32
    args = (place(jax.ShapeDtypeStruct((batch, 1, hq, d), jnp.bfloat16)), jax.tree.map(place, seg),
            place(jax.ShapeDtypeStruct((batch, mp), i32)),
            place(jax.ShapeDtypeStruct((batch,), i32)), place(jax.ShapeDtypeStruct((batch,), i32)))

    def step(q, seg, pt, lens, slots):
        return pallas_kernels.paged_attention(q, seg, jnp.int32(0), pt, lens,
                                              slots if seg.window else None, backend="triton",
                                              k_splits=k_splits)

    res = compile_fn(step, args, target)
    out = {"case": f"{dtype} b{batch} ctx{context} k{k_splits or 'auto'}", "ok": res.get("ok")}
    dump = os.environ["XLA_DUMP_DIR"]
    for f in glob.glob(os.path.join(dump, "*thunk_sequence.txt")):
        with open(f) as fh:
            for m in re.finditer(r"kvjax\w* grid: \[([^\]]*)\] threads: \[(\d+)", fh.read()):
                out["grid"] = "x".join(m[1].replace(" ", "").split(","))
                out["threads"] = int(m[2])
    for ptx in glob.glob(os.path.join(dump, "*.ptx")):
        with open(ptx) as fh:
            text = fh.read()
        if ".entry kvjax" not in text:
            continue
        r = subprocess.run(["ptxas", "-arch=sm_90a", "-v", ptx, "-o", os.devnull],
                           capture_output=True, text=True)
        for block in re.split(r"Compiling entry function", r.stdout + r.stderr)[1:]:
            if block.strip(" '").startswith("kvjax"):
                if m := re.search(r"Used (\d+) registers", block):
                    out["regs"] = int(m[1])
                if m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", block):
                    out["spill"] = int(m[1]) + int(m[2])
        c = loop_counts(text)
        out.update(loop_ptx=c[""], mma=c["mma"], bar=c["bar"], shfl=c["shfl"])
    kf, vf = pallas_kernels.formats_for(seg)
    kf, vf = kf.gather_form(), vf.gather_form()
    tokens, _ = triton_tuning(kf, vf, d)
    if tokens < cc.page_size and not (kf.per_token_rows and vf.per_token_rows):
        tokens = cc.page_size  # whole pages per block (the launcher's rule)
    out["tok/iter"] = tokens
    if "loop_ptx" in out and "threads" in out:
        out["warp-instr/tok"] = round(out["loop_ptx"] * out["threads"] / 32 / tokens)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="h100", choices=("h100", "h200"))
    ap.add_argument("--dtypes", default="bf16,int4,kivi4,kivi2,turbo4,turbo3.5,turbo2.5")
    ap.add_argument("--contexts", default="131072", help="comma-separated token counts")
    ap.add_argument("--batches", default="8,1", help="comma-separated batch sizes")
    ap.add_argument("--k-splits", default="0", help="comma-separated; 0 = auto (the default)")
    a = ap.parse_args(argv)
    if shutil.which("ptxas") is None:
        raise SystemExit("kernel_isa needs ptxas on PATH (the compile extra: "
                         'pip install -e ".[compile]")')
    try:
        import jax_plugins.xla_cuda13  # noqa: F401
    except ImportError:
        raise SystemExit("kernel_isa needs the compile extra (jax_plugins.xla_cuda13 is "
                         'missing): pip install -e ".[compile]"') from None
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    print("| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER), flush=True)
    for ctx in ints(a.contexts):
        for batch in ints(a.batches):
            for ks in ints(a.k_splits):
                for dtype in a.dtypes.split(","):
                    # a fresh process per case: XLA's dump directory is fixed at start-up
                    with tempfile.TemporaryDirectory(prefix="kernel_isa_") as dump:
                        env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={dump}",
                                   XLA_DUMP_DIR=dump, JAX_PLATFORMS="cpu")
                        code = (f"from kvjax.bench.kernel_isa import probe, row; print(row(probe("
                                f"{a.target!r}, {dtype!r}, {batch}, {ctx}, {ks})))")
                        r = subprocess.run([sys.executable, "-c", code], env=env,
                                           capture_output=True, text=True)
                    lines = r.stdout.strip().splitlines()
                    if r.returncode or not lines:
                        err = (r.stderr.strip().splitlines() or ["?"])[-1]
                        print(f"| {dtype} b{batch} ctx{ctx} k{ks} | FAILED: {err} |", flush=True)
                    else:
                        print(lines[-1], flush=True)


def row(out: dict) -> str:
    """One markdown table row of probe()'s figures, "-" where the compile gave none."""
    return "| " + " | ".join(str(out.get(k, "-")) for k in HEADER) + " |"


if __name__ == "__main__":
    main()
