"""orbax checkpoints of converted params: `python -m kvjax.convert` writes one, `--weights DIR`
restores it. The directory holds `params/` (orbax), `kvjax.json` (the model config the params
belong to) and the tokenizer (`tokenizer.json` + its settings in `kvjax.json`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from kvjax.config import ModelConfig, RopeScaling
from kvjax.loaders.gguf_loader import WeightsError
from kvjax.loaders.tokenizer import Tokenizer

META = "kvjax.json"


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / META).exists()


def save(out: str | Path, cfg: ModelConfig, params: dict[str, np.ndarray],
         tokenizer: Tokenizer | None) -> None:
    import orbax.checkpoint as ocp

    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(out / "params", params, force=True)
    # The params saved are float: the record says so whatever the run's --weight-dtype was.
    meta = {"model": dataclasses.asdict(dataclasses.replace(cfg, weight_dtype="auto"))}
    if tokenizer is not None:
        tokenizer.tok.save(str(out / "tokenizer.json"))
        meta["tokenizer"] = {"bos_id": tokenizer.bos_id, "eos_ids": tokenizer.eos_ids,
                             "add_bos": tokenizer.add_bos,
                             "chat_template": tokenizer.chat_template}
    (out / META).write_text(json.dumps(meta, indent=1))


def _meta(path: Path) -> dict:
    try:
        return json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: bad {META} ({e})") from None


def model_config(path: str | Path) -> ModelConfig:
    try:
        m = dict(_meta(Path(path))["model"])
        if m.get("rope_scaling"):
            m["rope_scaling"] = RopeScaling(**m["rope_scaling"])
        return ModelConfig(**m)
    except (KeyError, TypeError, ValueError) as e:  # ConfigError is a ValueError
        raise WeightsError(f"{path}: bad model config in {META} ({e})") from None


def load_params(path: str | Path, cfg: ModelConfig, target: dict | None = None
                ) -> dict[str, np.ndarray]:
    """The params; with `target` (name -> jax.ShapeDtypeStruct with a sharding, e.g.
    kvjax.sharding.abstract_params), restored straight into those shardings and dtypes: each
    process reads only the shards its devices hold."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    try:
        with ocp.StandardCheckpointer() as ckpt:
            return ckpt.restore(path / "params", target)
    except Exception as e:  # orbax raises many types for a damaged checkpoint
        raise WeightsError(
            f"{path}: cannot restore orbax params ({type(e).__name__}: {e})") from None


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    import tokenizers

    path = Path(path)
    t = _meta(path).get("tokenizer")
    if t is None:
        return None
    tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    return Tokenizer(tok, t["bos_id"], t["eos_ids"], t["add_bos"], t["chat_template"])
