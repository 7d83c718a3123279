"""Generate text: `python -m kvjax.generate --prompt "The capital of France is"`.

Loads the config's model (the embedded SmolLM2 by default), writes the prompt into the paged KV
cache in chunks, then decodes one token at a time, streaming text as it comes. Ends with one stats
line: prompt tokens, prefill and decode speed, KV bytes in use and per token.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import flags

from kvjax import cli, launch, memory, sharding
from kvjax.config import Config
from kvjax.loaders import StreamDecoder, Tokenizer, load
from kvjax.loaders.tokenizer import byte_tokenizer
from kvjax.runner import CHUNK_BUCKETS, Runner
from kvjax.sampling import sample

FLAGS = flags.FLAGS


def define_flags() -> None:
    cli.define_config_flags()
    flags.DEFINE_string("prompt", None, "Prompt text.")
    flags.DEFINE_string("prompt_file", None, "Read the prompt from this file.")
    flags.DEFINE_bool("chat", False, "Wrap the prompt in the model's chat template.")
    flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.", lower_bound=0)
    flags.DEFINE_float("temperature", 0.7, "Sampling temperature; 0 is greedy.", lower_bound=0.0)
    flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all).", lower_bound=0)
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.", lower_bound=0.0, upper_bound=1.0)
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_string("weights", None, "GGUF file, HF checkpoint dir or kvjax orbax dir.")
    flags.DEFINE_bool("random_weights", False, "Random weights with the config's real shapes.")
    launch.define_distributed_flags()


def load_model(cfg: Config, weights: str | None, random_weights: bool, seed: int = 0,
               mesh=None) -> tuple[dict, Tokenizer]:
    """Params and tokenizer from --weights, --random-weights or the config's default weights.
    Without any of them, prints the memory plan and raises a UsageError naming the flags.
    With a mesh, an orbax checkpoint is restored straight into its shardings."""
    import models

    source = weights or ("" if random_weights else cfg.weights)
    if not source and not random_weights:
        p = memory.plan(cfg, cfg.model.max_position, 1, 80.0, cfg.mesh.data * cfg.mesh.tensor)
        print(memory.format_plan(cfg, p, cfg.model.max_position, 1, 80.0,
                                 cfg.mesh.data * cfg.mesh.tensor))
        raise cli.UsageError(f"config {cfg.name} has no embedded weights: pass --weights PATH "
                             "(GGUF, HF checkpoint dir or orbax dir) or --random-weights")
    if random_weights:
        from kvjax.runner import param_dtype

        params = models.random_params(cfg.model, seed=seed, dtype=param_dtype(cfg))
        return params, byte_tokenizer()
    if mesh is not None:
        from kvjax.runner import param_dtype

        loaded = sharding.load_sharded(source, cfg, mesh, param_dtype(cfg))
        if loaded is not None:
            return loaded[0], loaded[1] or byte_tokenizer()
    params, tokenizer = load(source, cfg.model)
    return params, tokenizer or byte_tokenizer()


def read_prompt() -> str:
    if FLAGS.prompt is not None and FLAGS.prompt_file is not None:
        raise cli.UsageError("pass --prompt or --prompt-file, not both")
    if FLAGS.prompt_file is not None:
        return Path(FLAGS.prompt_file).read_text()
    if FLAGS.prompt is None:
        raise cli.UsageError("pass --prompt TEXT or --prompt-file FILE")
    return FLAGS.prompt


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cfg = cli.config_from_flags()
    prompt = read_prompt()
    launch.initialize_from_flags()  # a no-op unless this is one of several processes
    launch.quiet_unless_leader()
    mesh = sharding.mesh_for_run(
        cfg, strict=FLAGS.tensor_parallel is not None or FLAGS.data_parallel is not None)
    params, tokenizer = load_model(cfg, FLAGS.weights, FLAGS.random_weights, FLAGS.seed, mesh)
    if FLAGS.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    ids = tokenizer.encode(prompt)
    if not ids:
        raise cli.UsageError("the prompt is empty")
    context = cfg.model.max_position
    if len(ids) >= context:
        raise cli.UsageError(f"the prompt has {len(ids)} tokens; the context is {context}")
    if any(i >= cfg.model.vocab_size for i in ids):
        raise cli.UsageError("the tokenizer produced ids outside the model's vocabulary")
    max_len = min(context, len(ids) + FLAGS.max_new_tokens)

    runner = Runner(cfg, params, max_seq_len=max_len, mesh=mesh)
    del params
    key = jax.random.key(FLAGS.seed)
    temperature, top_p = np.float32(FLAGS.temperature), np.float32(FLAGS.top_p)

    first_chunk = min(len(ids), CHUNK_BUCKETS[-1])
    runner.warmup(tuple(sorted({1, next(b for b in CHUNK_BUCKETS if b >= first_chunk)})))
    t0 = time.perf_counter()
    logits = runner.prefill(0, ids)
    logits.block_until_ready()
    prefill_s = time.perf_counter() - t0

    stream = StreamDecoder(tokenizer)
    n_new, t1 = 0, time.perf_counter()
    for _ in range(max_len - len(ids)):
        key, sub = jax.random.split(key)
        token = int(sample(logits[None], sub, temperature, top_p, top_k=FLAGS.top_k)[0])
        n_new += 1
        if token in tokenizer.eos_ids:
            break
        sys.stdout.write(stream.push(token))
        sys.stdout.flush()
        if runner.lengths[0] + 1 > max_len:
            break
        logits = runner.step([0], [[token]])[0, 0]
    decode_s = time.perf_counter() - t1
    print()
    print(f"[stats] prompt tokens {len(ids)} | prefill {len(ids) / prefill_s:.1f} tok/s | "
          f"decode {n_new / max(decode_s, 1e-9):.1f} tok/s ({n_new} tokens) | "
          f"KV in use {runner.kv_bytes_in_use():,} bytes | "
          f"{memory.fmt_num(runner.kv_bytes_per_token)} bytes/token ({cfg.cache.dtype})",
          file=launch.stats_stream())
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
