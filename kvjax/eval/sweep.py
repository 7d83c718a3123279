"""Every cache dtype through ppl, kl and passkey: a markdown table, a JSON dump and a PNG plot of
quality against bytes per token, written to a results folder.

The model is loaded once and its params shared by every runner. Perplexity and KL come out of
one lockstep pass (`kvjax.eval.kl.compare`): the reference cache and all candidates advance a
chunk at a time over the same ids, so the reference runs once. Passkey then runs dtype by dtype
on the same seeded prompts. Results are rewritten after every dtype, so a long sweep that is cut
short leaves what it measured.

Also holds the command-line glue of `kl`, `passkey` and `sweep` (`python -m kvjax.eval`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import jax.numpy as jnp
from absl import flags

from kvjax import cli
from kvjax.cache import bytes_per_token
from kvjax.config import KIVI_GROUP, KV_CACHE_DTYPES, Config
from kvjax.eval.kl import KlResult, compare
from kvjax.eval.passkey import DEFAULT_LENGTHS, passkey_accuracy, trial_prompts
from kvjax.loaders import Tokenizer
from kvjax.runner import Runner, param_dtype

FLAGS = flags.FLAGS
DEFAULT_DTYPES = tuple(d for d in KV_CACHE_DTYPES if d != "f32")


def cache_for(cfg: Config, dtype: str) -> Config:
    """cfg with another cache dtype; KIVI dtypes get their group-sized pages unless the config's
    page size is already a multiple of the group."""
    page = cfg.cache.page_size
    if dtype.startswith("kivi") and page % KIVI_GROUP:
        page = 0
    return cfg.replace_cache(dtype=dtype, page_size=page)


def shared_params(cfg: Config, params: dict) -> dict:
    """Params as device arrays of the runners' dtype, so every Runner reuses them (no copies)."""
    dtype = param_dtype(cfg)
    return {k: jnp.asarray(v, dtype) for k, v in params.items()}


@dataclasses.dataclass
class Row:
    dtype: str
    bytes_per_token: float
    ratio: float  # reference bytes per token / this dtype's
    ppl: float | None = None
    dppl_pct: float | None = None
    kl: float | None = None
    top1: float | None = None
    passkey: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)  # len: (ok, n)
    passkey_answers: dict[int, list[tuple[str, str]]] = dataclasses.field(default_factory=dict)


