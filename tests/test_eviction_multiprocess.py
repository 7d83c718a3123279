"""Eviction on a mesh over two processes (jax.distributed, 2 x 4 fake CPU devices, data 2 x
tensor 4): StreamingLLM and H2O requests that evict several pages give the same greedy tokens and
evicted counts as on one device. Process 1 must switch on the attention-mass accumulator when
process 0 does (step header) and re-rotate the same pages (StepBatch.page_pos); without either,
the two processes run different programs and the collectives fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--max-tokens", "24"]


def test_eviction_over_two_processes_equals_one_device(capsys):
    from kvjax.engine import eviction_selftest

    assert eviction_selftest.main(ARGS) == 0
    want = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert all(evicted > 0 for _, evicted in want)  # every request evicted pages
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVJAX_") and k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "kvjax.launch", "--num-processes", "2",
           "--cpu-devices-per-process", "4", "--timeout", "400", "--module",
           "kvjax.engine.eviction_selftest", "--", *ARGS, "--data", "2", "--tensor", "4"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=450)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got == want
