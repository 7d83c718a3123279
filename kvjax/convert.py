"""Convert weights to an orbax checkpoint: `python -m kvjax.convert --weights SRC --out DIR`.
SRC is a GGUF file, an HF checkpoint dir or "smollm2" (the architecture comes from it; --config
only checks it); `--weights DIR` then restores the converted params (no dequantization or
transposes at load time). The params are saved in float: --weight-dtype applies when loading."""

from __future__ import annotations

import dataclasses

from absl import flags

from kvjax import cli
from kvjax.loaders import load, orbax_ckpt

FLAGS = flags.FLAGS


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cfg = cli.config_from_flags()
    source = FLAGS.weights or cfg.weights
    if not source:
        raise cli.UsageError("pass --weights SRC (GGUF file or HF checkpoint dir)")
    if not FLAGS.out:
        raise cli.UsageError("pass --out DIR")
    params, tokenizer = load(source, dataclasses.replace(cfg.model, weight_dtype="auto"))
    orbax_ckpt.save(FLAGS.out, cfg.model, params, tokenizer)
    n = sum(v.size for v in params.values())
    print(f"wrote {n:,} params of {cfg.name} to {FLAGS.out}")
    return 0


if __name__ == "__main__":
    cli.define_config_flags()
    flags.DEFINE_string("weights", None, "Source weights: GGUF file, HF checkpoint dir, smollm2.")
    flags.DEFINE_string("out", None, "Output directory for the orbax checkpoint.")
    cli.run(main)
