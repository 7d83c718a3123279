"""Shared command-line plumbing: absl flags parsed by hand so that every user error (a bad flag,
an unknown config, missing weights, a prompt too long) is one line on stderr and exit code 2,
never a traceback."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

from absl import flags

from kvjax.config import KV_CACHE_DTYPES, ConfigError

FLAGS = flags.FLAGS


class UsageError(ValueError):
    """A bad request from the user: printed as one line, exit 2."""


def user_errors() -> tuple[type[Exception], ...]:
    from kvjax.cache import OutOfPages
    from kvjax.loaders import WeightsError

    return (UsageError, ConfigError, WeightsError, OutOfPages, flags.Error, OSError)


def run(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    """Parse absl flags, run main, and turn user errors into `error: ...` + exit 2."""
    argv = _underscore_flag_names(list(sys.argv if argv is None else argv))
    if any(a in HELP_ARGS for a in argv[1:argv.index("--") if "--" in argv else None]):
        try:
            print(usage())
        except BrokenPipeError:  # `--help | head`
            pass
        sys.exit(0)
    try:
        rest = FLAGS(argv)
        code = main(rest)
    except user_errors() as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code or 0)


HELP_ARGS = ("-h", "--help", "--helpfull", "-?")


def usage() -> str:
    """The running command's docstring and its own flags (kvjax's and the script's), without
    absl's logging flags: what `--help` prints (absl's own --help is off: flags are parsed by hand
    so that a bad flag is one line)."""
    main_doc = (sys.modules["__main__"].__doc__ or "").strip()
    parts = [main_doc] if main_doc else []
    by_module = FLAGS.flags_by_module_dict()
    for module in sorted(by_module, key=lambda m: (not m.endswith("__main__.py"), m)):
        if "absl" in module or not by_module[module]:
            continue
        text = FLAGS.module_help(module)
        parts.append(text.replace(module, module[module.rfind("kvjax/"):] if "kvjax/" in module
                                  else module, 1))
    return "\n\n".join(parts) + "\n\nFlags take dashes or underscores (--max-new-tokens)."


def _underscore_flag_names(argv: list[str]) -> list[str]:
    """absl names flags with underscores; accept the dashed spelling users type (--max-new-tokens).
    Arguments after a bare `--` are passed through untouched."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        if i and arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            base = name[3:].replace("-", "_")
            if name.startswith("no-") and base in FLAGS and isinstance(FLAGS[base],
                                                                      flags.BooleanFlag):
                name = "no" + base  # --no-chat: absl spells boolean negation --nochat
            arg = "--" + name.replace("-", "_") + eq + value
        out.append(arg)
    return out


def define_config_flags() -> None:
    """Flags that pick and override a named config (shared by generate, eval, memory, bench)."""
    flags.DEFINE_string("config", "smollm2", "Named config from configs/. With --weights, the "
                        "architecture comes from the checkpoint and a named config only adds "
                        "cache/mesh presets (checked against the checkpoint).")
    flags.DEFINE_enum("weight_dtype", None, ["auto", "int8", "int4"], "Projection weights in "
                      "memory and in the matmul: auto (float), int8 (groups of 32, GGUF Q8_0's "
                      "layout) or int4 (groups of 32; GGUF Q4_0/Q4_1 kept as they are).")
    flags.DEFINE_string("kv_cache_dtype", None, "KV cache dtype: auto, "
                        + ", ".join(KV_CACHE_DTYPES) + "; or auto:BYTES / auto:DTYPE, per-layer "
                        "formats within BYTES per token (or DTYPE's bytes) from the KV "
                        "calibration's measured layer sensitivities. turbo3.5 and turbo2.5 are "
                        "such per-layer layouts at their own bytes (at most 6 segments) when "
                        "the calibration has sensitivities (smollm2's does), else uniform (with "
                        "a warning if a calibration was given); uniform:turbo3.5 / "
                        "uniform:turbo2.5 are always uniform.")
    flags.DEFINE_integer("page_size", None, "Tokens per KV page (a power of two).", lower_bound=1)
    flags.DEFINE_integer("kv_window", None, "Full-precision window: the most recent N tokens "
                         "of each sequence stay bf16 (default 128 for compressed dtypes; 0 gives "
                         "plain pages).", lower_bound=0)
    flags.DEFINE_integer("kv_sink_tokens", None, "Exact attention-sink tokens: the first N "
                         "tokens of each sequence stay bf16 beside the compressed pages (a "
                         "per-sequence buffer like the window; default: the format's, "
                         "config.DEFAULT_SINK_TOKENS).", lower_bound=0)
    flags.DEFINE_string("kv_calibration", None, "Directory written by python -m kvjax.calibrate "
                        "(TurboQuant key means and outlier channels per layer/KV head); 'none' "
                        "drops the config's default.")
    flags.DEFINE_integer("bf16_edge_layers", None, "Keep the first and last N layers' KV in bf16.",
                         lower_bound=0)
    flags.DEFINE_list("bf16_layers", None, "Keep these layers' KV in bf16 (comma-separated "
                      "indices).")
    flags.DEFINE_integer("num_layers", None, "Run only the first N layers (smoke runs).",
                         lower_bound=1)
    flags.DEFINE_integer("data_parallel", None, "Mesh data axis: batch rows split over this "
                         "many device groups (default: the config's mesh).", lower_bound=1)
    flags.DEFINE_enum("attention_impl", None, ["auto", "xla", "pallas"], "Decode attention: "
                      "xla, pallas kernels reading the compressed pages (Triton on GPU, Mosaic "
                      "on TPU, interpret mode on CPU), or auto (pallas on GPU/TPU, xla on CPU; "
                      "the default).")
    flags.DEFINE_integer("tensor_parallel", None, "Mesh tensor axis: heads and MLP split over "
                         "this many devices (default: the config's mesh).", lower_bound=1)


