"""GGUF checkpoints (llama.cpp's format): weights dequantized with the `gguf` package, tokenizer
built from the embedded BPE vocab and merges.

llama.cpp's converter reorders the rows of Llama's Q and K projections so that each head's RoPE
pairs are interleaved (x0, x1), (x2, x3), ... ; our model uses the Hugging Face rotate-half layout
(x_i pairs with x_{i + head_dim/2}). `_unpermute_rope_rows` undoes the reorder; skipping it gives
a model that still runs but whose perplexity is in the hundreds.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np

from kvjax.config import ConfigError, ModelConfig, RopeScaling
from kvjax.loaders.tokenizer import Tokenizer, from_gguf_fields
from kvjax.quant import weights
from models import checkpoint_names


class WeightsError(ValueError):
    """Missing, malformed or mismatched weights; the CLIs print it as one line and exit 2."""


def _reader(path: str):
    """The parsed file, cached per (path, mtime, size): parsing a 49K-token vocab takes seconds and
    `loaders.load` reads the config, the params and the tokenizer from the same file."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e})") from None
    return _parse(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _parse(path: str, mtime_ns: int, size: int):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the gguf package raises bare ValueErrors/struct errors on bad files
        raise WeightsError(f"{path}: not a readable GGUF file ({e})") from None


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _required(reader, key: str):
    value = _field(reader, key)
    if value is None:
        raise WeightsError(f"{reader.data.filename}: missing GGUF metadata {key}")
    return value


def model_config(path: str) -> ModelConfig:
    """The architecture recorded in a GGUF's metadata."""
    r = _reader(path)
    arch = _field(r, "general.architecture")
    if arch not in ("llama", "qwen2", "qwen3"):
        raise WeightsError(f"{path}: unsupported GGUF architecture {arch!r}")
    p = arch + "."
    try:
        heads = int(_required(r, p + "attention.head_count"))
        hidden = int(_required(r, p + "embedding_length"))
        head_dim = int(_field(r, p + "attention.key_length", hidden // heads))
        names = {t.name for t in r.tensors}
        scaling = _rope_scaling(r, p, "rope_freqs.weight" in names)
        vocab = _field(r, p + "vocab_size") or len(_required(r, "tokenizer.ggml.tokens"))
        return ModelConfig(
            arch=arch, vocab_size=int(vocab), hidden_size=hidden,
            intermediate_size=int(_required(r, p + "feed_forward_length")),
            num_layers=int(_required(r, p + "block_count")), num_heads=heads,
            num_kv_heads=int(_field(r, p + "attention.head_count_kv", heads)),
            head_dim=head_dim, rope_theta=float(_field(r, p + "rope.freq_base", 10000.0)),
            rope_scaling=scaling, max_position=int(_required(r, p + "context_length")),
            # GGUF stores eps as f32 (9.9999997e-06); round back to the decimal it was written
            # from.
            rms_norm_eps=float(
                f"{_field(r, p + 'attention.layer_norm_rms_epsilon', 1e-5):.6g}"),
            tie_embeddings="output.weight" not in names, qkv_bias="blk.0.attn_q.bias" in names,
            qk_norm="blk.0.attn_q_norm.weight" in names)
    except WeightsError:
        raise
    except (ConfigError, TypeError, ValueError, ZeroDivisionError) as e:
        raise WeightsError(f"{path}: bad GGUF metadata ({e})") from None


def _rope_scaling(r, p: str, has_freq_factors: bool) -> RopeScaling | None:
    """llama.cpp's rope.scaling.* keys. Llama 3.1 GGUFs carry precomputed frequency factors
    (rope_freqs.weight) and no type; a type kvjax does not implement is an error."""
    kind = _field(r, p + "rope.scaling.type")
    factor = float(_field(r, p + "rope.scaling.factor", 8.0))
    orig = int(_field(r, p + "rope.scaling.original_context_length", 8192))
    if kind == "llama3" or (has_freq_factors and kind in (None, "none")):
        return RopeScaling(factor=factor, original_max_position=orig)
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return RopeScaling(rope_type="linear", factor=factor, original_max_position=orig)
    if kind == "yarn":  # llama.cpp: mscale = attn_factor * (1 + 0.1 ln(factor))
        mscale = 1.0 + 0.1 * math.log(factor) if factor > 1 else 1.0
        return RopeScaling(rope_type="yarn", factor=factor, original_max_position=orig,
                           attention_factor=float(_field(r, p + "rope.scaling.attn_factor", 1.0))
                           * mscale)
    raise WeightsError(f"{r.data.filename}: unsupported rope scaling type {kind!r}; kvjax "
                       "supports none, linear, yarn, llama3")


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: rows [n_heads * head_dim, ...] back to rotate-half."""
    shape = w.shape
    return w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def load_params(path: str, cfg: ModelConfig, weight_dtype: str = "auto") -> dict[str, np.ndarray]:
    """Params in our layout ([in, out] projections, layers stacked): dequantized f32, except
    that with weight_dtype int4/int8 the projections become Int4Weights/Int8Weights (Q4_0/Q4_1
    resp. Q8_0 tensors bit for bit from their blocks, others quantized from f32)."""
    from gguf import GGMLQuantizationType, quants

    r = _reader(path)
    tensors = {t.name: t for t in r.tensors}

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise WeightsError(f"{path}: missing tensor {name}")
        t = tensors[name]
        try:
            if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                w = np.asarray(t.data, np.float32)
            else:
                w = quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            # GGUF lists dims fastest-first; numpy shape is the reverse: [out, in] like HF.
            return w.reshape([int(d) for d in reversed(t.shape)])
        except (ValueError, NotImplementedError) as e:  # truncated data, unknown quant type
            raise WeightsError(f"{path}: cannot read tensor {name} ({e})") from None

    def get_quantized(name: str, perm):
        """Q4_0/Q4_1 blocks into int4 and Q8_0 blocks into int8 as they are; anything else
        dequantized to f32 and quantized to weight_dtype."""
        t = tensors.get(name)
        kind = None if t is None else t.tensor_type.name
        if (weight_dtype, kind) in (("int4", "Q4_0"), ("int4", "Q4_1"), ("int8", "Q8_0")):
            out, inp = (int(d) for d in reversed(t.shape))
            try:
                if kind == "Q8_0":
                    return weights.from_gguf_q8_0(np.asarray(t.data), (out, inp), perm)
                return weights.from_gguf_q4(np.asarray(t.data), kind, (out, inp), perm)
            except ValueError as e:
                raise WeightsError(f"{path}: cannot read tensor {name} ({e})") from None
        w = get(name)
        return weights.quantize((w if perm is None else perm(w)).T, weight_dtype)

    params: dict[str, np.ndarray] = {}
    for ours, theirs in checkpoint_names(cfg, "gguf").items():
        if not ours.startswith("layers."):
            w = get(theirs)
            params[ours] = w.T if ours == "lm_head" else w
            continue
        per_layer = []
        for i in range(cfg.num_layers):
            perm = None
            if cfg.arch == "llama" and ours in ("layers.wq", "layers.bq"):
                perm = functools.partial(_unpermute_rope_rows, n_heads=cfg.num_heads)
            elif cfg.arch == "llama" and ours in ("layers.wk", "layers.bk"):
                perm = functools.partial(_unpermute_rope_rows, n_heads=cfg.num_kv_heads)
            if weight_dtype != "auto" and ours in weights.QUANTIZED:
                per_layer.append(get_quantized(theirs.format(i=i), perm))
                continue
            w = get(theirs.format(i=i))
            w = w if perm is None else perm(w)
            per_layer.append(w.T if w.ndim == 2 else w)
        params[ours] = weights.stack(per_layer)
    return params


def load_tokenizer(path: str) -> Tokenizer:
    r = _reader(path)
    if _field(r, "tokenizer.ggml.model") != "gpt2":
        raise WeightsError(f"{path}: only byte-level BPE ('gpt2') GGUF tokenizers are supported")
    bos = _field(r, "tokenizer.ggml.bos_token_id")
    eos = _field(r, "tokenizer.ggml.eos_token_id")
    return from_gguf_fields(
        tokens=list(_required(r, "tokenizer.ggml.tokens")),
        merges=list(_required(r, "tokenizer.ggml.merges")),
        token_types=list(_required(r, "tokenizer.ggml.token_type")),
        bos_id=None if bos is None else int(bos), eos_id=None if eos is None else int(eos),
        add_bos=bool(_field(r, "tokenizer.ggml.add_bos_token", False)),
        chat_template=_field(r, "tokenizer.chat_template"),
        pre=_field(r, "tokenizer.ggml.pre", ""))
