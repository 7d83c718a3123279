"""Quantizer benchmark: storage cost and accuracy of every KV method, as a markdown table.

    python -m kvjax.bench.quant [--tokens 512] [--queries 32] [--heads 4] [--seed 0] [--no-real]

Per method and width: bits per coordinate with metadata (K and V averaged), bytes per token per KV
head (K + V) at head_dim 64 and 128, compression against bf16, and, measured on the data:
  k_mse / v_mse   relative reconstruction error |x - x_hat|^2 / |x|^2 of keys / values
  score_err       relative error of the attention logits |s - s_hat| / |s|, s = q . k, computed from
                  the codes (quantizer.scores: TurboQuant/QJL never dequantize keys)
  attn_err        relative error of the attention output softmax(q k / sqrt(d)) v
Random data: i.i.d. N(0, 1) keys, values and queries at head_dim 128 (non-causal, every query sees
every key). Real data: SmolLM2 K/V/Q from a real prompt via ``real_kv_samples()`` (causal).

Keys use ``role="key"`` and values ``role="value"`` of the same name (so "turboB" is TurboQuant_prod
keys + TurboQuant_mse values). KIVI runs without its full-precision window here (every token is
quantized; the window is a cache policy, measured by the eval harness), with G = 32. Fractional
TurboQuant widths and static FP8 are calibrated on the keys/values being measured.
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.quant import ChannelSplit, FP8Quantizer, KiviKeyQuantizer, make_quantizer

METHODS = (
    "bf16",
    "fp8_e4m3",
    "fp8_e5m2",
    "int8",
    "int4",
    "kivi4",
    "kivi2",
    "turbo_mse4",
    "turbo_mse3.5",
    "turbo_mse3",
    "turbo_mse2.5",
    "turbo_mse2",
    "turbo4",
    "turbo3.5",
    "turbo3",
    "turbo2.5",
    "turbo2",
    "qjl",
    "polar",
)


def real_kv_samples() -> dict[str, np.ndarray] | None:
    """Real SmolLM2 K/V/Q from a real prompt, or None (with a printed note) when unavailable.

    From ``kvjax.bench.real_kv.load_default_kv_samples()``: a dict with
    ``k``, ``v``: [layers, kv_heads, T, head_dim] post-RoPE keys and values, and
    ``q``: [layers, q_heads, T, head_dim] post-RoPE queries (q_heads a multiple of kv_heads).
    """
    from kvjax.bench.real_kv import load_default_kv_samples

    try:
        return {k: np.asarray(v, np.float32) for k, v in load_default_kv_samples().items()}
    except Exception as e:  # noqa: BLE001 - report and carry on with the random section
        print(f"> real SmolLM2 section skipped: {type(e).__name__}: {e}")
        return None


def _pair(name: str, d: int, seed: int, k_sample: np.ndarray, v_sample: np.ndarray):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kq = make_quantizer(name, d, seed=seed, role="key")
        vq = make_quantizer(name, d, seed=seed + 1, role="value")
    out = []
    for qz, sample in ((kq, k_sample), (vq, v_sample)):
        if isinstance(qz, ChannelSplit) or (isinstance(qz, FP8Quantizer) and qz.static):
            qz = qz.calibrate(sample)
        out.append(qz)
    return out


def _bytes(name: str, d: int) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sum(
            make_quantizer(name, d, role=r).bytes_per_token() for r in ("key", "value")
        )


def _kv_hat_scores(kq: Any, vq: Any, k: jax.Array, v: jax.Array, q: jax.Array):
    """k, v: [B, T, d]; q: [B, Tq, d] -> (k_hat, v_hat [B, T, d], scores_hat [B, Tq, T])."""
    b, t, d = k.shape
    if isinstance(kq, KiviKeyQuantizer):
        g = kq.group_size
        kc = kq.quantize(k.reshape(b, t // g, g, d))
        k_hat = kq.dequantize(kc).reshape(b, t, d)
        s_hat = kq.scores(q[:, :, None, :], jax.tree_util.tree_map(lambda a: a[:, None], kc))
        s_hat = s_hat.reshape(b, q.shape[1], t)
    else:
        kc = kq.quantize(k)
        k_hat = kq.dequantize(kc)
        s_hat = kq.scores(q[:, :, None, :], jax.tree_util.tree_map(lambda a: a[:, None], kc))
    v_hat = vq.dequantize(vq.quantize(v))
    return k_hat, v_hat, s_hat


def _rel(a: jax.Array, b: jax.Array) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def measure(kq: Any, vq: Any, k: np.ndarray, v: np.ndarray, q: np.ndarray, causal: bool):
    """k, v: [B, T, d], q: [B, Tq, d] (query i sits at position T - Tq + i when causal)."""
    k, v, q = (jnp.asarray(a, jnp.float32) for a in (k, v, q))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        k_hat, v_hat, s_hat = jax.jit(_kv_hat_scores)(kq, vq, k, v, q)
    d, t, tq = k.shape[-1], k.shape[1], q.shape[1]
    s = jnp.einsum("bqd,btd->bqt", q, k)
    mask = jnp.ones((tq, t), bool)
    if causal:
        mask = jnp.arange(t)[None, :] <= (t - tq + jnp.arange(tq))[:, None]

    def attend(scores, vals):
        p = jax.nn.softmax(jnp.where(mask, scores / np.sqrt(d), -jnp.inf), axis=-1)
        return jnp.einsum("bqt,btd->bqd", p, vals)

    mse = lambda a, b: float(jnp.sum((a - b) ** 2) / jnp.sum(b**2))  # noqa: E731
    return {
        "k_mse": mse(k_hat, k),
        "v_mse": mse(v_hat, v),
        "score_err": _rel(jnp.where(mask, s_hat, 0), jnp.where(mask, s, 0)),
        "attn_err": _rel(attend(s_hat, v_hat), attend(s, v)),
    }


def _row(name: str, m: dict[str, float]) -> str:
    b64, b128 = _bytes(name, 64), _bytes(name, 128)
    bits = 8 * b128 / (2 * 128)
    return (
        f"| {name} | {bits:.3f} | {b64:g} | {b128:g} | {4 * 128 / b128:.2f}x | "
        f"{m['k_mse']:.2e} | {m['v_mse']:.2e} | {m['score_err']:.2e} | {m['attn_err']:.2e} |"
    )


HEADER = (
    "| method | bits/coord | B/token d=64 | B/token d=128 | vs bf16 | k_mse | v_mse | score_err "
    "| attn_err |\n|---|---|---|---|---|---|---|---|---|"
)


def random_section(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(args.seed)
    d = 128
    k, v = (rng.standard_normal((args.heads, args.tokens, d)).astype(np.float32) for _ in "kv")
    q = rng.standard_normal((args.heads, args.queries, d)).astype(np.float32)
    print(
        f"\n### Random N(0,1) vectors: head_dim {d}, {args.heads} heads x {args.tokens} keys, "
        f"{args.queries} queries per head, seed {args.seed}\n"
    )
    print(HEADER)
    for name in args.methods:
        kq, vq = _pair(name, d, args.seed, k, v)
        print(_row(name, measure(kq, vq, k, v, q, causal=False)), flush=True)


def real_section(args: argparse.Namespace) -> None:
    data = real_kv_samples()
    if data is None:
        return
    k, v, q = data["k"], data["v"], data["q"]  # [L, H, T, d]
    n_layers, h_kv, t, d = k.shape
    group = q.shape[1] // h_kv
    t = t - t % 32  # whole KIVI key groups
    k, v, q = k[:, :, :t], v[:, :, :t], q[:, :, :t]
    # Every query head attends its KV head's keys: [L * H_q, T, d].
    kk = np.repeat(k, group, axis=1).reshape(-1, t, d)
    vv = np.repeat(v, group, axis=1).reshape(-1, t, d)
    qq = q.reshape(-1, t, d)[:, -args.queries :]
    print(
        f"\n### Real SmolLM2-135M K/V/Q: {n_layers} layers x {h_kv} KV heads, {t} tokens, "
        f"head_dim {d}, last {args.queries} queries (causal)\n"
    )
    print(HEADER)
    for name in args.methods:
        # One quantizer per model here (calibration over all layers' keys); the cache may do better
        # with per-layer outlier sets.
        kq, vq = _pair(name, d, args.seed, k.reshape(-1, d), v.reshape(-1, d))
        print(_row(name, measure(kq, vq, kk, vv, qq, causal=True)), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--queries", type=int, default=32)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--no-real", action="store_true", help="skip the real SmolLM2 section")
    args = p.parse_args(argv)
    print(f"## KV quantizers (jax {jax.__version__}, {jax.default_backend()})")
    random_section(args)
    if not args.no_real:
        real_section(args)


if __name__ == "__main__":
    main()
