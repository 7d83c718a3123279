"""The HTTP contract: /openapi.json fuzzed by schemathesis (no 5xx, no hang), a 400 naming the field
for each unknown, mistyped or unsupported field, 503 "loading" on every route before the engine is
ready, and an engine error that fails one request (500, counted as a failure) while the server
keeps serving."""

import json
import urllib.error
import urllib.request

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig

import models
from kvjax.config import load_config
from kvjax.engine import EngineConfig
from kvjax.serve import Server
from kvjax.server.app import State
from tests.serving import running_server

CFG = load_config("tiny_llama")
MODEL = "tiny_llama"


@pytest.fixture(scope="module")
def server():
    params = models.random_params(CFG.model, seed=0)
    ecfg = EngineConfig(max_num_seqs=16, max_model_len=48, num_pages=200)
    with running_server(CFG, params, ecfg) as srv:
        yield srv


def call(url: str, body=None, method: str | None = None, timeout: float = 60):
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw.decode()


def completion(**kw) -> dict:
    return {"model": MODEL, "prompt": "hi", "max_tokens": 2, **kw}


def chat(**kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw}


# (path, body, the field the 400 must name, a word the message must contain)
NAMED = [
    ("completions", completion(foo=1), "foo", "unknown"),
    ("chat/completions", chat(tools=[{"type": "function"}]), "tools", "not supported"),
    ("chat/completions", chat(tool_choice="auto"), "tool_choice", "not supported"),
    ("chat/completions", chat(response_format={"type": "json_object"}), "response_format",
     "not supported"),
    ("completions", completion(suffix="x"), "suffix", "not supported"),
    ("completions", completion(temperature="hot"), "temperature", "temperature"),
    ("completions", completion(max_tokens="10"), "max_tokens", "integer"),
    ("completions", completion(n=1.5), "n", "n"),
    ("completions", completion(presence_penalty=3.0), "presence_penalty", "2"),
    ("completions", completion(frequency_penalty=-2.5), "frequency_penalty", "-2"),
    ("completions", completion(repetition_penalty=0), "repetition_penalty", "0"),
    ("completions", completion(logit_bias={"5": 101}), "logit_bias.5", "100"),
    ("completions", completion(logit_bias={"999999": 1}), "logit_bias", "vocabulary"),
    ("completions", completion(logit_bias={"x": 1}), "logit_bias", "token id"),
    ("completions", completion(logprobs=21), "logprobs", "20"),
    ("completions", completion(logprobs=1, echo=True), "echo", "echo"),
    ("completions", completion(best_of=3), "best_of", "best_of"),
    ("completions", completion(min_tokens=5), "min_tokens", "max_tokens"),
    ("completions", completion(seed="1"), "seed", "integer"),
    ("completions", completion(top_p=0), "top_p", "0"),
    ("completions", completion(n=17), "n", "16"),
    ("completions", completion(stop=["a", "b", "c", "d", "e"]), "stop", "stop"),
    ("completions", completion(stream_options={"include_usage": 1}), "stream_options"
     ".include_usage", "boolean"),
    ("completions", completion(kv_precision="half"), "kv_precision", "full"),
    ("completions", completion(max_tokens=1000), "max_tokens", "context length"),
    ("completions", {"model": MODEL}, "prompt", "missing"),
    ("chat/completions", chat(top_logprobs=2), "top_logprobs", "logprobs"),
    ("chat/completions", chat(messages=[{"role": "robot", "content": "x"}]), "messages.0.role",
     "system"),
    ("chat/completions", chat(messages=[{"role": "user", "content": "x", "tool_calls": []}]),
     "messages.0.tool_calls", "unknown"),
    ("chat/completions", chat(messages=[]), "messages", "at least 1"),
    ("chat/completions", chat(model="gpt-9"), "model", "does not exist"),
]


@pytest.mark.parametrize("path,body,param,word", NAMED)
def test_400_names_the_field(server, path, body, param, word):
    status, err = call(f"{server.url}/v1/{path}", body)
    assert status == 400, (body, status, err)
    e = err["error"]
    assert e["param"] == param, e
    assert e["type"] == "invalid_request_error"
    assert word.lower() in e["message"].lower(), e


def test_bad_bodies_and_routes(server):
    for raw in (b"{not json", b"[1, 2]", b'"text"', b""):
        status, err = call(f"{server.url}/v1/completions", raw or b"{}", method="POST")
        assert status == 400 and err["error"]["type"] == "invalid_request_error", (raw, err)
    status, err = call(f"{server.url}/v1/nowhere", b"{}")
    assert status == 404 and err["error"]["code"] == "not_found"
    status, err = call(f"{server.url}/v1/completions")  # GET on a POST route
    assert status == 405 and "error" in err


def test_openapi_schema_lists_the_fields(server):
    status, schema = call(server.url + "/openapi.json")
    assert status == 200
    comps = schema["components"]["schemas"]
    props = comps["CompletionRequest"]["properties"]
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
                 "logprobs", "n", "min_tokens", "seed", "top_k", "kv_precision", "kv_eviction"):
        assert name in props, name
    assert comps["CompletionRequest"]["additionalProperties"] is False
    assert "top_logprobs" in comps["ChatCompletionRequest"]["properties"]


def test_every_route_answers_503_while_loading():
    srv = Server(State(MODEL), port=0)
    srv.serve_background()
    try:
        for path, body in (("/health", None), ("/v1/models", None), ("/metrics", None),
                           ("/v1/completions", completion())):
            status, err = call(srv.url + path, body, timeout=10)
            assert status == 503 and err["error"]["code"] == "loading", (path, status, err)
        assert call(srv.url + "/openapi.json", timeout=10)[0] == 200
    finally:
        srv.close()


def test_engine_error_fails_that_request_only(server, monkeypatch):
    eng = server.engine
    real = eng.step

    def step():
        if any(r.prompt_ids[:4] == list(b"boom") for p in eng.pools.values()
               for r in (*p.running, *p.waiting)):
            raise RuntimeError("injected failure")
        return real()

    monkeypatch.setattr(eng, "step", step)
    status, err = call(server.url + "/v1/completions", completion(prompt="boom"))
    assert status == 500 and err["error"]["type"] == "internal_error", err
    status, ok = call(server.url + "/v1/completions", completion(prompt="fine", temperature=0))
    assert status == 200 and ok["usage"]["completion_tokens"] == 2
    text = call(server.url + "/metrics")[1]
    failed = [ln for ln in text.splitlines() if ln.startswith("kvjax:request_failure_total")]
    assert failed and float(failed[0].split()[-1]) >= 1, text


# Fuzzing phase only (the coverage phase enumerates hundreds of boundary bodies: minutes on CPU),
# seeded and derandomized so every run sends the same requests.
ST_CONFIG = SchemathesisConfig.from_str("""
seed = 11
[phases.coverage]
enabled = false
[generation]
max-examples = 30
mode = "all"
deterministic = true
database = "none"
""")


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json", config=ST_CONFIG)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=30, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_schemathesis_no_server_error_no_hang(case):
    # A hang would exceed the timeout and fail; a 5xx fails not_a_server_error.
    case.call_and_validate(checks=[not_a_server_error], timeout=60)
