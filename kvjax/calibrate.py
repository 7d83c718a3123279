"""KV-cache calibration: per layer and KV head statistics of a model's keys and values, measured
once on a text and loaded with ``--kv-calibration DIR``.

    python -m kvjax.calibrate --config smollm2 --text-file /usr/share/common-licenses/GPL-3 \\
        --out kvjax/calibration/smollm2

A name shipped under kvjax/calibration works from anywhere: ``--kv-calibration smollm2`` (measured
on GPL-3, a text neither quality protocol scores; format 2, RoPE-aware key mean; regenerated with
``--sensitivity-from smollm2``, which kept its layer sensitivities: same k_mean / orders).

What is stored (``calibration.npz`` + ``calibration.json`` in DIR), per layer and KV head:
  k_mean  [L, H, d] f32  the keys' per-channel mean. TurboQuant quantizes k - mean for every token
                         whose centred key is shorter than the key itself (a per-token flag kept
                         in the sign bit of its stored norm); attention sees exactly k_hat + mean.
                         Attention sinks (a short key far from the mean, e.g. the first token of
                         SmolLM2) stay uncentred, which is why the flag exists: centring every key
                         made SmolLM2 worse (BENCHMARKS.md lever table).
  k_order [L, H, d] i32  channels by decreasing centred energy E[(k - mean)^2]: the first n are the
                         outlier channels of a fractional width (2.5 / 3.5 bits), which get their
                         own rotation, norm and one more bit (the paper's outlier split).
  v_order [L, H, d] i32  the same for values (energy E[v^2]).

Format 2 adds (``rope_centred``; format-1 files load and keep the post-RoPE centring above):
  k_mean_rope [L, H, d] f32  the keys' mean *before* RoPE, mu (measured by rotating each
                             calibration key back by its position). A key at absolute position p
                             is centred on R(p) mu instead of k_mean: k - R(p) mu = R(p)(k_pre -
                             mu), so a rotary pair's mean is removed at every position (after RoPE
                             the mean of a high-frequency pair is smeared over positions, so
                             k_mean removes little there). Same per-token flag; readers add back
                             flag * R(p) mu (kernels: flag * <q, R(p) mu> from [cos; sin] of p).
  rope_inv_freq [d / 2] f32  the rotation's inverse frequencies (the model's, rope scaling
                             included: models.layers.rope_inv_freq), so reader and writer rotate
                             the mean alike; pools check it against the model's.

Optionally (``--sensitivity``, in calibration.json's "sensitivity" block; the npz and the digest
are unchanged, so files without it stay valid): for each candidate cache format F (a
KV_CACHE_DTYPES name) its bytes per token of one layer (all KV heads, K + V) and ``kl[L][F]``,
the decode-step KL against the exact cache when layer L alone is stored as F
(kvjax/sensitivity.py). ``--kv-cache-dtype auto:BYTES`` (or ``auto:turbo3``, the bytes of that
dtype) picks per-layer formats from it: the least summed KL within the bytes (``choose_formats``).

Statistics come from a dense f32 forward over the text (kvjax/bench/real_kv.py), post-RoPE keys:
what the cache stores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FILE_NPZ = "calibration.npz"
FILE_JSON = "calibration.json"
FORMAT_VERSION = 2  # 2: optional RoPE-aware key mean (k_mean_rope, rope_inv_freq)
READS_FORMATS = (1, 2)


@dataclass(frozen=True, eq=False)
class KVCalibration:
    """Per layer / KV head key and value statistics. Hashable by content (a digest), so it can sit
    in the static PoolSpec that keys the jit cache."""

    k_mean: np.ndarray  # [L, H, d] float32
    k_order: np.ndarray  # [L, H, d] int32, a permutation of range(d) per (layer, head)
    v_order: np.ndarray  # [L, H, d] int32
    source: str = ""
    # Per-layer sensitivity (optional, json only; not in the digest: pools never read it).
    sens_formats: tuple[str, ...] = ()  # candidate cache formats (KV_CACHE_DTYPES names)
    sens_bytes: tuple[float, ...] = ()  # bytes per token of one layer in each format
    sens_kl: tuple[tuple[float, ...], ...] = ()  # [layers][formats] KL, that layer alone
    # RoPE-aware centring (optional): the pre-RoPE key mean [L, H, d] and the model's RoPE
    # inverse frequencies [d / 2]; both or neither. Keys are then centred on R(p) k_mean_rope.
    k_mean_rope: np.ndarray | None = None
    rope_inv_freq: np.ndarray | None = None
    digest: str = field(default="", init=False)

    def __post_init__(self) -> None:
        k_mean = np.ascontiguousarray(self.k_mean, np.float32)
        k_order = np.ascontiguousarray(self.k_order, np.int32)
        v_order = np.ascontiguousarray(self.v_order, np.int32)
        if not (k_mean.shape == k_order.shape == v_order.shape) or k_mean.ndim != 3:
            raise ValueError(f"calibration arrays must all be [layers, kv_heads, head_dim], got "
                             f"{k_mean.shape}, {k_order.shape}, {v_order.shape}")
        d = k_mean.shape[-1]
        for name, order in (("k_order", k_order), ("v_order", v_order)):
            if not np.array_equal(np.sort(order, axis=-1),
                                  np.broadcast_to(np.arange(d), order.shape)):
                raise ValueError(f"calibration {name} is not a permutation of the channels")
        for name, a in (("k_mean", k_mean), ("k_order", k_order), ("v_order", v_order)):
            a.setflags(write=False)
            object.__setattr__(self, name, a)
        extra = ()
        if (self.k_mean_rope is None) != (self.rope_inv_freq is None):
            raise ValueError("calibration k_mean_rope and rope_inv_freq go together")
        if self.k_mean_rope is not None:
            mr = np.ascontiguousarray(self.k_mean_rope, np.float32)
            fr = np.ascontiguousarray(self.rope_inv_freq, np.float32)
            if mr.shape != k_mean.shape or fr.shape != (d // 2,) or d % 2:
                raise ValueError(f"calibration k_mean_rope {list(mr.shape)} / rope_inv_freq "
                                 f"{list(fr.shape)}: want {list(k_mean.shape)} / [{d // 2}]")
            for name, a in (("k_mean_rope", mr), ("rope_inv_freq", fr)):
                a.setflags(write=False)
                object.__setattr__(self, name, a)
            extra = (mr, fr)
        if self.sens_formats:
            kl = np.asarray(self.sens_kl, np.float64)
            if (len(self.sens_bytes) != len(self.sens_formats)
                    or kl.shape != (k_mean.shape[0], len(self.sens_formats))):
                raise ValueError(f"calibration sensitivity: {len(self.sens_formats)} formats, "
                                 f"{len(self.sens_bytes)} byte counts, kl {list(kl.shape)}; want "
                                 f"kl [{k_mean.shape[0]} layers, formats]")
        h = hashlib.sha256()
        for a in (k_mean, k_order, v_order, *extra):  # format-1 files keep their digest
            h.update(a.tobytes())
        object.__setattr__(self, "digest", h.hexdigest()[:16])

    def __hash__(self) -> int:
        return hash(self.digest)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KVCalibration) and other.digest == self.digest

    @property
    def rope_centred(self) -> bool:
        """Keys centred on the position-rotated pre-RoPE mean R(p) k_mean_rope."""
        return self.k_mean_rope is not None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.k_mean.shape)  # type: ignore[return-value]

    def check(self, num_layers: int, kv_heads: int, head_dim: int) -> None:
        """The model's shape must match; fewer layers are fine (--num-layers smoke runs use the
        first layers, whose statistics are the calibration's first layers)."""
        want = (num_layers, kv_heads, head_dim)
        if self.shape[1:] != want[1:] or self.shape[0] < num_layers:
            raise ValueError(f"KV calibration {self.source or ''} is for [layers, kv_heads, "
                             f"head_dim] = {list(self.shape)}, the model has {list(want)}")

    def check_rope(self, inv_freq: np.ndarray) -> None:
        """A RoPE-centred calibration rotates its mean with the inverse frequencies it was
        measured with; they must be the model's (rope scaling included)."""
        if self.rope_centred and not np.allclose(self.rope_inv_freq, inv_freq, rtol=1e-6,
                                                 atol=0.0):
            raise ValueError(f"KV calibration {self.source or ''} was measured with other RoPE "
                             "frequencies than the model's (rope_theta / rope_scaling)")

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        arrays = dict(k_mean=self.k_mean, k_order=self.k_order, v_order=self.v_order)
        if self.rope_centred:
            arrays.update(k_mean_rope=self.k_mean_rope, rope_inv_freq=self.rope_inv_freq)
        np.savez(out / FILE_NPZ, **arrays)
        # Format 1 when there is nothing new: such files stay readable by older kvjax.
        meta = {"format": 2 if self.rope_centred else 1, "source": self.source,
                "digest": self.digest,
                "layers": self.shape[0], "kv_heads": self.shape[1], "head_dim": self.shape[2]}
        if self.sens_formats:
            meta["sensitivity"] = {"formats": list(self.sens_formats),
                                   "bytes": [float(b) for b in self.sens_bytes],
                                   "kl": [[float(x) for x in row] for row in self.sens_kl]}
        (out / FILE_JSON).write_text(json.dumps(meta, indent=1) + "\n")
        return out


