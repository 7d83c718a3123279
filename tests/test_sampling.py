"""The batched sampler against a numpy reference of the same logits: penalties (OpenAI's formula,
vLLM's repetition penalty), logit_bias, min_tokens, greedy rows, the top-k / top-p sets and the
inverse-CDF draw, logprobs, seeded reproducibility under any batch composition, no recompiles."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.sampling import (
    SamplerFlags,
    counts_from_tokens,
    pack,
    record_tokens,
    row_seed,
    row_uniforms,
    sample_batch_jit,
)

V = 64


def params(**kw):
    base = dict(temperature=0.0, top_k=0, top_p=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                repetition_penalty=1.0, logit_bias=(), min_tokens=0, logprobs=None)
    return SimpleNamespace(**{**base, **kw})


def ref_process(logits, p, counts, prompt, step, bans):
    """numpy: min_tokens -> logit_bias -> repetition -> frequency/presence (OpenAI formula)."""
    x = logits.astype(np.float64).copy()
    if step < p.min_tokens:
        x[list(bans)] = -np.inf
    for t, b in p.logit_bias:
        x[t] += b
    seen = (counts > 0) | prompt
    r = p.repetition_penalty
    x[seen] = np.where(x[seen] > 0, x[seen] / r, x[seen] * r)
    return x - counts * p.frequency_penalty - (counts > 0) * p.presence_penalty


def ref_allowed(x, p):
    """The token ids top-k then top-p keep (ascending), probabilities renormalised (float64).
    Top-k keeps ties at the k-th value (vLLM); top-p the most probable tokens reaching top_p."""
    z = x / p.temperature
    k = p.top_k if 0 < p.top_k < len(z) else len(z)
    kth = np.sort(z)[::-1][k - 1]
    keep = np.flatnonzero(z >= kth)
    pr = np.exp(z[keep] - z[keep].max())
    pr /= pr.sum()
    if p.top_p < 1:
        order = np.argsort(-pr, kind="stable")
        before = np.cumsum(pr[order]) - pr[order]
        q = pr[order][before < p.top_p].min()  # the smallest probability the nucleus needs
        keep, pr = keep[pr >= q], pr[pr >= q]
    return keep, pr / pr.sum()


def run(rows, logits, steps, seeds, bans=(), counts=None, prompt=None):
    sb, flags = pack(rows, len(rows), steps, seeds, bans)
    if flags.penalties:
        sb = sb._replace(output_counts=jnp.asarray(counts), prompt_mask=jnp.asarray(prompt))
    return sample_batch_jit(jnp.asarray(logits), sb, flags), flags


def test_penalties_bias_min_tokens_and_greedy_match_numpy():
    rng = np.random.default_rng(0)
    b = 6
    logits = rng.normal(0, 3, (b, V)).astype(np.float32)
    counts = rng.integers(0, 3, (b, V)) * (rng.random((b, V)) < 0.3)
    prompt = rng.random((b, V)) < 0.2
    rows = [params(presence_penalty=1.5), params(frequency_penalty=0.7),
            params(repetition_penalty=1.8), params(presence_penalty=-1.0, frequency_penalty=2.0,
                                                   repetition_penalty=0.6),
            params(logit_bias=((3, 100.0), (5, -100.0), (int(np.argmax(logits[4])), -100.0))),
            params(min_tokens=3, logit_bias=((7, 50.0),))]
    bans = [[], [], [], [], [], [7, 11]]
    steps = [0, 0, 0, 0, 0, 1]
    out, flags = run(rows, logits, steps, [0] * b, bans, counts, prompt)
    assert flags.penalties and flags.bias_width and flags.stop_width and not flags.stochastic
    for i, p in enumerate(rows):
        x = ref_process(logits[i], p, counts[i], prompt[i], steps[i], bans[i])
        assert int(out.tokens[i]) == int(np.argmax(x)), i
    assert int(out.tokens[4]) == 3  # +100 wins
    assert int(out.tokens[5]) != 7  # banned below min_tokens although biased up
    # Past min_tokens the ban lifts and the +50 bias picks 7.
    out2, _ = run([rows[5]], logits[5:6], [3], [0], [bans[5]])
    assert int(out2.tokens[0]) == 7


def test_processed_logits_equal_reference_exactly():
    from kvjax.sampling import process_logits

    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (3, V)).astype(np.float32)
    counts = rng.integers(0, 4, (3, V))
    prompt = rng.random((3, V)) < 0.3
    rows = [params(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.3,
                   logit_bias=((1, 2.0), (9, -3.0)))] * 3
    sb, flags = pack(rows, 3, [0] * 3, [0] * 3)
    sb = sb._replace(output_counts=jnp.asarray(counts), prompt_mask=jnp.asarray(prompt))
    got = np.asarray(jax.jit(process_logits, static_argnames="flags")(jnp.asarray(logits), sb,
                                                                        flags))
    for i in range(3):
        np.testing.assert_allclose(got[i], ref_process(logits[i], rows[i], counts[i], prompt[i],
                                                       0, ()), rtol=1e-6, atol=1e-5)


# vocab 64 < CANDIDATES: the top-k fast path sees everything. vocab 1024: sigma 4 logits keep the
# nucleus among the top 256 (fast path); sigma 0.3 logits need ~800 tokens for top_p 0.95, and
# top_k 300 > 256, both only on the exact bisection path.
@pytest.mark.parametrize("top_k,top_p,vocab,sigma", [
    (0, 1.0, V, 2), (5, 1.0, V, 2), (0, 0.6, V, 2), (4, 0.5, V, 2), (1, 1.0, V, 2),
    (V + 10, 0.9, V, 2), (40, 0.9, 1024, 4), (0, 0.95, 1024, 4), (0, 0.95, 1024, 0.3),
    (300, 1.0, 1024, 0.3), (300, 0.9, 1024, 4)])
def test_draw_is_the_inverse_cdf_of_the_reference_set(top_k, top_p, vocab, sigma):
    rng = np.random.default_rng(2)
    b = 16
    logits = rng.normal(0, sigma, (b, vocab)).astype(np.float32)
    p = params(temperature=0.8, top_k=top_k, top_p=top_p)
    seeds = [row_seed(i, 0) for i in range(b)]
    steps = list(range(b))
    out, _ = run([p] * b, logits, steps, seeds)
    u = np.asarray(row_uniforms(jnp.asarray(seeds, jnp.uint32), jnp.asarray(steps, jnp.int32)))
    for i in range(b):
        keep, pr = ref_allowed(logits[i].astype(np.float64), p)
        tok = int(out.tokens[i])
        assert tok in set(keep.tolist()), (i, tok)
        cum = np.cumsum(pr)  # the draw is in id order, truncated or not
        j = int(np.searchsorted(cum, u[i] * cum[-1]))
        if np.min(np.abs(cum - u[i] * cum[-1])) > 1e-5:  # not on a float boundary
            assert tok == int(keep[min(j, len(keep) - 1)]), i


def test_draw_frequencies_match_the_truncated_distribution():
    rng = np.random.default_rng(3)
    logits = np.tile(rng.normal(0, 1.5, (1, 16)).astype(np.float32), (4096, 1))
    p = params(temperature=1.3, top_k=10, top_p=0.9)
    out, _ = run([p] * 4096, logits, list(range(4096)), [row_seed(42, 0)] * 4096)
    keep, pr = ref_allowed(logits[0].astype(np.float64), p)
    freq = np.bincount(np.asarray(out.tokens), minlength=16) / 4096
    expect = np.zeros(16)
    expect[keep] = pr
    sigma = np.sqrt(expect * (1 - expect) / 4096)
    assert np.all(np.abs(freq - expect) <= 5.5 * sigma + 1e-9), (freq, expect)


def test_seeded_row_reproducible_under_any_batch_composition():
    rng = np.random.default_rng(4)
    row = rng.normal(0, 2, V).astype(np.float32)
    mine = params(temperature=1.0, top_p=0.95)
    plain = params(temperature=0.7)
    seed = row_seed(1234, 0)
    alone, _ = run([mine], row[None], [5], [seed])
    alone_plain, _ = run([plain], row[None], [5], [seed])
    for b in (3, 8):
        logits = rng.normal(0, 2, (b, V)).astype(np.float32)
        at = b - 1
        logits[at] = row
        others = [params(temperature=0.5, top_k=3, presence_penalty=1.0,
                         logit_bias=((0, 1.0),), logprobs=2)] * b
        seeds = [row_seed(None, i) for i in range(b)]
        for who, solo in ((mine, alone), (plain, alone_plain)):
            rows = list(others)
            rows[at] = who
            sd = list(seeds)
            sd[at] = seed
            counts = np.zeros((b, V), np.int64)
            counts[0, 3] = 2
            out, flags = run(rows, logits, [5] * b, sd, (), counts, np.zeros((b, V), bool))
            assert flags.truncate and flags.penalties and flags.top_n
            assert int(out.tokens[at]) == int(solo.tokens[0])
    # A different step or seed gives a different stream (over 32 steps, equal w.p. ~0).
    a, _ = run([mine] * 32, np.tile(row, (32, 1)), list(range(32)), [seed] * 32)
    c, _ = run([mine] * 32, np.tile(row, (32, 1)), list(range(32)), [seed + 1] * 32)
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


def test_logprobs_and_top_n_are_the_raw_model_distribution():
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 2, (3, V)).astype(np.float32)
    rows = [params(logprobs=0), params(logprobs=5, presence_penalty=2.0), None]
    counts = np.zeros((3, V), np.int64)
    counts[1, np.argmax(logits[1])] = 1
    out, flags = run(rows, logits, [0, 1, 0], [0, 0, 0], (), counts, np.zeros((3, V), bool))
    assert flags.logprobs and flags.top_n == 20
    ref = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum(-1,
                                                                                      keepdims=True))
    for i in range(2):
        tok = int(out.tokens[i])
        np.testing.assert_allclose(float(out.logprobs[i]), ref[i, tok], atol=1e-5)
        order = np.argsort(-ref[i], kind="stable")[:20]
        np.testing.assert_array_equal(np.asarray(out.top_ids[i]), order)
        np.testing.assert_allclose(np.asarray(out.top_logprobs[i]), ref[i, order], atol=1e-5)
    # The penalty moved row 1 off its argmax; its logprob is still the model's for that token.
    assert int(out.tokens[1]) != int(np.argmax(logits[1]))


def test_new_values_do_not_recompile_and_features_are_off_by_default():
    rng = np.random.default_rng(6)
    logits = jnp.asarray(rng.normal(0, 1, (4, V)).astype(np.float32))
    sb, flags = pack([params()] * 4, 4, [0] * 4, [0] * 4)
    assert flags == SamplerFlags()
    assert sb.presence is None and sb.bias_ids is None and sb.stop_ids is None
    sample_batch_jit(logits, *pack([params(temperature=1.0, top_k=2)] * 4, 4, [0] * 4, [1] * 4))
    n0 = sample_batch_jit._cache_size()
    for k, tp, t in ((3, 0.5, 0.3), (40, 0.99, 1.7), (1, 0.1, 2.0)):
        sb, flags = pack([params(temperature=t, top_k=k, top_p=tp)] * 4, 4, [7] * 4, [9] * 4)
        sample_batch_jit(logits, sb, flags)
    assert sample_batch_jit._cache_size() == n0


def test_penalty_state_helpers():
    hist = jnp.asarray([[1, 1, 5, -1], [-1, -1, -1, -1]], jnp.int32)
    c = np.asarray(counts_from_tokens(hist, 8))
    assert c[0, 1] == 2 and c[0, 5] == 1 and c.sum() == 3
    state = jnp.zeros((4, 8), jnp.int32)
    state = record_tokens(state, jnp.asarray([2, 0, 3]), jnp.asarray([6, 1, 6]),
                          jnp.asarray([True, True, False]))
    s = np.asarray(state)
    assert s[2, 6] == 1 and s[0, 1] == 1 and s.sum() == 2


def test_top_k_keeps_ties_and_handles_banned_and_negative_logits():
    x = np.full((1, V), -50.0, np.float32)
    x[0, [3, 9, 20]] = 2.0  # a three-way tie at the top
    x[0, 30] = 1.9
    p = params(temperature=1.0, top_k=1, min_tokens=5)
    drawn = set()
    for step in range(0, 200, 1):
        out, _ = run([p], x, [step % 4], [row_seed(1, step)], [[9]])  # 9 banned (min_tokens)
        drawn.add(int(out.tokens[0]))
    assert drawn == {3, 20}  # top_k=1 keeps both tied tokens (9 is banned), 30 is cut
    # All logits negative, top_p with one dominant token: only it survives.
    y = np.full((1, V), -30.0, np.float32)
    y[0, 7] = -1.0
    out, _ = run([params(temperature=1.0, top_p=0.5)], y, [0], [5])
    assert int(out.tokens[0]) == 7
