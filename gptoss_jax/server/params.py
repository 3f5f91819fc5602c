"""Request parameters that several endpoints check the same way, each check in one place.

Unknown fields, parameters of OpenAI's API that this server does not implement (audio,
predictions, ``echo``...: a 400 naming them unless they are at their "off" value),
``stream_options`` without ``stream``, ``metadata`` limits, the model (a blank or missing one is the served model;
aliases), the new-token budget against the context, reasoning effort, and the output
constraint (format, tools, tool choice). The sampling parameters (penalties, ``logit_bias``,
``seed``, ``n``, ``stop``, logprobs, vLLM's extras) are read in
:mod:`gptoss_jax.server.request_sampling`. Every failure is an
:class:`~gptoss_jax.server.errors.APIError` whose ``param`` names the field.

Per-request constraints start here: ``request_constraint`` is the one reader of a request's
structured-output and tool-choice fields.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from gptoss_jax.chat.render import EFFORTS
from gptoss_jax.inference.constraints import ConstraintError, RequestConstraint, from_chat, from_responses
from gptoss_jax.server.errors import APIError, unsupported
from gptoss_jax.server.state import ServerState

# Chat and text completions: parameter -> the value(s) that mean "off" (anything else: a 400).
_OFF_VALUES = {
    "audio": (None,), "prediction": (None,), "functions": (None,),
    "function_call": (None,), "web_search_options": (None,), "echo": (None, False),
    "suffix": (None, ""), "best_of": (None, 1),
}


def check_extra(body, allowed_ignored: tuple[str, ...] = (), *, at: str = "") -> None:
    """Unknown request fields are an error, as with OpenAI (not silently ignored). ``at``: the
    path of a nested object (``reasoning``), which the parameter's name starts with."""
    for key in (body.model_extra or {}):
        if key not in allowed_ignored:
            name = f"{at}.{key}" if at else key
            raise APIError(f"Unrecognized request argument supplied: {name}", param=name,
                           code="unknown_parameter")


def check_metadata(metadata: Mapping[str, str] | None) -> None:
    """``metadata``: at most 16 pairs, keys up to 64 characters, values up to 512 (OpenAI's
    limits; the values' type is checked by the schema)."""
    if metadata is None:
        return
    if len(metadata) > 16:
        raise APIError(f"Invalid 'metadata': too many properties. Expected an object with at most 16 "
                       f"properties, but got an object with {len(metadata)} properties instead.",
                       param="metadata", code="object_above_max_properties")
    for key, value in metadata.items():
        if len(key) > 64:
            raise APIError(f"Invalid 'metadata': key {key[:64]!r}... is {len(key)} characters long; at most 64 "
                           f"are allowed.", param="metadata", code="invalid_value")
        if len(value) > 512:
            raise APIError(f"Invalid 'metadata.{key}': string too long. Expected a string with maximum length "
                           f"512, but got a string with length {len(value)} instead.", param=f"metadata.{key}",
                           code="string_above_max_length")


def check_completion_params(req) -> None:
    """The fields shared by chat and text completions: unknown ones, ``stream_options``,
    ``metadata``, and the parameters this server does not implement."""
    check_extra(req)
    check_stream_options(req)
    check_metadata(getattr(req, "metadata", None))
    for name, off in _OFF_VALUES.items():
        if name in type(req).model_fields and getattr(req, name) not in off:
            raise unsupported(name)


def check_stream_options(req) -> None:
    """``stream_options`` only with ``stream: true``, as OpenAI answers."""
    if req.stream_options is None:
        return
    if req.stream is not True:
        raise APIError("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                       param="stream_options", code="invalid_value")
    if hasattr(req.stream_options, "model_extra"):
        check_extra(req.stream_options, at="stream_options")


def model_of(st: ServerState, model: str | None) -> str:
    """The served model's id for a request's ``model``: a blank or missing one means the served
    model (its main id), an alias is itself; anything else is a 404."""
    if model is None or model == "":
        return st.model_name
    if model not in st.model_names:
        served = ", ".join(repr(n) for n in st.model_names)
        raise APIError(f"The model {model!r} does not exist; this server serves {served}", status=404,
                       param="model", code="model_not_found")
    return model


def check_model(st: ServerState, model: str | None) -> None:
    model_of(st, model)


def token_budget(st: ServerState, prompt_len: int, requested: int | None, param: str,
                 input_param: str) -> int:
    """New-token budget: ``requested`` or the rest of the context; 400 if it cannot fit.
    ``param`` names the budget field, ``input_param`` the prompt's."""
    ctx = st.context
    if prompt_len >= ctx:
        raise APIError(f"The input is {prompt_len} tokens, but this server's context is "
                       f"{ctx} tokens", param=input_param, code="context_length_exceeded")
    if requested is None:
        return ctx - prompt_len
    if requested < 1:
        raise APIError(f"Invalid {param!r}: integer below minimum value. Expected a value >= 1, but got "
                       f"{requested} instead.", param=param, code="integer_below_min_value")
    if prompt_len + requested > ctx:
        raise APIError(f"{param!r} of {requested} plus the input of {prompt_len} tokens exceeds "
                       f"this server's context of {ctx} tokens (at most {ctx - prompt_len} "
                       f"more tokens fit)", param=param, code="context_length_exceeded")
    return requested


def effort_of(value: Any, param: str) -> str:
    """The reasoning effort (default medium)."""
    if value is None:
        return "medium"
    if not isinstance(value, str) or value not in EFFORTS:
        raise APIError(f"Unsupported value for {param!r}: {value!r}; this model supports "
                       f"{', '.join(EFFORTS)}", param=param, code="unsupported_value")
    return value


def request_constraint(req, api: Literal["responses", "chat"], *,
                       builtin_tools: Mapping[str, Sequence[str]] | None = None) -> RequestConstraint:
    """The request's output rules -- ``text.format`` (Responses) / ``response_format`` (chat),
    ``tools``, ``tool_choice``, ``parallel_tool_calls`` -- as a compiled constraint
    (``inference.constraints``), checked before a slot is taken: a schema, grammar or tool
    choice that cannot be enforced is a 400 naming the parameter (``text.format.schema``,
    ``tools[2].parameters``, ``tool_choice``). ``json_whitespace`` (an extra body parameter,
    "compact" by default) picks the JSON layout. ``builtin_tools``: the hosted tools' harmony
    recipients this server enabled for the request ({tool type: recipients})."""
    whitespace = getattr(req, "json_whitespace", None) or "compact"
    read = from_responses if api == "responses" else from_chat
    try:
        return read(req, builtin_tools=builtin_tools, whitespace=whitespace)
    except ConstraintError as e:
        raise APIError(e.message, param=e.param, code=e.code) from None
