"""kl, passkey and sweep (`python -m kvjax.eval`): logic on the tiny config with random weights,
one short SmolLM2 passkey run, and the command line's user errors."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import models
from configs.tiny import CONFIGS
from kvjax.eval import passkey as pk
from kvjax.eval import sweep_plot
from kvjax.eval.kl import compare, kl_divergence
from kvjax.eval.ppl import perplexity
from kvjax.eval.sweep import cache_for, run_sweep, shared_params
from kvjax.eval.sweep_plot import pareto_frontier
from kvjax.loaders.tokenizer import byte_tokenizer
from kvjax.runner import Runner

ROOT = Path(__file__).resolve().parents[1]
# No bf16 window: the default 128 recent tokens would cover these short texts entirely.
TINY = CONFIGS["tiny_llama"].replace_cache(window=0)


@pytest.fixture(scope="module")
def tiny():
    cfg = TINY
    params = shared_params(cfg, models.random_params(cfg.model, seed=0))
    other = shared_params(cfg, models.random_params(cfg.model, seed=1))
    ids = [int(i) for i in np.random.default_rng(0).integers(0, cfg.model.vocab_size, 40)]
    return cfg, params, other, ids


def _runner(cfg, dtype, params, n=64, batch=1):
    return Runner(cache_for(cfg, dtype), params, max_seq_len=n, max_batch=batch)


def test_kl_of_a_dtype_against_itself_is_zero(tiny):
    cfg, params, _, ids = tiny
    r = kl_divergence(_runner(cfg, "bf16", params), _runner(cfg, "bf16", params), ids,
                      prefix=16, chunk=1)
    assert r.tokens_scored == len(ids) - 16
    assert r.kl == 0.0 and r.top1 == 1.0 and r.nll == r.ref_nll


def _direct(runner, ids):
    """Logits of a teacher-forced pass (f32 cache: nothing compressed, chunking changes only
    rounding)."""
    return np.concatenate([np.asarray(runner.step([0], [ids[i: i + 16]])[0, : len(ids[i: i + 16])],
                                      np.float64) for i in range(0, len(ids), 16)])


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("prefix, chunk", [(16, 1), (0, 8)])
def test_kl_against_another_model_matches_numpy(tiny, prefix, chunk):
    cfg, params, other, ids = tiny
    r = kl_divergence(_runner(cfg, "f32", params), _runner(cfg, "f32", other), ids,
                      prefix=prefix, chunk=chunk)
    p = _log_softmax(_direct(_runner(cfg, "f32", params), ids))
    q = _log_softmax(_direct(_runner(cfg, "f32", other), ids))
    first = max(prefix, 1)  # token t is scored from the logits of t - 1
    rows, targets = slice(first - 1, len(ids) - 1), np.array(ids[first:])
    kl = (np.exp(p[rows]) * (p[rows] - q[rows])).sum(-1)
    assert r.tokens_scored == len(targets)
    assert r.kl > 0.05
    np.testing.assert_allclose(r.kl, kl.mean(), rtol=1e-4)
    np.testing.assert_allclose(r.top1, (p[rows].argmax(-1) == q[rows].argmax(-1)).mean())
    nll = -q[rows][np.arange(len(targets)), targets]
    np.testing.assert_allclose(r.nll, nll.mean(), rtol=1e-5)
    # and the candidate's perplexity is exactly the `ppl` subcommand's
    ppl = perplexity(_runner(cfg, "f32", other), ids, prefix=prefix, chunk=chunk)
    np.testing.assert_allclose(r.nll, ppl.nll, rtol=1e-6)


def test_lockstep_candidates_match_one_at_a_time(tiny):
    cfg, params, _, ids = tiny
    both = compare(_runner(cfg, "bf16", params),
                   {d: _runner(cfg, d, params) for d in ("int4", "int8")}, ids, 16, 1)
    alone = kl_divergence(_runner(cfg, "bf16", params), _runner(cfg, "int8", params), ids, 16, 1)
    assert both["int8"] == alone
    assert 0 < both["int8"].kl < both["int4"].kl  # quantization shows, and more at fewer bits


@pytest.mark.parametrize("length", [300, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_passkey_prompt_puts_the_key_at_the_depth(length, depth):
    tok = byte_tokenizer()  # one token per byte: token positions are string offsets
    p = pk.build_prompt(tok, length, depth, "40713")
    text = tok.decode(p.ids)
    assert length - 22 <= len(p.ids) <= length  # within one filler sentence
    assert text.count("40713") == 2 and text.endswith("What is the pass key? The pass key is")
    assert tok.decode(p.ids[p.needle_pos:]).lstrip().startswith("The pass key is 40713.")
    assert tok.decode(p.ids[: p.needle_pos]).rstrip().endswith(("there.", "green.", "blue.",
                                                                "yellow.", "go.", "again."))
    start, end = p.filler_span
    needle = len("The pass key is 40713. Remember it. 40713 is the pass key. ")
    assert abs(p.needle_pos - (start + depth * (end - start - needle))) <= 22
    assert text[start:end].count("The grass is green.") >= (end - start - needle) // 100


def test_passkey_trials_are_seeded_per_length():
    tok = byte_tokenizer()
    a = pk.trial_prompts(tok, 400, 3, seed=5)
    assert [p.ids for p in a] == [p.ids for p in pk.trial_prompts(tok, 400, 3, seed=5)]
    assert len({p.key for p in a}) == 3 and all(len(p.key) == 5 for p in a)
    assert [p.key for p in a] != [p.key for p in pk.trial_prompts(tok, 400, 3, seed=6)]
    assert all(len(p.ids) <= 400 - pk.MAX_NEW_TOKENS for p in a)


@pytest.mark.parametrize("text, ok", [
    (" 40713.", True), ("40713 is the pass key", True), (" 40713\n", True),
    (" 4071", False), (" 407135", False), (" 40714.", False), (" 4 0713", False),
    (" the key is unknown", False), ("", False), (" 12 and 40713", False)])
def test_check_answer(text, ok):
    assert pk.check_answer(text, "40713") is ok


def test_batched_answers_equal_one_at_a_time():
    """Prompts of different lengths share a batch: a finished prompt's empty chunk is padding
    that must not touch its cache (here KIVI, whose pages seal from the window)."""
    cfg = TINY.replace_model(head_dim=32).replace_cache(window=-1)  # KIVI: 32-wide groups
    params = shared_params(cfg, models.random_params(cfg.model, seed=0))
    rng = np.random.default_rng(1)
    prompts = [[int(t) for t in rng.integers(0, 256, n)] for n in (150, 97, 140)]
    runner = _runner(cfg, "kivi4", params, 160, batch=3)
    batched = pk.answer_batch(runner, prompts, 5, chunk=64)
    for prompt, got in zip(prompts, batched, strict=True):  # same shapes: no empty chunks
        assert pk.answer_batch(runner, [prompt] * 3, 5, chunk=64) == [got] * 3


def test_sweep_writes_table_json_and_png(tiny, tmp_path):
    cfg, params, _, ids = tiny
    rows = run_sweep(cfg, params, byte_tokenizer(), ids, dtypes=["bf16", "int8"],
                     results_dir=tmp_path, prefix=16, chunk=4, passkey_lengths=[300, 320],
                     trials=1, passkey_chunk=16, log=lambda s: None)
    assert [r.dtype for r in rows] == ["bf16", "int8"]
    bf16, int8 = rows
    assert bf16.kl == 0.0 and bf16.top1 == 1.0 and bf16.dppl_pct == 0.0 and bf16.ratio == 1.0
    assert int8.kl > 0 and int8.ratio > 1.5
    ref = perplexity(_runner(cfg, "int8", params), ids, prefix=16, chunk=4).ppl
    np.testing.assert_allclose(int8.ppl, ref, rtol=1e-6)
    table = (tmp_path / "sweep.md").read_text().splitlines()
    body = [line for line in table if line.startswith("| ") and "dtype" not in line]
    assert [line.split("|")[1].strip() for line in body] == ["bf16", "int8"]
    header = next(line for line in table if line.startswith("| dtype"))
    assert "passkey 300" in header and "passkey 320" in header
    assert body[0].split("|")[5].strip() == "+0.00"  # Δppl of the reference
    assert body[1].split("|")[-2].strip() == f"{int8.passkey[320][0]}/1"
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["meta"]["tokens_scored"] == len(ids) - 16
    assert [r["dtype"] for r in saved["rows"]] == ["bf16", "int8"]

    # --resume keeps what is saved (2 ppl/kl rows, 4 passkey cells) and measures only int4
    logs = []
    again = run_sweep(cfg, params, byte_tokenizer(), ids, dtypes=["bf16", "int8", "int4"],
                      results_dir=tmp_path, prefix=16, chunk=4, passkey_lengths=[300], trials=1,
                      passkey_chunk=16, resume=True, log=logs.append)
    assert logs[0] == f"resume: kept 6 measurements from {tmp_path / 'sweep.json'}"
    assert again[:2] == rows
    assert again[2].kl > 0 and list(again[2].passkey) == [300]
    assert sum(line.startswith("int4 passkey 300") for line in logs) == 1
    assert not any(line.startswith(("bf16 passkey", "int8 passkey")) for line in logs)


def test_pareto_frontier_keeps_only_undominated_points():
    pts = [(100.0, 5.0, "a"), (50.0, 9.0, "b"), (80.0, 9.5, "c"), (80.0, 4.0, "d"),
           (200.0, 0.0, "ref"), (120.0, 4.0, "e"), (60.0, -1.0, "f")]
    # f (60 B, -1.0) beats every dearer point but the reference's 0 is not below -1: f ends it
    assert pareto_frontier(pts) == [(50.0, 9.0, "b"), (60.0, -1.0, "f")]
    assert [n for _, _, n in pareto_frontier([p for p in pts if p[2] != "f"])] == \
        ["b", "d", "ref"]  # c and a are dominated by d; e ties d's loss at more bytes


def test_sweep_plot_redraws_saved_results_and_rejects_bad_files(tiny, tmp_path):
    cfg, params, _, ids = tiny
    run_sweep(cfg, params, byte_tokenizer(), ids, dtypes=["bf16", "int8", "int4"],
              results_dir=tmp_path, prefix=16, chunk=4, passkey_lengths=[], log=lambda s: None)
    out = tmp_path / "two.png"
    assert sweep_plot.main([str(tmp_path / "sweep.json")] * 2 + ["--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "bad.json").write_text("{}")
    assert sweep_plot.main([str(tmp_path / "bad.json"), "--out", str(out)]) == 2


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "kvjax.eval", *args], cwd=ROOT,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                          text=True, timeout=300)


def test_cli_kl_runs_and_bad_input_is_one_line(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 3)
    tiny = ["--config", "tiny_llama", "--random-weights"]
    pool = ThreadPoolExecutor(4)
    bad = [pool.submit(_cli, *args) for args in [
        ("sweep", *tiny, "--text-file", str(text), "--dtypes", "bf16,nope"),
        ("passkey", *tiny, "--passkey-lengths", "1024"),  # past the tiny context of 512
        ("passkey", *tiny, "--passkey-lengths", "130")]]  # too short for the prompt
    ok = _cli("kl", *tiny, "--text-file", str(text), "--kv-cache-dtype", "int8", "--prefix",
              "64", "--max-tokens", "80", "--chunk", "1")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("kl ") and "scored 16 tokens" in ok.stdout, ok.stdout
    for r, needle in zip(bad, ["'nope'", "1024", "130"], strict=True):
        r = r.result()
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr
        assert needle in r.stderr, r.stderr


SMOLLM2_TEXT = "/usr/share/common-licenses/Apache-2.0"


def test_smollm2_passkey_at_1k():
    """The real model finds a key in ~1K tokens of filler with the bf16 cache (measured 3/3 at
    1K and at 2K), so the passkey comparison in the sweep is not vacuous."""
    from kvjax.config import load_config
    from kvjax.loaders import load

    cfg = load_config("smollm2")
    params, tok = load("smollm2", cfg.model)
    res = pk.passkey_accuracy(Runner(cfg, params, max_seq_len=1024, max_batch=2), tok,
                              lengths=[1024], trials=2, seed=0, batch=2)
    assert res[1024].correct == 2, res[1024].answers
