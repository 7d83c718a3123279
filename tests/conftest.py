import gc
import os

import pytest

# Tests run on the CPU in f32; keep XLA from grabbing both cores' worth of threads per test.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The suite runs in one process and XLA:CPU maps every compiled executable's code (a few hundred
# mappings each); JAX's caches keep the executables of finished tests alive, and past
# vm.max_map_count the process dies with SIGSEGV (a fresh CI did, ~85% through the suite, once
# the exact-sink tests' interpret-mode kernels were added). Above this share of the limit, JAX's
# caches are dropped after a test (what a test's fixtures still hold stays compiled).
MAP_SHARE = float(os.environ.get("KVJAX_TEST_MAP_SHARE", "0.4"))


def _map_count() -> tuple[int, int]:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f), limit
    except (OSError, ValueError):
        return 0, 1


@pytest.fixture(autouse=True)
def _bounded_memory_mappings():
    yield
    used, limit = _map_count()
    if used > MAP_SHARE * limit:
        import jax

        jax.clear_caches()
        gc.collect()
