"""`python -m kvjax.eval ppl --config NAME --text-file F [--max-tokens N] [--prefix N]`.

Also `kl` (against the --reference cache, default bf16), `passkey` and `sweep` (every dtype
through ppl, kl and passkey, written to --results): see kvjax/eval/sweep.py; `longppl` (a text
longer than the context under a --budget-token cache, per 1K bucket: kvjax/eval/longppl.py)."""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags

from kvjax import cli
from kvjax.eval.ppl import perplexity
from kvjax.generate import load_model
from kvjax.runner import Runner

FLAGS = flags.FLAGS
COMMANDS = ("ppl", "kl", "passkey", "sweep", "longppl")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise cli.UsageError(f"usage: python -m kvjax.eval {{{','.join(COMMANDS)}}} [flags]")
    cfg = cli.config_from_flags()
    if argv[1] == "longppl":
        return _longppl(cfg)
    if argv[1] != "ppl":
        from kvjax.eval.sweep import COMMANDS as OTHERS

        return OTHERS[argv[1]](cfg)
    if FLAGS.text_file is None:
        raise cli.UsageError("pass --text-file FILE")
    text = Path(FLAGS.text_file).read_text()
    params, tokenizer = load_model(cfg, FLAGS.weights, FLAGS.random_weights)
    ids = tokenizer.encode(text)[: FLAGS.max_tokens]
    if len(ids) > cfg.model.max_position:
        raise cli.UsageError(f"{len(ids)} tokens exceed the context of {cfg.model.max_position}")
    if len(ids) < FLAGS.prefix + 2:
        raise cli.UsageError(f"the text has {len(ids)} tokens; --prefix {FLAGS.prefix} leaves "
                             "nothing to score")
    runner = Runner(cfg, params, max_seq_len=len(ids))
    result = perplexity(runner, ids, prefix=FLAGS.prefix, chunk=FLAGS.chunk)
    print(f"ppl {result.ppl:.4f} | nll {result.nll:.5f} | scored {result.tokens_scored} tokens "
          f"| prefix {FLAGS.prefix} | kv {cfg.cache.dtype} | config {cfg.name}")
    return 0


def _longppl(cfg) -> int:
    """Per-1K-bucket perplexity of a long text under a bounded cache (kvjax/eval/longppl.py)."""
    from kvjax.eval import longppl

    if FLAGS.text_file is None:
        raise cli.UsageError("pass --text-file FILE_OR_DIR")
    bad = [m for m in FLAGS.methods if m not in longppl.METHODS]
    if bad:
        raise cli.UsageError(f"unknown --methods {bad}; choose from {longppl.METHODS}")
    params, tokenizer = load_model(cfg, FLAGS.weights, FLAGS.random_weights)
    ids = tokenizer.encode(longppl.read_text(FLAGS.text_file))[: FLAGS.max_tokens]
    if len(ids) < 2:
        raise cli.UsageError("the text has fewer than 2 tokens")
    if FLAGS.longppl_passkey:  # passkey retrieval under each method's eviction instead
        longppl.main_passkey(cfg, params, tokenizer, FLAGS.methods, FLAGS.budget, FLAGS.chunk,
                             [int(n) for n in FLAGS.longppl_passkey], FLAGS.longppl_trials,
                             FLAGS.longppl_results, FLAGS.kv_eviction_granularity)
        return 0
    longppl.main(cfg, params, ids, FLAGS.methods, FLAGS.budget, FLAGS.chunk,
                 FLAGS.longppl_results, FLAGS.kv_eviction_granularity)
    return 0


if __name__ == "__main__":
    cli.define_config_flags()
    flags.DEFINE_string("text_file", None, "Text to score.")
    flags.DEFINE_integer("max_tokens", 1024, "Score at most this many tokens (prefix included).",
                         lower_bound=2)
    flags.DEFINE_integer("prefix", 0, "Tokens written into the cache before scoring starts.",
                         lower_bound=0)
    flags.DEFINE_integer("chunk", 256, "Tokens per forward while scoring (1 = decode steps).",
                         lower_bound=1)
    flags.DEFINE_string("weights", None, "GGUF file, HF checkpoint dir or kvjax orbax dir.")
    flags.DEFINE_bool("random_weights", False, "Random weights with the config's real shapes.")
    flags.DEFINE_integer("budget", 1024, "longppl: KV cache budget in tokens.", lower_bound=16)
    flags.DEFINE_list("methods", ["window", "streaming", "h2o", "dense"],
                      "longppl: dense, window (no sinks), streaming (4 sinks), h2o, h2o-max.")
    flags.DEFINE_string("longppl_results", None, "longppl: write the buckets to this JSON file.")
    flags.DEFINE_list("longppl_passkey", [], "longppl: passkey retrieval at these lengths under "
                      "each method's eviction (instead of perplexity).")
    flags.DEFINE_integer("longppl_trials", 4, "longppl_passkey: trials per length.", lower_bound=1)
    flags.DEFINE_enum("kv_eviction_granularity", "page", ["page", "token"],
                      "longppl: evict whole pages or single tokens (compacted on device).")
    from kvjax.eval.sweep import define_flags

    define_flags()
    cli.run(main, sys.argv)
