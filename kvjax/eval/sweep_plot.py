"""Plot `eval sweep` results: quality against KV bytes per token, kvjax's frontier beside the
peers' published figures.

`python -m kvjax.eval sweep` draws `sweep.png` (four panels: Δppl, KL, top-1, passkey) in its
results folder. This module also redraws figures from saved `sweep.json` files, one Δppl panel
and one KL panel per text, for comparing texts side by side:

`python -m kvjax.eval.sweep_plot apache/sweep.json mpl/sweep.json --out docs/frontier.png`

The frontier is the Pareto set of the measured dtypes: a dtype is on it when every dtype with
fewer or equal bytes per token has a higher loss. Drawn as a step line: at a budget of x bytes
per token, the best loss any measured dtype reaches within x.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

# Peer figures drawn (hollow, grey) on the Δppl panel at their compression vs bf16, for scale
# (issue 13; /work/shared/reference/quality-baselines.md). vLLM's TurboQuant presets are measured
# on other models; HF quanto int4 and llama.cpp q4_0 on SmolLM2-135M with the same protocol (both
# 4.5 bits a value with their per-group fp16 scales: 3.56x).
PEERS = (("vLLM k8v4 (other model)", 2.6, 1.17), ("vLLM 4bit_nc (other model)", 3.8, 2.71),
         ("vLLM k3v4_nc (other model)", 3.5, 10.6), ("vLLM 3bit_nc (other model)", 4.9, 20.6),
         ("HF quanto int4", 16 / 4.5, 2.7), ("llama.cpp q4_0", 16 / 4.5, 4.6))


def pareto_frontier(points: Sequence[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The (bytes, loss, name) points no other point beats on both: scanning by bytes (ties by
    loss), a point is kept when its loss is below every cheaper point's. Returned by bytes."""
    kept, best = [], float("inf")
    for x, y, name in sorted(points, key=lambda p: (p[0], p[1])):
        if y < best:
            kept.append((x, y, name))
            best = y
    return kept


def _scatter_panel(ax, rows, get: Callable, title: str, yscale: str, peers_at: float | None,
                   frontier: bool) -> None:
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    pts = [(r.bytes_per_token, get(r), r.dtype) for r in rows
           if get(r) is not None and not (yscale == "log" and get(r) <= 0)]
    for x, y, name in pts:
        ax.scatter([x], [y], s=18)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    drawn = frontier and len(pts) > 1  # kvjax's own points (before the peers join pts)
    if drawn:
        front = pareto_frontier(pts)
        xs = [x for x, _, _ in front] + [max(x for x, _, _ in pts)]
        ys = [y for _, y, _ in front] + [front[-1][1]]
        ax.step(xs, ys, where="post", color="tab:blue", linewidth=1.2, alpha=0.7,
                label="kvjax frontier")
    if peers_at is not None:  # bf16's bytes per token: peers sit at bf16 / their ratio
        for i, (name, ratio, dppl) in enumerate(PEERS):
            ax.scatter([peers_at / ratio], [dppl], s=22, facecolors="none", edgecolors="grey")
            ax.annotate(name, (peers_at / ratio, dppl), textcoords="offset points",
                        xytext=(4, -9 if i % 2 else 3), fontsize=6.5, color="grey")
        pts = pts + [(peers_at / r, d, n) for n, r, d in PEERS]
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 1.5, 2, 3, 5, 7)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ys = [y for _, y, _ in pts]
    if yscale == "log" and ys and min(ys) > 0:  # KL: the reference's own 0 is left out
        ax.set_yscale("log")
    elif yscale in ("log", "symlog"):  # Δppl: linear within ±1 %, log beyond
        ax.set_yscale("symlog", linthresh=1.0)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("KV bytes per token (all layers, K+V)")
    ax.grid(True, which="both", alpha=0.3)
    if drawn:
        ax.legend(fontsize=7, loc="upper right")


def _bf16_bytes(rows, meta: dict) -> float | None:
    """bf16's bytes per token when the reference is bf16 (every row's bytes x its ratio)."""
    if meta.get("reference", "bf16") != "bf16" or not rows:
        return None
    return rows[0].bytes_per_token * rows[0].ratio


def _dppl(r):
    return r.dppl_pct


def _kl(r):
    return r.kl


def plot(rows, path: Path, meta: dict) -> None:
    """sweep.png: Δppl (with the peers), KL, top-1 and passkey against bytes per token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = meta.get("reference", "bf16")
    panels = [(f"Δ perplexity vs {ref} (%)", "symlog", _dppl, _bf16_bytes(rows, meta), True),
              ("KL(p_ref || p), nats per token", "log", _kl, None, True),
              ("top-1 agreement", "linear", lambda r: r.top1, None, False),
              ("passkey accuracy, all lengths", "linear",
               lambda r: (sum(c for c, _ in r.passkey.values())
                          / max(1, sum(n for _, n in r.passkey.values())))
               if r.passkey else None, None, False)]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (title, yscale, get, peers_at, front) in zip(axes.flat, panels, strict=True):
        _scatter_panel(ax, rows, get, title, yscale, peers_at, front)
    fig.suptitle(_caption(meta), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _caption(meta: dict) -> str:
    return (f"{meta.get('config', '')}, {meta.get('text', '')}: quality against KV cache size "
            f"(prefix {meta.get('prefix')}, {meta.get('tokens_scored', '?')} scored tokens, "
            f"chunk {meta.get('chunk')})")


def load(path: str | Path) -> tuple[list[SimpleNamespace], dict]:
    """A sweep.json's rows (attribute access, like sweep.Row) and its protocol."""
    saved = json.loads(Path(path).read_text())
    return [SimpleNamespace(**r) for r in saved["rows"]], saved["meta"]


def plot_texts(paths: Sequence[str | Path], out: str | Path) -> None:
    """One column per sweep.json: Δppl (kvjax frontier + peers) above, KL (frontier) below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load(p) for p in paths]
    width = max(8.0, 6.5 * len(runs))
    fig, axes = plt.subplots(2, len(runs), figsize=(width, 8.5), squeeze=False)
    for col, (rows, meta) in enumerate(runs):
        ref = meta.get("reference", "bf16")
        _scatter_panel(axes[0][col], rows, _dppl,
                       f"{meta.get('text', '')}: Δ perplexity vs {ref} (%)", "symlog",
                       _bf16_bytes(rows, meta), True)
        _scatter_panel(axes[1][col], rows, _kl, f"{meta.get('text', '')}: KL, nats per token",
                       "log", None, True)
    fig.suptitle(_caption({**runs[0][1], "text": " / ".join(m.get("text", "") for _, m in runs)})
                 + "\nhollow grey: peers' published figures (vLLM presets on other models)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvjax.eval.sweep_plot",
                                description="Redraw eval sweep results: Δppl and KL against "
                                "bytes per token, one column per sweep.json.")
    p.add_argument("files", nargs="+", help="sweep.json files written by `eval sweep`")
    p.add_argument("--out", default="frontier.png", help="PNG to write")
    a = p.parse_args(argv)
    for f in a.files:
        try:
            rows, _ = load(f)
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"error: {f}: not a sweep.json ({type(e).__name__}: {e})", file=sys.stderr)
            return 2
        if not any(r.dppl_pct is not None for r in rows):
            print(f"error: {f}: no perplexity measured (run eval sweep with --text-file)",
                  file=sys.stderr)
            return 2
    plot_texts(a.files, a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