def load_calibration(path: str | Path) -> KVCalibration:
    """Reads a directory written by ``python -m kvjax.calibrate`` (one-line errors on bad input)."""
    path = Path(path)
    npz, meta_file = path / FILE_NPZ, path / FILE_JSON
    if not npz.is_file() or not meta_file.is_file():
        raise FileNotFoundError(f"no KV calibration in {path} (want {FILE_NPZ} and {FILE_JSON}; "
                                "write one with python -m kvjax.calibrate)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") not in READS_FORMATS:
        raise ValueError(f"{meta_file}: calibration format {meta.get('format')!r}, this kvjax "
                         f"reads {', '.join(map(str, READS_FORMATS))}")
    sens = meta.get("sensitivity") or {}
    with np.load(npz) as z:
        rope = {n: z[n] for n in ("k_mean_rope", "rope_inv_freq") if n in z.files}
        cal = KVCalibration(k_mean=z["k_mean"], k_order=z["k_order"], v_order=z["v_order"],
                            source=str(meta.get("source", "")),
                            sens_formats=tuple(sens.get("formats", ())),
                            sens_bytes=tuple(sens.get("bytes", ())),
                            sens_kl=tuple(tuple(r) for r in sens.get("kl", ())), **rope)
    if meta.get("digest") and meta["digest"] != cal.digest:
        raise ValueError(f"{path}: contents do not match the digest in {FILE_JSON}")
    return cal


