"""Request bodies (pydantic): types checked here, meaning checked by the routes.

Scalars are strict (a string where a number belongs is a 400, not silently coerced). Unknown
fields are kept in ``model_extra`` so the routes can reject them by name; parameters that are
part of OpenAI's API but that this server does not implement are declared, so that a request
using them gets a clear "not supported" error instead of "unrecognized".

One extra body parameter of this server (the openai client sends it with ``extra_body=``):
``json_whitespace``, "compact" (the default: no whitespace between JSON tokens, so a model
cannot fill a constrained object with whitespace until its budget runs out) or "flexible"
(whitespace allowed wherever JSON allows it), for ``json_schema`` / ``json_object`` outputs and
function arguments.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Temperature = Field(default=None, ge=0.0, le=2.0)
TopP = Field(default=None, gt=0.0, le=1.0)
JsonWhitespace = Literal["compact", "flexible"] | None


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Generation(_Body):
    """Fields of every generation request."""

    model: StrictStr | None = None
    temperature: StrictFloat | None = Temperature
    top_p: StrictFloat | None = TopP
    stream: StrictBool | None = None
    user: StrictStr | None = None  # accepted and ignored


class StreamOptions(_Body):
    include_usage: StrictBool | None = None


class _Completion(_Generation):
    """Fields shared by chat and text completions."""

    seed: StrictInt | None = None
    n: StrictInt | None = None
    stream_options: StreamOptions | None = None
    # not supported (400 unless at the default)
    stop: StrictStr | list[StrictStr] | None = None
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    logit_bias: dict[str, Any] | None = None


class ReasoningParam(_Body):
    effort: Any = None  # low | medium | high (checked by the route: a clear message)
    summary: Any = None  # accepted and ignored: the raw reasoning is returned instead
    generate_summary: Any = None


class ResponsesRequest(_Generation):
    input: StrictStr | list[Any]
    instructions: StrictStr | None = None
    max_output_tokens: StrictInt | None = None
    reasoning: ReasoningParam | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None  # checked by params.request_constraint
    parallel_tool_calls: StrictBool | None = None
    json_whitespace: JsonWhitespace = None  # this server's extra (module docstring)
    stream_options: dict[str, Any] | None = None
    store: StrictBool | None = None
    previous_response_id: StrictStr | None = None
    metadata: dict[str, StrictStr] | None = None
    text: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    # accepted and ignored
    safety_identifier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None
    service_tier: StrictStr | None = None
    # part of OpenAI's API, not supported here (400 when set to anything but the default)
    include: list[StrictStr] | None = None
    top_logprobs: StrictInt | None = None
    background: StrictBool | None = None
    max_tool_calls: StrictInt | None = None
    conversation: Any = None
    prompt: Any = None


class ChatCompletionRequest(_Completion):
    messages: list[Any]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None
    reasoning_effort: Any = None
    response_format: dict[str, Any] | None = None
    json_whitespace: JsonWhitespace = None  # this server's extra (module docstring)
    # accepted and ignored
    metadata: dict[str, StrictStr] | None = None
    store: StrictBool | None = None
    service_tier: StrictStr | None = None
    safety_identifier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None
    # not supported (400 unless at the default)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    modalities: list[StrictStr] | None = None
    audio: Any = None
    prediction: Any = None
    functions: Any = None
    function_call: Any = None
    web_search_options: Any = None


class CompletionRequest(_Completion):
    prompt: StrictStr | list[StrictInt] | list[list[StrictInt]] | list[StrictStr]
    max_tokens: StrictInt | None = 16
    # not supported (400 unless at the default)
    echo: StrictBool | None = None
    logprobs: StrictInt | None = None
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None
