"""Plot `eval longppl` results: perplexity per 1K-token bucket, one line per method, one panel
per results file (e.g. bf16 and turbo3.5), as in the StreamingLLM paper's Fig. 3.

`python -m kvjax.eval.longppl_plot bf16.json turbo35.json --out docs/longppl.png`
"""

from __future__ import annotations

import argparse
import json
import sys

STYLE = {"dense": ("black", "-"), "window": ("tab:red", ":"), "streaming": ("tab:blue", "-"),
         "h2o": ("tab:green", "--"), "h2o-max": ("tab:olive", "-.")}
LABEL = {"dense": "dense (to the 8K context)", "window": "window, no sinks",
         "streaming": "StreamingLLM (4 sinks)", "h2o": "H2O", "h2o-max": "H2O (max over heads)"}


def plot(paths: list[str], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(open(p).read()) for p in paths]
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 3.6), sharey=True,
                             squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        for method, r in run["methods"].items():
            color, ls = STYLE.get(method, (None, "-"))
            xs = [i + 0.5 for i in range(len(r["buckets"]))]
            ax.plot(xs, r["buckets"], color=color, linestyle=ls, marker=".",
                    label=f"{LABEL.get(method, method)}: {r.get('ppl', float('nan')):.2f}")
        ax.axvline(8, color="grey", linewidth=0.6)  # the model's context
        ax.set_title(f"SmolLM2-135M, {run['kv']} cache, budget {run['budget']} tokens",
                     fontsize=9)
        ax.set_xlabel("tokens (thousands)")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("perplexity per 1K tokens")
    fig.tight_layout()
    fig.savefig(out, dpi=80)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvjax.eval.longppl_plot")
    ap.add_argument("results", nargs="+", help="JSON files written by eval longppl")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    try:
        plot(a.results, a.out)
    except (OSError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