def run_sweep(cfg: Config, params: dict, tokenizer: Tokenizer, ids: list[int] | None,
              dtypes=DEFAULT_DTYPES, results_dir: str | Path = "results", reference: str = "bf16",
              prefix: int = 0, chunk: int = 256, passkey_lengths=DEFAULT_LENGTHS,
              trials: int = 3, seed: int = 0, chat: bool = False, batch: int = 3,
              passkey_chunk: int = 256, meta: dict | None = None, resume: bool = False,
              log=print) -> list[Row]:
    """Runs the sweep and writes sweep.md, sweep.json and sweep.png under results_dir (the table
    and JSON after every measurement, the plot at the end). ids=None skips ppl and kl; empty
    passkey_lengths skips passkey. With resume, measurements already in results_dir/sweep.json
    under the same protocol are kept and not run again (passkey per dtype and length)."""
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = shared_params(cfg, params)
    ref_cfg = cache_for(cfg, reference)
    ref_bytes = bytes_per_token(cfg.model, ref_cfg.cache)
    rows = []
    for d in dtypes:
        b = bytes_per_token(cfg.model, cache_for(cfg, d).cache)
        rows.append(Row(d, b, ref_bytes / b))
    meta = dict(meta or {}, config=cfg.name, reference=reference, prefix=prefix, chunk=chunk,
                trials=trials, seed=seed, chat=chat, window=cfg.cache.window,
                bf16_edge_layers=cfg.cache.bf16_edge_layers,
                bf16_layers=list(cfg.cache.bf16_layers))
    if resume:
        scored = len(ids) - max(prefix, 1) if ids is not None else None
        _resume(out / "sweep.json", rows, meta, scored, log)

    def save(final: bool = False) -> None:
        write_results(out, rows, meta, with_plot=final)

    todo = [r for r in rows if r.ppl is None]
    if ids is not None and todo:
        t0 = time.perf_counter()
        ref = Runner(ref_cfg, params, max_seq_len=len(ids))
        cands = {r.dtype: Runner(cache_for(cfg, r.dtype), params, max_seq_len=len(ids))
                 for r in todo if r.dtype != reference}
        if not cands:  # the reference alone: its perplexity still needs one pass
            cands = {reference: Runner(ref_cfg, params, max_seq_len=len(ids))}
        res = compare(ref, cands, ids, prefix=prefix, chunk=chunk)
        del ref, cands
        ref_ppl = next(iter(res.values())).ref_ppl
        if reference not in res:
            res[reference] = KlResult(next(iter(res.values())).tokens_scored, 0.0, 1.0,
                                      math.log(ref_ppl), math.log(ref_ppl))
        for r in todo:
            k = res[r.dtype]
            r.ppl, r.kl, r.top1 = k.ppl, k.kl, k.top1
            r.dppl_pct = 100.0 * (k.ppl / ref_ppl - 1.0)
        meta.update(tokens_scored=next(iter(res.values())).tokens_scored, ref_ppl=ref_ppl)
        log(f"ppl/kl over {meta['tokens_scored']} tokens: {time.perf_counter() - t0:.0f} s")
        save()
    for r in rows:
        lengths = [n for n in passkey_lengths if n not in r.passkey]
        if not lengths:
            continue
        t0 = time.perf_counter()
        runner = Runner(cache_for(cfg, r.dtype), params, max_seq_len=max(lengths),
                        max_batch=min(batch, trials))
        for n in lengths:  # one length at a time, saved as it comes
            p = passkey_accuracy(runner, tokenizer, [n], trials, seed, chat,
                                 batch=min(batch, trials), chunk=passkey_chunk,
                                 log=lambda s, d=r.dtype: log(f"{d} {s}"))[n]
            r.passkey[n] = (p.correct, p.trials)
            r.passkey_answers[n] = p.answers
            save()
        del runner
        log(f"{r.dtype} passkey: {time.perf_counter() - t0:.0f} s")
    save(final=True)
    return rows


# Protocol fields that must match for a saved measurement to be reused.
_CACHE_KEYS = ("config", "window", "bf16_edge_layers", "bf16_layers")
_PPL_KEYS = (*_CACHE_KEYS, "reference", "prefix", "chunk", "text")
_PASSKEY_KEYS = (*_CACHE_KEYS, "trials", "seed", "chat")


