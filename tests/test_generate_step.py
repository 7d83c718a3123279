"""generate's decode path (kvjax.engine.step through generate.Decoder): greedy tokens equal the
argmax of the full-logits forward, and nothing compiles once generation starts although the
page-table width grows through several buckets."""

import numpy as np
import pytest

import models
from kvjax.config import load_config
from kvjax.engine.request import SamplingParams
from kvjax.engine.step import count_compiles
from kvjax.generate import Decoder, warm_decode
from kvjax.runner import Runner

CFG = load_config("tiny_llama")  # page_size 8: 100 tokens cross widths 8 -> 16 pages


@pytest.fixture(scope="module")
def params():
    return models.random_params(CFG.model, seed=1)


def reference(params, prompt: list[int], n: int) -> list[int]:
    """Greedy over the full [batch, t, vocab] logits of Runner.step (no bucketing of logits)."""
    r = Runner(CFG, params, max_seq_len=len(prompt) + n)
    logits = r.prefill(0, prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(np.asarray(logits))))
        logits = r.step([0], [[out[-1]]])[0, 0]
    return out


def test_decoder_greedy_equals_full_logits_and_never_recompiles(params):
    prompt = list(np.random.default_rng(0).integers(0, 256, 20))
    n = 90
    want = reference(params, prompt, n)
    r = Runner(CFG, params, max_seq_len=len(prompt) + n)
    sp = SamplingParams(temperature=0.0)
    warm_decode(r, len(prompt), len(prompt) + n, sp, seed=0)
    assert len(r.widths(len(prompt) + n)) >= 2  # the run crosses a width bucket
    dec = Decoder(r, sp, seed=0)
    with count_compiles() as compiles:
        got = [dec.prefill(prompt)]
        while len(got) < n:
            got.append(dec.step(got[-1]))
    assert got == want
    assert compiles() == 0


def test_decoder_sampling_is_seeded(params):
    prompt = [1, 2, 3, 4, 5]
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=20)

    def run(seed):
        r = Runner(CFG, params, max_seq_len=40)
        dec = Decoder(r, sp, seed=seed)
        out = [dec.prefill(prompt)]
        while len(out) < 30:
            out.append(dec.step(out[-1]))
        return out

    a = run(7)
    assert a == run(7)
    assert a != run(8)
    assert all(0 <= t < CFG.model.vocab_size for t in a)


def test_table_width_ladder(params):
    """Widths step by x1.5 (8, 12, 16, 24, ...): a step reads at most 1.5x the pages its longest
    row needs (powers of two read up to 2x), never fewer, and `widths` lists every width
    `table_width` can return (what warmup compiles)."""
    r = Runner(CFG, params, max_seq_len=3000)  # 375 pages of 8
    assert r.widths()[:8] == [8, 12, 16, 24, 32, 48, 64, 96]
    assert r.widths()[-1] == r.max_pages == 375
    for tokens in range(1, 3001):
        need = -(-tokens // 8)
        w = r.table_width(tokens)
        assert need <= w <= max(8, min(r.max_pages, 1.5 * need))
        assert w in r.widths()
    assert r.table_width(544) == r.table_width(768) == 96  # 68 / 96 pages: not 128
