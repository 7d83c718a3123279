"""The real embedded model: SmolLM2-135M-Instruct from its GGUF, through the paged cache."""

import numpy as np
import pytest

from kvjax.config import load_config
from kvjax.eval.ppl import perplexity
from kvjax.loaders import load
from kvjax.runner import Runner

# Ordinary English text that ships with every Debian system (and so with CI's machine).
TEXT = "/usr/share/common-licenses/Apache-2.0"


@pytest.fixture(scope="module")
def smollm2():
    cfg = load_config("smollm2")
    params, tokenizer = load("smollm2", cfg.model)
    with open(TEXT) as f:
        ids = tokenizer.encode(f.read())[:320]
    return cfg, params, ids


def _scramble_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's interleaving `permute` applied to already-correct columns: a wrong row order."""
    h, cols = w.shape[1], w.shape[2]
    w = w.reshape(w.shape[0], h, n_heads, 2, cols // n_heads // 2)
    return w.swapaxes(3, 4).reshape(-1, h, cols)


def test_perplexity_is_sane_and_detects_wrong_rope_order(smollm2):
    cfg, params, ids = smollm2
    ppl = perplexity(Runner(cfg, params, max_seq_len=len(ids)), ids, prefix=64, chunk=64).ppl
    # A 135M model on legal English: measured 12.4 on 512 + 256 tokens; anything near the
    # hundreds means the weights or RoPE layout are wrong.
    assert 4.0 < ppl < 30.0, ppl

    bad = dict(params)
    bad["layers.wq"] = _scramble_rope_rows(params["layers.wq"], cfg.model.num_heads)
    bad["layers.wk"] = _scramble_rope_rows(params["layers.wk"], cfg.model.num_kv_heads)
    bad_ppl = perplexity(Runner(cfg, bad, max_seq_len=len(ids)), ids, prefix=64, chunk=64).ppl
    assert bad_ppl > 5 * ppl, (ppl, bad_ppl)


def test_decode_steps_match_chunked_prefill(smollm2):
    """Scoring token by token (decode steps reading the cache) equals scoring in chunks."""
    cfg, params, ids = smollm2
    ids = ids[:96]
    runner = Runner(cfg, params, max_seq_len=len(ids))
    chunked = perplexity(runner, ids, prefix=64, chunk=32)
    stepwise = perplexity(runner, ids, prefix=64, chunk=1)
    assert chunked.tokens_scored == stepwise.tokens_scored == len(ids) - 64
    # Different matmul shapes sum in a different order, and a last-bit change in f32 can flip the
    # bf16 rounding of a stored key (2**-8 relative): allow that much, not a wrong mask or page.
    np.testing.assert_allclose(chunked.nll, stepwise.nll, rtol=1e-3)
