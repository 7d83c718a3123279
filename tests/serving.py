"""An in-process kvjax server for the HTTP tests (byte tokenizer, random weights) and an openai
client for it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import openai

from kvjax.config import Config
from kvjax.engine import EngineConfig
from kvjax.loaders.tokenizer import byte_tokenizer
from kvjax.serve import build


@contextlib.contextmanager
def running_server(cfg: Config, params: dict, ecfg: EngineConfig) -> Iterator:
    """The server on a free port, its engine loop on a background thread; closed on exit."""
    srv = build(cfg, params, byte_tokenizer(), ecfg, port=0)
    srv.start_background()
    try:
        yield srv
    finally:
        srv.close()


def client_for(url: str, timeout: float = 120) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=timeout)
