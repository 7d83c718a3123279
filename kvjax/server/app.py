"""The FastAPI application: OpenAI routes, SSE streaming, errors, the loading gate.

The engine is one blocking loop on its own thread; each request's events reach the event loop
through a `Sink` (the engine calls `req.out.put((token, reason))`, which schedules the item onto an
asyncio queue), so no thread blocks per connection. A client that disconnects, streaming or not,
has its requests aborted at once (their pages come back), as vLLM does.

Until `State.ready` is set, every route but /openapi.json and /docs answers 503
{"error": {"code": "loading"}}: the port is bound at once, so a client never hangs on startup.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvjax.engine.metrics import render
from kvjax.loaders.tokenizer import StreamDecoder, Tokenizer
from kvjax.server import protocol as P
from kvjax.server.params import APIError, Plan, make_requests, plan

log = logging.getLogger("kvjax.serve")
MAX_BODY = 32 * 2**20
OPEN_PATHS = ("/openapi.json", "/docs", "/docs/oauth2-redirect")


@dataclass
class State:
    model_name: str
    engine: object | None = None  # kvjax.engine.Engine once loaded
    tokenizer: Tokenizer | None = None
    ready: bool = False
    failed: str | None = None  # the load error, if loading failed
    created: int = field(default_factory=lambda: int(time.time()))


class Sink:
    """`req.out` for the engine thread: put() hands (token, reason) to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.q = loop, asyncio.Queue()

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.q.put_nowait, item)
        except RuntimeError:  # the event loop is closed (server shutting down): nobody listens
            pass

    async def get(self):
        return await self.q.get()


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _validation_error(exc: RequestValidationError) -> APIError:
    errs = exc.errors()
    first = errs[0] if errs else {"loc": ("body",), "msg": "invalid request", "type": ""}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    # Union members report one error each with the member's type in the location: keep the field.
    loc = [x for x in loc if not (x[:1].isupper() or "[" in x or x in P.UNION_TAGS)]
    name = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(f"invalid JSON body: {first.get('msg')}")
    if kind == "extra_forbidden":
        top = loc[-1] if loc else ""
        if top in P.UNSUPPORTED:
            return APIError(f"'{name}' is not supported by this server ({P.UNSUPPORTED[top]})",
                            param=name, code="unsupported_parameter")
        return APIError(f"unknown field '{name}'", param=name, code="unknown_parameter")
    if not loc:
        return APIError("the request body must be a JSON object with the request's fields")
    if kind == "missing":
        return APIError(f"missing required field '{name}'", param=name)
    return APIError(f"'{name}': {first.get('msg')}", param=name)


