"""Generate text: `python -m kvjax.generate --prompt "The capital of France is"`.

Loads the config's model (the embedded SmolLM2 by default), writes the prompt into the paged KV
cache in chunks, then decodes one token at a time, streaming text as it comes. Ends with one stats
line: prompt tokens, prefill and decode speed, KV bytes in use and per token.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from absl import flags

from kvjax import cli, launch, memory, sampling, sharding
from kvjax.cache import window_bytes_per_sequence
from kvjax.config import Config
from kvjax.engine.request import SamplingParams
from kvjax.engine.step import compile_sampler, enable_compile_cache, execute, fetch, prepare
from kvjax.loaders import StreamDecoder, Tokenizer, load
from kvjax.loaders.tokenizer import byte_tokenizer
from kvjax.random_weights import random_params as draw_random
from kvjax.runner import CHUNK_BUCKETS, Runner

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
    flags.DEFINE_bool("ignore_eos", False, "Keep generating past end-of-sequence tokens (for "
                      "long sessions and benchmarks; llama.cpp's --ignore-eos).")
    flags.DEFINE_string("weights", None, "GGUF file, HF checkpoint dir or kvjax orbax dir.")
    flags.DEFINE_bool("random_weights", False, "Random weights with the config's real shapes.")
    flags.DEFINE_integer("kv_stats_every", 0, "With --kv-eviction: print KV bytes in use, tokens "
                         "evicted and process RSS every N generated tokens (0 = only at the end).",
                         lower_bound=0)
    cli.define_eviction_flags()
    launch.define_distributed_flags()


def load_model(cfg: Config, weights: str | None, random_weights: bool, seed: int = 0,
               mesh=None) -> tuple[dict, Tokenizer]:
    """Params and tokenizer from --weights, --random-weights or the config's default weights.
    Without any of them, prints the memory plan and raises a UsageError naming the flags.
    With a mesh, an orbax checkpoint is restored straight into its shardings."""
    source = weights or ("" if random_weights else cfg.weights)
    if not source and not random_weights:
        p = memory.plan(cfg, cfg.model.max_position, 1, 80.0, cfg.mesh.data * cfg.mesh.tensor)
        print(memory.format_plan(cfg, p, cfg.model.max_position, 1, 80.0,
                                 cfg.mesh.data * cfg.mesh.tensor))
        raise cli.UsageError(f"config {cfg.name} has no embedded weights: pass --weights PATH "
                             "(GGUF, HF checkpoint dir or orbax dir) or --random-weights")
    if random_weights:
        from kvjax.runner import param_dtype

        # Each device draws only its shards, in the final dtype (kvjax/random_weights.py: the
        # 70B-shaped smoke run never holds a full parameter or an f32 copy).
        params = draw_random(cfg.model, seed, param_dtype(cfg), mesh)
        return params, byte_tokenizer()
    if mesh is not None:
        from kvjax.runner import param_dtype

        loaded = sharding.load_sharded(source, cfg, mesh, param_dtype(cfg))
        if loaded is not None:
            return loaded[0], loaded[1] or byte_tokenizer()
    params, tokenizer = load(source, cfg.model)
    return params, tokenizer or byte_tokenizer()


class Decoder:
    """One sequence through the engine's step path (kvjax.engine.step): the forward computes
    logits only at the last position, samples on device, and the sampled id is the only thing
    read back per token."""

    def __init__(self, runner: Runner, params: SamplingParams, seed: int, seq_id: int = 0):
        self.runner, self.params, self.seed, self.seq_id = runner, params, seed, seq_id
        self.generated = 0

    def _run(self, chunk: list[int], sample: bool) -> int | None:
        step = prepare(self.runner, [self.seq_id], [chunk])
        if sample:
            step.sample, step.flags = sampling.pack([self.params], 1, [self.generated],
                                                    [self.seed])
        out = execute(self.runner, step)
        if not sample:
            return None
        self.generated += 1
        return int(fetch(out, step.flags)[0][0])

    def prefill(self, ids: list[int], chunk: int = CHUNK_BUCKETS[-1]) -> int:
        """Write the prompt in chunks; returns the first sampled token."""
        token = None
        for i in range(0, len(ids), chunk):
            token = self._run(ids[i:i + chunk], sample=i + chunk >= len(ids))
        return token

    def step(self, token: int) -> int:
        return self._run([token], sample=True)


def warm_decode(runner: Runner, prompt_len: int, max_len: int, params: SamplingParams,
                seed: int, chunk: int = CHUNK_BUCKETS[-1], batch: int = 1) -> float:
    """Compile every shape a Decoder run of prompt_len -> max_len tokens reaches (prefill chunks
    at their widths, then decode at each width it grows through, and the sampler), so nothing
    compiles once generation starts. Returns the seconds spent."""
    t0 = time.perf_counter()
    for i in range(0, prompt_len, chunk):
        n = min(chunk, prompt_len - i)
        t = next(b for b in CHUNK_BUCKETS if b >= n)
        runner.compile(batch, t, runner.table_width(i + n))
    for w in runner.widths(max_len):
        if w >= runner.table_width(prompt_len + 1):
            runner.compile(batch, 1, w)
    flags = sampling.pack([params] * batch, batch, [0] * batch, [seed] * batch)[1]
    compile_sampler(runner, batch, flags, runner.cfg.model.vocab_size)
    return time.perf_counter() - t0


def generate_evicting(cfg: Config, params: dict, tokenizer: Tokenizer, ids: list[int],
                      sp: SamplingParams, mesh=None) -> None:
    """--kv-eviction: the session runs through the serving engine (kvjax/engine), whose block
    manager drops pages as StreamingLLM/H2O decide, so the cache stays at its budget however many
    tokens are generated (the model's context no longer caps --max-new-tokens)."""
    from kvjax.engine import Engine, EngineConfig, RequestError

    eviction, ps, chunk = cli.eviction_from_flags(), cfg.cache.page_size, CHUNK_BUCKETS[-1]
    budget = -(-eviction.max_cache_tokens(ps, chunk) // ps)  # pages one session can hold
    ecfg = EngineConfig(max_num_seqs=1, max_model_len=budget * ps, max_num_batched_tokens=chunk,
                        chunk_size=chunk, num_pages=budget + 1, eviction=eviction, seed=FLAGS.seed)
    engine = Engine(cfg, params, ecfg, eos_ids=tuple(tokenizer.eos_ids), mesh=mesh)
    try:
        req = engine.add_request(engine.make_request("generate", ids, sp))
    except RequestError as e:
        raise cli.UsageError(str(e)) from None
    pool, stream = engine.pools[req.pool], StreamDecoder(tokenizer)
    page_bytes = ps * pool.runner.kv_bytes_per_token
    ring_bytes = window_bytes_per_sequence(cfg.model, pool.cfg.cache)
    printed, peak, last, t0 = 0, 0, 0, time.perf_counter()
    while not req.finished:
        last = int(pool.bm.num_used * page_bytes + ring_bytes)  # before this step's growth
        engine.step()
        peak = max(peak, last, int(pool.bm.num_used * page_bytes + ring_bytes))
        for token in req.output_ids[printed:]:
            if token not in tokenizer.eos_ids:
                sys.stdout.write(stream.push(token))
        every = FLAGS.kv_stats_every
        if every and not req.finished and printed // every != len(req.output_ids) // every:
            print(f"\n[kv] {len(req.output_ids)} tokens, {time.perf_counter() - t0:.1f} s | KV in "
                  f"use {int(pool.bm.num_used * page_bytes + ring_bytes):,} bytes (peak {peak:,})"
                  f" | evicted {req.num_evicted} | RSS {_rss_bytes():,} bytes",
                  file=launch.stats_stream(), flush=True)
        printed = len(req.output_ids)
        sys.stdout.flush()
    if req.finish_reason == "error":
        raise RuntimeError(f"generation failed: {req.error}")
    seconds = time.perf_counter() - t0
    print()
    print(f"[stats] prompt tokens {len(ids)} | {len(req.output_ids)} tokens in {seconds:.1f} s "
          f"({len(req.output_ids) / max(seconds, 1e-9):.1f} tok/s) | {eviction.policy}: evicted "
          f"{req.num_evicted} tokens | KV in use {last:,} bytes (peak {peak:,}; budget "
          f"{budget} pages = {int(budget * page_bytes + ring_bytes):,} bytes)",
          file=launch.stats_stream())


def _rss_bytes() -> int:
    """This process's resident set size now (Linux /proc; 0 elsewhere)."""
    try:
        import os

        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


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
    if FLAGS.kv_eviction != "none":
        generate_evicting(cfg, params, tokenizer, ids, SamplingParams(
            max_tokens=max(1, FLAGS.max_new_tokens), temperature=FLAGS.temperature,
            top_p=FLAGS.top_p, top_k=FLAGS.top_k, seed=FLAGS.seed,
            ignore_eos=FLAGS.ignore_eos), mesh)
        return 0
    context = cfg.model.max_position
    if len(ids) >= context:
        raise cli.UsageError(f"the prompt has {len(ids)} tokens; the context is {context}")
    if any(i >= cfg.model.vocab_size for i in ids):
        raise cli.UsageError("the tokenizer produced ids outside the model's vocabulary")
    max_len = min(context, len(ids) + FLAGS.max_new_tokens)

    runner = Runner(cfg, params, max_seq_len=max_len, mesh=mesh)
    del params
    sp = SamplingParams(temperature=FLAGS.temperature, top_p=FLAGS.top_p, top_k=FLAGS.top_k)
    seed = sampling.row_seed(FLAGS.seed, 0)
    enable_compile_cache()
    warm_s = warm_decode(runner, len(ids), max_len, sp, seed)
    t0 = time.perf_counter()
    decoder = Decoder(runner, sp, seed)
    token = decoder.prefill(ids)
    prefill_s = time.perf_counter() - t0

    stream = StreamDecoder(tokenizer)
    budget = max_len - len(ids)  # --max-new-tokens, capped by the context
    n_new, t1 = 0, time.perf_counter()
    while n_new < budget:
        n_new += 1
        if token in tokenizer.eos_ids and not FLAGS.ignore_eos:
            break
        if token not in tokenizer.eos_ids:
            sys.stdout.write(stream.push(token))
        sys.stdout.flush()
        if n_new < budget:  # the last token is printed, never written to the cache
            token = decoder.step(token)
    decode_s = time.perf_counter() - t1
    print()
    print(f"[stats] prompt tokens {len(ids)} | prefill {len(ids) / prefill_s:.1f} tok/s | "
          f"decode {n_new / max(decode_s, 1e-9):.1f} tok/s ({n_new} tokens) | "
          f"KV in use {runner.kv_bytes_in_use():,} bytes | "
          f"{memory.fmt_num(runner.kv_bytes_per_token)} bytes/token ({cfg.cache.dtype}) | "
          f"compile {warm_s:.1f} s",
          file=launch.stats_stream())
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
