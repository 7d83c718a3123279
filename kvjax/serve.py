"""OpenAI-compatible HTTP server: `python -m kvjax.serve --config NAME --port 8000`.

Endpoints: POST /v1/completions and /v1/chat/completions (OpenAI request and response shapes,
`stream: true` as server-sent events), GET /v1/models, /health, /metrics (Prometheus text) and
/openapi.json (the request/response schema). Flags follow vLLM's: --kv-cache-dtype,
--enable-prefix-caching, --max-num-seqs, --max-model-len, --max-num-batched-tokens,
--gpu-memory-utilization, --num-kv-pages (vLLM's num_gpu_blocks_override), --served-model-name,
--tensor-parallel / --data-parallel (a device mesh; several processes via jax.distributed, see
scripts/serve_multihost.sh). At start it logs vLLM's sizing lines, "KV cache size: N tokens" and
"Maximum concurrency for M tokens per request: Xx", and how long startup took.

Stack: FastAPI + uvicorn + pydantic, as vLLM's server (kvjax/server/). The port is bound before
the model loads: until the engine is warm every route answers 503 {"error": {"code": "loading"}},
so clients never hang. Process 0 serves HTTP and schedules; other processes of a multi-host run
follow its steps (`Engine.follow`).

Extensions to the OpenAI request, as in vLLM: top_k, min_tokens, repetition_penalty, ignore_eos,
stop_token_ids, cache_salt (isolates prefix-cache entries per tenant), plus kv_precision ("full"
routes the request to the full-precision page pool) and kv_eviction ({"policy": "streaming"|"h2o",
"sink_tokens", "window", "heavy_tokens"}) for unbounded sessions. Responses report
usage.prompt_tokens_details.cached_tokens (prompt tokens served by the prefix cache). OpenAI
fields it cannot honour (tools, response_format, ...) are 400s naming the field.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
import time

from absl import flags

from kvjax import cli, launch
from kvjax.engine import Engine, EngineConfig
from kvjax.loaders.tokenizer import Tokenizer
from kvjax.server.app import Gate, State, create_app

log = logging.getLogger("kvjax.serve")
FLAGS = flags.FLAGS


class Server:
    """The HTTP front: a socket bound at construction, uvicorn serving the app on it."""

    def __init__(self, state: State, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.state = state
        self.app = Gate(create_app(state), state)
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(2048)
        self.server_address = self.sock.getsockname()
        self.uv = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off",
                                                timeout_graceful_shutdown=5))
        self._thread: threading.Thread | None = None

    @property
    def engine(self) -> Engine:
        return self.state.engine

    @property
    def model_name(self) -> str:
        return self.state.model_name

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def serve_background(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [self.sock]},
                                        name="kvjax-http", daemon=True)
        self._thread.start()
        return self._thread

    def start_background(self) -> threading.Thread:
        """Start the engine loop and serve on a daemon thread (tests, notebooks)."""
        self.engine.start()
        return self.serve_background()

    def close(self) -> None:
        self.uv.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.sock.close()
        if self.engine is not None:
            self.engine.stop()


def make_engine(cfg, params, tokenizer: Tokenizer, ecfg: EngineConfig,
                model_name: str | None = None, mesh=None) -> Engine:
    kw = {"mesh": mesh} if mesh is not None else {}
    engine = Engine(cfg, params, ecfg, eos_ids=tuple(tokenizer.eos_ids),
                    model_name=model_name or cfg.name, **kw)
    for line in engine.startup_lines:
        log.info(line)
    return engine


def build(cfg, params, tokenizer: Tokenizer, ecfg: EngineConfig, host: str = "127.0.0.1",
          port: int = 0, model_name: str | None = None, mesh=None) -> Server:
    """A ready server over a new engine (not started: call start_background)."""
    engine = make_engine(cfg, params, tokenizer, ecfg, model_name, mesh)
    state = State(engine.model_name, engine, tokenizer, ready=True)
    return Server(state, host, port)


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
    cli.define_eviction_flags()  # the default policy for requests without kv_eviction
    flags.DEFINE_integer("seed", 0, "Sampling seed for requests without one.")
    flags.DEFINE_bool("warmup", True, "Compile the decode and prefill shapes before serving.")
    launch.define_distributed_flags()


def engine_config() -> EngineConfig:
    return EngineConfig(
        max_num_seqs=FLAGS.max_num_seqs, max_model_len=FLAGS.max_model_len or 0,
        max_num_batched_tokens=FLAGS.max_num_batched_tokens,
        num_pages=FLAGS.num_kv_pages or 0, gpu_memory_utilization=FLAGS.gpu_memory_utilization,
        enable_prefix_caching=FLAGS.enable_prefix_caching,
        eviction=cli.eviction_from_flags(),
        full_precision_pages=FLAGS.full_precision_pages,
        full_precision_dtype=FLAGS.full_precision_dtype,
        full_precision_threshold=FLAGS.full_precision_threshold, seed=FLAGS.seed)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(asctime)s %(name)s] %(message)s")
    t_start = time.perf_counter()
    cfg = cli.config_from_flags()
    try:
        ecfg = engine_config()
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    launch.initialize_from_flags()  # a no-op unless this is one of several processes
    leader = launch.is_leader()
    server = None
    if leader:  # bind now: /health answers 503 "loading" until the engine is warm
        state = State(FLAGS.served_model_name or cfg.name)
        try:
            server = Server(state, FLAGS.host, FLAGS.port)
        except OSError as e:
            raise cli.UsageError(f"cannot listen on {FLAGS.host}:{FLAGS.port}: {e}") from None
        server.serve_background()
        log.info("Listening on %s (loading; every route answers 503 until ready)", server.url)
    from kvjax import sharding
    from kvjax.generate import load_model

    try:
        mesh = sharding.mesh_for_run(
            cfg, strict=FLAGS.tensor_parallel is not None or FLAGS.data_parallel is not None)
        params, tokenizer = load_model(cfg, FLAGS.weights, FLAGS.random_weights, FLAGS.seed,
                                       mesh)
        t_load = time.perf_counter()
        engine = make_engine(cfg, params, tokenizer, ecfg, FLAGS.served_model_name, mesh)
        del params
        if FLAGS.warmup:
            engine.warmup()
    except (ValueError, cli.UsageError) as e:
        if server is not None:
            server.state.failed = f"the server failed to start: {e}"
            server.close()
        raise cli.UsageError(str(e)) from None
    t_warm = time.perf_counter()
    log.info("startup took %.1f s (config + weights %.1f s, engine + warmup %.1f s)",
             t_warm - t_start, t_load - t_start, t_warm - t_load)
    if not leader:  # run process 0's steps until it stops
        engine.follow()
        return 0
    server.state.tokenizer, server.state.engine = tokenizer, engine
    server.state.model_name = engine.model_name
    engine.start()
    server.state.ready = True
    log.info("Serving %s on %s (OpenAI API at %s/v1)", engine.model_name, server.url, server.url)

    def _terminate(*_) -> None:  # SIGTERM: the same clean stop as ^C (releases followers)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        while server._thread.is_alive():
            server._thread.join(timeout=1.0)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
