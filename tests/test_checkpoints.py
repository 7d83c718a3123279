"""Checkpoints as users have them: `--weights DIR` alone, architecture from config.json.

Tiny Llama-3.1 (llama3 RoPE scaling), Qwen2 and Qwen3 checkpoints are written here as HF
transformers writes them (config.json + model.safetensors + tokenizer.json), in both config.json
styles: the older top-level `rope_theta` / `rope_scaling`, and transformers 5's
`rope_parameters`. kvjax's perplexity (through `python -m kvjax.eval ppl --weights DIR`, no
--config) must equal an independent float64 numpy forward within 0.5%; the reference with plain
RoPE at theta 10000 (what the old loader silently did) must not, so the test can fail. The other
RoPE types (linear, dynamic, yarn) go through the Runner against the same reference.
"""

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from safetensors.numpy import save_file

from kvjax.config import CacheConfig, Config, config_for
from kvjax.eval.ppl import perplexity
from kvjax.loaders import WeightsError, checkpoint_config, load
from kvjax.runner import Runner

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("the cat sat on the mat. a cafe in the city. hello there, the cat said to the dog on the "
        "mat in the city; then the dog sat there and the cat ran. ") * 2
ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
FAMILIES = {  # arch, rope_theta, rope settings (None = default RoPE), tied embeddings
    "llama31": ("llama", 500000.0, LLAMA3, False),
    "qwen2": ("qwen2", 1000000.0, None, True),
    "qwen3": ("qwen3", 1000000.0, None, False),
}
H, F, LAYERS, HEADS, KV, D = 64, 128, 2, 4, 2, 16


def tokenizer() -> tokenizers.Tokenizer:
    from tokenizers import decoders, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 3, trainer)
    return tok


def hf_tensors(arch: str, vocab: int, tied: bool, rng) -> dict[str, np.ndarray]:
    """HF names and layout ([out, in]); q/k scaled up so attention is peaked and RoPE matters."""
    def w(out, inp, gain=1.0):
        return (gain * rng.standard_normal((out, inp)) / math.sqrt(inp)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)

    t = {"model.embed_tokens.weight": rng.standard_normal((vocab, H)).astype(np.float32),
         "model.norm.weight": norm(H)}
    if not tied:
        t["lm_head.weight"] = w(vocab, H, 2.0)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": norm(H), p + "post_attention_layernorm.weight": norm(H),
              p + "self_attn.q_proj.weight": w(HEADS * D, H, 3.0),
              p + "self_attn.k_proj.weight": w(KV * D, H, 3.0),
              p + "self_attn.v_proj.weight": w(KV * D, H),
              p + "self_attn.o_proj.weight": w(H, HEADS * D),
              p + "mlp.gate_proj.weight": w(F, H), p + "mlp.up_proj.weight": w(F, H),
              p + "mlp.down_proj.weight": w(H, F)}
        if arch == "qwen2":
            for n, size in (("q", HEADS * D), ("k", KV * D), ("v", KV * D)):
                t[p + f"self_attn.{n}_proj.bias"] = (0.3 * rng.standard_normal(size)).astype(
                    np.float32)
        if arch == "qwen3":
            t[p + "self_attn.q_norm.weight"] = norm(D)
            t[p + "self_attn.k_norm.weight"] = norm(D)
    return t


def write_checkpoint(path: Path, arch: str, theta: float, rope: dict | None, tied: bool,
                     style: str, rng, max_pos: int = 512) -> dict[str, np.ndarray]:
    """style "v4": top-level rope_theta (+ rope_scaling); "v5": rope_parameters only."""
    path.mkdir(parents=True)
    tok = tokenizer()
    vocab = tok.get_vocab_size()
    config = {"architectures": [ARCH[arch]], "model_type": arch, "vocab_size": vocab,
              "hidden_size": H, "intermediate_size": F, "num_hidden_layers": LAYERS,
              "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": D,
              "max_position_embeddings": max_pos, "rms_norm_eps": 1e-6, "hidden_act": "silu",
              "tie_word_embeddings": tied, "dtype": "float32"}
    if style == "v5":
        rope = {("rope_type" if k == "type" else k): v for k, v in (rope or {}).items()}
        config["rope_parameters"] = {"rope_theta": theta, "rope_type": "default", **rope}
    else:
        config["rope_theta"] = theta
        if rope is not None:
            config["rope_scaling"] = rope
    (path / "config.json").write_text(json.dumps(config))
    tensors = hf_tensors(arch, vocab, tied, rng)
    save_file(tensors, str(path / "model.safetensors"))
    tok.save(str(path / "tokenizer.json"))
    return tensors


