"""Multi-process runs on JAX's own multi-controller runtime.

Every process runs the same program (`python -m kvjax.generate ...`) over one global mesh;
`jax.distributed.initialize` joins them. Each process is told the coordinator (host 0's
address:port), the number of processes and its own id, by flags or by the environment:

    --coordinator_address / KVJAX_COORDINATOR_ADDRESS   host:port of process 0
    --num_processes       / KVJAX_NUM_PROCESSES
    --process_id          / KVJAX_PROCESS_ID

(`KVJAX_DISTRIBUTED=auto` instead lets jax detect a cluster: SLURM, Open MPI, TPU pods.)
Only process 0 prints; all of them feed identical host inputs (page tables, tokens), and greedy
or same-seed sampling on replicated logits keeps them in lockstep. On CPU the processes reduce
over gloo. scripts/multihost.sh runs the same on real hosts, one process per host.

For testing and development, this module starts P local processes on loopback, each with D fake
CPU devices, forming one P x D device mesh:

    python -m kvjax.launch --num-processes 2 --cpu-devices-per-process 4 -- \\
        --config smollm2 --prompt "The capital of France is" --max-new-tokens 8 --temperature 0
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import time

ENV_COORDINATOR = "KVJAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "KVJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "KVJAX_PROCESS_ID"
ENV_AUTO = "KVJAX_DISTRIBUTED"


def define_distributed_flags() -> None:
    """absl flags for a program that may run as one of several processes."""
    from absl import flags

    flags.DEFINE_string("coordinator_address", None,
                        f"host:port of process 0 for jax.distributed (or ${ENV_COORDINATOR}).")
    flags.DEFINE_integer("num_processes", None,
                         f"Processes in a multi-host run (or ${ENV_NUM_PROCESSES}).", lower_bound=1)
    flags.DEFINE_integer("process_id", None,
                         f"This process's id, 0 is the coordinator (or ${ENV_PROCESS_ID}).",
                         lower_bound=0)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """`jax.distributed.initialize` from arguments or the environment; False (and nothing done)
    for a single-process run. Must run before anything asks jax for its devices."""
    import jax

    env = os.environ
    coordinator_address = coordinator_address or env.get(ENV_COORDINATOR)
    if num_processes is None and env.get(ENV_NUM_PROCESSES):
        num_processes = int(env[ENV_NUM_PROCESSES])
    if process_id is None and env.get(ENV_PROCESS_ID):
        process_id = int(env[ENV_PROCESS_ID])
    auto = env.get(ENV_AUTO) == "auto"
    if not auto and (num_processes or 1) == 1:
        return False
    if jax.distributed.is_initialized():
        return True
    if not auto and (coordinator_address is None or process_id is None):
        raise ValueError("a multi-process run needs the coordinator address and the process id "
                         f"(--coordinator-address/--process-id or ${ENV_COORDINATOR}/"
                         f"${ENV_PROCESS_ID})")
    if _cpu_only():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        _c_stdout_to_stderr()  # gloo logs each connection on the C-level stdout
    if auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True


def _c_stdout_to_stderr() -> None:
    """Point file descriptor 1 at stderr, and Python's sys.stdout at the real stdout: native
    libraries' chatter then cannot interleave with the generated text."""
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = io.TextIOWrapper(open(real, "wb"), encoding=sys.stdout.encoding,  # noqa: SIM115
                                  errors=sys.stdout.errors,
                                  line_buffering=sys.stdout.line_buffering)


def initialize_from_flags() -> bool:
    from absl import flags

    f = flags.FLAGS
    return initialize(f.coordinator_address, f.num_processes, f.process_id)


def _cpu_only() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    return platforms == "cpu" or "--xla_force_host_platform_device_count" in os.environ.get(
        "XLA_FLAGS", "")


def is_leader() -> bool:
    import jax

    return jax.process_index() == 0


def quiet_unless_leader() -> None:
    """Processes other than 0 run silently (their stdout goes nowhere; errors still show)."""
    if not is_leader():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process


def stats_stream():
    """Where status lines go: stderr on process 0, nowhere on the others."""
    return sys.stderr if is_leader() else open(os.devnull, "w")  # noqa: SIM115


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(process_id: int, num_processes: int, devices: int, coordinator: str,
              base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    xla = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
    env.update({
        "XLA_FLAGS": " ".join([*xla, f"--xla_force_host_platform_device_count={devices}"]),
        "JAX_PLATFORMS": "cpu",
        ENV_COORDINATOR: coordinator,
        ENV_NUM_PROCESSES: str(num_processes),
        ENV_PROCESS_ID: str(process_id),
    })
    return env


def launch(num_processes: int, devices: int, module: str, args: list[str],
           timeout: float | None = None, port: int | None = None) -> int:
    """Start `python -m module args` as num_processes local processes on loopback; process 0's
    stdout is passed through, the others' is discarded; every stderr is passed through. Returns
    the first nonzero exit code (the rest are stopped), else 0."""
    coordinator = f"127.0.0.1:{port or free_port()}"
    procs = []
    for pid in range(num_processes):
        env = child_env(pid, num_processes, devices, coordinator)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", module, *args], env=env,
            stdout=None if pid == 0 else subprocess.DEVNULL))
    deadline = None if timeout is None else time.monotonic() + timeout
    code = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed:
                code = failed[0]
                break
            if deadline is not None and time.monotonic() > deadline:
                print(f"error: launch timed out after {timeout:g} s", file=sys.stderr)
                code = 124
                break
            time.sleep(0.1)
        else:
            code = next((p.returncode for p in procs if p.returncode), 0)
    finally:
        for p in procs:  # only the processes started here
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(
        prog="python -m kvjax.launch",
        description="Run a kvjax program as several local processes over one device mesh.")
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--cpu-devices-per-process", type=int, default=4)
    parser.add_argument("--module", default="kvjax.generate",
                        help="the program every process runs (default kvjax.generate)")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before giving up")
    a = parser.parse_args(argv)
    if a.num_processes < 1 or a.cpu_devices_per_process < 1:
        parser.error("--num-processes and --cpu-devices-per-process must be >= 1")
    return launch(a.num_processes, a.cpu_devices_per_process, a.module, rest, a.timeout, a.port)


if __name__ == "__main__":
    sys.exit(main())
