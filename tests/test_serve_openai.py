"""OpenAI sampling fields through the official client, checked against a numpy reference of the same
logits (a dense forward of the tiny f32 model over prompt + the server's output): logprobs and
top_logprobs, presence/frequency/repetition penalties (OpenAI's formula, vLLM's repetition),
logit_bias, min_tokens, n, seed (reproducible alone and among concurrent requests), streaming with
logprobs, echo, and a non-streaming client that hangs up."""

import time
from concurrent.futures import ThreadPoolExecutor

import jax.numpy as jnp
import numpy as np
import openai
import pytest

import models
from kvjax.config import load_config
from kvjax.engine import EngineConfig
from tests.serving import client_for, running_server
from tests.test_model import dense_forward

CFG = load_config("tiny_llama")  # f32 cache: the paged logits equal the dense ones to ~1e-5
MODEL = "tiny_llama"
V = CFG.model.vocab_size


@pytest.fixture(scope="module")
def params():
    return models.random_params(CFG.model, seed=3)


@pytest.fixture(scope="module")
def server(params):
    ecfg = EngineConfig(max_num_seqs=4, max_model_len=512, num_pages=600)  # few shapes
    with running_server(CFG, params, ecfg) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return client_for(server.url)


def ids_of(choice) -> list[int]:
    return [int(t.split(":")[1]) for t in choice.logprobs.tokens]


def complete(client, prompt: str, **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    extra = {"return_tokens_as_token_ids": True, **kw.pop("extra_body", {})}
    return client.completions.create(model=MODEL, prompt=prompt, logprobs=kw.pop("logprobs", 0),
                                     extra_body=extra, **kw)


def ref_logprobs(params, prompt: list[int], out: list[int]) -> np.ndarray:
    """[len(out), V] float64 log-softmax of the logits that chose each output token."""
    seq = jnp.asarray([prompt + out[:-1]], jnp.int32)
    logits = np.asarray(dense_forward(CFG.model, params, seq)[0], np.float64)
    logits = logits[len(prompt) - 1:]
    return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)


def ref_logits(params, prompt: list[int], out: list[int]) -> np.ndarray:
    seq = jnp.asarray([prompt + out[:-1]], jnp.int32)
    return np.asarray(dense_forward(CFG.model, params, seq)[0], np.float64)[len(prompt) - 1:]


def test_logprobs_and_top_logprobs_equal_the_dense_reference(client, params):
    prompt = "the cache pages"
    r = complete(client, prompt, logprobs=4)
    c = r.choices[0]
    out = ids_of(c)
    assert len(out) == 12 and len(c.logprobs.top_logprobs) == 12
    ref = ref_logprobs(params, list(prompt.encode()), out)
    for t, tok in enumerate(out):
        assert tok == int(np.argmax(ref[t])) or ref[t].max() - ref[t, tok] < 1e-4  # greedy
        np.testing.assert_allclose(c.logprobs.token_logprobs[t], ref[t, tok], atol=2e-4)
        top = c.logprobs.top_logprobs[t]
        want = np.argsort(-ref[t], kind="stable")[:4]
        assert len(top) == 4
        for k in want:
            if ref[t, want[-1]] - ref[t, np.argsort(-ref[t])[4]] > 1e-4:  # no tie at the edge
                np.testing.assert_allclose(top[f"token_id:{k}"], ref[t, k], atol=2e-4)
    assert c.logprobs.text_offset[0] == 0


def test_penalties_follow_the_openai_formula_on_reference_logits(client, params):
    prompt = "aaaa bbbb"
    plain = ids_of(complete(client, prompt, max_tokens=24).choices[0])
    kw = dict(presence_penalty=1.5, frequency_penalty=0.5,
              extra_body={"repetition_penalty": 1.3})
    out = ids_of(complete(client, prompt, max_tokens=24, **kw).choices[0])
    assert out != plain  # the penalties changed the output (the check below is not vacuous)
    p_ids = list(prompt.encode())
    logits = ref_logits(params, p_ids, out)
    in_prompt = np.zeros(V, bool)
    in_prompt[p_ids] = True
    counts = np.zeros(V)
    checked = 0
    for t, tok in enumerate(out):
        x = logits[t].copy()
        seen = (counts > 0) | in_prompt
        x[seen] = np.where(x[seen] > 0, x[seen] / 1.3, x[seen] * 1.3)
        x = x - counts * 0.5 - (counts > 0) * 1.5
        top2 = np.sort(x)[-2:]
        if top2[1] - top2[0] > 1e-3:
            assert tok == int(np.argmax(x)), t
            checked += 1
        counts[tok] += 1
    assert checked >= 20


