"""Batch-1 greedy decode: kvjax's generate path against Hugging Face transformers (PyTorch eager)
on the same SmolLM2 GGUF, in one process, in alternating rounds so both see the same machine load.

    pip install torch==2.13.0 'transformers<5'    # CPU torch from the local wheel; bench only
    python -m kvjax.bench.vs_hf --new-tokens 128 --rounds 3

kvjax decodes through generate.Decoder (the engine's step: logits at the last position, sampling
on device, one id back per token; every shape compiled before timing). HF runs the model's
forward with its KV cache (use_cache) one token at a time, argmax on the host, under
torch.inference_mode. Both time only the decode of new_tokens tokens after the prompt.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def kvjax_decode(cfg, params, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    from kvjax.engine.request import SamplingParams
    from kvjax.generate import Decoder, warm_decode
    from kvjax.runner import Runner

    runner = Runner(cfg, params, max_seq_len=len(prompt) + new_tokens + 1)
    greedy = SamplingParams()
    warm_decode(runner, len(prompt), len(prompt) + new_tokens + 1, greedy, 0)
    dec = Decoder(runner, greedy, 0)
    out = [dec.prefill(prompt)]
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out.append(dec.step(out[-1]))
    return new_tokens / (time.perf_counter() - t0), out


def hf_model():
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from kvjax.loaders import smollm2_path

    path = Path(smollm2_path())
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)


def hf_decode(model, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    import torch

    with torch.inference_mode():
        ids = torch.tensor([prompt])
        res = model(ids, use_cache=True)
        past, tok = res.past_key_values, int(res.logits[0, -1].argmax())
        out = [tok]
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            res = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past, tok = res.past_key_values, int(res.logits[0, -1].argmax())
            out.append(tok)
        return new_tokens / (time.perf_counter() - t0), out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvjax.bench.vs_hf")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kv-cache-dtype", default="bf16")
    ap.add_argument("--prompt", default="The capital of France is")
    a = ap.parse_args(argv)
    try:
        import torch
        import transformers
    except ImportError:
        print("error: needs torch and transformers (pip install torch==2.13.0 'transformers<5')",
              file=sys.stderr)
        return 2
    import jax

    from kvjax.config import load_config
    from kvjax.engine.step import enable_compile_cache
    from kvjax.generate import load_model

    enable_compile_cache()
    cfg = load_config("smollm2").replace_cache(dtype=a.kv_cache_dtype)
    params, tok = load_model(cfg, None, False)
    prompt = tok.encode(a.prompt)
    model = hf_model()
    ours, theirs = [], []
    for _ in range(a.rounds):
        tps, ours_ids = kvjax_decode(cfg, params, prompt, a.new_tokens)
        ours.append(tps)
        tps, hf_ids = hf_decode(model, prompt, a.new_tokens)
        theirs.append(tps)
    agree = int(np.argmin(np.asarray(ours_ids) == np.asarray(hf_ids))) if ours_ids != hf_ids \
        else len(hf_ids)
    print(f"jax {jax.__version__} | torch {torch.__version__} | transformers "
          f"{transformers.__version__} | threads {torch.get_num_threads()} | prompt {len(prompt)} "
          f"tokens | {a.new_tokens} new tokens | greedy tokens agree for the first {agree}")
    print("| engine | decode tok/s (median of rounds) | rounds |")
    print("|---|---|---|")
    print(f"| kvjax generate ({a.kv_cache_dtype} cache) | {np.median(ours):.2f} | "
          f"{', '.join(f'{x:.2f}' for x in ours)} |")
    print(f"| HF transformers (PyTorch eager, f32) | {np.median(theirs):.2f} | "
          f"{', '.join(f'{x:.2f}' for x in theirs)} |")
    print(f"ratio kvjax / HF: {np.median(ours) / np.median(theirs):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
