"""``POST /v1/responses/input_tokens``: how many input tokens a Responses request would have.

OpenAI's API reference defines it with the request fields that shape the input (``input``,
``instructions``, ``previous_response_id``, ``tools``, ``tool_choice``, ``text``,
``reasoning``, ...) and answers ``{"object": "response.input_tokens", "input_tokens": N}``. The
count is the length of the harmony prompt ``POST /v1/responses`` would run for the same fields
(:func:`gptoss_jax.server.responses.request_prompt`: the system message with the reasoning
effort and any built-in tools, the developer message with the instructions, function tools and
a JSON schema's response format, the stored conversation, the new input). Nothing is generated
or stored. ``personality`` and ``conversation`` are a 400 (not supported here).
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from gptoss_jax.server import params, responses
from gptoss_jax.server.errors import unsupported
from gptoss_jax.server.openapi import errors
from gptoss_jax.server.schemas import InputTokensRequest, ResponsesRequest
from gptoss_jax.server.state import state

router = APIRouter()


@router.post("/v1/responses/input_tokens", responses=errors(400, 404, 409))
async def count_input_tokens(body: InputTokensRequest, request: Request):
    st = state(request)
    params.check_extra(body)
    if body.personality is not None:
        raise unsupported("personality")
    fields = body.model_dump(exclude_none=True, exclude={"personality"})
    req = ResponsesRequest.model_validate({**fields, "input": fields.get("input", [])})
    responses.check(req)
    params.model_of(st, req.model)
    return {"object": "response.input_tokens", "input_tokens": len(responses.request_prompt(st, req))}
