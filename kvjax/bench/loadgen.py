"""HTTP load generator for an OpenAI-compatible server, in the manner of vLLM's benchmark_serving:
streaming /v1/completions requests over aiohttp, `concurrency` kept in flight (closed loop), and per
request the time to first token (first non-empty text chunk), the gaps between later chunks (ITL),
end-to-end latency and the token counts the server reports (stream_options.include_usage).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Result:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = float("nan")
    e2e: float = float("nan")
    itl: list[float] = field(default_factory=list)
    error: str = ""


async def _one(session, url: str, model: str, prompt: list[int], output_len: int) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    res = Result(ok=False, prompt_tokens=len(prompt))
    last = None
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return res
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    break
                d = json.loads(data)
                if "error" in d:
                    res.error = d["error"].get("message", "error")
                    return res
                if d.get("usage"):
                    res.output_tokens = d["usage"]["completion_tokens"]
                    res.prompt_tokens = d["usage"]["prompt_tokens"]
                if d.get("choices"):  # a token event (its text may be held back: UTF-8)
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
    except Exception as e:  # a failed request is reported, not fatal to the run
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.e2e = time.perf_counter() - t0
    res.ok = True
    return res


async def run(base_url: str, model: str, prompts: list[list[int]], output_len: int,
              concurrency: int, timeout_s: float = 1800.0) -> tuple[list[Result], float]:
    """Send every prompt, `concurrency` at a time; returns the results and the wall time."""
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    url = base_url.rstrip("/") + "/v1/completions"
    conn = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        async def guarded(p):
            async with sem:
                return await _one(session, url, model, p, output_len)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(guarded(p) for p in prompts))
        return list(results), time.perf_counter() - t0


def summarize(results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    out = sum(r.output_tokens for r in ok)
    inp = sum(r.prompt_tokens for r in ok)
    ttft = np.array([r.ttft for r in ok]) * 1e3
    itl = np.array([x for r in ok for x in r.itl]) * 1e3
    e2e = np.array([r.e2e for r in ok])

    def pct(a, q):
        return float(np.nanpercentile(a, q)) if a.size else float("nan")

    return {"completed": len(ok), "failed": len(results) - len(ok), "wall": wall,
            "out_tps": out / wall, "total_tps": (out + inp) / wall, "req_s": len(ok) / wall,
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99), "e2e_p50": pct(e2e, 50),
            "errors": sorted({r.error for r in results if not r.ok})[:3]}
