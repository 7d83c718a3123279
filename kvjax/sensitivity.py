"""Per-layer sensitivity to the KV cache format, for ``--kv-cache-dtype auto:BYTES``.

For each layer L and candidate format F (a KV_CACHE_DTYPES name), the KL divergence of the next
token distribution against the exact cache when layer L alone stores its K/V as F and every other
layer is exact, on a calibration text under the decode-step protocol of
``eval ppl --prefix P --max-tokens N --chunk 1`` (emulated in dense forwards as in
kvjax/bench/kv_screen.py: prefill in 256-token chunks, then one token per step, the last `window`
tokens of each step read from bf16, older ones from codes). The codes are the engine's own
(``PoolSpec.roundtrip``: the same quantizers, seeds and calibration transforms as the pools), so
the figure is that of the real cache format, not a model of it.

Cost: the layers before L are shared with the exact forward (their outputs are kept), so one
measurement runs layers L..end: |F| * L(L+1)/2 layer passes in all (30 layers, 8 formats,
768 tokens: ~4-8 minutes on 2 CPU cores).

Layer KLs are summed to predict a whole assignment's KL (``kvjax.layer_budget.choose_formats``); the
sum is checked against a forward with every layer quantized (``evaluate``; printed by
``python -m kvjax.sensitivity``).

    python -m kvjax.sensitivity --text-file /usr/share/common-licenses/Apache-2.0 \\
        --dtypes turbo3,auto:turbo3          # emulated ppl / KL / top-1 of whole assignments
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.layout import PoolSpec
from kvjax.calibrate import KVCalibration
from models.layers import apply_rope, rms_norm, rope_inv_freq, swiglu

# Candidate layer formats, most bytes first (bf16 lets a very sensitive layer stay exact).
CANDIDATES = ("bf16", "k8v4turbo", "turbo4", "k4v3turbo", "turbo3.5", "turbo3", "turbo2.5",
              "k3v2turbo")
PREFILL_CHUNK = 256


def specs(mc, fmt: str, cal: KVCalibration | None, seed: int = 0, page_size: int = 16
          ) -> tuple[PoolSpec | None, PoolSpec | None]:
    """The K/V pool layouts a layer of format `fmt` gets (kvjax/cache/paged.pool_specs); None for
    bf16, read exactly."""
    from kvjax.config import KV_CACHE_DTYPES

    if fmt in ("bf16", "f32"):
        return None, None
    k_method, v_method = KV_CACHE_DTYPES[fmt]
    return (PoolSpec(k_method, "key", mc.head_dim, page_size, seed, cal, 0),
            PoolSpec(v_method, "value", mc.head_dim, page_size, seed + 1, cal, 0))


def layer_bytes(mc, fmt: str) -> float:
    """Bytes per token of one layer in `fmt`, K and V over all KV heads (calibration adds none)."""
    if fmt in ("bf16", "f32"):
        return 2 * mc.num_kv_heads * mc.head_dim * (2 if fmt == "bf16" else 4)
    k, v = specs(mc, fmt, None)
    return mc.num_kv_heads * (k.bytes_per_token() + v.bytes_per_token())


def masks(t: int, prefix: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(read exactly, read from codes) [T, T]: what query t sees in the engine's protocol."""
    pos = np.arange(t)
    # Prefix rows: 256-token chunks under the full-precision-chunk rule (own chunk exact, the cache
    # before it as earlier steps left it: window = the positions before the chunk).
    length = np.where(pos < prefix, (pos // PREFILL_CHUNK) * PREFILL_CHUNK, pos + 1)
    ws = length - window
    causal = pos[None, :] <= pos[:, None]
    return causal & (pos[None, :] >= ws[:, None]), causal & (pos[None, :] < ws[:, None])


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _layer(mc, x: jax.Array, p: dict, li: jax.Array, m: tuple[jax.Array, jax.Array],
           k_spec: PoolSpec | None, v_spec: PoolSpec | None) -> jax.Array:
    """One decoder layer on x [T, hidden] with K/V older than the window read through the codes."""
    t = x.shape[0]
    exact, quant = m
    h = rms_norm(x, p["attn_norm"], mc.rms_norm_eps)
    q, k, v = (h @ p[w] + (p["b" + w[1]] if mc.qkv_bias else 0.0) for w in ("wq", "wk", "wv"))
    q = q.reshape(1, t, mc.num_heads, mc.head_dim)
    k = k.reshape(1, t, mc.num_kv_heads, mc.head_dim)
    v = v.reshape(t, mc.num_kv_heads, mc.head_dim)
    if mc.qk_norm:
        q, k = rms_norm(q, p["q_norm"], mc.rms_norm_eps), rms_norm(k, p["k_norm"], mc.rms_norm_eps)
    pos = jnp.arange(t)[None]
    inv_freq = jnp.asarray(rope_inv_freq(mc))
    q, k = apply_rope(q, pos, inv_freq)[0], apply_rope(k, pos, inv_freq)[0]  # [T, H, d]
    kb = k.astype(jnp.bfloat16).astype(jnp.float32)  # window and bf16 pages
    vb = v.astype(jnp.bfloat16).astype(jnp.float32)
    kq = kb if k_spec is None else k_spec.roundtrip(k, li, pos[0])
    vq = vb if v_spec is None else v_spec.roundtrip(v, li)
    rep = mc.num_heads // mc.num_kv_heads
    qs = q / np.sqrt(mc.head_dim)
    s_e = jnp.einsum("qhd,khd->hqk", qs, jnp.repeat(kb, rep, axis=1))
    s_q = jnp.einsum("qhd,khd->hqk", qs, jnp.repeat(kq, rep, axis=1))
    a = jax.nn.softmax(jnp.where(exact, s_e, jnp.where(quant, s_q, -jnp.inf)), axis=-1)
    o = (jnp.einsum("hqk,khd->qhd", jnp.where(exact, a, 0.0), jnp.repeat(vb, rep, axis=1))
         + jnp.einsum("hqk,khd->qhd", jnp.where(quant, a, 0.0), jnp.repeat(vq, rep, axis=1)))
    x = x + o.reshape(t, -1) @ p["wo"]
    return x + swiglu(rms_norm(x, p["mlp_norm"], mc.rms_norm_eps), p["w_gate"], p["w_up"],
                      p["w_down"])


@functools.partial(jax.jit, static_argnums=0)
def _logprobs(mc, x: jax.Array, params: dict) -> jax.Array:
    x = rms_norm(x, params["final_norm"], mc.rms_norm_eps)
    head = params["embed"].T if "lm_head" not in params else params["lm_head"]
    return jax.nn.log_softmax(x @ head, -1)


class Emulator:
    """Dense forwards of one text under the decode-step protocol, any format per layer."""

    def __init__(self, mc, params: dict, ids: np.ndarray, prefix: int, window: int = 128,
                 cal: KVCalibration | None = None, seed: int = 0) -> None:
        if not 0 < prefix < len(ids):
            raise ValueError(f"prefix {prefix} must be within the text's {len(ids)} tokens")
        self.mc, self.cal, self.seed, self.prefix = mc, cal, seed, prefix
        self.ids = np.asarray(ids, np.int32)
        self.params = params
        self.layers = [{k.split(".", 1)[1]: v[i] for k, v in params.items()
                        if k.startswith("layers.")} for i in range(mc.num_layers)]
        self.m = tuple(jnp.asarray(a) for a in masks(len(ids), prefix, window))
        x = params["embed"][jnp.asarray(self.ids)]
        self.inputs = []  # exact input of each layer
        for li in range(mc.num_layers):
            self.inputs.append(x)
            x = _layer(mc, x, self.layers[li], jnp.int32(li), self.m, None, None)
        self.ref = self._scored(x)

    def _scored(self, x: jax.Array) -> jax.Array:
        return _logprobs(self.mc, x[self.prefix - 1:-1], self.params)

    def run(self, formats: list[str] | tuple[str, ...], start: int = 0) -> dict[str, float]:
        """ppl / KL vs exact / top-1 agreement over the scored tokens with layer i in formats[i]
        (layers before `start` exact)."""
        x = self.inputs[start]
        for li in range(start, self.mc.num_layers):
            ks, vs = specs(self.mc, formats[li], self.cal, self.seed)
            x = _layer(self.mc, x, self.layers[li], jnp.int32(li), self.m, ks, vs)
        lp = self._scored(x)
        tgt = jnp.asarray(self.ids[self.prefix:])
        nll = -jnp.take_along_axis(lp, tgt[:, None], -1).mean()
        kl = jnp.sum(jnp.exp(self.ref) * (self.ref - lp), -1).mean()
        top1 = jnp.mean(jnp.argmax(lp, -1) == jnp.argmax(self.ref, -1))
        return {"ppl": math.exp(float(nll)), "kl": max(float(kl), 0.0), "top1": float(top1)}

    def sensitivity(self, formats: tuple[str, ...] = CANDIDATES, log=None) -> np.ndarray:
        """KL [layers, formats]: layer L alone in each format."""
        n = self.mc.num_layers
        out = np.zeros((n, len(formats)))
        for li in range(n):
            t0 = time.time()
            for fi, fmt in enumerate(formats):
                if fmt in ("bf16", "f32"):
                    continue  # exact: KL 0 by construction
                alone = [fmt if i == li else "bf16" for i in range(n)]
                out[li, fi] = self.run(alone, start=li)["kl"]
            if log:
                log(f"layer {li}: " + " ".join(f"{f} {k:.5f}" for f, k in zip(formats, out[li],
                                                                                strict=True))
                    + f" ({time.time() - t0:.0f}s)")
        return out


def load(config_name: str, text: str, tokens: int, weights: str | None = None,
         random_weights: bool = False):
    from kvjax.config import load_config
    from kvjax.generate import load_model

    cfg = load_config(config_name)
    params, tok = load_model(cfg, weights, random_weights)
    ids = np.asarray(tok.encode(text)[:tokens], np.int32)
    return cfg, {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}, ids


def with_sensitivity(cal: KVCalibration, mc, params: dict, ids: np.ndarray, prefix: int,
                     window: int = 128, formats: tuple[str, ...] = CANDIDATES, log=None
                     ) -> KVCalibration:
    """`cal` with its layer sensitivities measured on `ids` (the pools use `cal` itself)."""
    em = Emulator(mc, params, ids, prefix, window, cal)
    kl = em.sensitivity(formats, log)
    return dataclasses.replace(cal, sens_formats=tuple(formats),
                               sens_bytes=tuple(layer_bytes(mc, f) for f in formats),
                               sens_kl=tuple(tuple(float(x) for x in row) for row in kl))


def main(argv: list[str] | None = None) -> int:
    import argparse

    from kvjax.calibrate import cached_calibration
    from kvjax.config import KV_CACHE_DTYPES
    from kvjax.layer_budget import budget_bytes, choose_formats, count_segments

    ap = argparse.ArgumentParser(prog="python -m kvjax.sensitivity", description=__doc__.split(
        "\n")[0])
    ap.add_argument("--config", default="smollm2")
    ap.add_argument("--text-file", required=True)
    ap.add_argument("--tokens", type=int, default=768)
    ap.add_argument("--prefix", type=int, default=512)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--kv-calibration", default=None, help="default: the config's")
    ap.add_argument("--dtypes", required=True, help="comma list: dtypes and auto:BYTES|DTYPE")
    ap.add_argument("--shrink", default=None, help="auto: comma list of shrink values to try "
                    "(default: kvjax.layer_budget.AUTO_SHRINK)")
    ap.add_argument("--max-segments", default=None, help="auto: comma list of segment caps to "
                    "try (0 = none; default: kvjax.layer_budget.AUTO_MAX_SEGMENTS)")
    args = ap.parse_args(argv)
    shrinks = [None] if args.shrink is None else [float(x) for x in args.shrink.split(",")]
    caps = [None] if args.max_segments is None else [int(x) for x in args.max_segments.split(",")]
    try:
        cfg, params, ids = load(args.config, Path(args.text_file).read_text(), args.tokens)
        path = cfg.cache.calibration if args.kv_calibration is None else args.kv_calibration
        cal = cached_calibration(path) if path and path != "none" else None
        em = Emulator(cfg.model, params, ids, args.prefix, args.window, cal)
        n = cfg.model.num_layers
        ref_ppl = em.run(["bf16"] * n)["ppl"]
        print(f"bf16 ppl {ref_ppl:.4f} | {args.text_file} | {len(ids)} tokens, prefix "
              f"{args.prefix}, window {args.window} | calibration {path}")
        for d in args.dtypes.split(","):
            runs = []
            if d.startswith("auto:"):
                if cal is None:
                    raise ValueError(f"{d} needs a KV calibration")
                for sh in shrinks:
                    for cap in caps:
                        fmts, used, pred = choose_formats(cal, budget_bytes(cal, d[5:], n), n,
                                                          sh, cap)
                        tag = "".join(f" {k}={v:g}" for k, v in (("shrink", sh), ("segs", cap))
                                      if v is not None)
                        runs.append((d + tag, fmts, used, f" | predicted KL {pred:.5f} | "
                                     f"{count_segments(fmts)} segments | {' '.join(fmts)}"))
            elif d in KV_CACHE_DTYPES:
                fmts = [d] * n
                runs.append((d, fmts, sum(layer_bytes(cfg.model, f) for f in fmts), ""))
            else:
                raise ValueError(f"unknown dtype {d!r}")
            for name, fmts, used, extra in runs:
                r = em.run(fmts)
                print(f"{name:16s} {used:8.1f} B/token | ppl {r['ppl']:.4f} "
                      f"({100 * (r['ppl'] / ref_ppl - 1):+.2f}%) | KL {r['kl']:.5f} | top-1 "
                      f"{r['top1']:.4f}{extra}", flush=True)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
