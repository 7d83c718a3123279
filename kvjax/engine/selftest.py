"""Greedy requests through an Engine, optionally on a device mesh over several processes; prints
each request's output ids as one JSON line (process 0). The multi-process check compares it
with a one-device run:

    python -m kvjax.launch --num-processes 2 --cpu-devices-per-process 4 \\
        --module kvjax.engine.selftest -- --config tiny_llama_kv4 --data 2 --tensor 4
    python -m kvjax.engine.selftest --config tiny_llama_kv4

SmolLM2's 9 query / 3 KV heads take tensor 3 (two processes x 3 devices, data 2 x tensor 3):

    python -m kvjax.launch --num-processes 2 --cpu-devices-per-process 3 \
        --module kvjax.engine.selftest -- --config smollm2 --weights config --num-layers 4 \
        --data 2 --tensor 3
    python -m kvjax.engine.selftest --config smollm2 --weights config --num-layers 4
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvjax.engine.selftest")
    ap.add_argument("--config", default="tiny_llama_kv4")
    ap.add_argument("--num-layers", type=int, default=None, help="cut the model to N layers")
    ap.add_argument("--kv-cache-dtype", default="f32", help="cache dtype (f32: exact across "
                    "meshes, whose reduction order differs)")
    ap.add_argument("--data", type=int, default=1)
    ap.add_argument("--tensor", type=int, default=1)
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0, help="weights seed (random weights)")
    ap.add_argument("--weights", default=None, help="a checkpoint, or 'config' for the config's "
                    "own weights (default: random weights; SmolLM2's tied random embeddings "
                    "make every greedy token repeat the last prompt token)")
    ap.add_argument("--sampled", action="store_true", help="also seeded temperature sampling")
    ap.add_argument("--warmup", action="store_true")
    a = ap.parse_args(argv)

    from kvjax import launch

    launch.initialize()
    import jax

    import models
    from kvjax.config import MeshConfig, load_config
    from kvjax.engine import Engine, EngineConfig, SamplingParams
    from kvjax.sharding import make_mesh

    cfg = load_config(a.config).replace_cache(dtype=a.kv_cache_dtype)
    if a.num_layers:
        cfg = cfg.replace_model(num_layers=a.num_layers)
    mesh = None
    if a.data * a.tensor > 1:
        mesh = make_mesh(MeshConfig(data=a.data, tensor=a.tensor))
    if a.weights:
        from kvjax.loaders import load

        params = load(cfg.weights if a.weights == "config" else a.weights, cfg.model)[0]
    else:
        params = models.random_params(cfg.model, seed=a.seed)
    eng = Engine(cfg, params, EngineConfig(max_model_len=128, num_pages=300, max_num_seqs=8,
                                           max_num_batched_tokens=96, chunk_size=32), mesh=mesh)
    if a.warmup:
        eng.warmup(background=False)
    if jax.process_index() != 0:
        eng.follow()
        return 0
    rng = np.random.default_rng(0)
    vocab = cfg.model.vocab_size
    prompts = [rng.integers(0, vocab, int(rng.integers(2, 60))).tolist()
               for _ in range(a.requests)]
    sps = [SamplingParams(max_tokens=a.max_tokens)]
    if a.sampled:
        sps.append(SamplingParams(max_tokens=a.max_tokens, temperature=0.8, top_p=0.9, top_k=40,
                                  seed=1234))
    out = []
    try:
        for sp in sps:
            reqs = [eng.make_request(f"r{i}", p, sp) for i, p in enumerate(prompts)]
            eng.generate(reqs)
            out.append([r.output_ids for r in reqs])
            if any(r.finish_reason == "error" for r in reqs):
                print(f"error: {[r.error for r in reqs if r.error][0]}", file=sys.stderr)
                return 1
    finally:
        eng.stop()  # releases the other processes
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
