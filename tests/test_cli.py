"""The command-line tools, run as a user runs them: `python -m kvjax.<tool>` in a subprocess.

Every bad input must end as exit code 2 and exactly one `error: ...` line on stderr, never a
traceback. The good runs use the tiny configs with --random-weights, except the acceptance check
(SmolLM2 says "Paris"), which loads the embedded GGUF once.

The subprocesses are started together from one module fixture (a few at a time) so the file's wall
time is about that of its slowest run, not the sum of ~16 interpreter start-ups.
"""

import importlib.util
import os
import random
import re
import string
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GEN = ["-m", "kvjax.generate"]
TINY = [*GEN, "--config", "tiny_llama", "--random-weights"]
TINY_CONTEXT = 512  # configs/tiny.py max_position


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Future]:
    tmp = tmp_path_factory.mktemp("cli")
    garbage = tmp / "garbage.gguf"
    garbage.write_bytes(random.randbytes(4096))
    prompt_file = tmp / "prompt.txt"
    prompt_file.write_text("hello")
    long_prompt = "".join(random.choices(string.ascii_letters + " ", k=TINY_CONTEXT + 40))
    cases = {
        # The slow ones first, so the quick ones fill the other slots meanwhile.
        "paris": [*GEN, "--prompt", "The capital of France is", "--max-new-tokens", "8",
                  "--temperature", "0"],
        "tiny_generate": [*TINY, "--prompt", "hi", "--max-new-tokens", "4", "--temperature", "0"],
        # Past the 512-token context: StreamingLLM keeps the cache at its budget.
        "tiny_evict": [*TINY, "--prompt", "hi", "--max-new-tokens", "700", "--temperature", "0",
                       "--kv-eviction", "streaming", "--eviction-window", "64"],
        "memory_70b": ["-m", "kvjax.memory", "--config", "llama70b_bf16", "--context", "131072"],
        "plan70b_int4": ["-m", "kvjax.plan70b", "--weight-dtype", "int4", "--context", "8192",
                         "--cache-dtypes", "turbo3.5"],
        "memory_70b_int4": ["-m", "kvjax.memory", "--config", "llama70b_turbo", "--weight-dtype",
                            "int4", "--context", "131072"],
        "memory_70b_tpu": ["-m", "kvjax.memory", "--config", "llama70b_turbo", "--context",
                           "131072", "--target", "tpu-v5e", "--device-memory", "16"],
        "unknown_config": [*GEN, "--config", "nope", "--prompt", "hi"],
        "missing_weights": [*GEN, "--config", "tiny_llama", "--weights",
                            str(tmp / "no-such-file.gguf"), "--prompt", "hi"],
        "garbage_weights": [*GEN, "--config", "tiny_llama", "--weights", str(garbage),
                            "--prompt", "hi"],
        "negative_temperature": [*TINY, "--prompt", "hi", "--temperature", "-1"],
        "top_p_2": [*TINY, "--prompt", "hi", "--top-p", "2"],
        "page_size_3": [*TINY, "--prompt", "hi", "--page-size", "3"],
        "prompt_too_long": [*TINY, "--prompt", long_prompt, "--max-new-tokens", "1"],
        "max_new_tokens_abc": [*TINY, "--prompt", "hi", "--max-new-tokens", "abc"],
        "unknown_flag": [*TINY, "--prompt", "hi", "--no-such-flag", "1"],
        "eval_unknown_command": ["-m", "kvjax.eval", "nope"],
        "memory_unknown_config": ["-m", "kvjax.memory", "--config", "nope"],
        "prompt_and_prompt_file": [*TINY, "--prompt", "hi", "--prompt-file", str(prompt_file)],
        "no_weights_70b": [*GEN, "--config", "llama70b_turbo", "--prompt", "hi"],
        "help_generate": [*GEN, "--help"],
        "help_eval": ["-m", "kvjax.eval", "passkey", "-h"],
    }
    with ThreadPoolExecutor(max_workers=3) as pool:
        yield {name: pool.submit(run_cli, args) for name, args in cases.items()}