def test_logit_bias_and_min_tokens(client, params):
    prompt = "bias me"
    r = complete(client, prompt, max_tokens=5, logit_bias={"65": 100})
    assert r.choices[0].text == "AAAAA"
    plain = ids_of(complete(client, prompt, max_tokens=3).choices[0])
    banned = complete(client, prompt, max_tokens=3, logit_bias={str(plain[0]): -100})
    first = ids_of(banned.choices[0])[0]
    ref = ref_logits(params, list(prompt.encode()), [first])[0]
    ref[plain[0]] = -np.inf
    assert first == int(np.argmax(ref))
    # The greedy first token as a stop token: stops at once, unless min_tokens holds it off.
    stop = complete(client, prompt, max_tokens=6, extra_body={"stop_token_ids": [plain[0]]})
    assert stop.choices[0].finish_reason == "stop" and stop.usage.completion_tokens == 1
    assert stop.choices[0].text == ""
    held = complete(client, prompt, max_tokens=6,
                    extra_body={"stop_token_ids": [plain[0]], "min_tokens": 4})
    got = ids_of(held.choices[0])
    assert len(got) >= 4 and plain[0] not in got[:4]


def test_n_and_seed(client):
    kw = dict(max_tokens=10, temperature=1.0, top_p=0.95)
    r = complete(client, "seeded", n=3, seed=5, **kw)
    outs = [ids_of(c) for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1, 2] and len({tuple(o) for o in outs}) > 1
    for i, o in enumerate(outs):  # choice i is the request with seed + i
        assert ids_of(complete(client, "seeded", seed=5 + i, **kw).choices[0]) == o
    assert r.usage.completion_tokens == 30
    greedy = complete(client, "twice", n=2, max_tokens=6)
    assert greedy.choices[0].text == greedy.choices[1].text

    # A seeded request gives the same tokens among concurrent sampled requests.
    def one(p, seed=None):
        return ids_of(complete(client, p, seed=seed, **kw).choices[0])

    alone = one("seeded", 5)
    with ThreadPoolExecutor(6) as pool:
        futs = [pool.submit(one, f"noise {i}") for i in range(5)]
        together = pool.submit(one, "seeded", 5)
        [f.result() for f in futs]
    assert together.result() == alone == outs[0]


def test_chat_logprobs_streaming_and_echo(client):
    msgs = [{"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 8 and all(len(e.top_logprobs) == 2 for e in content)
    assert all(e.logprob <= 0 and e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in content)
    stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8,
                                            temperature=0, logprobs=True, top_logprobs=2,
                                            stream=True)
    parts, lps = [], []
    for ch in stream:
        if ch.choices:
            parts.append(ch.choices[0].delta.content or "")
            if ch.choices[0].logprobs and ch.choices[0].logprobs.content:
                lps += [e.logprob for e in ch.choices[0].logprobs.content]
    assert "".join(parts) == r.choices[0].message.content
    np.testing.assert_allclose(lps, [e.logprob for e in content], atol=1e-6)
    # n > 1 streams interleave their choices; each one's text equals its non-streaming twin.
    chunks = list(client.completions.create(model=MODEL, prompt="two", max_tokens=5, n=2,
                                            temperature=0, stream=True))
    texts = ["", ""]
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] += c.text
    full = client.completions.create(model=MODEL, prompt="two", max_tokens=5, temperature=0)
    assert texts == [full.choices[0].text] * 2
    echo = client.completions.create(model=MODEL, prompt="two", max_tokens=5, temperature=0,
                                     echo=True)
    assert echo.choices[0].text == "two" + full.choices[0].text


def test_non_streaming_client_that_hangs_up_frees_its_request(server):
    impatient = client_for(server.url, timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model=MODEL, prompt="long", max_tokens=500,
                                     extra_body={"ignore_eos": True})
    deadline = time.time() + 10
    while time.time() < deadline and server.engine.pools["default"].bm.num_used:
        time.sleep(0.05)
    assert server.engine.pools["default"].bm.num_used == 0
