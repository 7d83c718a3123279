"""The OpenAI-compatible server, driven by the official `openai` client over loopback: completions,
chat, streaming, 32 concurrent greedy requests, prefix-cache accounting, metrics, and a 400 for
every kind of bad request while the server keeps serving."""

import http.client
import json
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest

import models
from kvjax.config import load_config
from kvjax.engine import EngineConfig
from tests.serving import client_for, running_server

CFG = load_config("tiny_llama")
MAX_LEN = 160
MODEL = "tiny_llama"


@pytest.fixture(scope="module")
def server():
    params = models.random_params(CFG.model, seed=0)
    ecfg = EngineConfig(max_num_seqs=32, max_model_len=MAX_LEN, num_pages=700,
                        enable_prefix_caching=True)
    with running_server(CFG, params, ecfg) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return client_for(server.url)


def prompts(n: int) -> list[str]:
    rng = np.random.default_rng(7)
    words = ["alpha", "beta", "gamma", "delta", "kv", "cache", "page", "jax", "tok"]
    return [" ".join(rng.choice(words, size=rng.integers(2, 12))) for _ in range(n)]


def test_completion_and_usage(client):
    r = client.completions.create(model=MODEL, prompt="hello world", max_tokens=8,
                                  temperature=0)
    assert r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].finish_reason == "length" and isinstance(r.choices[0].text, str)
    assert r.usage.prompt_tokens == len("hello world") and r.usage.completion_tokens == 8
    again = client.completions.create(model=MODEL, prompt="hello world", max_tokens=8,
                                      temperature=0)
    assert again.choices[0].text == r.choices[0].text
    assert client.models.list().data[0].id == MODEL


def test_streaming_completion_matches_non_streaming(client):
    full = client.completions.create(model=MODEL, prompt="stream me", max_tokens=12,
                                     temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt="stream me", max_tokens=12,
                                             temperature=0, stream=True,
                                             stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_chat_and_streaming_chat(client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10,
                                            temperature=0, stream=True)
    parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(parts) == r.choices[0].message.content


def test_32_concurrent_greedy_requests_equal_alone(client):
    ps = prompts(32)

    def one(p):
        return client.completions.create(model=MODEL, prompt=p, max_tokens=10,
                                         temperature=0).choices[0].text

    alone = [one(p) for p in ps]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(one, ps))
    assert together == alone


def test_prefix_cache_hits_are_reported(client, server):
    stem = "You are a helpful assistant. Answer in one word. " * 2
    a = client.completions.create(model=MODEL, prompt=stem + "Q1", max_tokens=4, temperature=0)
    b = client.completions.create(model=MODEL, prompt=stem + "Q2?", max_tokens=4, temperature=0)
    assert a.usage.prompt_tokens_details.cached_tokens < len(stem)
    assert b.usage.prompt_tokens_details.cached_tokens >= len(stem) // 8 * 8 - 8
    metrics = urllib.request.urlopen(server.url + "/metrics").read().decode()
    hits = [line for line in metrics.splitlines()
            if line.startswith("kvjax:prefix_cache_hits_total")]
    assert hits and float(hits[0].split()[-1]) > 0


def test_metrics_and_health(server, client):
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=3, temperature=0)
    assert urllib.request.urlopen(server.url + "/health").status == 200
    resp = urllib.request.urlopen(server.url + "/metrics")
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = resp.read().decode()
    for name in ("kvjax:kv_cache_usage_perc{", "kvjax:prefix_cache_queries_total{",
                 "kvjax:prefix_cache_hits_total{", "kvjax:num_requests_running{",
                 "kvjax:num_requests_waiting{", "kvjax:time_to_first_token_seconds_bucket{",
                 "kvjax:inter_token_latency_seconds_bucket{", "kvjax:num_preemptions_total{"):
        assert name in text, name
    count = [ln for ln in text.splitlines()
             if ln.startswith("kvjax:time_to_first_token_seconds_count")]
    assert float(count[0].split()[-1]) >= 1


