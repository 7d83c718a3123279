"""Per-layer cache formats from a KV calibration's measured layer sensitivities: the knapsack
behind `--kv-cache-dtype auto:BYTES` / `auto:DTYPE`, and what a plain fractional TurboQuant dtype
(turbo3.5, turbo2.5) means per layer (kvjax/config.py `layer_formats`). The sensitivities are
measured by `python -m kvjax.calibrate` (kvjax/calibrate.py) and previewed by kvjax/sensitivity.py.
"""

from __future__ import annotations

import functools
import sys

import numpy as np

from kvjax.calibrate import KVCalibration, cached_calibration, resolve


def budget_bytes(cal: KVCalibration, spec: str, num_layers: int) -> float:
    """An auto budget, bytes per token over `num_layers` layers: a number, or a candidate format's
    name (``turbo3``: the bytes of turbo3 on every layer)."""
    try:
        value = float(spec)
    except ValueError:
        if spec not in cal.sens_formats:
            raise ValueError(f"auto:{spec}: not a byte count nor one of the calibration's "
                             f"formats {', '.join(cal.sens_formats)}") from None
        return num_layers * cal.sens_bytes[cal.sens_formats.index(spec)]
    if not value > 0:
        raise ValueError(f"auto:{spec}: the bytes per token must be > 0")
    return value


# How auto:BYTES reads the measured sensitivities (kvjax/sensitivity.py screens; BENCHMARKS.md):
# AUTO_SHRINK pulls each layer's KL toward its format's mean over layers (the single-layer KLs of
# the fine formats, ~1e-4, sit at the noise floor of the scored tokens), and AUTO_MAX_SEGMENTS
# caps the runs of equal formats (each run is one cache segment: one scan per step, one compile).
AUTO_SHRINK = 0.0
AUTO_MAX_SEGMENTS = 0  # 0 = no cap


def choose_formats(cal: KVCalibration, budget: float, num_layers: int | None = None,
                   shrink: float | None = None, max_segments: int | None = None
                   ) -> tuple[list[str], float, float]:
    """Per-layer formats with the least summed sensitivity (KL of that layer alone) whose bytes
    per token fit `budget`: an exact multiple-choice knapsack by dynamic programming over byte
    totals. -> (formats, bytes per token, predicted KL). Ties go to fewer bytes.

    shrink s in [0, 1]: the KL of layer L in format F is read as (1 - s) kl[L, F] + s mean_L
    kl[:, F] (s = 1: every layer alike, so the bytes go where formats differ most on average).
    max_segments > 0: at most that many runs of equal formats (the DP also tracks the last
    format and the run count). Defaults: AUTO_SHRINK, AUTO_MAX_SEGMENTS."""
    if not cal.sens_formats:
        raise ValueError(f"KV calibration {cal.source or ''} has no layer sensitivities; write "
                         "one with python -m kvjax.calibrate (it measures them by default)")
    shrink = AUTO_SHRINK if shrink is None else shrink
    max_segments = AUTO_MAX_SEGMENTS if max_segments is None else max_segments
    if not 0.0 <= shrink <= 1.0:
        raise ValueError(f"shrink must be within [0, 1], got {shrink}")
    n = cal.shape[0] if num_layers is None else num_layers
    kl = np.asarray(cal.sens_kl, np.float64)[:n]
    if shrink:
        kl = (1.0 - shrink) * kl + shrink * kl.mean(axis=0, keepdims=True)
    cost = [round(b * 64) for b in cal.sens_bytes]  # exact: bytes are multiples of 1/64
    cap = int(np.floor(budget * 64 + 1e-6))
    limit = max_segments if max_segments > 0 else n
    # state (last format, runs so far) -> {bytes used: (loss, picks)}, Pareto-pruned per state
    best: dict[tuple[int, int], dict[int, tuple[float, tuple[int, ...]]]] = {(-1, 0): {
        0: (0.0, ())}}
    for layer in range(n):
        nxt: dict[tuple[int, int], dict[int, tuple[float, tuple[int, ...]]]] = {}
        for (last, runs), front in best.items():
            for f, c in enumerate(cost):
                r = runs + (f != last)
                if r > limit:
                    continue
                group = nxt.setdefault((f if max_segments > 0 else -1, r if max_segments > 0
                                        else 0), {})
                for used, (loss, picks) in front.items():
                    u = used + c
                    if u > cap:
                        continue
                    cand = (loss + kl[layer, f], picks + (f,))
                    if u not in group or cand[0] < group[u][0]:
                        group[u] = cand
        nxt = {key: g for key, g in nxt.items() if g}
        if not nxt:
            least = n * min(cal.sens_bytes)
            raise ValueError(f"auto: {budget:g} bytes per token is below the smallest format "
                             f"on every layer ({least:g} bytes)")
        best = {}
        for key, group in nxt.items():  # keep the Pareto front: less loss for every extra byte
            front, floor = {}, np.inf
            for u in sorted(group):
                if group[u][0] < floor:
                    front[u], floor = group[u], group[u][0]
            best[key] = front
    used, (loss, picks) = min(((u, v) for front in best.values() for u, v in front.items()),
                              key=lambda kv: (kv[1][0], kv[0]))
    return [cal.sens_formats[f] for f in picks], used / 64, loss