class Gate:
    """ASGI middleware: 503 while loading, 413 for oversized bodies."""

    def __init__(self, app, state: State):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            st = self.state
            err = None
            if not st.ready and scope["path"] not in OPEN_PATHS:
                err = APIError(st.failed or "the server is loading the model; retry shortly", 503,
                               type_="service_unavailable", code="loading")
            for k, v in scope.get("headers", ()):
                if k == b"content-length" and v.isdigit() and int(v) > MAX_BODY:
                    err = APIError("the request body is too large", 413)
            if err is not None:
                await _error(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Choice:
    """One engine request's output as it streams: text pieces (stop strings cut, held back while
    they could still start one) and the token ids behind each piece, for logprobs."""

    def __init__(self, st: State, req, stop: list[str], as_ids: bool = False):
        self.st, self.req, self.stop, self.as_ids = st, req, stop, as_ids
        self.dec = StreamDecoder(st.tokenizer)
        self.held, self.n_seen = "", 0
        self.hold = max((len(s) for s in stop), default=1) - 1

    async def events(self):
        """Yields (text, token indices, finish_reason or None)."""
        eng, req = self.st.engine, self.req
        pending: list[int] = []
        while True:
            token, reason = await req.out.get()
            if reason == "error":
                why = getattr(req, "error", None) or "the engine failed on this request"
                raise APIError(f"internal error: {why}", 500, type_="internal_error")
            if token is not None:
                pending.append(self.n_seen)
                self.n_seen += 1
                # The token that stopped the request is not part of the text (as in vLLM).
                if not (reason == "stop" and (token in eng.eos_ids
                                              or token in req.params.stop_token_ids)):
                    self.held += self.dec.push(token)
            if self.stop:
                cut = min((i for i in (self.held.find(s) for s in self.stop) if i >= 0),
                          default=-1)
                if cut >= 0:
                    eng.abort(req.request_id)
                    yield self.held[:cut], pending, "stop"
                    return
            if reason:
                yield self.held, pending, reason
                return
            if len(self.held) > self.hold:
                out = self.held[: len(self.held) - self.hold] if self.hold else self.held
                self.held = self.held[len(out):]
                yield out, pending, None
                pending = []

    def text(self, t: int) -> str:
        """A token as logprobs show it: its text, or vLLM's "token_id:N" when asked."""
        return f"token_id:{t}" if self.as_ids else self.st.tokenizer.decode([t], skip_special=False)

    def _lp(self, i: int) -> float | None:
        lps = self.req.output_logprobs
        return lps[i] if i < len(lps) else None  # an engine that did not record it

    def _top(self, i: int) -> list[tuple[int, float]]:
        tops = self.req.top_logprobs
        return tops[i][: self.req.params.logprobs] if i < len(tops) else []

    def completion_logprobs(self, idx: list[int], offset: int) -> dict:
        req = self.req
        toks = [self.text(req.output_ids[i]) for i in idx]
        offs, o = [], offset
        for t in toks:
            offs.append(o)
            o += len(t)
        top = None
        if req.params.logprobs:
            top = [{self.text(t): lp for t, lp in self._top(i)} for i in idx]
        return {"tokens": toks, "token_logprobs": [self._lp(i) for i in idx],
                "top_logprobs": top, "text_offset": offs}

    def chat_logprobs(self, idx: list[int]) -> dict:
        req = self.req

        def entry(t: int, lp: float | None) -> dict:
            s = self.text(t)
            return {"token": s, "logprob": -9999.0 if lp is None else lp,
                    "bytes": list(s.encode())}

        return {"content": [
            {**entry(req.output_ids[i], self._lp(i)),
             "top_logprobs": [entry(t, lp) for t, lp in self._top(i)]} for i in idx]}


def _usage(requests, prompts: list[list[int]]) -> dict:
    prompt = sum(len(r.prompt_ids) for r in requests)
    completion = sum(len(r.output_ids) for r in requests)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {
                "cached_tokens": sum(max(r.num_cached_prompt, 0) for r in requests)}}


async def _watch_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


def create_app(state: State) -> FastAPI:
    app = FastAPI(title="kvjax OpenAI-compatible server", version="0.1.0")
    app.state.kv = state

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_, exc: RequestValidationError):
        return _error(_validation_error(exc))

    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return _error(APIError(f"{exc.detail}: {request.method} {request.url.path}",
                               exc.status_code, code="not_found" if exc.status_code == 404
                               else None))

    @app.exception_handler(Exception)
    async def _internal(_, exc: Exception):
        log.exception("internal error")
        return _error(APIError(f"internal error: {type(exc).__name__}: {exc}", 500,
                               type_="internal_error"))

    @app.get("/health", response_class=PlainTextResponse)
    async def health() -> str:
        return ""

    @app.get("/ping", response_class=PlainTextResponse, include_in_schema=False)
    async def ping() -> str:
        return ""

    @app.get("/v1/models", response_model=P.ModelList)
    async def models() -> dict:
        eng = state.engine
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": state.created,
            "owned_by": "kvjax", "root": eng.cfg.name, "max_model_len": eng.max_model_len}]}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        eng = state.engine
        text = render(state.model_name, eng.metrics, eng.stats())
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/completions", response_model=P.CompletionResponse,
              responses={400: {"model": P.ErrorResponse}, 503: {"model": P.ErrorResponse}})
    async def completions(body: P.CompletionRequest, request: Request):
        return await _generate(state, body, request, chat=False)

    @app.post("/v1/chat/completions", response_model=P.ChatCompletionResponse,
              responses={400: {"model": P.ErrorResponse}, 503: {"model": P.ErrorResponse}})
    async def chat(body: P.ChatCompletionRequest, request: Request):
        return await _generate(state, body, request, chat=True)

    def openapi() -> dict:
        """FastAPI's schema, with `model` narrowed to the one served model (so a schema-driven
        client, or schemathesis, sends requests this server can run)."""
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for name in ("CompletionRequest", "ChatCompletionRequest"):
                schema["components"]["schemas"][name]["properties"]["model"]["enum"] = [
                    state.model_name]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