# ---------------------------------------------------------------------------------------------
# The reference: float64 numpy, HF's formulas written out again (not models.layers).

def ref_inv_freq(theta: float, rope: dict | None, max_pos: int) -> tuple[np.ndarray, float]:
    inv = 1.0 / theta ** (np.arange(0, D, 2) / D)
    rope = rope or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in ("default", "dynamic"):  # dynamic: plain RoPE up to max_position_embeddings
        return inv, 1.0
    f = rope["factor"]
    if kind == "linear":
        return inv / f, 1.0
    old = rope["original_max_position_embeddings"]
    if kind == "llama3":
        lo_wl, hi_wl = old / rope["low_freq_factor"], old / rope["high_freq_factor"]
        wl = 2 * np.pi / inv
        out = np.where(wl > lo_wl, inv / f, inv)
        sm = (old / wl - rope["low_freq_factor"]) / (rope["high_freq_factor"]
                                                      - rope["low_freq_factor"])
        mid = ~(wl < hi_wl) & ~(wl > lo_wl)
        return np.where(mid, (1 - sm) * out / f + sm * out, out), 1.0
    assert kind == "yarn"

    def dim(rot):
        return D * math.log(old / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(dim(32)), 0), min(math.ceil(dim(1)), D - 1)
    ramp = np.clip((np.arange(D // 2) - low) / (high - low), 0, 1)
    return inv / f * ramp + inv * (1 - ramp), 0.1 * math.log(f) + 1.0


def ref_ppl(t: dict, arch: str, theta: float, rope: dict | None, ids: list[int],
            max_pos: int = 512) -> float:
    g = {k: v.astype(np.float64) for k, v in t.items()}
    inv, mscale = ref_inv_freq(theta, rope, max_pos)
    n = len(ids)
    ang = np.arange(n)[:, None] * inv[None]
    cos, sin = np.cos(ang)[:, None] * mscale, np.sin(ang)[:, None] * mscale

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * w

    def rot(x):  # x [n, heads, D], rotate-half
        a, b = x[..., : D // 2], x[..., D // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)

    x = g["model.embed_tokens.weight"][ids]
    for i in range(LAYERS):
        def p(s: str, i: int = i) -> np.ndarray:
            return g[f"model.layers.{i}.{s}"]

        h = rms(x, p("input_layernorm.weight"))
        q, k, v = (h @ p(f"self_attn.{c}_proj.weight").T for c in "qkv")
        if arch == "qwen2":
            q, k, v = (y + p(f"self_attn.{c}_proj.bias")
                       for y, c in zip((q, k, v), "qkv", strict=True))
        q, k, v = q.reshape(n, HEADS, D), k.reshape(n, KV, D), v.reshape(n, KV, D)
        if arch == "qwen3":
            q, k = rms(q, p("self_attn.q_norm.weight")), rms(k, p("self_attn.k_norm.weight"))
        q, k = rot(q), rot(k)
        k, v = np.repeat(k, HEADS // KV, 1), np.repeat(v, HEADS // KV, 1)
        s = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(D)
        s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", a, v).reshape(n, -1) @ p("self_attn.o_proj.weight").T
        h = rms(x, p("post_attention_layernorm.weight"))
        gate, up = h @ p("mlp.gate_proj.weight").T, h @ p("mlp.up_proj.weight").T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ p("mlp.down_proj.weight").T
    x = rms(x, g["model.norm.weight"])
    logits = x @ g.get("lm_head.weight", g["model.embed_tokens.weight"]).T
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return float(np.exp(-logp[np.arange(n - 1), ids[1:]].mean()))


# ---------------------------------------------------------------------------------------------


def run_eval(path: Path, text_file: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "kvjax.eval", "ppl", "--weights", str(path), "--text-file",
         str(text_file), "--kv-cache-dtype", "f32", "--chunk", "16"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


CLI_STYLE = {"llama31": "v5", "qwen2": "v4", "qwen3": "v5"}  # the other style: in process


def test_eval_ppl_weights_dir_alone_matches_numpy(tmp_path):
    """3 families x 2 config.json styles; each family through `kvjax.eval ppl --weights DIR`
    (no --config) in one style and through config_for + Runner (what the CLI runs) in the other;
    both styles must give the same ModelConfig."""
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    tensors, paths = {}, {}
    for seed, (name, (arch, theta, rope, tied)) in enumerate(FAMILIES.items()):
        for style in ("v4", "v5"):  # the same weights in both styles
            paths[name, style] = tmp_path / f"{name}_{style}"
            tensors[name] = write_checkpoint(paths[name, style], arch, theta, rope, tied, style,
                                             np.random.default_rng(seed))
        assert checkpoint_config(str(paths[name, "v4"])) == checkpoint_config(
            str(paths[name, "v5"]))
    unsupported = tmp_path / "longrope"
    write_checkpoint(unsupported, "llama", 1e4, {"rope_type": "longrope", "factor": 4.0,
                                                 "short_factor": [1.0] * 8,
                                                 "long_factor": [2.0] * 8}, False, "v5",
                     np.random.default_rng(99))
    ids = tokenizer().encode(TEXT).ids
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_eval, paths[name, style], text_file)
                   for name, style in CLI_STYLE.items()}
        bad = pool.submit(run_eval, unsupported, text_file)
        in_process = {name: _runner_ppl(paths[name, "v5" if style == "v4" else "v4"], ids)
                      for name, style in CLI_STYLE.items()}
        results = {k: f.result() for k, f in futures.items()}
        bad = bad.result()

    assert bad.returncode == 2, bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "unsupported rope type 'longrope'" in lines[0], bad.stderr

    for name, r in results.items():
        assert r.returncode == 0, (name, r.stderr[-2000:])
        got = float(r.stdout.split("ppl ")[1].split()[0])
        arch, theta, rope, _ = FAMILIES[name]
        want = ref_ppl(tensors[name], arch, theta, rope, ids)
        assert abs(got / want - 1) < 0.005, (name, got, want)
        assert abs(in_process[name] / want - 1) < 0.005, (name, in_process[name], want)
        # The old loader's silent fallback (theta 10000, no scaling) would be caught.
        wrong = ref_ppl(tensors[name], arch, 10000.0, None, ids)
        assert abs(wrong / want - 1) > 0.01, (name, wrong, want)


def _runner_ppl(path: Path, ids: list[int]) -> float:
    cfg = config_for(None, str(path))
    cfg = Config(name="t", model=cfg.model, cache=CacheConfig("f32"), param_dtype="f32")
    params, _ = load(str(path), cfg.model)
    return perplexity(Runner(cfg, params, max_seq_len=len(ids)), ids, chunk=16).ppl


@pytest.mark.parametrize("arch,rope", [
    ("llama", {"rope_type": "linear", "factor": 4.0}),
    ("llama", {"type": "dynamic", "factor": 4.0}),
    ("qwen2", {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    ("qwen3", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
])
def test_other_rope_types_match_numpy(tmp_path, arch, rope):
    rng = np.random.default_rng(7)
    ids = tokenizer().encode(TEXT).ids
    for style in ("v4", "v5"):
        path = tmp_path / style
        tensors = write_checkpoint(path, arch, 1e6, rope, False, style, rng)
        mc = checkpoint_config(str(path))
        assert mc.rope_scaling.rope_type == rope.get("rope_type", rope.get("type"))
        got, want = _runner_ppl(path, ids), ref_ppl(tensors, arch, 1e6, rope, ids)
        assert abs(got / want - 1) < 0.005, (style, got, want)
        if rope.get("type") != "dynamic":
            assert abs(ref_ppl(tensors, arch, 1e6, None, ids) / want - 1) > 0.005


def test_named_config_is_checked_and_mismatch_is_one_line(tmp_path):
    rng = np.random.default_rng(3)
    path = tmp_path / "ckpt"
    write_checkpoint(path, "qwen3", 1e6, None, False, "v5", rng)
    auto = config_for(None, str(path))
    assert auto.model == checkpoint_config(str(path)) and auto.name == "ckpt"
    with pytest.raises(WeightsError, match="does not match") as e:
        config_for("tiny_qwen3", str(path))
    assert "\n" not in str(e.value)
    # Without --weights, the named config (default smollm2) as before.
    assert config_for(None, None).name == "smollm2"
    for bad in ({"rope_parameters": {"rope_type": "default"}},
                {"partial_rotary_factor": 0.5}, {"hidden_act": "gelu"}):
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, **bad}))
        with pytest.raises(WeightsError):
            checkpoint_config(str(path))
        (path / "config.json").write_text(json.dumps(cfg))
