"""OpenAI-compatible HTTP server: `python -m kvjax.serve --config NAME --port 8000`.

Endpoints: POST /v1/completions and /v1/chat/completions (OpenAI request and response shapes,
`stream: true` as server-sent events), GET /v1/models, /health and /metrics (Prometheus text).
Flags follow vLLM's: --kv-cache-dtype, --enable-prefix-caching, --max-num-seqs, --max-model-len,
--max-num-batched-tokens, --gpu-memory-utilization, --num-kv-pages (vLLM's
num_gpu_blocks_override), --served-model-name. At start it logs vLLM's sizing lines,
"KV cache size: N tokens" and "Maximum concurrency for M tokens per request: Xx".

Server stack: the standard library's `ThreadingHTTPServer`, on purpose. The engine is one
blocking loop on its own thread (a JAX step holds the device anyway); each HTTP connection gets a
thread that validates the request, hands it to the engine, and blocks on that request's queue,
writing JSON or SSE chunks as tokens arrive. That is all an async framework would do here, without
bridging asyncio to a blocking engine thread and without three extra dependencies (FastAPI,
starlette, uvicorn) in the runtime. Robustness comes from the handler: every request is parsed
and validated before it reaches the engine, every failure is turned into an OpenAI-style JSON
error (400 for the client's, 500 for ours) and a broken connection aborts its request, so no
request can take the server down. Metrics are written in the Prometheus text format by
kvjax/engine/metrics.py (no prometheus_client global registry).

Extensions to the OpenAI request, as in vLLM: top_k, ignore_eos, stop_token_ids, cache_salt
(isolates prefix-cache entries per tenant), plus kv_precision ("full" routes the request to the
full-precision page pool) and kv_eviction ({"policy": "streaming"|"h2o", "sink_tokens",
"window", "heavy_tokens"}) for unbounded sessions. Responses report
usage.prompt_tokens_details.cached_tokens (prompt tokens served by the prefix cache).
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from absl import flags

from kvjax import cli
from kvjax.engine import Engine, EngineConfig, EvictionConfig, RequestError, SamplingParams
from kvjax.engine.metrics import render
from kvjax.loaders.tokenizer import StreamDecoder, Tokenizer

log = logging.getLogger("kvjax.serve")
FLAGS = flags.FLAGS
MAX_BODY = 32 * 2**20


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.type, self.code = status, param, type_, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param,
                          "code": self.code}}


# ---- request parsing ---------------------------------------------------------------------------
def _get(body: dict, name: str, types, default=None, required: bool = False):
    if name not in body or body[name] is None:
        if required:
            raise APIError(f"missing required field '{name}'", param=name)
        return default
    value = body[name]
    if types is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, types) or (isinstance(value, bool) and types is not bool):
        raise APIError(f"'{name}' has the wrong type", param=name)
    return value


def _sampling(body: dict, default_max: int, max_model_len: int, prompt_len: int,
              bounded: bool) -> tuple[SamplingParams, list[str]]:
    max_tokens = _get(body, "max_completion_tokens", int, None)
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", int, default_max)
    if max_tokens < 1:
        raise APIError(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    if bounded and prompt_len + max_tokens > max_model_len:
        raise APIError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
            f"{max_tokens} in the completion). Please reduce the length of the prompt or "
            "completion.", param="max_tokens")
    temperature = _get(body, "temperature", float, 1.0)
    top_p = _get(body, "top_p", float, 1.0)
    top_k = _get(body, "top_k", int, 0)
    if not 0 <= temperature <= 2:
        raise APIError("temperature must be in [0, 2]", param="temperature")
    if not 0 < top_p <= 1:
        raise APIError("top_p must be in (0, 1]", param="top_p")
    if top_k < 0 and top_k != -1:
        raise APIError("top_k must be >= 0 (or -1 for all)", param="top_k")
    if _get(body, "n", int, 1) != 1:
        raise APIError("only n=1 is supported", param="n")
    if _get(body, "best_of", int, 1) != 1:
        raise APIError("best_of is not supported", param="best_of")
    if body.get("logprobs") not in (None, False) or body.get("echo"):
        raise APIError("logprobs and echo are not supported", param="logprobs")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)) or len(stop) > 4:
        raise APIError("'stop' must be a string or a list of up to 4 strings", param="stop")
    stop = [s for s in stop if s]
    stop_ids = _get(body, "stop_token_ids", list, [])
    if not all(isinstance(t, int) for t in stop_ids):
        raise APIError("'stop_token_ids' must be a list of integers", param="stop_token_ids")
    seed = _get(body, "seed", int, None)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                            top_k=max(top_k, 0), seed=seed, stop_token_ids=tuple(stop_ids),
                            ignore_eos=_get(body, "ignore_eos", bool, False))
    return params, stop


def _eviction(body: dict, default: EvictionConfig) -> EvictionConfig:
    spec = body.get("kv_eviction")
    if spec is None:
        return default
    if isinstance(spec, str):
        spec = {"policy": spec}
    if not isinstance(spec, dict):
        raise APIError("'kv_eviction' must be an object or a policy name", param="kv_eviction")
    try:
        kw = {k: spec[k] for k in ("policy", "sink_tokens", "window", "heavy_tokens") if k in spec}
        if any(not isinstance(v, int) for k, v in kw.items() if k != "policy"):
            raise ValueError("kv_eviction sizes must be integers")
        return EvictionConfig(**{**default.__dict__, **kw})
    except (TypeError, ValueError) as e:
        raise APIError(str(e), param="kv_eviction") from None


def _chat_prompt(tokenizer: Tokenizer, messages) -> str:
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty list", param="messages")
    clean = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError("each message needs a 'role' and 'content'", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise APIError("only text content parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise APIError("message 'content' must be a string", param="messages")
        clean.append({"role": m["role"], "content": content})
    if tokenizer.chat_template:
        try:
            return tokenizer.apply_chat_template(clean)
        except Exception as e:  # the template's own raise_exception, or a rendering error
            raise APIError(f"chat template: {e}", param="messages") from None
    # No template (byte tokenizer, random weights): a plain transcript.
    return "".join(f"{m['role']}: {m['content']}\n" for m in clean) + "assistant:"


# ---- the server --------------------------------------------------------------------------------
class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, engine: Engine, tokenizer: Tokenizer, model_name: str):
        super().__init__(addr, Handler)
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.created = int(time.time())

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start_background(self) -> threading.Thread:
        """Start the engine loop and serve on a daemon thread (tests, notebooks)."""
        self.engine.start()
        t = threading.Thread(target=self.serve_forever, name="kvjax-http", daemon=True)
        t.start()
        return t

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.engine.stop()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, fmt, *args):  # the default writes every request to stderr
        log.debug("%s " + fmt, self.address_string(), *args)

    # ---- plumbing ----
    def _send(self, status: int, payload, content_type: str = "application/json") -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: APIError) -> None:
        self._send(e.status, e.body())

    def _guard(self, fn) -> None:
        try:
            fn()
        except APIError as e:
            self._error(e)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # our bug: report it, keep serving
            log.exception("internal error")
            try:
                self._error(APIError(f"internal error: {type(e).__name__}: {e}", 500,
                                     type_="internal_error"))
            except OSError:
                self.close_connection = True

    def do_GET(self):
        self._guard(self._get)

    def do_POST(self):
        self._guard(self._post)

    def _get(self) -> None:
        path = self.path.split("?", 1)[0]
        srv = self.server
        if path in ("/health", "/ping"):
            self._send(200, b"", "text/plain")
        elif path == "/v1/models":
            self._send(200, {"object": "list", "data": [{
                "id": srv.model_name, "object": "model", "created": srv.created,
                "owned_by": "kvjax", "root": srv.engine.cfg.name,
                "max_model_len": srv.engine.max_model_len}]})
        elif path == "/metrics":
            text = render(srv.model_name, srv.engine.metrics, srv.engine.stats())
            self._send(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")
        else:
            raise APIError(f"no route for GET {path}", 404, code="not_found")

    def _body(self) -> dict:
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise APIError("bad Content-Length") from None
        if n <= 0:
            raise APIError("the request has no JSON body")
        if n > MAX_BODY:
            self.close_connection = True
            raise APIError("the request body is too large", 413)
        raw = self.rfile.read(n)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(f"invalid JSON body: {e}") from None
        if not isinstance(body, dict):
            raise APIError("the JSON body must be an object")
        return body

    def _post(self) -> None:
        path = self.path.split("?", 1)[0]
        if path not in ("/v1/completions", "/v1/chat/completions"):
            self._body_drain()
            raise APIError(f"no route for POST {path}", 404, code="not_found")
        body = self._body()
        chat = path == "/v1/chat/completions"
        srv = self.server
        model = _get(body, "model", str, required=True)
        if model != srv.model_name:
            raise APIError(f"The model '{model}' does not exist; this server serves "
                           f"'{srv.model_name}'", param="model", code="model_not_found")
        engine, tok = srv.engine, srv.tokenizer
        if chat:
            prompt = _get(body, "messages", list, required=True)
            prompts = [tok.encode(_chat_prompt(tok, prompt))]
        else:
            prompts = _prompts(tok, body)
        eviction = _eviction(body, engine.ecfg.eviction)
        salt = _get(body, "cache_salt", str, None)
        precision = _get(body, "kv_precision", str, "auto")
        stream = _get(body, "stream", bool, False)
        opts = _get(body, "stream_options", dict, {})
        include_usage = bool(opts.get("include_usage", False))
        requests, stops = [], []
        for ids in prompts:
            default_max = engine.max_model_len - len(ids) if chat else 16
            params, stop = _sampling(body, max(default_max, 1), engine.max_model_len, len(ids),
                                     bounded=not eviction.enabled)
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            try:
                req = engine.make_request(rid, ids, params, salt, eviction, precision)
            except RequestError as e:
                raise APIError(str(e), param="messages" if chat else "prompt") from None
            req.out = queue.Queue()
            requests.append(req)
            stops.append(stop)
        for req in requests:
            engine.add_request(req)
        try:
            if stream:
                self._stream(requests, stops, chat, include_usage)
            else:
                self._complete(requests, stops, chat)
        finally:
            for req in requests:
                if not req.finished:
                    engine.abort(req.request_id)

    def _body_drain(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        if 0 < n <= MAX_BODY:
            self.rfile.read(n)

    # ---- generation ----
    def _events(self, req, stop: list[str]):
        """Yields (text piece, finish_reason or None) as tokens arrive; stop strings end the
        request and are not returned (text that could start one is held back)."""
        dec = StreamDecoder(self.server.tokenizer)
        held = ""
        hold = max((len(s) for s in stop), default=1) - 1
        while True:
            token, reason = req.out.get()
            if reason == "error":
                raise APIError("the engine failed on this request", 500, type_="internal_error")
            piece = dec.push(token) if token is not None and not (
                reason == "stop" and token in self.server.engine.eos_ids) else ""
            held += piece
            if stop:
                cut = min((i for i in (held.find(s) for s in stop) if i >= 0), default=-1)
                if cut >= 0:
                    self.server.engine.abort(req.request_id)
                    yield held[:cut], "stop"
                    return
            if reason:
                yield held, reason
                return
            if len(held) > hold:
                out = held[: len(held) - hold] if hold else held
                held = held[len(out):]
                yield out, None

    def _usage(self, requests) -> dict:
        prompt = sum(len(r.prompt_ids) for r in requests)
        completion = sum(len(r.output_ids) for r in requests)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {
                    "cached_tokens": sum(max(r.num_cached_prompt, 0) for r in requests)}}

    def _complete(self, requests, stops, chat: bool) -> None:
        choices = []
        for i, (req, stop) in enumerate(zip(requests, stops, strict=True)):
            text, reason = "", None
            for piece, why in self._events(req, stop):
                text, reason = text + piece, why
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": None, "finish_reason": reason})
            else:
                choices.append({"index": i, "text": text, "logprobs": None,
                                "finish_reason": reason})
        self._send(200, {"id": requests[0].request_id,
                         "object": "chat.completion" if chat else "text_completion",
                         "created": int(time.time()), "model": self.server.model_name,
                         "choices": choices, "usage": self._usage(requests)})

    def _stream(self, requests, stops, chat: bool, include_usage: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        rid, created = requests[0].request_id, int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def send(payload) -> None:
            data = b"data: " + (payload if isinstance(payload, bytes)
                                else json.dumps(payload).encode()) + b"\n\n"
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def chunk(choice: dict, usage=None) -> dict:
            return {"id": rid, "object": obj, "created": created,
                    "model": self.server.model_name, "choices": [choice] if choice else [],
                    **({"usage": usage} if include_usage else {})}

        try:
            for i, (req, stop) in enumerate(zip(requests, stops, strict=True)):
                if chat:
                    send(chunk({"index": i, "delta": {"role": "assistant", "content": ""},
                                "logprobs": None, "finish_reason": None}))
                for piece, reason in self._events(req, stop):
                    if not piece and not reason:
                        continue
                    if chat:
                        delta = {"content": piece} if piece else {}
                        send(chunk({"index": i, "delta": delta, "logprobs": None,
                                    "finish_reason": reason}))
                    else:
                        send(chunk({"index": i, "text": piece, "logprobs": None,
                                    "finish_reason": reason}))
            if include_usage:
                send(chunk({}, self._usage(requests)))
        except APIError as e:  # headers are gone: report the error in the stream
            send(e.body())
        send(b"[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def _prompts(tok: Tokenizer, body: dict) -> list[list[int]]:
    prompt = body.get("prompt")
    if prompt is None:
        raise APIError("missing required field 'prompt'", param="prompt")

    def one(p) -> list[int]:
        if isinstance(p, str):
            return tok.encode(p)
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                             for t in p):
            return list(p)
        raise APIError("'prompt' must be a string, a list of token ids, or a list of those",
                       param="prompt")

    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        out = [one(p) for p in prompt]
    else:
        out = [one(prompt)]
    if any(not ids for ids in out):
        raise APIError("the prompt is empty", param="prompt")
    return out


# ---- command line ------------------------------------------------------------------------------
def define_flags() -> None:
    cli.define_config_flags()
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
    flags.DEFINE_integer("port", 8000, "Port (0 = any free port).", lower_bound=0)
    flags.DEFINE_string("served_model_name", None, "Model name in the API (default: config).")
    flags.DEFINE_string("weights", None, "GGUF file, HF checkpoint dir or kvjax orbax dir.")
    flags.DEFINE_bool("random_weights", False, "Random weights with the config's real shapes.")
    flags.DEFINE_bool("enable_prefix_caching", False, "Reuse cached full pages of prompts.")
    flags.DEFINE_integer("max_num_seqs", 32, "Requests in the running batch.", lower_bound=1)
    flags.DEFINE_integer("max_model_len", None, "Prompt + output tokens per request "
                         "(default: the model's context).", lower_bound=2)
    flags.DEFINE_integer("max_num_batched_tokens", 512, "Tokens per engine step.", lower_bound=1)
    flags.DEFINE_integer("num_kv_pages", None, "KV pages in the main pool (overrides "
                         "--gpu-memory-utilization).", lower_bound=2)
    flags.DEFINE_float("gpu_memory_utilization", 0.9, "Fraction of device memory to use.",
                       lower_bound=0.01, upper_bound=1.0)
    flags.DEFINE_integer("full_precision_pages", 0, "Pages of a full-precision pool (0 = none).",
                         lower_bound=0)
    flags.DEFINE_string("full_precision_dtype", "", "Cache dtype of that pool (bf16 or f32).")
    flags.DEFINE_integer("full_precision_threshold", 0, "Prompts longer than this go to the "
                         "full-precision pool (0 = only requests with kv_precision=full).",
                         lower_bound=0)
    flags.DEFINE_enum("kv_eviction", "none", ["none", "streaming", "h2o"],
                      "Default eviction policy for requests.")
    flags.DEFINE_integer("sink_tokens", 4, "StreamingLLM/H2O sink tokens.", lower_bound=0)
    flags.DEFINE_integer("eviction_window", 512, "Recent tokens kept by eviction.", lower_bound=1)
    flags.DEFINE_integer("heavy_tokens", 128, "H2O heavy-hitter tokens.", lower_bound=0)
    flags.DEFINE_integer("seed", 0, "Sampling seed for requests without one.")
    flags.DEFINE_bool("warmup", True, "Compile the decode and prefill shapes before serving.")


def build(cfg, params, tokenizer: Tokenizer, ecfg: EngineConfig, host: str = "127.0.0.1",
          port: int = 0, model_name: str | None = None) -> Server:
    engine = Engine(cfg, params, ecfg, eos_ids=tuple(tokenizer.eos_ids),
                    model_name=model_name or cfg.name)
    for line in engine.startup_lines:
        log.info(line)
    return Server((host, port), engine, tokenizer, engine.model_name)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(asctime)s %(name)s] %(message)s")
    from kvjax.generate import load_model

    cfg = cli.config_from_flags()
    params, tokenizer = load_model(cfg, FLAGS.weights, FLAGS.random_weights, FLAGS.seed)
    try:
        ecfg = EngineConfig(
            max_num_seqs=FLAGS.max_num_seqs, max_model_len=FLAGS.max_model_len or 0,
            max_num_batched_tokens=FLAGS.max_num_batched_tokens,
            num_pages=FLAGS.num_kv_pages or 0, gpu_memory_utilization=FLAGS.gpu_memory_utilization,
            enable_prefix_caching=FLAGS.enable_prefix_caching,
            eviction=EvictionConfig(FLAGS.kv_eviction, FLAGS.sink_tokens, FLAGS.eviction_window,
                                    FLAGS.heavy_tokens),
            full_precision_pages=FLAGS.full_precision_pages,
            full_precision_dtype=FLAGS.full_precision_dtype,
            full_precision_threshold=FLAGS.full_precision_threshold, seed=FLAGS.seed)
        server = build(cfg, params, tokenizer, ecfg, FLAGS.host, FLAGS.port,
                       FLAGS.served_model_name)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    del params
    if FLAGS.warmup:
        t0 = time.perf_counter()
        server.engine.warmup()
        log.info("compiled the decode and prefill shapes in %.1f s", time.perf_counter() - t0)
    server.engine.start()
    log.info("Serving %s on %s (OpenAI API at %s/v1)", server.model_name, server.url, server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.engine.stop()
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
