"""OpenAI request models -> engine requests: sampling parameters, prompts, chat, errors."""

from __future__ import annotations

from dataclasses import dataclass

from kvjax.engine import Engine, EvictionConfig, RequestError, SamplingParams
from kvjax.loaders.tokenizer import Tokenizer
from kvjax.sampling import TOP_LOGPROBS_MAX
from kvjax.server.protocol import ChatCompletionRequest, CompletionRequest, KvEviction


class APIError(Exception):
    """An OpenAI-style error: {"error": {"message", "type", "param", "code"}} with a status."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.type, self.code = status, param, type_, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclass
class Plan:
    """What one HTTP request turns into: engine requests (prompt-major, n per prompt)."""
    prompts: list[list[int]]
    params: list[SamplingParams]  # per choice
    stop: list[str]
    eviction: EvictionConfig
    logprobs: int | None  # None = off, else the top-n per token (0 = just the sampled one)
    echo: bool = False


def eviction(spec, default: EvictionConfig) -> EvictionConfig:
    if spec is None:
        return default
    if isinstance(spec, str):
        spec = KvEviction(policy=spec)
    kw = {k: v for k, v in spec.model_dump().items() if v is not None}
    try:
        return EvictionConfig(**{**default.__dict__, **kw})
    except (TypeError, ValueError) as e:
        raise APIError(str(e), param="kv_eviction") from None


def chat_prompt(tokenizer: Tokenizer, req: ChatCompletionRequest) -> str:
    msgs = []
    for m in req.messages:
        content = m.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        msgs.append({"role": m.role, "content": content or ""})
    if tokenizer.chat_template:
        try:
            return tokenizer.apply_chat_template(msgs)
        except Exception as e:  # the template's own raise_exception, or a rendering error
            raise APIError(f"chat template: {e}", param="messages") from None
    # No template (byte tokenizer, random weights): a plain transcript.
    return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"


def completion_prompts(tok: Tokenizer, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        out = [tok.encode(prompt)]
    elif prompt and isinstance(prompt[0], int):
        out = [list(prompt)]
    else:
        out = [tok.encode(p) if isinstance(p, str) else list(p) for p in prompt]
    if any(not ids for ids in out):
        raise APIError("the prompt is empty", param="prompt")
    return out


def plan(engine: Engine, tok: Tokenizer, req: CompletionRequest | ChatCompletionRequest
         ) -> Plan:
    """Validate everything the schema cannot (context length, vocabulary, combinations)."""
    chat = isinstance(req, ChatCompletionRequest)
    vocab = engine.cfg.model.vocab_size
    if chat:
        prompts = [tok.encode(chat_prompt(tok, req))]
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs and not req.logprobs:
            raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
        max_tokens = req.max_completion_tokens or req.max_tokens
    else:
        prompts = completion_prompts(tok, req.prompt)
        logprobs = req.logprobs
        if req.echo and logprobs is not None:
            raise APIError("echo with logprobs (prompt logprobs) is not supported", param="echo")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError("best_of other than n is not supported", param="best_of")
        max_tokens = req.max_tokens
    if logprobs is not None and logprobs > TOP_LOGPROBS_MAX:
        raise APIError(f"at most {TOP_LOGPROBS_MAX} top logprobs", param="logprobs")
    evict = eviction(req.kv_eviction, engine.ecfg.eviction)
    bias = []
    for key, value in (req.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise APIError(f"logit_bias key {key!r} is not a token id", param="logit_bias"
                           ) from None
        if not 0 <= token < vocab:
            raise APIError(f"logit_bias token {token} is outside the vocabulary [0, {vocab})",
                           param="logit_bias")
        bias.append((token, float(value)))
    stops = req.stop if isinstance(req.stop, list) else [req.stop] if req.stop else []
    stop_ids = tuple(req.stop_token_ids or ())
    if any(t >= vocab for t in stop_ids):
        raise APIError("stop_token_ids must be in [0, vocab_size)", param="stop_token_ids")
    params = []
    for ids in prompts:
        mt = max_tokens or (max(engine.max_model_len - len(ids), 1) if chat else 16)
        if not evict.enabled and len(ids) + mt > engine.max_model_len:
            raise APIError(
                f"This model's maximum context length is {engine.max_model_len} tokens. However, "
                f"you requested {len(ids) + mt} tokens ({len(ids)} in the prompt, {mt} in the "
                "completion). Please reduce the length of the prompt or completion.",
                param="max_tokens")
        if req.min_tokens > mt:
            raise APIError(f"min_tokens ({req.min_tokens}) exceeds max_tokens ({mt})",
                           param="min_tokens")
        for i in range(req.n):
            params.append(SamplingParams(
                max_tokens=mt, temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p, top_k=max(req.top_k or 0, 0),
                seed=None if req.seed is None else req.seed + i, stop_token_ids=stop_ids,
                ignore_eos=req.ignore_eos, presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                repetition_penalty=req.repetition_penalty or 1.0, logit_bias=tuple(bias),
                min_tokens=req.min_tokens, logprobs=logprobs))
    return Plan(prompts, params, [s for s in stops if s], evict, logprobs,
                echo=not chat and req.echo)


def make_requests(engine: Engine, p: Plan, req, rid: str) -> list:
    out = []
    n = req.n
    for j, ids in enumerate(p.prompts):
        for i in range(n):
            try:
                out.append(engine.make_request(f"{rid}-{j * n + i}", ids, p.params[j * n + i],
                                               req.cache_salt, p.eviction, req.kv_precision))
            except RequestError as e:
                param = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
                raise APIError(str(e), param=param) from None
    return out
