"""Fast screen of KV quantization levers on SmolLM2: one dense forward that emulates the paged
cache's decode-step protocol instead of 256 decode steps through the engine.

`eval ppl --prefix P --max-tokens N --chunk 1` writes the prefix in 256-token prefill chunks, then
scores each token in a decode step; every query reads keys/values older than the last W tokens of
its step's length from the compressed pages and the rest from the bf16 window. Quantization is per
token, so quantize-dequantize of every key once, then choosing per (query, key) between the bf16
and the dequantized copy, reproduces what each query sees. One jitted forward per lever set
(seconds), against minutes per engine run: for screening; final figures come from `eval ppl/kl`.

    python -m kvjax.bench.kv_screen --text /usr/share/common-licenses/Apache-2.0 --levers ...
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from models.layers import apply_rope, rms_norm, rope_inv_freq, swiglu

PREFILL_CHUNK = 256

# fake(layer, x [T, H, d]) -> dequantized x [T, H, d]
Fake = Callable[[int, jax.Array], jax.Array]


def window_start(t: np.ndarray, prefix: int, window: int) -> np.ndarray:
    """First position query t reads exactly (engine protocol, see module doc). Prefix rows are
    256-token prefill chunks under the full-precision-chunk rule (kvjax/attention.py): a chunk
    reads its own keys as computed and the cache as earlier steps left it, whose bf16 window holds
    the `window` positions before the chunk; decode rows read the window before and at t."""
    length = np.where(t < prefix, (t // PREFILL_CHUNK) * PREFILL_CHUNK, t + 1)
    return length - window


def forward(mc, params: dict, ids: np.ndarray, fake_k: Fake | None, fake_v: Fake | None,
            prefix: int, window: int, capture: bool = False):
    """ids [T] -> logits [T, vocab] (and per-layer q/k/v when capture) under the emulated cache."""
    t = ids.shape[0]
    pos = jnp.arange(t)[None]
    inv_freq = jnp.asarray(rope_inv_freq(mc))
    pos_np = np.arange(t)
    ws = window_start(pos_np, prefix, window)
    causal = pos_np[None, :] <= pos_np[:, None]
    exact = jnp.asarray(causal & (pos_np[None, :] >= ws[:, None]))
    quant = jnp.asarray(causal & (pos_np[None, :] < ws[:, None]))
    rep = mc.num_heads // mc.num_kv_heads
    x = params["embed"][ids][None]
    caps = []
    for li in range(mc.num_layers):
        p = {k.split(".", 1)[1]: v[li] for k, v in params.items() if k.startswith("layers.")}
        h = rms_norm(x, p["attn_norm"], mc.rms_norm_eps)
        q, k, v = (h @ p[w] + (p["b" + w[1]] if mc.qkv_bias else 0.0) for w in ("wq", "wk", "wv"))
        q = q.reshape(1, t, mc.num_heads, mc.head_dim)
        k = k.reshape(1, t, mc.num_kv_heads, mc.head_dim)
        v = v.reshape(1, t, mc.num_kv_heads, mc.head_dim)
        q, k = apply_rope(q, pos, inv_freq)[0], apply_rope(k, pos, inv_freq)[0]  # [T, H, d]
        v = v[0]
        if capture:
            caps.append((q, k, v))
        kb = k.astype(jnp.bfloat16).astype(jnp.float32)
        vb = v.astype(jnp.bfloat16).astype(jnp.float32)
        kq = fake_k(li, k) if fake_k is not None else kb
        vq = fake_v(li, v) if fake_v is not None else vb
        qs = q / np.sqrt(mc.head_dim)
        s_e = jnp.einsum("qhd,khd->hqk", qs, jnp.repeat(kb, rep, axis=1))
        s_q = jnp.einsum("qhd,khd->hqk", qs, jnp.repeat(kq, rep, axis=1))
        s = jnp.where(exact, s_e, jnp.where(quant, s_q, -jnp.inf))
        a = jax.nn.softmax(s, axis=-1)
        o = (jnp.einsum("hqk,khd->qhd", jnp.where(exact, a, 0.0), jnp.repeat(vb, rep, axis=1))
             + jnp.einsum("hqk,khd->qhd", jnp.where(quant, a, 0.0), jnp.repeat(vq, rep, axis=1)))
        x = x + o.reshape(1, t, -1) @ p["wo"]
        x = x + swiglu(rms_norm(x, p["mlp_norm"], mc.rms_norm_eps), p["w_gate"], p["w_up"],
                       p["w_down"])
    x = rms_norm(x, params["final_norm"], mc.rms_norm_eps)[0]
    head = params["embed"].T if "lm_head" not in params else params["lm_head"]
    logits = x @ head
    return (logits, caps) if capture else logits


def load(text: Path, tokens: int):
    from kvjax.config import load_config
    from kvjax.generate import load_model

    cfg = load_config("smollm2")
    params, tok = load_model(cfg, None, False)
    ids = np.asarray(tok.encode(text.read_text())[:tokens], np.int32)
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    return cfg.model, params, ids


def stats(ref_logits: jax.Array, logits: jax.Array, ids: np.ndarray, prefix: int
          ) -> dict[str, float]:
    """ppl / KL vs ref / top-1 agreement over the scored tokens ids[prefix:]."""
    sl = slice(prefix - 1, len(ids) - 1)
    tgt = jnp.asarray(ids[prefix:])
    lp = jax.nn.log_softmax(logits[sl], -1)
    rp = jax.nn.log_softmax(ref_logits[sl], -1)
    nll = -jnp.take_along_axis(lp, tgt[:, None], -1).mean()
    kl = jnp.sum(jnp.exp(rp) * (rp - lp), -1).mean()
    top1 = jnp.mean(jnp.argmax(lp, -1) == jnp.argmax(rp, -1))
    return {"ppl": math.exp(float(nll)), "kl": float(kl), "top1": float(top1)}


# --- levers -------------------------------------------------------------------------------------


def tq_fake(x: jax.Array, bits: int, variant: str, rot: str, nc: bool, seed: int) -> jax.Array:
    """Quantize-dequantize x [..., n] with one TurboQuant instance at its own dimension n."""
    from kvjax.quant.turboquant import TurboMse, TurboProd

    n = x.shape[-1]
    if variant == "prod":
        qz = TurboProd.build(n, bits, seed, rot)
        return qz.dequantize(qz.quantize(x))
    qz = TurboMse.build(n, bits, seed, rot)
    codes = qz.quantize(x)
    c = qz.rotated_values(codes)
    norm = codes.norm.astype(jnp.float32)
    if nc:  # store the norm that makes the dequantized length exact
        xn = jnp.sqrt(jnp.sum(jnp.square(x), -1, keepdims=True))
        norm = (xn / jnp.maximum(jnp.sqrt(jnp.sum(c * c, -1, keepdims=True)), 1e-12)
                ).astype(jnp.float16).astype(jnp.float32)
    return norm * (c @ jnp.asarray(qz.rot))


def channel_stats(caps: list, tokens: int) -> dict[str, np.ndarray]:
    """Per layer/KV head from the first `tokens` keys/values: mean, mean square. [L, H, d]"""
    out = {}
    for name, i in (("k", 1), ("v", 2)):
        xs = np.stack([np.asarray(c[i][:tokens]) for c in caps])  # [L, T, H, d]
        out[name + "_mean"] = xs.mean(1)
        out[name + "_ms"] = np.square(xs).mean(1)
        out[name + "_cms"] = np.square(xs - xs.mean(1, keepdims=True)).mean(1)
    return out


def make_fake(lv: dict, role: str, st: dict[str, np.ndarray], head_dim: int) -> Fake | None:
    """lv: {bits, variant, rot, nc, mean, n_out, select} for one role."""
    if lv is None:
        return None
    bits, n_out = lv["bits"], lv.get("n_out", 0)
    mean = st[role[0] + "_mean"] if lv.get("mean") else None
    sel = lv.get("select", "energy")
    if n_out:
        if sel == "fixed":
            from kvjax.cache.layout import low_frequency_channels
            hi = np.array(low_frequency_channels(head_dim, n_out))
            lo = np.array([c for c in range(head_dim) if c not in set(hi)])
            perm = np.broadcast_to(np.concatenate([hi, lo]), st["k_ms"].shape).copy()
        elif sel == "first":
            perm = np.broadcast_to(np.arange(head_dim), st["k_ms"].shape).copy()
        else:
            score = st[role[0] + ("_cms" if lv.get("mean") else "_ms")]
            perm = np.argsort(-score, axis=-1, kind="stable")
    seed = (1 if role == "value" else 0) + 1000 * lv.get("seed", 0)

    def fake(layer: int, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x, jnp.float32)
        x0 = x
        if mean is not None:
            x = x - mean[layer][None]
            if lv.get("mean") == "adaptive":  # centre only tokens it makes shorter (not sinks)
                use = (jnp.sum(x * x, -1, keepdims=True) < jnp.sum(x0 * x0, -1, keepdims=True))
                x = jnp.where(use, x, x0)
        if n_out:
            pm = jnp.asarray(perm[layer])  # [H, d]
            xp = jnp.take_along_axis(x, pm[None], axis=-1)
            hi = tq_fake(xp[..., :n_out], bits + lv.get("hi_extra", 1), lv["variant"],
                         lv["rot"], lv.get("nc", False), seed)
            lo = tq_fake(xp[..., n_out:], bits, lv["variant"], lv["rot"], lv.get("nc", False),
                         seed + 7919)
            y = jnp.concatenate([hi, lo], -1)
            y = jnp.take_along_axis(y, jnp.argsort(pm, -1)[None], axis=-1)
        else:
            y = tq_fake(x, bits, lv["variant"], lv["rot"], lv.get("nc", False), seed)
        if mean is not None:
            y = y + (use if lv.get("mean") == "adaptive" else 1.0) * mean[layer][None]
        if lv.get("sinks"):
            y = y.at[: lv["sinks"]].set(x0[: lv["sinks"]].astype(jnp.bfloat16).astype(jnp.float32))
        return y

    return fake


def run_levers(name: str, kl: dict | None, vl: dict | None, ctx: dict) -> dict[str, float]:
    mc = ctx["mc"]
    t0 = time.time()
    rs = []
    for sd in range(ctx["seeds"]):
        fk = make_fake(kl and {**kl, "seed": sd}, "key", ctx["st"], mc.head_dim)
        fv = make_fake(vl and {**vl, "seed": sd}, "value", ctx["st"], mc.head_dim)
        logits = forward(mc, ctx["params"], ctx["ids"], fk, fv, ctx["prefix"], ctx["window"])
        rs.append(stats(ctx["ref"], logits, ctx["ids"], ctx["prefix"]))
        rs[-1]["dppl"] = 100 * (rs[-1]["ppl"] / ctx["ref_ppl"] - 1)
    r = {k: float(np.mean([x[k] for x in rs])) for k in rs[0]}
    print(f"{name:44s} ppl {r['ppl']:.4f} dppl {r['dppl']:+6.2f}% KL {r['kl']:.5f} "
          f"top1 {r['top1']:.4f} ({time.time() - t0:.0f}s)", flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", default="/usr/share/common-licenses/Apache-2.0")
    ap.add_argument("--calib-text", default=None, help="stats from this text (default: prompt)")
    ap.add_argument("--tokens", type=int, default=768)
    ap.add_argument("--prefix", type=int, default=512)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--exp", default="basic")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    mc, params, ids = load(Path(args.text), args.tokens)
    t0 = time.time()
    ref, caps = forward(mc, params, ids, None, None, args.prefix, args.window, capture=True)
    if args.calib_text:
        _, _, cids = load(Path(args.calib_text), 1024)
        _, ccaps = forward(mc, params, cids, None, None, 1024, 0, capture=True)
        st = channel_stats(ccaps, 1024)
    else:
        st = channel_stats(caps, args.prefix)
    ctx = {"mc": mc, "params": params, "ids": ids, "prefix": args.prefix, "window": args.window,
           "ref": ref, "st": st,
           "seeds": args.seeds}
    ctx["ref_ppl"] = stats(ref, ref, ids, args.prefix)["ppl"]
    print(f"ref ppl {ctx['ref_ppl']:.4f} ({time.time() - t0:.0f}s)", flush=True)
    for name, kl, vl in EXPERIMENTS[args.exp]():
        run_levers(name, kl, vl, ctx)


def _basic():
    H = "haar"
    v4 = {"bits": 4, "variant": "mse", "rot": H}
    return [
        ("turbo4 today (K prod4, V mse4)", {"bits": 4, "variant": "prod", "rot": H}, v4),
        ("K exact, V mse4", None, v4),
        ("K mse4 (no QJL)", {"bits": 4, "variant": "mse", "rot": H}, v4),
        ("K mse4 +mean", {"bits": 4, "variant": "mse", "rot": H, "mean": True}, v4),
        ("K mse4 +nc", {"bits": 4, "variant": "mse", "rot": H, "nc": True}, v4),
        ("K prod4 +mean", {"bits": 4, "variant": "prod", "rot": H, "mean": True}, v4),
        ("K mse4 hadamard2", {"bits": 4, "variant": "mse", "rot": "hadamard"}, v4),
        ("K mse4 +mean +nc", {"bits": 4, "variant": "mse", "rot": H, "mean": True, "nc": True},
         v4),
    ]


def _round2():
    H = "haar"
    v4 = {"bits": 4, "variant": "mse", "rot": H}
    k4 = {"bits": 4, "variant": "mse", "rot": H, "nc": True}
    return [
        ("K mse4 +nc +adaptive mean", {**k4, "mean": "adaptive"}, v4),
        ("K mse4 +nc, token 0 exact", {**k4, "sinks": 1}, v4),
        ("K mse4 +nc +mean, token 0 exact", {**k4, "sinks": 1, "mean": True}, v4),
        ("K mse4 +nc, V mse4 +nc", k4, {**v4, "nc": True}),
        ("K mse5 +nc, V mse3 +nc", {**k4, "bits": 5}, {**v4, "bits": 3, "nc": True}),
        ("K mse4 +nc +energy split 16@5", {**k4, "n_out": 16}, v4),
    ]


def _round3():
    H = "haar"
    m = {"variant": "mse", "rot": H, "nc": True}
    ka = {**m, "mean": "adaptive"}
    return [
        ("t4: K +nc +amean +split16@5 (4.25b)", {**ka, "bits": 4, "n_out": 16}, {**m, "bits": 4}),
        ("t3.5 today: K prod fixed split, V fixed", {"bits": 3, "variant": "prod", "rot": H,
         "n_out": 32, "select": "fixed"}, {"bits": 3, "variant": "mse", "rot": H, "n_out": 32,
                                           "select": "fixed"}),
        ("t3.5: K nc energy split, V nc energy", {**m, "bits": 3, "n_out": 32},
         {**m, "bits": 3, "n_out": 32}),
        ("t3.5: K nc amean energy, V nc energy", {**ka, "bits": 3, "n_out": 32},
         {**m, "bits": 3, "n_out": 32}),
        ("t3.5: K nc amean first-32, V nc first", {**ka, "bits": 3, "n_out": 32, "select": "first"},
         {**m, "bits": 3, "n_out": 32, "select": "first"}),
        ("t3.5: K nc amean 16@5+48@3, V energy", {**ka, "bits": 3, "n_out": 16, "hi_extra": 2},
         {**m, "bits": 3, "n_out": 32}),
        ("t2.5: K nc amean energy, V nc energy", {**ka, "bits": 2, "n_out": 32},
         {**m, "bits": 2, "n_out": 32}),
        ("t2.5: K nc amean 16@4+48@2, V energy", {**ka, "bits": 2, "n_out": 16, "hi_extra": 2},
         {**m, "bits": 2, "n_out": 32}),
        ("t3: K nc amean, V nc", {**ka, "bits": 3}, {**m, "bits": 3}),
    ]


def _shipped():
    """What the turboB dtypes do with a calibration: mse + nc, keys centred (adaptive), energy
    split for fractional widths."""
    m = {"variant": "mse", "rot": "haar", "nc": True}
    ka = {**m, "mean": "adaptive"}
    return [(f"turbo{b}", {**ka, "bits": int(b), "n_out": 32 if b % 1 else 0},
             {**m, "bits": int(b), "n_out": 32 if b % 1 else 0}) for b in (4, 3.5, 3, 2.5)]


def _hadamard():
    m = {"variant": "mse", "rot": "hadamard", "nc": True}
    ka = {**m, "mean": "adaptive"}
    return [("turbo4 hadamard2", {**ka, "bits": 4}, {**m, "bits": 4}),
            ("turbo3.5 hadamard2", {**ka, "bits": 3, "n_out": 32}, {**m, "bits": 3, "n_out": 32})]


EXPERIMENTS = {"basic": _basic, "round2": _round2, "round3": _round3, "shipped": _shipped,
               "hadamard": _hadamard}


if __name__ == "__main__":
    main()
