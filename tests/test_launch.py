"""`python -m kvjax.launch`: 2 processes x 4 fake CPU devices on loopback form one 8-device mesh
(jax.distributed, gloo) and print the same text as the plain one-process generate command.

All runs start together from one module fixture; each is bounded (the launcher's own --timeout,
and the subprocess timeout above it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ["-m", "kvjax.launch", "--num-processes", "2", "--cpu-devices-per-process", "4",
          "--timeout", "400", "--"]
TINY = ["--config", "tiny_qwen2", "--random-weights", "--prompt", "Sharded hello",
        "--max-new-tokens", "8", "--temperature", "0"]
SMOL = ["--config", "smollm2", "--prompt", "The capital of France is", "--max-new-tokens", "8",
        "--temperature", "0"]
TIMEOUT = 450


def run(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVJAX_") and k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          timeout=TIMEOUT)


@pytest.fixture(scope="module")
def runs() -> dict[str, Future]:
    cases = {
        "smol_launch": [*LAUNCH, *SMOL],
        "tiny_launch": [*LAUNCH, *TINY],
        "tiny_single": ["-m", "kvjax.generate", *TINY],
        "smol_single": ["-m", "kvjax.generate", *SMOL],
        "tiny_launch_data2": [*LAUNCH, *TINY, "--data-parallel", "2", "--tensor-parallel", "4"],
        "bad_config": [*LAUNCH, "--config", "nope", "--prompt", "hi"],
    }
    pool = ThreadPoolExecutor(max_workers=3)
    futures = {name: pool.submit(run, args) for name, args in cases.items()}
    pool.shutdown(wait=False)
    return futures


def _ok(r: subprocess.CompletedProcess) -> bytes:
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-3000:]
    return r.stdout


def test_two_processes_print_the_same_text_as_one(runs):
    single = _ok(runs["tiny_single"].result())
    launched = _ok(runs["tiny_launch"].result())
    assert single.strip(), single
    assert launched == single  # process 0 alone prints; no native library chatter on stdout
    stats = [s for s in runs["tiny_launch"].result().stderr.decode().splitlines()
             if s.startswith("[stats]")]
    assert len(stats) == 1  # only process 0 reports


def test_data_parallel_mesh_across_processes(runs):
    assert _ok(runs["tiny_launch_data2"].result()) == _ok(runs["tiny_single"].result())


def test_smollm2_launch_matches_plain_generate(runs):
    single = _ok(runs["smol_single"].result())
    assert b"Paris" in single
    assert _ok(runs["smol_launch"].result()) == single


def test_a_failing_process_fails_the_launch(runs):
    r = runs["bad_config"].result()
    assert r.returncode == 2
    assert b"error: unknown config 'nope'" in r.stderr


def test_single_process_needs_no_distributed_init(monkeypatch):
    from kvjax import launch

    for var in (launch.ENV_COORDINATOR, launch.ENV_NUM_PROCESSES, launch.ENV_PROCESS_ID,
                launch.ENV_AUTO):
        monkeypatch.delenv(var, raising=False)
    assert launch.initialize() is False
    assert launch.initialize(num_processes=1) is False
    with pytest.raises(ValueError, match="coordinator"):
        launch.initialize(num_processes=2)


def test_child_environment():
    from kvjax import launch

    env = launch.child_env(1, 2, 4, "127.0.0.1:1234",
                           {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo"})
    assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=4"
    assert (env[launch.ENV_COORDINATOR], env[launch.ENV_NUM_PROCESSES],
            env[launch.ENV_PROCESS_ID]) == ("127.0.0.1:1234", "2", "1")
