"""One OpenAI endpoint over two processes (kvjax.launch, CPU devices): completions, chat and
streaming through the official openai client give the greedy outputs of a one-device server with
the same weights, and a seeded sampled request is the same on both. Two meshes, as the heads allow:

* tiny_llama_kv4 (8 query / 4 KV heads): 2 processes x 4 devices, data 2 x tensor 4 (the KV heads
  split 4 ways);
* SmolLM2 (9 query / 3 KV heads, its real weights cut to 4 layers, its own tokenizer):
  2 processes x 3 devices, data 2 x tensor 3. Real weights, because SmolLM2 ties its embeddings
  and random tied weights make every greedy token repeat the last prompt token.

The caches are f32: the meshes reduce in another order than one device, and bf16 pages could
round a near-tie the other way."""

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import openai
import pytest

import models
from kvjax.config import load_config
from kvjax.engine import EngineConfig
from kvjax.launch import free_port
from kvjax.loaders import load
from kvjax.loaders.tokenizer import byte_tokenizer
from kvjax.serve import build

COMMON = ["--kv-cache-dtype", "f32", "--max-model-len", "48", "--max-num-seqs", "2",
          "--num-kv-pages", "40", "--warmup=false"]
CASES = {
    # name: (config, extra serve flags, devices per process, data, tensor)
    "tiny_llama_kv4": ("tiny_llama_kv4", ["--random-weights"], 4, 2, 4),
    "smollm2": ("smollm2", ["--num-layers", "4"], 3, 2, 3),
}


def ask(c: openai.OpenAI, model: str) -> list:
    msgs = [{"role": "user", "content": "hi there"}]
    out = [c.completions.create(model=model, prompt="hello", max_tokens=6,
                                temperature=0).choices[0].text,
           c.chat.completions.create(model=model, messages=msgs, max_tokens=6,
                                     temperature=0).choices[0].message.content,
           "".join(ch.choices[0].text for ch in c.completions.create(
               model=model, prompt="stream", max_tokens=6, temperature=0, stream=True)
               if ch.choices),
           c.completions.create(model=model, prompt="seeded", max_tokens=6, temperature=1.0,
                                top_p=0.9, seed=7).choices[0].text]
    return out


def one_device(name: str) -> list:
    config, extra = CASES[name][:2]
    cfg = load_config(config).replace_cache(dtype="f32")
    if "--random-weights" in extra:
        # --random-weights uses seed 0 (kvjax.serve's --seed default), as here.
        params, tok = models.random_params(cfg.model, seed=0), byte_tokenizer()
    else:
        cfg = cfg.replace_model(num_layers=int(extra[extra.index("--num-layers") + 1]))
        params, tok = load(cfg.weights, cfg.model)
    srv = build(cfg, params, tok, EngineConfig(max_num_seqs=2, max_model_len=48, num_pages=40),
                port=0)
    srv.start_background()
    try:
        return ask(openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0,
                                 timeout=120), srv.model_name)
    finally:
        srv.close()


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_serve_the_one_device_outputs(name):
    config, extra, devices, data, tensor = CASES[name]
    expected = one_device(name)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "kvjax.launch", "--num-processes", "2",
           "--cpu-devices-per-process", str(devices), "--module", "kvjax.serve", "--timeout",
           "600", "--", "--config", config, *extra, *COMMON, "--tensor-parallel", str(tensor),
           "--data-parallel", str(data), "--port", str(port)]
    # Own process group: the finally below can stop the servers even if the launcher dies first
    # (fresh CI left both server processes running after this test).
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    lines = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "Serving" in line:
                break
        threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
        text = "".join(lines)
        assert "Serving" in text, text[-3000:]
        assert f"Mesh: data={data} x tensor={tensor} over 2 process(es)" in text, text[-3000:]
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        got = ask(c, config)
        assert got == expected
        assert len(set(got[0])) > 1, got  # not a degenerate repeat of one character
    finally:
        proc.send_signal(signal.SIGINT)  # launch's own cleanup stops both processes
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left