def define_eviction_flags() -> None:
    """Eviction for unbounded sessions (shared by generate and serve; kvjax/engine/eviction.py)."""
    flags.DEFINE_enum("kv_eviction", "none", ["none", "streaming", "h2o"],
                      "Eviction policy: StreamingLLM (sinks + recent window) or H2O (sinks + "
                      "heavy hitters by attention mass + recent window).")
    flags.DEFINE_integer("sink_tokens", 4, "StreamingLLM/H2O sink tokens.", lower_bound=0)
    flags.DEFINE_integer("eviction_window", 512, "Recent tokens kept by eviction.", lower_bound=1)
    flags.DEFINE_integer("heavy_tokens", 128, "H2O heavy-hitter tokens.", lower_bound=0)
    flags.DEFINE_enum("kv_eviction_granularity", "page", ["page", "token"],
                      "Evict whole pages (nothing moves) or single tokens (kept tokens "
                      "compacted on device; a KIVI cache still evicts whole pages).")


def eviction_from_flags():
    from kvjax.engine.eviction import EvictionConfig

    return EvictionConfig(FLAGS.kv_eviction, FLAGS.sink_tokens, FLAGS.eviction_window,
                          FLAGS.heavy_tokens, FLAGS.kv_eviction_granularity)


def config_from_flags():
    from kvjax.config import config_for

    weights = FLAGS["weights"].value if "weights" in FLAGS else None
    cfg = config_for(FLAGS.config if FLAGS["config"].present or not weights else None, weights)
    if FLAGS.weight_dtype is not None:
        cfg = cfg.replace_model(weight_dtype=FLAGS.weight_dtype)
    if FLAGS.num_layers is not None:
        cfg = cfg.replace_model(num_layers=FLAGS.num_layers)
    mesh_kw = {k: v for k, v in (("data", FLAGS.data_parallel),
                                 ("tensor", FLAGS.tensor_parallel)) if v is not None}
    if mesh_kw:
        cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, **mesh_kw))
    if FLAGS.attention_impl is not None:
        cfg = dataclasses.replace(cfg, attention_impl=FLAGS.attention_impl)
    cache_kw = {}
    if FLAGS.kv_cache_dtype is not None:
        cache_kw["dtype"] = FLAGS.kv_cache_dtype
        if FLAGS.page_size is None and FLAGS.kv_cache_dtype.startswith("kivi"):
            cache_kw["page_size"] = 0  # the dtype's default page size (KIVI's group size)
    if FLAGS.page_size is not None:
        cache_kw["page_size"] = FLAGS.page_size
    if FLAGS.kv_window is not None:
        cache_kw["window"] = FLAGS.kv_window
    if FLAGS.kv_sink_tokens is not None:
        cache_kw["sink_tokens"] = FLAGS.kv_sink_tokens
    if FLAGS.kv_calibration is not None:
        cache_kw["calibration"] = "" if FLAGS.kv_calibration == "none" else FLAGS.kv_calibration
    if FLAGS.bf16_edge_layers is not None:
        cache_kw["bf16_edge_layers"] = FLAGS.bf16_edge_layers
    if FLAGS.bf16_layers is not None:
        try:
            cache_kw["bf16_layers"] = tuple(int(i) for i in FLAGS.bf16_layers)
        except ValueError:
            raise ConfigError(f"--bf16-layers takes layer indices, got "
                              f"{','.join(FLAGS.bf16_layers)}") from None
    return cfg.replace_cache(**cache_kw) if cache_kw else cfg