def post(server, path: str, body: bytes, headers=None) -> tuple[int, dict]:
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json",
                                                   **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data) if data else {}


BAD = [
    ("/v1/completions", b"{not json"),
    ("/v1/completions", b"[1, 2]"),
    ("/v1/completions", json.dumps({"model": MODEL}).encode()),  # no prompt
    ("/v1/completions", json.dumps({"prompt": "hi"}).encode()),  # no model
    ("/v1/chat/completions", json.dumps({"model": MODEL}).encode()),  # no messages
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": "hi"}).encode()),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": [{"content": 1}]}).encode()),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 0}).encode()),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": -5}).encode()),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "hi",
                                    "max_tokens": 10**9}).encode()),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "hi",
                                    "max_tokens": "ten"}).encode()),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x" * (MAX_LEN + 5)}).encode()),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": [1, 2, 999]}).encode()),
    ("/v1/completions", json.dumps({"model": "gpt-9", "prompt": "hi"}).encode()),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", "temperature": -1}).encode()),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", "n": 0}).encode()),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "", "max_tokens": 2}).encode()),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "hi",
                                    "kv_eviction": {"policy": "lru"}}).encode()),
]


def test_each_bad_request_gets_a_400_and_the_server_keeps_serving(server, client):
    for path, body in BAD:
        status, err = post(server, path, body)
        assert status == 400, (body, status, err)
        assert set(err["error"]) >= {"message", "type", "param", "code"}, err
        assert err["error"]["type"] == "invalid_request_error"
    # The client sees them as BadRequestError, with the message.
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt="x" * (MAX_LEN + 5), max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "a"}])
    # Garbage on the socket: the connection gets an error, the server lives on.
    host, port = server.server_address[:2]
    import socket

    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"\x00\x01garbage\r\n\r\n")
        s.recv(1024)
    status, _ = post(server, "/v1/nowhere", b"{}")
    assert status == 404
    r = client.completions.create(model=MODEL, prompt="still alive", max_tokens=3)
    assert r.usage.completion_tokens == 3


def test_stop_strings_and_disconnect(server, client):
    full = client.completions.create(model=MODEL, prompt="abc", max_tokens=20,
                                     temperature=0).choices[0].text
    if len(full) > 6:
        stop = full[3:5]
        r = client.completions.create(model=MODEL, prompt="abc", max_tokens=20, temperature=0,
                                      stop=[stop])
        assert r.choices[0].finish_reason == "stop"
        assert r.choices[0].text == full[: full.find(stop)]
    # A streaming client that hangs up: its request is aborted and its pages come back.
    stream = client.completions.create(model=MODEL, prompt="bye", max_tokens=100, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    deadline = time.time() + 30
    while time.time() < deadline and server.engine.pools["default"].bm.num_used:
        time.sleep(0.1)
    assert server.engine.pools["default"].bm.num_used == 0


def test_command_line_server_logs_capacity_and_serves(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "kvjax.serve", "--config", "tiny_llama", "--random-weights",
           "--host", "127.0.0.1", "--port", "0", "--max-model-len", "64", "--num-kv-pages", "33",
           "--max-num-seqs", "4", "--enable-prefix-caching", "--kv-cache-dtype", "f32",
           "--warmup=false"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        lines, url = [], None
        deadline = time.time() + 120
        while url is None and time.time() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "Serving" in line:
                url = line.split(" on ")[1].split()[0]
        text = "".join(lines)
        assert "KV cache size: 256 tokens" in text, text
        assert "Maximum concurrency for 64 tokens per request: 4.00x" in text, text
        assert url, text
        c = client_for(url, timeout=600)  # the openai client's own default
        assert c.completions.create(model="tiny_llama", prompt="hi",
                                    max_tokens=2).usage.completion_tokens == 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "kvjax.serve", "--config", "nope"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: unknown config")
