"""Eviction through an Engine, optionally on a device mesh over several processes: StreamingLLM
and H2O requests that grow several times past their budget; prints each request's greedy output
ids and evicted-token count as one JSON line (process 0). The multi-process check compares it
with a one-device run (tests/test_eviction_multiprocess.py):

    python -m kvjax.launch --num-processes 2 --cpu-devices-per-process 4 \\
        --module kvjax.engine.eviction_selftest -- --data 2 --tensor 4
    python -m kvjax.engine.eviction_selftest

Over processes, H2O needs every process to run the program with the attention-mass accumulator
(process 0 switches it on when it admits an H2O request; the step header tells the followers),
process 0 reads the mass from its own replica, and each step after an eviction carries the pages'
absolute positions (StepBatch.page_pos).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvjax.engine.eviction_selftest")
    ap.add_argument("--config", default="tiny_llama_kv4")
    ap.add_argument("--data", type=int, default=1)
    ap.add_argument("--tensor", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=40)
    a = ap.parse_args(argv)

    from kvjax import launch

    launch.initialize()
    import jax

    import models
    from kvjax.config import MeshConfig, load_config
    from kvjax.engine import Engine, EngineConfig, SamplingParams
    from kvjax.engine.eviction import EvictionConfig
    from kvjax.sharding import make_mesh

    cfg = load_config(a.config)
    mesh = None
    if a.data * a.tensor > 1:
        mesh = make_mesh(MeshConfig(data=a.data, tensor=a.tensor))
    params = models.random_params(cfg.model, seed=0)
    eng = Engine(cfg, params, EngineConfig(max_model_len=96, num_pages=120, max_num_seqs=4,
                                           max_num_batched_tokens=32, chunk_size=16), mesh=mesh)
    if jax.process_index() != 0:
        eng.follow()
        return 0
    rng = np.random.default_rng(0)
    policies = [EvictionConfig("streaming", sink_tokens=4, window=16),
                EvictionConfig("h2o", sink_tokens=4, window=16, heavy_tokens=16),
                EvictionConfig("h2o", sink_tokens=4, window=24, heavy_tokens=8),
                EvictionConfig("streaming", sink_tokens=8, window=24)]
    reqs = [eng.make_request(f"r{i}", rng.integers(0, cfg.model.vocab_size, 30 + 7 * i).tolist(),
                             SamplingParams(max_tokens=a.max_tokens, ignore_eos=True), eviction=e)
            for i, e in enumerate(policies)]
    try:
        eng.generate(reqs)
        if any(r.finish_reason == "error" for r in reqs):
            print(f"error: {[r.error for r in reqs if r.error][0]}", file=sys.stderr)
            return 1
    finally:
        eng.stop()  # releases the other processes
    print(json.dumps([[r.output_ids, r.num_evicted] for r in reqs]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