def assert_user_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, stderr exactly one line `error: ...` (naming each needle), no traceback."""
    everything = r.stdout + r.stderr
    assert "Traceback" not in everything, everything
    assert r.returncode == 2, (r.returncode, everything)
    assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.endswith("\n"), r.stderr
    for needle in needles:
        assert needle in r.stderr, (needle, r.stderr)
    return r.stderr


@pytest.mark.parametrize("case, needles", [
    ("unknown_config", ["'nope'", "tiny_llama"]),  # names the bad one and lists the good ones
    ("missing_weights", ["no-such-file.gguf"]),
    ("garbage_weights", ["garbage.gguf"]),
    ("negative_temperature", ["temperature"]),
    ("top_p_2", ["top_p"]),
    ("page_size_3", ["page_size"]),
    ("prompt_too_long", [str(TINY_CONTEXT)]),
    ("max_new_tokens_abc", ["max_new_tokens", "abc"]),
    ("unknown_flag", ["no_such_flag"]),
    ("eval_unknown_command", ["ppl"]),
    ("memory_unknown_config", ["'nope'"]),
    ("prompt_and_prompt_file", ["--prompt", "--prompt-file"]),
])
def test_bad_input_is_one_line_and_exit_2(runs, case, needles):
    assert_user_error(runs[case].result(), *needles)


@pytest.mark.parametrize("case, needles", [
    ("help_generate", ["Generate text", "--max_new_tokens", "--kv_cache_dtype", "--prompt"]),
    ("help_eval", ["kvjax.eval", "--passkey_lengths", "--text_file", "--kv_cache_dtype"]),
])
def test_help_lists_the_tools_own_flags(runs, case, needles):
    """`--help` prints the tool's docstring and its flags (not absl's logging ones), exit 0."""
    r = runs[case].result()
    assert r.returncode == 0 and "Traceback" not in r.stdout + r.stderr, r.stderr
    for needle in needles:
        assert needle in r.stdout, (needle, r.stdout[:400])
    assert "--verbosity" not in r.stdout and "--logtostderr" not in r.stdout


def test_config_without_weights_prints_plan_then_names_flags(runs):
    r = runs["no_weights_70b"].result()
    assert_user_error(r, "--weights", "--random-weights")
    # turbo3.5 at head_dim 128: 3.5 bits x 128 = 56 bytes of codes for K and for V, plus an fp16
    # norm |x| per channel group (two groups) for each (keys are TurboQuant_mse since 6dba20b:
    # no QJL residual norm).
    per_token = (56 + 2 * 2 + 56 + 2 * 2) * 8 * 80
    assert "KV cache size" in r.stdout and f"KV bytes per token: {per_token:,}" in r.stdout


def test_memory_plan_llama70b_bf16(runs):
    r = runs["memory_70b"].result()
    assert r.returncode == 0, r.stderr
    per_token = 2 * 80 * 8 * 128 * 2  # K and V x layers x KV heads x head_dim x bf16 bytes
    assert per_token == 327_680
    assert f"KV bytes per token: {per_token:,}" in r.stdout
    per_request = per_token * 131_072
    line = next(s for s in r.stdout.splitlines() if s.startswith("KV bytes per request"))
    assert f"{per_request:,}" in line and "(42.95 GB)" in line, line


def test_memory_plan_llama70b_int4_weights(runs):
    """Projections at 0.5 byte + an f32 scale and min per 32 weights, the rest bf16; the
    concurrency is what is left of 8 x 80 GiB x 0.9 after them and 1 GiB per device."""
    r = runs["memory_70b_int4"].result()
    assert r.returncode == 0, r.stderr
    proj = 80 * (8192 * 128 * (64 * 2 + 8 * 2) + 3 * 8192 * 28672)
    weights = proj * (0.5 + 8 / 32) + (70_553_706_496 - proj) * 2
    assert f"{weights / 1e9:.2f} GB in bf16 with int4 projections ({proj:,} params)" in r.stdout
    lines = r.stdout.splitlines()
    per_request = int(next(s for s in lines if s.startswith("KV bytes per request"))
                      .split(": ")[1].split()[0].replace(",", ""))
    pool = 80 * 2**30 * 8 * 0.9 - weights - 8 * 2**30
    assert f"Maximum concurrency for 131,072 tokens per request: {pool / per_request:.2f}x" in (
        r.stdout)


def test_memory_plan_counts_what_a_tpu_stores(runs):
    """--target tpu-v5e: the pool as the TPU lays it out (pool_formats.resident_bytes, compiled
    without a TPU): turbo3.5's narrow code leaves take 4.3x their logical bytes there, a little
    more than bf16's own. Without libtpu: a one-line error naming the extra."""
    r = runs["memory_70b_tpu"].result()
    if importlib.util.find_spec("libtpu") is None:
        assert r.returncode != 0 and "compile extra" in r.stderr, r.stderr
        return
    assert r.returncode == 0, r.stderr
    line = next(s for s in r.stdout.splitlines() if s.startswith("KV bytes per token"))
    stored = int(line.split(": ")[1].split()[0].replace(",", ""))
    logical = 76_800  # turbo3.5 at head_dim 128, 80 layers x 8 KV heads (test above)
    assert f"as tpu-v5e stores it ({stored / logical:.2f}x the logical 76,800" in line, line
    assert 4.0 * logical < stored < 4.6 * logical
    per_request = int(next(s for s in r.stdout.splitlines()
                           if s.startswith("KV bytes per request")).split(": ")[1].split()[0]
                      .replace(",", ""))
    assert per_request >= stored * 131_072  # the stored bytes carry into the capacity lines


