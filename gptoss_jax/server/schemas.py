"""Request bodies (pydantic): types checked here, meaning checked by the routes.

Scalars are strict (a string where a number belongs is a 400, not silently coerced). Unknown
fields are kept in ``model_extra`` so the routes can reject them by name; parameters that are
part of OpenAI's API but that this server does not implement are declared, so that a request
using them gets a clear "not supported" error instead of "unrecognized". Ranges that OpenAI's
API states (``n``, ``top_logprobs``, the penalties) are declared here, so ``/openapi.json``
shows them and a value outside is a 400 naming the field. vLLM's extra sampling parameters
(``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``; the openai client sends them
with ``extra_body=``) are accepted by every generation route.

One more extra body parameter, this server's own: ``json_whitespace``, "compact" (the default:
no whitespace between JSON tokens, so a model cannot fill a constrained object with whitespace
until its budget runs out) or "flexible" (whitespace allowed wherever JSON allows it), for
``json_schema`` / ``json_object`` outputs and function arguments.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Temperature = Field(default=None, ge=0.0, le=2.0)
TopP = Field(default=None, gt=0.0, le=1.0)
Penalty = Field(default=None, ge=-2.0, le=2.0)
TopLogprobs = Field(default=None, ge=0, le=20)


def _config(*examples: dict) -> ConfigDict:
    # unknown fields are kept (to be rejected by name, see the module docstring), so documented
    # as not allowed; the examples are requests this server answers
    extra: dict[str, Any] = {"additionalProperties": False}
    if examples:
        extra["examples"] = list(examples)
    return ConfigDict(extra="allow", json_schema_extra=extra)
JsonWhitespace = Literal["compact", "flexible"] | None


class _Body(BaseModel):
    model_config = _config()


class _Generation(_Body):
    """Fields of every generation request."""

    model: StrictStr | None = None
    temperature: StrictFloat | None = Temperature
    top_p: StrictFloat | None = TopP
    stream: StrictBool | None = None
    user: StrictStr | None = None  # accepted and ignored
    # vLLM's extra sampling parameters
    top_k: StrictInt | None = Field(default=None, ge=-1)  # -1 / 0: off
    min_p: StrictFloat | None = Field(default=None, ge=0.0, lt=1.0)
    repetition_penalty: StrictFloat | None = Field(default=None, gt=0.0)
    min_tokens: StrictInt | None = Field(default=None, ge=0)


class StreamOptions(_Body):
    include_usage: StrictBool | None = None
    include_obfuscation: StrictBool | None = None  # accepted and ignored (no obfuscation)


class ResponseStreamOptions(_Body):
    """The Responses API's ``stream_options`` (no ``include_usage``: the final event carries it)."""

    include_obfuscation: StrictBool | None = None  # accepted and ignored (no obfuscation)


class _Completion(_Generation):
    """Fields shared by chat and text completions."""

    seed: StrictInt | None = None
    n: StrictInt | None = Field(default=None, ge=1, le=128)
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None  # at most 4 (checked by the route)
    presence_penalty: StrictFloat | None = Penalty
    frequency_penalty: StrictFloat | None = Penalty
    logit_bias: dict[str, Any] | None = None  # token id -> bias in [-100, 100] (checked by the route)


class ReasoningParam(_Body):
    effort: Any = None  # low | medium | high (checked by the route: a clear message)
    # accepted, echoed and otherwise ignored: the raw reasoning is returned instead of a summary
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None  # deprecated name of summary


class ChatReasoningParam(_Body):
    """Chat completions' ``reasoning`` (OpenRouter's convention, which OpenAI's gpt-oss guide
    asks Chat Completions servers to follow): ``effort`` (as ``reasoning_effort``) and
    ``exclude`` (true: the reply carries no ``reasoning``; the model still reasons)."""

    effort: Any = None
    exclude: StrictBool | None = None


class TextParam(_Body):
    """The Responses API's ``text``: the output ``format`` (read by ``params.request_constraint``)
    and ``verbosity`` (accepted and echoed; this model has no verbosity control)."""

    format: dict[str, Any] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(_Generation):
    model_config = _config({"model": "", "input": "Hello", "max_output_tokens": 16, "top_logprobs": 2,
                            "include": ["message.output_text.logprobs"]})

    input: StrictStr | list[Any]
    instructions: StrictStr | None = None
    max_output_tokens: StrictInt | None = None
    reasoning: ReasoningParam | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None  # checked by params.request_constraint
    parallel_tool_calls: StrictBool | None = None
    json_whitespace: JsonWhitespace = None  # this server's extra (module docstring)
    stream_options: ResponseStreamOptions | None = None
    store: StrictBool | None = None
    previous_response_id: StrictStr | None = None
    metadata: dict[str, StrictStr] | None = None
    text: TextParam | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[StrictStr] | None = None  # "message.output_text.logprobs"
    top_logprobs: StrictInt | None = TopLogprobs
    background: StrictBool | None = None
    max_tool_calls: StrictInt | None = None
    reasoning_effort: Any = None  # openai/gpt-oss's reference server: an alias of reasoning.effort
    # accepted and ignored
    safety_identifier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    service_tier: StrictStr | None = None
    # part of OpenAI's API, not supported here (400 when set to anything but the default)
    conversation: Any = None
    prompt: Any = None


class InputTokensRequest(_Body):
    """``POST /v1/responses/input_tokens``: the fields of a Responses request that shape its
    input (OpenAI's TokenCountsBody); the count is that of the prompt ``POST /v1/responses``
    would run."""

    model_config = _config({"model": "", "input": "Hello", "instructions": "Be brief."})

    model: StrictStr | None = None
    input: StrictStr | list[Any] | None = None
    instructions: StrictStr | None = None
    previous_response_id: StrictStr | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None
    text: TextParam | None = None
    reasoning: ReasoningParam | None = None
    truncation: Literal["auto", "disabled"] | None = None
    # part of OpenAI's API, not supported here (400 when set)
    conversation: Any = None
    personality: Any = None


class ChatCompletionRequest(_Completion):
    model_config = _config({"messages": [{"role": "user", "content": "Hello"}], "max_completion_tokens": 16,
                            "n": 2, "logprobs": True, "top_logprobs": 2, "stop": ["\n\n"], "seed": 7})

    messages: list[Any]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None
    reasoning_effort: Any = None
    reasoning: ChatReasoningParam | None = None
    include_reasoning: StrictBool | None = None  # vLLM's extra: false = reasoning.exclude
    verbosity: Literal["low", "medium", "high"] | None = None  # accepted and ignored
    response_format: dict[str, Any] | None = None
    json_whitespace: JsonWhitespace = None  # this server's extra (module docstring)
    # accepted and ignored
    metadata: dict[str, StrictStr] | None = None
    store: StrictBool | None = None
    service_tier: StrictStr | None = None
    safety_identifier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = TopLogprobs  # needs logprobs: true
    # not supported (400 unless at the default)
    modalities: list[StrictStr] | None = None
    audio: Any = None
    prediction: Any = None
    functions: Any = None
    function_call: Any = None
    web_search_options: Any = None


class CompletionRequest(_Completion):
    model_config = _config({"prompt": "Once upon a time", "max_tokens": 8, "logprobs": 2, "n": 2,
                            "stream": True, "stream_options": {"include_usage": True}})

    prompt: StrictStr | list[StrictInt] | list[list[StrictInt]] | list[StrictStr]
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = Field(default=None, ge=0, le=20)  # the top N (vLLM's bound, 20)
    # not supported (400 unless at the default)
    echo: StrictBool | None = None
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None
