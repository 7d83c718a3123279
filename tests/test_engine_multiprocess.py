"""The engine on a mesh over two processes (jax.distributed, 2 x 4 fake CPU devices, data 2 x
tensor 4 on a config with 8 query / 4 KV heads): process 0 schedules and sends each step, process
1 runs the same jitted steps on its shards, and the greedy and seeded-sampled outputs of 12
concurrent requests equal a one-device engine's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--config", "tiny_llama_kv4", "--requests", "12", "--max-tokens", "8", "--sampled"]


def test_two_processes_equal_one_device(capsys):
    from kvjax.engine import selftest

    assert selftest.main(ARGS) == 0
    want = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVJAX_") and k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "kvjax.launch", "--num-processes", "2",
           "--cpu-devices-per-process", "4", "--timeout", "400", "--module",
           "kvjax.engine.selftest", "--", *ARGS, "--data", "2", "--tensor", "4"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=450)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got == want
    assert len(want) == 2 and want[0] != want[1]  # greedy and sampled runs differ
