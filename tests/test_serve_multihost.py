"""One OpenAI endpoint over two processes x 4 CPU devices (data 2 x tensor 4, kvjax.launch):
completions, chat and streaming through the official openai client give the greedy outputs of a
one-device server with the same weights, and a seeded sampled request is the same on both."""

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
from kvjax.loaders.tokenizer import byte_tokenizer
from kvjax.serve import build

CFG = load_config("tiny_llama").replace_cache(dtype="f32")
MODEL = "tiny_llama"
ARGS = ["--config", "tiny_llama", "--random-weights", "--kv-cache-dtype", "f32",
        "--max-model-len", "48", "--max-num-seqs", "2", "--num-kv-pages", "40", "--warmup=false"]


def ask(c: openai.OpenAI) -> list:
    msgs = [{"role": "user", "content": "hi there"}]
    out = [c.completions.create(model=MODEL, prompt="hello", max_tokens=6,
                                temperature=0).choices[0].text,
           c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6,
                                     temperature=0).choices[0].message.content,
           "".join(ch.choices[0].text for ch in c.completions.create(
               model=MODEL, prompt="stream", max_tokens=6, temperature=0, stream=True)
               if ch.choices),
           c.completions.create(model=MODEL, prompt="seeded", max_tokens=6, temperature=1.0,
                                top_p=0.9, seed=7).choices[0].text]
    return out


@pytest.fixture(scope="module")
def one_device():
    # --random-weights uses seed 0 (kvjax.serve's --seed default), as here.
    params = models.random_params(CFG.model, seed=0)
    srv = build(CFG, params, byte_tokenizer(), EngineConfig(max_num_seqs=2, max_model_len=48,
                                                            num_pages=40), port=0)
    srv.start_background()
    yield ask(openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60))
    srv.close()


def test_two_processes_serve_the_one_device_outputs(one_device):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "kvjax.launch", "--num-processes", "2",
           "--cpu-devices-per-process", "4", "--module", "kvjax.serve", "--timeout", "600", "--",
           *ARGS, "--tensor-parallel", "4", "--data-parallel", "2", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
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
        assert "Mesh: data=2 x tensor=4 over 2 process(es)" in text, text[-3000:]
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        assert ask(c) == one_device
    finally:
        proc.send_signal(signal.SIGINT)  # launch's own cleanup stops both processes
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