_CACHE: dict[str, KVCalibration] = {}


PACKAGED = Path(__file__).resolve().parent / "calibration"


def resolve(path: str) -> Path:
    """A directory, or the name of one shipped in kvjax/calibration ("smollm2")."""
    p = Path(path)
    if not p.exists() and (PACKAGED / path).is_dir():
        return PACKAGED / path
    return p


def cached_calibration(path: str) -> KVCalibration:
    """load_calibration, once per path per process (configs name a path; PoolSpecs share it)."""
    key = str(resolve(path).resolve())
    if key not in _CACHE:
        _CACHE[key] = load_calibration(key)
    return _CACHE[key]


def channel_order(energy: np.ndarray) -> np.ndarray:
    """Channels by decreasing energy (ties by index). energy: [..., d] -> int32 [..., d]"""
    return np.argsort(-np.asarray(energy, np.float64), axis=-1, kind="stable").astype(np.int32)


def rope_angles(positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """[..., d / 2] f32 angles p * inv_freq, rounded as models.layers.apply_rope rounds them
    (f32 position times f32 frequency), so a mean rotated here matches the model's keys."""
    return (np.asarray(positions, np.float32)[..., None]
            * np.asarray(inv_freq, np.float32)).astype(np.float32)


def unrotate_keys(k: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Post-RoPE keys k [..., tokens, d] at `positions` [tokens] -> R(-p) k (rotate-half layout,
    models.layers.apply_rope), float64: the keys as they were before RoPE (times YaRN's scale)."""
    ang = rope_angles(positions, inv_freq).astype(np.float64)
    cos, sin = np.cos(ang), np.sin(ang)
    k = np.asarray(k, np.float64)
    k1, k2 = np.split(k, 2, axis=-1)
    return np.concatenate([k1 * cos + k2 * sin, k2 * cos - k1 * sin], axis=-1)


def from_samples(k: np.ndarray, v: np.ndarray, source: str = "",
                 inv_freq: np.ndarray | None = None) -> KVCalibration:
    """Statistics of keys and values k, v: [layers, kv_heads, tokens, head_dim], k post-RoPE at
    positions 0..tokens-1. With the model's RoPE inv_freq [d / 2] also the pre-RoPE mean
    (k_mean_rope: RoPE-aware centring)."""
    k = np.asarray(k, np.float64)
    v = np.asarray(v, np.float64)
    k_mean = k.mean(axis=2)
    k_energy = np.square(k - k_mean[:, :, None]).mean(axis=2)
    v_energy = np.square(v).mean(axis=2)
    rope = {}
    if inv_freq is not None:
        pre = unrotate_keys(k, np.arange(k.shape[2]), inv_freq)
        rope = dict(k_mean_rope=pre.mean(axis=2).astype(np.float32),
                    rope_inv_freq=np.asarray(inv_freq, np.float32))
    return KVCalibration(k_mean=k_mean.astype(np.float32), k_order=channel_order(k_energy),
                         v_order=channel_order(v_energy), source=source, **rope)


def measure(config_name: str, text: str, tokens: int = 1024, weights: str | None = None,
            random_weights: bool = False, no_rope: bool = False) -> KVCalibration:
    """Runs the model densely over the first `tokens` tokens of `text` and measures k and v
    (and the pre-RoPE key mean, unless `no_rope`: then a format-1 file, post-RoPE centring)."""
    import jax.numpy as jnp

    from kvjax.bench.real_kv import _capture
    from kvjax.config import load_config
    from kvjax.generate import load_model
    from models.layers import rope_inv_freq

    cfg = load_config(config_name)
    params, tokenizer = load_model(cfg, weights, random_weights)
    ids = tokenizer.encode(text)[:tokens]
    if len(ids) < 16:
        raise ValueError(f"the calibration text has {len(ids)} tokens; need at least 16")
    out = _capture(cfg.model, {k: jnp.asarray(v, jnp.float32) for k, v in params.items()},
                   jnp.asarray(ids, jnp.int32))
    return from_samples(np.asarray(out["k"]), np.asarray(out["v"]),
                        source=f"{config_name}, {len(ids)} tokens",
                        inv_freq=None if no_rope else rope_inv_freq(cfg.model))


def sens_source(source: str, tokens: int, text_file: str) -> str:
    """The calibration's source line with its sensitivity text; a re-measure (--stats-from)
    replaces the previous one instead of appending a second."""
    base = source.split("; layer sensitivities")[0]
    return f"{base}; layer sensitivities on {tokens} tokens of {Path(text_file).name}"


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m kvjax.calibrate", description=__doc__.split(
        "\n")[0])
    ap.add_argument("--config", default="smollm2")
    ap.add_argument("--text-file", required=True)
    ap.add_argument("--out", required=True, help="directory to write")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens of the text to measure")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--stats-from", default=None, help="keep the means/orders of this "
                    "calibration (dir or shipped name) and measure only the layer sensitivities")
    ap.add_argument("--no-sensitivity", action="store_true", help="skip the per-layer KL of each "
                    "cache format (what --kv-cache-dtype auto:BYTES reads; minutes)")
    ap.add_argument("--sens-tokens", type=int, default=768, help="tokens of the text the layer "
                    "sensitivities are measured on (decode steps after --sens-prefix)")
    ap.add_argument("--sens-prefix", type=int, default=512)
    ap.add_argument("--no-rope-mean", action="store_true", help="centre keys on the post-RoPE "
                    "mean only (format 1, the centring before RoPE-aware means)")
    ap.add_argument("--sensitivity-from", default=None, help="measure the means/orders, keep "
                    "the layer sensitivities of this calibration (dir or shipped name)")
    args = ap.parse_args(argv)
    try:
        text = Path(args.text_file).read_text()
        if args.stats_from:
            cal = load_calibration(resolve(args.stats_from))
        else:
            cal = measure(args.config, text, args.tokens, args.weights, args.random_weights,
                          args.no_rope_mean)
            cal = dataclasses.replace(cal, source=f"{cal.source} of {Path(args.text_file).name}")
        if args.sensitivity_from:
            old = load_calibration(resolve(args.sensitivity_from))
            if not old.sens_formats or len(old.sens_kl) != cal.shape[0]:
                raise ValueError(f"{args.sensitivity_from}: no layer sensitivities for "
                                 f"{cal.shape[0]} layers")
            tail = old.source.split("; layer sensitivities")
            cal = dataclasses.replace(
                cal, source=cal.source + ("; layer sensitivities" + tail[1] if len(tail) > 1
                                          else ""),
                sens_formats=old.sens_formats, sens_bytes=old.sens_bytes, sens_kl=old.sens_kl)
        elif not args.no_sensitivity:
            from kvjax.sensitivity import load, with_sensitivity

            cfg, params, ids = load(args.config, text, args.sens_tokens, args.weights,
                                    args.random_weights)
            cal.check(cfg.model.num_layers, cfg.model.num_kv_heads, cfg.model.head_dim)
            cal = with_sensitivity(cal, cfg.model, params, ids, args.sens_prefix,
                                   log=lambda m: print(m, file=sys.stderr, flush=True))
            cal = dataclasses.replace(cal, source=sens_source(cal.source, len(ids),
                                                               args.text_file))
        out = cal.save(args.out)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({cal.source}; layers x kv_heads x head_dim = {list(cal.shape)}, "
          f"digest {cal.digest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
