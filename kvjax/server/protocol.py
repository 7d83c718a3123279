"""Pydantic models of the OpenAI requests and responses the server speaks.

Requests are strict (`"10"` is not an int) and closed (`extra="forbid"`), so a mistyped or unknown
field is a 400 that names it, and the served /openapi.json is the contract schemathesis tests.
Beyond OpenAI's fields, vLLM's extensions: top_k, min_tokens, repetition_penalty, ignore_eos,
stop_token_ids, cache_salt; and ours: kv_precision, kv_eviction.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16  # choices per prompt (each one a request in the engine)
MAX_STOP = 4

Strict = ConfigDict(extra="forbid", strict=True)
Open = ConfigDict(extra="allow")  # responses: clients ignore what they do not know

# Names pydantic puts in an error's location for union members (not field names).
UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal"}

# Fields OpenAI defines that this server cannot honour: a 400 naming them, not "unknown field".
UNSUPPORTED = {
    "tools": "tool calling", "tool_choice": "tool calling", "functions": "function calling",
    "function_call": "function calling", "parallel_tool_calls": "tool calling",
    "response_format": "structured output (response_format)", "audio": "audio output",
    "modalities": "non-text modalities", "prediction": "predicted outputs",
    "web_search_options": "web search", "suffix": "suffix (insertion)",
    "reasoning_effort": "reasoning_effort", "store": "stored completions",
    "metadata": "stored completions (metadata)", "service_tier": "service tiers",
    "guided_json": "guided decoding", "guided_regex": "guided decoding",
    "guided_choice": "guided decoding", "guided_grammar": "guided decoding",
}


class KvEviction(BaseModel):
    model_config = Strict
    policy: Literal["none", "streaming", "h2o"] = "streaming"
    sink_tokens: Annotated[int, Field(ge=0)] | None = None
    window: Annotated[int, Field(ge=1)] | None = None
    heavy_tokens: Annotated[int, Field(ge=0)] | None = None


class StreamOptions(BaseModel):
    model_config = Strict
    include_usage: bool = False
    continuous_usage_stats: bool = False


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Stop = str | Annotated[list[str], Field(max_length=MAX_STOP)] | None


class _Sampling(BaseModel):
    """Fields shared by completions and chat."""
    model_config = Strict
    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    seed: int | None = None
    stop: Stop = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    cache_salt: str | None = None
    return_tokens_as_token_ids: bool = False  # vLLM's: logprobs tokens as "token_id:N"
    kv_precision: Literal["auto", "full", "default"] = "auto"
    kv_eviction: Literal["none", "streaming", "h2o"] | KvEviction | None = None


class CompletionRequest(_Sampling):
    prompt: str | TokenIds | Annotated[list[str], Field(min_length=1)] | Annotated[
        list[TokenIds], Field(min_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None


class TextPart(BaseModel):
    model_config = Strict
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = Strict
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


# ---- responses ---------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


class CompletionResponse(BaseModel):
    model_config = Open
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


class ChatCompletionResponse(BaseModel):
    model_config = Open
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvjax"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: Any = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
