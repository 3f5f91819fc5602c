"""``POST /v1/responses`` (plain and streaming) and ``GET /v1/responses/{id}``.

The reply is parsed from harmony as it is generated (:mod:`gptoss_jax.server.reply`):
analysis -> ``reasoning`` items (``content`` of ``reasoning_text``), final -> ``message``
items (phase ``final_answer``; commentary preambles: phase ``commentary``), tool calls ->
``function_call`` items (``custom_tool_call`` for custom tools); the object and its stream
events are built in :mod:`gptoss_jax.server.response_output`.

``text.format`` (``json_schema`` / ``json_object``), function tools' ``strict`` parameters,
custom tools' grammars, ``tool_choice`` and ``parallel_tool_calls`` are enforced while the
reply is generated (``params.request_constraint``; bad ones are a 400 before anything runs).
A JSON schema is also shown to the model in the developer message's ``# Response Formats``
section. A constraint that dead-ends mid-generation ends the response with status ``failed``
and an ``error`` (``server_error``); the server and the other requests carry on.

``store`` (default true, as in OpenAI's API) keeps the response and its conversation in the
server's :class:`~gptoss_jax.server.store.ResponseStore` for ``previous_response_id`` and
``GET``. A request goes: checks -> conversation (stored + new input) -> prompt -> job ->
reply -> stored. A request whose ``tools`` enable built-in tools (web search, code interpreter,
MCP: :mod:`gptoss_jax.server.builtin_tools`) declares them in the system message and goes
through the tool loop instead (:mod:`gptoss_jax.server.tool_loop`), every model call of it held
to the request's constraint (the hosted tools' recipients are allowed recipients there, and
``tool_choice`` may name one).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gptoss_jax.chat.messages import Message
from gptoss_jax.inference.constraints import RequestConstraint
from gptoss_jax.server import builtin_tools, generation, inputs, params, tool_loop
from gptoss_jax.server.errors import APIError, unsupported
from gptoss_jax.server.generation import SSEResponse
from gptoss_jax.server.reply import ReplyTracker
from gptoss_jax.server.response_output import ResponseRun, StreamEvents
from gptoss_jax.server.scheduler import ConstraintFailed, EngineError, Job
from gptoss_jax.server.schemas import ResponsesRequest
from gptoss_jax.server.state import ServerState, state
from gptoss_jax.server.store import StoredResponse
from gptoss_jax.tools import Toolbox

router = APIRouter()


def _check(req: ResponsesRequest) -> None:
    params.check_extra(req)
    if req.reasoning is not None:
        params.check_extra(req.reasoning)
    builtin_tools.check_include(req.include)
    if req.max_tool_calls is not None and req.max_tool_calls < 1:
        raise APIError(f"Invalid 'max_tool_calls': must be >= 1, got {req.max_tool_calls}",
                       param="max_tool_calls", code="invalid_value")
    if req.top_logprobs:
        raise unsupported("top_logprobs", "logprobs are not supported by this server")
    if req.background:
        raise unsupported("background", "background responses are not supported by this server")
    if req.conversation is not None:
        raise unsupported("conversation", "conversations are not supported; use previous_response_id")
    if req.prompt is not None:
        raise unsupported("prompt", "prompt templates are not supported by this server")


def _conversation(st: ServerState, req: ResponsesRequest) -> tuple[list[Message], dict[str, str]]:
    """The stored conversation of ``previous_response_id`` (if any) plus the new input, and the
    function names by ``call_id`` of every call in it."""
    call_names: dict[str, str] = {}
    messages: list[Message] = []
    if req.previous_response_id is not None:
        entry = st.store.get(req.previous_response_id)
        if entry is None:
            raise APIError(f"Previous response with id {req.previous_response_id!r} not found.",
                           status=404, param="previous_response_id", code="previous_response_not_found")
        messages, call_names = list(entry.conversation), dict(entry.call_names)
    if isinstance(req.input, str):
        new = [Message(role="user", content=req.input)]
    else:
        new = inputs.response_items(req.input, call_names)
    if not new and not messages:
        raise APIError("'input' must not be empty", param="input", code="invalid_value")
    return messages + new, call_names


def _save(st: ServerState, run: ResponseRun, messages: list[Message], call_names: dict[str, str]) -> None:
    if run.req.store is False or run.status not in ("completed", "incomplete"):
        return
    reply = run.tracker.message()
    names = {**call_names, **{i.call_id: i.name for i in run.tracker.tool_calls}}
    st.store.put(run.id, StoredResponse(run.json(), tuple(messages + ([reply] if reply else [])), names))


@router.post("/v1/responses")
async def create_response(req: ResponsesRequest, request: Request):
    st = state(request)
    _check(req)
    params.check_model(st, req.model)
    messages, call_names = _conversation(st, req)
    effort = params.effort_of(req.reasoning.effort if req.reasoning else None, "reasoning.effort")
    requested = builtin_tools.request_tools(req.tools, st.toolbox)
    tools = inputs.function_tools(requested.functions)
    toolbox = requested.toolbox(st.toolbox) if requested.namespaces else None
    rc = params.request_constraint(req, "responses",
                                   builtin_tools=requested.recipients(toolbox) if toolbox else None)
    if toolbox is not None and rc.tool_choice != "none":
        return await _with_builtin_tools(st, req, request, messages, call_names, effort, requested, toolbox, rc)
    prompt = inputs.render(messages, reasoning_effort=effort, instructions=req.instructions,
                           tools=[] if rc.tool_choice == "none" else tools,
                           response_format=rc.developer_section)
    max_new = params.token_budget(st, len(prompt), req.max_output_tokens, "max_output_tokens", "input")
    run = ResponseRun(req, model=st.model_name, prompt_len=len(prompt), effort=effort, tools=requested.listed,
                      custom_tools=rc.custom_tools)
    job = generation.submit(st, prompt, params.sampling_of(req.temperature, req.top_p, None), max_new,
                            rc.constraint)
    if req.stream:
        events = _stream(run, job, st, lambda: _save(st, run, messages, call_names))
        return SSEResponse(events, on_close=lambda: st.scheduler.cancel(job))
    try:
        await generation.collect(job, run.tracker, request, st.scheduler)
    except ConstraintFailed as e:
        run.fail(f"Generation failed: {e}")
        return JSONResponse(run.json())
    run.cached_tokens = job.cached_tokens
    run.complete()
    _save(st, run, messages, call_names)
    return JSONResponse(run.json())


async def _with_builtin_tools(st: ServerState, req: ResponsesRequest, request: Request, messages: list[Message],
                              call_names: dict[str, str], effort: str, requested: builtin_tools.RequestTools,
                              toolbox: Toolbox, rc: RequestConstraint):
    functions = inputs.function_tools(requested.functions)
    conversation = inputs.conversation(messages, reasoning_effort=effort, instructions=req.instructions,
                                       tools=functions, tool_namespaces=toolbox.configs())
    prompt = tool_loop.prompt_of(conversation, rc.developer_section)
    params.token_budget(st, len(prompt), req.max_output_tokens, "max_output_tokens", "input")
    tracker = ReplyTracker(item_type=toolbox.item_type, custom_tools=rc.custom_tools)
    run = ResponseRun(req, model=st.model_name, prompt_len=len(prompt), effort=effort, tools=requested.listed,
                      tracker=tracker)
    conversation_id = tool_loop.conversation_root(st, req.previous_response_id, run.id)
    run.container_id = tool_loop.container_id(conversation_id)
    sampling = params.sampling_of(req.temperature, req.top_p, None)
    return await tool_loop.respond(st, run, request, conversation, toolbox, sampling, messages=messages,
                                   call_names=call_names, conversation_id=conversation_id, constraint=rc)


async def _stream(run: ResponseRun, job: Job, st: ServerState, save):
    ev = StreamEvents(run)
    yield ev.response("response.created")
    yield ev.response("response.in_progress")
    try:
        async for ops in generation.stream(job, run.tracker, st.scheduler):
            for s in ev.ops(ops):
                yield s
    except EngineError as e:
        for s in ev.ops(run.fail(f"Generation failed: {e}")):
            yield s
        yield ev.event("error", code="server_error", message=run.error["message"], param=None)
        yield ev.response("response.failed")
        return
    run.cached_tokens = job.cached_tokens
    run.complete()
    save()
    yield ev.response("response.incomplete" if run.status == "incomplete" else "response.completed")


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request):
    entry = state(request).store.get(response_id)
    if entry is None:
        raise APIError(f"No response found with id {response_id!r}.", status=404,
                       param="response_id", code="not_found")
    return entry.response
