"""Perplexity of a text longer than the model's context under a bounded cache, per 1K-token
bucket, as in the StreamingLLM paper (Fig. 3 / Table 1): a sliding window without sinks,
StreamingLLM (sinks + window), H2O (sinks + heavy hitters + window, same budget; "h2o-max" scores
a page by its most attentive KV head instead of all heads), and dense attention up to the model's
context for reference.

`python -m kvjax.eval longppl --text-file DIR_OR_FILE --budget 1024 [--methods ...]
[--chunk 1] [--max-tokens N] [--results F.json]`

Every method runs the engine's own machinery without the scheduler: a BlockManager holds the
pages, `pages_to_drop` picks the pages to release before each chunk, `page_positions` gives the
forward the pages' absolute positions (keys scored at their positions within the cache), and H2O
reads the attention mass the XLA path accumulates on device. Eviction is page-granular by default
(a budget of B tokens holds between B and B + chunk tokens), or token-granular with
`--kv-eviction-granularity token` (kept tokens compacted on device; up to B + page - 1 + chunk).
With `--chunk 1` every token is scored exactly as in decoding; larger chunks trade that for speed
(the tokens of a chunk also see the chunk's earlier tokens).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.block_manager import BlockManager
from kvjax.config import Config
from kvjax.engine.eviction import EvictionConfig, evict_sequence
from kvjax.runner import Runner

METHODS = ("dense", "window", "streaming", "h2o", "h2o-max")


@dataclass(frozen=True)
class LongPplResult:
    method: str
    nll: np.ndarray  # [scored tokens] nats; token i + 1 predicted from tokens <= i
    kv_tokens_max: int  # most tokens the cache held at once
    seconds: float

    def buckets(self, size: int = 1000) -> list[float]:
        """Perplexity of each `size`-token bucket of the text (by the scored token's index)."""
        return [math.exp(float(self.nll[i:i + size].mean()))
                for i in range(0, len(self.nll), size)]


def read_text(path: str) -> str:
    """A file, or every file of a directory concatenated in name order (e.g. the licenses)."""
    p = Path(path)
    if p.is_dir():
        return "\n\n".join(f.read_text(errors="replace") for f in sorted(p.iterdir())
                           if f.is_file())
    return p.read_text(errors="replace")


def eviction_for(method: str, budget: int, page_size: int, sinks: int = 4,
                 granularity: str = "page") -> EvictionConfig:
    """The policy of a method at a cache budget of `budget` tokens (page-granular: StreamingLLM's
    4 sinks occupy one page; token-granular: 4 tokens)."""
    unit = page_size if granularity == "page" else 1
    sink_units = -(-sinks // unit)
    if method == "dense":
        return EvictionConfig()
    if method == "window":
        return EvictionConfig("streaming", sink_tokens=0, window=budget, granularity=granularity)
    rest = budget - sink_units * unit
    if method == "streaming":
        return EvictionConfig("streaming", sink_tokens=sinks, window=rest,
                              granularity=granularity)
    if method in ("h2o", "h2o-max"):  # half heavy hitters, half recent (H2O's 10% + 10%)
        heavy = rest // 2 // unit * unit
        return EvictionConfig("h2o", sink_tokens=sinks, window=rest - heavy, heavy_tokens=heavy,
                              granularity=granularity)
    raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")


@jax.jit
def _nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]


class Session:
    """Sequences under one method's eviction policy, one at a time, over a Runner and a
    BlockManager: `feed` appends tokens (one forward of `chunk` columns) after dropping the pages
    the policy releases, and returns their logits. `new` starts the next sequence on the same
    runner (no recompile)."""

    def __init__(self, cfg: Config, params: dict, method: str, budget: int, chunk: int,
                 dense_len: int, granularity: str = "page"):
        ps = cfg.cache.page_size
        self.ecfg = eviction_for(method, budget, ps, granularity=granularity)
        # h2o: a page's score sums its mass over all heads; h2o-max: the KV head using it most
        self.reduce = "max" if method == "h2o-max" else "sum"
        cap = self.ecfg.max_cache_tokens(ps, chunk) + ps if self.ecfg.enabled else dense_len
        self.runner = Runner(cfg, params, max_seq_len=cap, max_batch=1)
        self.bm = BlockManager(self.runner.allocator.num_pages, ps, cfg.cache.dtype)
        if self.ecfg.policy == "h2o":
            self.runner.track_attention_mass()
        self.ps, self.chunk, self.sid, self.held, self.peak = ps, chunk, 1, 0, 0

    def new(self) -> None:
        self.bm.free(self.sid)
        self.runner.free(self.sid)
        self.sid, self.held = self.sid + 1, 0

    def feed(self, piece: list[int]) -> jax.Array:
        """Logits [len(piece), vocab] (on device) of appending `piece` (<= chunk tokens)."""
        bm, runner, sid = self.bm, self.runner, self.sid
        if self.ecfg.enabled:  # the engine's own eviction step (pages, or tokens + compaction)
            self.held -= len(evict_sequence(self.ecfg, bm, runner, sid, self.held, self.reduce))
        n, held = len(piece), self.held
        bm.ensure(sid, held + n)
        width = runner.table_width(held + n)
        tokens = np.zeros((1, self.chunk), np.int32)
        tokens[0, :n] = piece
        positions = (held + np.arange(self.chunk, dtype=np.int32))[None]
        logits = runner.forward_batch([sid], tokens, positions, bm.page_table([sid], width),
                                      np.array([held + n], np.int32),
                                      bm.page_positions([sid], width))[0, :n]
        self.held += n
        self.peak = max(self.peak, self.held)
        return logits


def run_method(cfg: Config, params: dict, ids: list[int], method: str, budget: int,
               chunk: int = 1, log_every: int = 0, granularity: str = "page") -> LongPplResult:
    """Teacher-forced NLL of ids[1:] under `method` (dense stops at the model's context)."""
    if method == "dense":
        ids = ids[: cfg.model.max_position]
    sess = Session(cfg, params, method, budget, chunk, len(ids), granularity)
    done = 0
    nlls: list[np.ndarray] = []
    last = None
    t0 = time.perf_counter()
    while done < len(ids):
        piece = ids[done: done + chunk]
        n = len(piece)
        logits = sess.feed(piece)
        pred = logits[:-1] if last is None else jnp.concatenate([last[None], logits[:-1]])
        targets = piece[1:] if last is None else piece
        if targets:
            nlls.append(np.asarray(_nll(pred, jnp.asarray(targets, jnp.int32))))
        last = logits[-1]
        done += n
        if log_every and done // log_every != (done - n) // log_every:
            so_far = np.concatenate(nlls)
            print(f"  {method}: {done} tokens, ppl so far {math.exp(so_far.mean()):.3f}, "
                  f"cache {sess.held} tokens, {time.perf_counter() - t0:.0f}s", flush=True)
    return LongPplResult(method, np.concatenate(nlls), sess.peak, time.perf_counter() - t0)


def passkey(cfg: Config, params: dict, tokenizer, method: str, budget: int, chunk: int,
            lengths: list[int], trials: int, seed: int = 0, granularity: str = "page"
            ) -> dict[int, tuple[int, int, list]]:
    """Passkey retrieval (kvjax/eval/passkey.py prompts, same keys and depths as `eval passkey`)
    with the prompt fed through the eviction policy in `chunk`-token pieces, then the answer
    decoded greedily one token at a time (also under eviction). Returns {length: (correct,
    trials, [(key, answer, needle kept)])}: "needle kept" says whether any of the first 20 tokens
    of the key sentence was still in the cache when the question was read (eviction drops
    evidence by design: StreamingLLM keeps it only when it falls in the recent window)."""
    from kvjax.eval.passkey import MAX_NEW_TOKENS, check_answer, trial_prompts

    sess = Session(cfg, params, method, budget, chunk, max(lengths), granularity)
    out = {}
    for length in lengths:
        ok, rows = 0, []
        for p in trial_prompts(tokenizer, length, trials, seed):
            sess.new()
            logits = None
            for i in range(0, len(p.ids), chunk):
                logits = sess.feed(p.ids[i: i + chunk])
            kept = bool(set(range(p.needle_pos, p.needle_pos + 20)) & _cached_positions(sess))
            answer = [int(jnp.argmax(logits[-1]))]
            for _ in range(MAX_NEW_TOKENS - 1):
                answer.append(int(jnp.argmax(sess.feed(answer[-1:])[-1])))
            text = tokenizer.decode(answer)
            ok += check_answer(text, p.key)
            rows.append((p.key, text.strip(), kept))
        out[length] = (ok, trials, rows)
        print(f"  passkey {method} {length}: {ok}/{trials} "
              + " ".join(f"{k}->{a!r}{'' if kept else ' (needle evicted)'}"
                         for k, a, kept in rows), flush=True)
    return out


def _cached_positions(sess: Session) -> set[int]:
    """Absolute positions of the tokens the session's sequence holds now."""
    return set(sess.bm._token_positions(sess.sid, sess.held).tolist())


def table(results: list[LongPplResult], size: int = 1000) -> str:
    """Markdown: one row per bucket, one column per method (blank past a method's end)."""
    cols = [r.buckets(size) for r in results]
    rows = max(len(c) for c in cols)
    out = ["| tokens | " + " | ".join(r.method for r in results) + " |",
           "|---" * (len(results) + 1) + "|"]
    for i in range(rows):
        cells = [f"{c[i]:.2f}" if i < len(c) else "" for c in cols]
        out.append(f"| {i * size // 1000}K-{(i + 1) * size // 1000}K | " + " | ".join(cells)
                   + " |")
    out.append("| max KV tokens | " + " | ".join(str(r.kv_tokens_max) for r in results) + " |")
    return "\n".join(out)


def main_passkey(cfg: Config, params: dict, tokenizer, methods: list[str], budget: int,
                 chunk: int, lengths: list[int], trials: int,
                 results_path: str | None = None, granularity: str = "page") -> dict:
    """`longppl --longppl_passkey 2048,4096,8192`: passkey accuracy per method under eviction."""
    out = {}
    for m in methods:
        t0 = time.perf_counter()
        out[m] = passkey(cfg, params, tokenizer, m, budget, chunk, lengths, trials,
                         granularity=granularity)
        print(f"{m}: {time.perf_counter() - t0:.0f}s", flush=True)
        if results_path:
            Path(results_path).write_text(json.dumps(
                {"kv": cfg.cache.dtype, "budget": budget, "chunk": chunk,
                 "granularity": granularity, "passkey": out},
                indent=1))
    print(f"\nkv {cfg.cache.dtype} | budget {budget} | chunk {chunk} | {trials} trials a length")
    print("| method | " + " | ".join(str(n) for n in lengths) + " |")
    print("|---" * (len(lengths) + 1) + "|")
    for m, res in out.items():
        print(f"| {m} | " + " | ".join(
            f"{res[n][0]}/{res[n][1]} (needle kept {sum(r[2] for r in res[n][2])})"
            for n in lengths) + " |")
    return out


def main(cfg: Config, params: dict, ids: list[int], methods: list[str], budget: int, chunk: int,
         results_path: str | None = None, granularity: str = "page") -> list[LongPplResult]:
    results = []
    for m in methods:
        r = run_method(cfg, params, ids, m, budget, chunk, log_every=2000,
                       granularity=granularity)
        results.append(r)
        print(f"{m}: ppl {math.exp(float(r.nll.mean())):.3f} over {len(r.nll)} tokens, "
              f"max {r.kv_tokens_max} KV tokens, {r.seconds:.0f}s", flush=True)
        if results_path:  # after every method: a long run cut short keeps what it measured
            _write(results_path, cfg, budget, chunk, len(ids), results, granularity)
    print(f"\nkv {cfg.cache.dtype} | budget {budget} | chunk {chunk} | {len(ids)} tokens | "
          f"config {cfg.name} | {granularity}-granular eviction")
    print(table(results))
    return results


def _write(path: str, cfg: Config, budget: int, chunk: int, tokens: int,
           results: list[LongPplResult], granularity: str = "page") -> None:
    Path(path).write_text(json.dumps({
        "kv": cfg.cache.dtype, "budget": budget, "chunk": chunk, "tokens": tokens,
        "granularity": granularity,
        "methods": {r.method: {"buckets": r.buckets(), "ppl": math.exp(float(r.nll.mean())),
                               "scored": len(r.nll), "kv_tokens_max": r.kv_tokens_max,
                               "seconds": r.seconds} for r in results}}, indent=1))
