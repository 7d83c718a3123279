"""The engine's step: a failing step fails only its own requests (finish_reason "error", counted
as failures) while the others finish with the tokens they get alone, also when the failure
consumed the donated cache; logprobs come back per token; warmup leaves nothing to compile."""

import numpy as np
import pytest

import models
from kvjax.config import load_config
from kvjax.engine import Engine, EngineConfig, SamplingParams
from kvjax.engine import engine as engine_mod
from kvjax.engine.step import count_compiles

CFG = load_config("tiny_llama")
MAGIC = 255  # a prompt holding this token makes the patched step raise


@pytest.fixture(scope="module")
def params():
    return models.random_params(CFG.model, seed=0)


def make(params, **kw) -> Engine:
    kw.setdefault("max_model_len", 128)
    kw.setdefault("num_pages", 200)
    return Engine(CFG, params, EngineConfig(**kw))


GOOD = [[5, 6, 7], [9, 1, 4, 4, 2], [3] * 11, [8, 2]]  # chunks of the 16 bucket
BAD = [MAGIC] + list(range(30))  # a 64-bucket chunk: its own forward in the first step


def alone(params) -> list[list[int]]:
    eng = make(params)
    reqs = [eng.make_request(f"a{i}", p, SamplingParams(max_tokens=12)) for i, p in
            enumerate(GOOD)]
    return [r.output_ids for r in eng.generate(reqs)]


@pytest.mark.parametrize("consume_cache", [False, True])
def test_a_failing_step_fails_only_its_requests(params, monkeypatch, consume_cache):
    want = alone(params)
    real = engine_mod.execute

    def flaky(runner, step):
        out = real(runner, step)
        if (step.tokens == MAGIC).any():
            if consume_cache:  # as if the failure came after the cache was donated
                for leaf in __import__("jax").tree.leaves(runner.cache):
                    leaf.delete()
            raise RuntimeError("injected failure")
        return out

    monkeypatch.setattr(engine_mod, "execute", flaky)
    eng = make(params)
    sp = SamplingParams(max_tokens=12)
    good = [eng.make_request(f"g{i}", p, sp) for i, p in enumerate(GOOD)]
    bad = eng.make_request("bad", BAD, sp)
    eng.generate([*good, bad])
    assert bad.finish_reason == "error" and "injected failure" in bad.error
    assert [r.output_ids for r in good] == want
    assert all(r.finish_reason == "length" for r in good)
    c = eng.metrics.counters
    assert c["request_failure"] == 1 and c["request_success"] == len(GOOD)
    pool = eng.pools["default"]
    pool.bm.check()
    assert pool.bm.num_used == 0 and not pool.running and not pool.waiting


def test_logprobs_match_the_logits(params):
    eng = make(params)
    prompt = [1, 2, 3, 4]
    req = eng.make_request("lp", prompt, SamplingParams(max_tokens=3, logprobs=3))
    eng.generate([req])
    assert len(req.output_logprobs) == 3 and len(req.top_logprobs) == 3
    # Greedy: the sampled token is the top-1 entry, with the same logprob.
    for tok, lp, top in zip(req.output_ids, req.output_logprobs, req.top_logprobs, strict=True):
        assert len(top) == 3 and top[0][0] == tok
        assert lp == pytest.approx(top[0][1], abs=1e-6) and lp <= 0
        assert [x[1] for x in top] == sorted((x[1] for x in top), reverse=True)
    # The first token's logprob against a dense forward of the prompt.
    r = models.forward
    del r
    from kvjax.runner import Runner

    run = Runner(CFG, params, max_seq_len=16)
    logits = np.asarray(run.prefill(0, prompt), np.float64)
    ref = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    assert req.output_logprobs[0] == pytest.approx(ref[req.output_ids[0]], abs=1e-4)


def test_warmup_leaves_nothing_to_compile(params):
    eng = make(params, max_num_seqs=4, max_num_batched_tokens=64, chunk_size=16)
    eng.warmup(background=False)
    assert eng.warmup_done.is_set()
    prompts = [list(range(1, 1 + n)) for n in (3, 9, 14, 2, 7)]
    with count_compiles() as n:
        reqs = [eng.make_request(f"w{i}", p, SamplingParams(max_tokens=70, ignore_eos=True))
                for i, p in enumerate(prompts)]
        eng.generate(reqs)  # decode grows through table widths 8 -> 16 pages
    assert n() == 0
    assert all(len(r.output_ids) == 70 for r in reqs)


def test_decode_rows_pad_to_the_ladder_and_match_solo_runs(params, monkeypatch):
    """Ten decoding rows run as a [12, 1] step (the 1.5x rung), not [16, 1], with the tokens each
    request gets alone; warmup lists the rung."""
    eng = make(params, max_num_seqs=12, max_num_batched_tokens=256, chunk_size=16)
    assert (12, 1) in eng.warmup_shapes() and (16, 1) not in eng.warmup_shapes()
    prompts = [[1 + i, 2 * i + 3, 7] for i in range(10)]
    sp = SamplingParams(max_tokens=4, ignore_eos=True)
    solo = [eng.generate([eng.make_request(f"s{i}", p, sp)])[0].output_ids
            for i, p in enumerate(prompts)]
    shapes = []
    real = engine_mod.execute

    def record(runner, step):
        shapes.append(step.tokens.shape)
        return real(runner, step)

    monkeypatch.setattr(engine_mod, "execute", record)
    reqs = eng.generate([eng.make_request(f"b{i}", p, sp) for i, p in enumerate(prompts)])
    assert [r.output_ids for r in reqs] == solo
    assert (12, 1) in shapes and all(b != 16 for b, t in shapes if t == 1)


