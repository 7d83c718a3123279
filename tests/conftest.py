import os

# Tests run on the CPU in f32; keep XLA from grabbing both cores' worth of threads per test.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