async def _generate(st: State, body, request: Request, chat: bool):
    if body.model != st.model_name:
        raise APIError(f"The model '{body.model}' does not exist; this server serves "
                       f"'{st.model_name}'", param="model", code="model_not_found")
    eng = st.engine
    p = plan(eng, st.tokenizer, body)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    reqs = make_requests(eng, p, body, rid)
    loop = asyncio.get_running_loop()
    for r in reqs:
        r.out = Sink(loop)
    choices = [Choice(st, r, p.stop, body.return_tokens_as_token_ids) for r in reqs]
    for r in reqs:
        eng.add_request(r)
    if body.stream:
        opts = body.stream_options or P.StreamOptions()
        return StreamingResponse(_sse(st, rid, reqs, choices, p, chat, opts, request),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    watch = asyncio.ensure_future(_watch_disconnect(request))
    work = asyncio.ensure_future(asyncio.gather(*(_collect(c, p, chat) for c in choices)))
    try:
        done, _ = await asyncio.wait({watch, work}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:  # the client hung up: stop the work, answer no one
            work.cancel()
            return Response(status_code=499)
        outs = work.result()
    finally:
        watch.cancel()
        for r in reqs:
            if not r.finished:
                eng.abort(r.request_id)
    created = int(time.time())
    out = {"id": rid, "object": "chat.completion" if chat else "text_completion",
           "created": created, "model": st.model_name, "usage": _usage(reqs, p.prompts)}
    out["choices"] = [{"index": i, **o} for i, o in enumerate(outs)]
    return JSONResponse(out)


async def _collect(c: Choice, p: Plan, chat: bool) -> dict:
    text, reason, idx = "", None, []
    async for piece, pending, why in c.events():
        text, reason = text + piece, why
        idx += pending
    lp = None
    if p.logprobs is not None:
        lp = c.chat_logprobs(idx) if chat else c.completion_logprobs(idx, 0)
    if chat:
        return {"message": {"role": "assistant", "content": text}, "logprobs": lp,
                "finish_reason": reason}
    if p.echo:
        text = c.st.tokenizer.decode(c.req.prompt_ids) + text
    return {"text": text, "logprobs": lp, "finish_reason": reason}


async def _sse(st: State, rid: str, reqs, choices: list[Choice], p: Plan, chat: bool,
               opts: P.StreamOptions, request: Request):
    """Chunks of every choice as they come (interleaved), usage last, then [DONE]."""
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"
    q: asyncio.Queue = asyncio.Queue()

    def chunk(choice: dict | None, usage=None) -> bytes:
        d = {"id": rid, "object": obj, "created": created, "model": st.model_name,
             "choices": [choice] if choice else []}
        if opts.include_usage:
            d["usage"] = usage
        return b"data: " + json.dumps(d).encode() + b"\n\n"

    async def pump(i: int, c: Choice) -> None:
        try:
            if chat:
                await q.put(chunk({"index": i, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}))
            offset = len(st.tokenizer.decode(c.req.prompt_ids)) if p.echo else 0
            if p.echo:
                await q.put(chunk({"index": i, "text": st.tokenizer.decode(c.req.prompt_ids),
                                   "logprobs": None, "finish_reason": None}))
            async for piece, idx, reason in c.events():
                if not piece and not reason and not (idx and p.logprobs is not None):
                    continue
                lp = None
                if p.logprobs is not None:
                    lp = c.chat_logprobs(idx) if chat else c.completion_logprobs(idx, offset)
                offset += len(piece)
                if chat:
                    delta = {"content": piece} if piece else {}
                    await q.put(chunk({"index": i, "delta": delta, "logprobs": lp,
                                       "finish_reason": reason}))
                else:
                    await q.put(chunk({"index": i, "text": piece, "logprobs": lp,
                                       "finish_reason": reason}))
        except APIError as e:
            await q.put(b"data: " + json.dumps(e.body()).encode() + b"\n\n")
        finally:
            await q.put(None)

    tasks = [asyncio.ensure_future(pump(i, c)) for i, c in enumerate(choices)]
    try:
        live = len(tasks)
        while live:
            try:
                item = await asyncio.wait_for(q.get(), timeout=1.0)
            except TimeoutError:  # no token for a while: is the client still there?
                if await request.is_disconnected():
                    return
                continue
            if item is None:
                live -= 1
                continue
            yield item
        if opts.include_usage:
            yield chunk(None, _usage(reqs, p.prompts))
        yield b"data: [DONE]\n\n"
    finally:  # also on disconnect (the generator is closed or cancelled): stop the work
        for t in tasks:
            t.cancel()
        for r in reqs:
            if not r.finished:
                st.engine.abort(r.request_id)