def test_prompt_pieces_pad_to_the_32_and_128_rungs_and_match_solo_runs(params, monkeypatch):
    """Under a 160-token budget, a 100-token prompt runs as [1, 128] (not 256), a 30-token one as
    [1, 32] (not 64), and a third prompt's budget-cut first piece is cut at 16 tokens, its
    84-token rest run as [1, 128]; each request's tokens equal its solo run."""
    eng = make(params, max_num_seqs=4, max_num_batched_tokens=160)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(1, 250, n).tolist() for n in (100, 30, 100)]
    sp = SamplingParams(max_tokens=5, ignore_eos=True)
    solo = [eng.generate([eng.make_request(f"s{i}", p, sp)])[0].output_ids
            for i, p in enumerate(prompts)]
    steps: list[list[tuple[int, int]]] = []
    real = engine_mod.execute

    def record(runner, step):
        steps[-1].append(step.tokens.shape)
        return real(runner, step)

    monkeypatch.setattr(engine_mod, "execute", record)
    reqs = [eng.make_request(f"b{i}", p, sp) for i, p in enumerate(prompts)]
    for r in reqs:
        eng.add_request(r)
    while eng.has_work():
        steps.append([])
        eng.step()
    assert [r.output_ids for r in reqs] == solo
    assert sorted(steps[0]) == [(1, 16), (1, 32), (1, 128)]
    assert sorted(steps[1]) == [(1, 128), (2, 1)]
    assert all(t in (1, 16, 32, 128) for s in steps for _, t in s)


def test_warmup_stops_near_the_memory_map_limit(params, monkeypatch):
    """Past the process's memory-mapping share, the background warmup stops compiling (each XLA:CPU
    executable maps its code; past vm.max_map_count the process dies), still reports itself done,
    and the shapes it skipped compile when first used: outputs equal a fully warmed engine's."""
    from kvjax.engine import warmup as warmup_mod

    calls = []

    def fake_map_count():  # the limit is reached after 3 more compiles
        calls.append(1)
        return (100 if len(calls) > 3 else 10), 100

    monkeypatch.setattr(warmup_mod, "map_count", fake_map_count)
    eng = make(params, max_num_seqs=4, max_num_batched_tokens=64, chunk_size=16)
    eng.warmup(background=False)
    assert eng.warmup_done.is_set() and len(calls) == 4
    first = sum(1 for b, t in eng.warmup_shapes() if b == 1)  # one-row shapes, narrowest width
    assert len(eng.pools["default"].runner._compiled) == first + 3
    prompts = [list(range(1, 1 + n)) for n in (3, 9, 14, 2, 7)]
    sp = SamplingParams(max_tokens=6, ignore_eos=True)
    got = [r.output_ids for r in eng.generate([eng.make_request(f"m{i}", p, sp)
                                               for i, p in enumerate(prompts)])]
    monkeypatch.undo()
    full = make(params, max_num_seqs=4, max_num_batched_tokens=64, chunk_size=16)
    full.warmup(background=False)
    assert got == [r.output_ids for r in full.generate([full.make_request(f"f{i}", p, sp)
                                                        for i, p in enumerate(prompts)])]


def test_runner_drops_least_recently_used_executables_near_the_map_limit(params, monkeypatch):
    """Near vm.max_map_count the Runner drops its least recently used executables before compiling
    another (past the limit LLVM cannot map code and the server dies): the one just run is kept,
    and an engine that evicts before every compile gives the tokens of one that never does."""
    from kvjax import runner as runner_mod

    prompts = [list(range(1, 1 + n)) for n in (3, 9, 14, 2, 7)]
    sp = SamplingParams(max_tokens=6, ignore_eos=True)

    def gen(eng):
        return [r.output_ids for r in eng.generate([eng.make_request(f"e{i}", p, sp)
                                                    for i, p in enumerate(prompts)])]

    ref = gen(make(params, max_num_seqs=4, max_num_batched_tokens=64, chunk_size=16))
    maps = [10]
    monkeypatch.setattr(runner_mod, "map_count", lambda: (maps[0], 100))
    eng = make(params, max_num_seqs=4, max_num_batched_tokens=64, chunk_size=16)
    r = eng.pools["default"].runner
    w = r.widths()[0]
    a, b, c, d = ((1, t, w) for t in (1, 16, 32, 64))
    for key in (a, b, c):
        r.compile(*key)
    z = np.zeros((1, 1), np.int32)
    r.run(z, z, np.zeros((1, w), np.int32), np.ones(1, np.int32), np.zeros(1, np.int32),
          np.zeros(1, np.int32))  # a is now the most recently used
    assert list(r._compiled) == [b, c, a] and r.evicted == 0
    maps[0] = 95  # over EVICT_SHARE of the limit
    r.compile(*d)  # drops the least recently used quarter (at least one): b
    assert list(r._compiled) == [c, a, d] and r.evicted == 1
    r.reset_cache()
    assert gen(eng) == ref and r.evicted > 1
