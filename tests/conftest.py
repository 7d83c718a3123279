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


@pytest.fixture(autouse=True)
def _bounded_memory_mappings():
    yield
    import jax

    from kvjax.runner import map_count  # after JAX_PLATFORMS is set above

    used, limit = map_count()
    if used > MAP_SHARE * limit:
        jax.clear_caches()
        gc.collect()