def count_segments(formats: list[str] | tuple[str, ...]) -> int:
    """Runs of equal formats (each is one cache segment)."""
    return sum(1 for i, f in enumerate(formats) if i == 0 or formats[i - 1] != f)


@functools.lru_cache(maxsize=64)
def auto_formats(path: str, spec: str, num_layers: int, max_segments: int | None = None
                 ) -> tuple[str, ...]:
    """Layer formats for ``--kv-cache-dtype auto:SPEC`` with the calibration at `path`."""
    cal = cached_calibration(path)
    if cal.shape[0] < num_layers:
        raise ValueError(f"KV calibration {cal.source or path} has {cal.shape[0]} layers, the "
                         f"model {num_layers}")
    return tuple(choose_formats(cal, budget_bytes(cal, spec, num_layers), num_layers,
                                max_segments=max_segments)[0])


# A plain fractional dtype's per-layer layout has at most this many segments (runs of equal
# formats): each is one scan and one compiled kernel per step, and startup compiles them all.
# On SmolLM2 the cap costs 2-8% of auto:turbo3.5's KL (19 segments uncapped; BENCHMARKS.md).
PLAIN_MAX_SEGMENTS = 6


@functools.lru_cache(maxsize=64)
def per_layer_or_uniform(calibration: str, dtype: str, num_layers: int) -> tuple[str, ...]:
    """What a plain fractional dtype (config.PER_LAYER_DTYPES: turbo3.5, turbo2.5) means: the
    per-layer formats of auto:DTYPE (the same bytes) in at most PLAIN_MAX_SEGMENTS segments when
    `calibration` has layer sensitivities for this model, else DTYPE on every layer, with a
    one-line warning (once per process) when a calibration was given but cannot serve. Without
    any calibration (the 70B configs) the uniform layout is the documented meaning: no warning,
    so a user error that follows stays the only line on stderr."""
    if not calibration:
        return (dtype,) * num_layers
    try:
        path = str(resolve(calibration).resolve())
        if cached_calibration(path).sens_formats:
            return auto_formats(path, dtype, num_layers, PLAIN_MAX_SEGMENTS)
        why = f"KV calibration {calibration} has no layer sensitivities"
    except (OSError, ValueError) as e:
        why = str(e)
    if (dtype, why) not in _WARNED:
        _WARNED.add((dtype, why))
        print(f"warning: {dtype}: {why}; using the uniform {dtype} layout (per-layer formats need "
              "python -m kvjax.calibrate)", file=sys.stderr)
    return (dtype,) * num_layers


_WARNED: set[tuple[str, str]] = set()