def test_plan70b_int4_compiled_weights_equal_planner(runs):
    """The 70B decode step compiled for 8 fake devices with int4 weights holds per device what
    the planner counts (weights / devices)."""
    r = runs["plan70b_int4"].result()
    assert r.returncode == 0, r.stderr[-2000:]
    def row(label: str) -> float:
        return float(next(s for s in r.stdout.splitlines() if s.startswith(label)).split()[-1])

    compiled, planned = row("weights (compiled arguments)"), row("planner: weights / devices")
    assert abs(compiled / planned - 1) < 0.01, (compiled, planned)
    assert 6.5 < compiled < 7.5  # vs 17.6 GB of bf16 weights per device


def test_generate_tiny_random_weights(runs):
    r = runs["tiny_generate"].result()
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    stats = [s for s in r.stderr.splitlines() if s.startswith("[stats]")]
    assert len(stats) == 1, r.stderr
    s = stats[0]
    # "hi" is 2 tokens under the byte tokenizer; 2 layers x 2 KV heads x 16 x 2 (K, V) x 4 bytes.
    assert "prompt tokens 2" in s and "tok/s" in s and "(4 tokens)" in s, s
    assert f"{2 * 2 * 2 * 16 * 4:,} bytes/token" in s, s


def test_generate_with_eviction_runs_past_the_context_in_a_flat_cache(runs):
    r = runs["tiny_evict"].result()
    assert r.returncode == 0, r.stderr
    s = next(s for s in r.stderr.splitlines() if s.startswith("[stats]"))
    m = re.search(r"(\d+) tokens in .* evicted (\d+) tokens \| KV in use ([\d,]+) bytes "
                  r"\(peak ([\d,]+); budget (\d+) pages = ([\d,]+) bytes\)", s)
    assert m, s
    generated, evicted, last, peak, _, budget = (int(g.replace(",", "")) for g in m.groups())
    assert generated == 700 and evicted >= 700 + 2 - TINY_CONTEXT, s
    assert 0 < last <= peak <= budget, s
    # f32 tiny_llama: 512 bytes/token; sinks (one 16-token page) + 64-token window + the page
    # being filled is all a session holds after its first eviction.
    assert last <= (16 + 64 + 16) * 512, s


def test_generate_smollm2_says_paris(runs):
    """The acceptance check: the embedded SmolLM2, greedy, knows the capital of France."""
    r = runs["paris"].result()
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout, r.stdout
    assert "[stats] prompt tokens 5" in r.stderr, r.stderr