def _resume(path: Path, rows: list[Row], meta: dict, scored: int | None, log) -> None:
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    old_meta, old = saved["meta"], {r["dtype"]: r for r in saved["rows"]}
    same_ppl = (all(old_meta.get(k) == meta.get(k) for k in _PPL_KEYS)
                and old_meta.get("tokens_scored") == scored)
    same_passkey = all(old_meta.get(k) == meta.get(k) for k in _PASSKEY_KEYS)
    kept = 0
    for r in rows:
        o = old.get(r.dtype)
        if o is None:
            continue
        if same_ppl and o["ppl"] is not None:
            r.ppl, r.dppl_pct, r.kl, r.top1 = o["ppl"], o["dppl_pct"], o["kl"], o["top1"]
            kept += 1
        if same_passkey:
            r.passkey = {int(n): tuple(v) for n, v in o["passkey"].items()}
            r.passkey_answers = {int(n): [tuple(a) for a in v]
                                 for n, v in o["passkey_answers"].items()}
            kept += len(r.passkey)
    if same_ppl and "ref_ppl" in old_meta:
        meta.update(tokens_scored=old_meta["tokens_scored"], ref_ppl=old_meta["ref_ppl"])
    log(f"resume: kept {kept} measurements from {path}")


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown_table(rows: list[Row], meta: dict) -> str:
    lengths = sorted({n for r in rows for n in r.passkey})
    head = ["dtype", "bytes/token", "x vs " + meta.get("reference", "bf16"), "ppl", "Δppl %",
            "KL (nats)", "top-1"] + [f"passkey {n}" for n in lengths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.dtype, _fmt(r.bytes_per_token, ",.1f"), _fmt(r.ratio, ".2f"),
                 _fmt(r.ppl, ".3f"), _fmt(r.dppl_pct, "+.2f"), _fmt(r.kl, ".5f"),
                 _fmt(r.top1, ".4f")]
        cells += [f"{r.passkey[n][0]}/{r.passkey[n][1]}" if n in r.passkey else "—"
                  for n in lengths]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, rows: list[Row], meta: dict, with_plot: bool = True) -> None:
    proto = ", ".join(f"{k} {v}" for k, v in meta.items())
    (out / "sweep.md").write_text("# KV cache dtype sweep\n\n" + proto + "\n\n"
                                  + markdown_table(rows, meta))
    (out / "sweep.json").write_text(json.dumps(
        {"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1) + "\n")
    if with_plot:
        from kvjax.eval.sweep_plot import plot  # matplotlib loads only here

        plot(rows, out / "sweep.png", meta)


# --- command line -------------------------------------------------------------------------------

def define_flags() -> None:
    """Flags of kl, passkey and sweep (ppl's --text-file, --max-tokens, --prefix, --chunk,
    --weights and --random-weights are shared)."""
    flags.DEFINE_string("reference", "bf16", "kl/sweep: the cache dtype compared against.")
    flags.DEFINE_list("passkey_lengths", [str(n) for n in DEFAULT_LENGTHS],
                      "passkey/sweep: context lengths in tokens (empty: sweep skips passkey).")
    flags.DEFINE_integer("trials", 3, "passkey/sweep: trials per context length.", lower_bound=1)
    flags.DEFINE_integer("batch", 3, "passkey/sweep: trials run together in one batch.",
                         lower_bound=1)
    flags.DEFINE_integer("seed", 0, "passkey/sweep: seeds the keys and their depths.")
    flags.DEFINE_bool("chat", False, "passkey/sweep: wrap the passkey prompt in the chat "
                      "template.")
    flags.DEFINE_list("dtypes", list(DEFAULT_DTYPES), "sweep: cache dtypes to measure.")
    flags.DEFINE_string("results", "results", "sweep: folder for sweep.md, .json and .png.")
    flags.DEFINE_bool("resume", False, "sweep: keep the measurements already in the results "
                      "folder's sweep.json (same protocol) and run only the missing ones.")


def read_ids(cfg: Config, tokenizer: Tokenizer) -> list[int]:
    if FLAGS.text_file is None:
        raise cli.UsageError("pass --text-file FILE")
    ids = tokenizer.encode(Path(FLAGS.text_file).read_text())[: FLAGS.max_tokens]
    if len(ids) > cfg.model.max_position:
        raise cli.UsageError(f"{len(ids)} tokens exceed the context of {cfg.model.max_position}")
    if len(ids) < FLAGS.prefix + 2:
        raise cli.UsageError(f"the text has {len(ids)} tokens; --prefix {FLAGS.prefix} leaves "
                             "nothing to score")
    return ids


def passkey_lengths(cfg: Config) -> list[int]:
    try:
        lengths = [int(s) for s in FLAGS.passkey_lengths]
    except ValueError:
        raise cli.UsageError(f"--passkey-lengths takes integers, got "
                             f"{','.join(FLAGS.passkey_lengths)}") from None
    for n in lengths:
        if not 128 <= n <= cfg.model.max_position:
            raise cli.UsageError(f"passkey length {n} must be in [128, {cfg.model.max_position}]"
                                 " (the model's context)")
    return lengths


def check_prompts_fit(tokenizer: Tokenizer, lengths: list[int], chat: bool) -> None:
    for n in lengths:
        try:
            trial_prompts(tokenizer, n, 1, chat=chat)
        except ValueError as e:  # too short for the instruction and question
            raise cli.UsageError(f"passkey length {n}: {e}") from None


def _load(cfg: Config):
    from kvjax.generate import load_model

    return load_model(cfg, FLAGS.weights, FLAGS.random_weights)


def kl_main(cfg: Config) -> int:
    ref_cfg = cache_for(cfg, FLAGS.reference)  # a bad name is a ConfigError: one line, exit 2
    params, tokenizer = _load(cfg)
    ids = read_ids(cfg, tokenizer)
    params = shared_params(cfg, params)
    r = compare(Runner(ref_cfg, params, max_seq_len=len(ids)),
                {"c": Runner(cfg, params, max_seq_len=len(ids))}, ids, FLAGS.prefix,
                FLAGS.chunk)["c"]
    print(f"kl {r.kl:.6f} | top1 {r.top1:.4f} | ppl {r.ppl:.4f} vs {r.ref_ppl:.4f} "
          f"({100 * (r.ppl / r.ref_ppl - 1):+.2f}%) | scored {r.tokens_scored} tokens "
          f"| prefix {FLAGS.prefix} | kv {cfg.cache.dtype} vs {ref_cfg.cache.dtype} "
          f"| config {cfg.name}")
    return 0


def passkey_main(cfg: Config) -> int:
    lengths = passkey_lengths(cfg)
    if not lengths:
        raise cli.UsageError("pass --passkey-lengths N[,N...]")
    params, tokenizer = _load(cfg)
    batch = min(FLAGS.batch, FLAGS.trials)
    check_prompts_fit(tokenizer, lengths, FLAGS.chat)
    runner = Runner(cfg, params, max_seq_len=max(lengths), max_batch=batch)
    res = passkey_accuracy(runner, tokenizer, lengths, FLAGS.trials, FLAGS.seed, FLAGS.chat,
                           batch=batch, log=lambda s: print(s, file=sys.stderr))
    print(" | ".join(f"passkey {n}: {r.correct}/{r.trials}" for n, r in res.items())
          + f" | kv {cfg.cache.dtype} | config {cfg.name} | seed {FLAGS.seed}"
          + (" | chat" if FLAGS.chat else ""))
    return 0


def sweep_main(cfg: Config) -> int:
    for d in FLAGS.dtypes + [FLAGS.reference]:
        cache_for(cfg, d)  # unknown names fail here, before anything loads
    lengths = passkey_lengths(cfg)
    params, tokenizer = _load(cfg)
    ids = read_ids(cfg, tokenizer)
    check_prompts_fit(tokenizer, lengths, FLAGS.chat)
    rows = run_sweep(cfg, params, tokenizer, ids, dtypes=FLAGS.dtypes, results_dir=FLAGS.results,
                     reference=FLAGS.reference, prefix=FLAGS.prefix, chunk=FLAGS.chunk,
                     passkey_lengths=lengths, trials=FLAGS.trials, seed=FLAGS.seed,
                     chat=FLAGS.chat, batch=FLAGS.batch, resume=FLAGS.resume,
                     meta={"text": Path(FLAGS.text_file).name},
                     log=lambda s: print(s, file=sys.stderr, flush=True))
    meta = json.loads((Path(FLAGS.results) / "sweep.json").read_text())["meta"]
    print(markdown_table(rows, meta), end="")
    print(f"wrote {FLAGS.results}/sweep.md, sweep.json, sweep.png")
    return 0


COMMANDS = {"kl": kl_main, "passkey": passkey_main, "sweep": sweep_main}
