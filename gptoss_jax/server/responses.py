"""``POST /v1/responses`` (plain, streaming, background).

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

``store`` (default true, as in OpenAI's API) keeps the response, its input items and its
conversation in the server's :class:`~gptoss_jax.server.response_store.ResponseStore` (records
as :mod:`gptoss_jax.server.stored` writes them) for ``previous_response_id``, ``GET``,
``input_items`` and ``DELETE`` (:mod:`gptoss_jax.server.response_routes`); ``store: false``
keeps nothing. ``background: true`` (which needs ``store``) answers at once and generates in a
task (:mod:`gptoss_jax.server.background_responses`). A request goes: checks -> conversation
(stored + new input; ``instructions`` are the request's own, never the previous response's) ->
prompt (``truncation: "auto"`` drops the oldest turns until it fits) -> job -> reply -> stored.

Also read here: logprobs (``include: ["message.output_text.logprobs"]``, ``top_logprobs``),
vLLM's sampling extras, ``max_tool_calls`` (accepted: this route runs no built-in tools) and the
top-level ``reasoning_effort`` of openai/gpt-oss's reference server (an alias of
``reasoning.effort``).

A request whose ``tools`` enable built-in tools (web search, code interpreter, MCP:
:mod:`gptoss_jax.server.builtin_tools`) declares them in the system message and goes through
the tool loop instead (:mod:`gptoss_jax.server.tool_loop`; in the background too, and with
the final message's logprobs when asked), every model call of it held to the request's constraint (the hosted tools'
recipients are allowed recipients there, and ``tool_choice`` may name one). ``text.format``,
strict function tools, custom tools and ``tool_choice`` are enforced while the reply is
generated (``params.request_constraint``).
"""

from __future__ import annotations

from typing import NamedTuple

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gptoss_jax.chat.messages import Message
from gptoss_jax.inference.constraints import RequestConstraint
from gptoss_jax.inference.logprobs import TokenBytes
from gptoss_jax.server import builtin_tools, generation, inputs, params, request_sampling, stored, tool_loop
from gptoss_jax.server.background_responses import BackgroundRun, JobReply, stored_events
from gptoss_jax.server.choices import ReplyLogprobs
from gptoss_jax.server.errors import APIError, unsupported
from gptoss_jax.server.generation import SSEResponse
from gptoss_jax.server.openapi import STREAMING, errors
from gptoss_jax.server.reply import ReplyTracker
from gptoss_jax.server.response_output import ResponseRun, StreamEvents
from gptoss_jax.server.response_store import ACTIVE
from gptoss_jax.server.scheduler import ConstraintFailed, EngineError, Job
from gptoss_jax.server.schemas import ResponsesRequest
from gptoss_jax.server.state import ServerState, state
from gptoss_jax.tools import Toolbox

router = APIRouter()


def check(req: ResponsesRequest) -> None:
    """The request's fields that no later step reads (a 400 naming a bad one)."""
    params.check_extra(req)
    params.check_stream_options(req)
    params.check_metadata(req.metadata)
    for at in ("reasoning", "text"):
        if getattr(req, at) is not None:
            params.check_extra(getattr(req, at), at=at)
    builtin_tools.check_include(req.include, also=(request_sampling.LOGPROBS_INCLUDE,))
    if req.max_tool_calls is not None and req.max_tool_calls < 1:
        raise APIError(f"Invalid 'max_tool_calls': integer below minimum value. Expected a value >= 1, but "
                       f"got {req.max_tool_calls} instead.", param="max_tool_calls", code="integer_below_min_value")
    if req.background and req.store is False:
        raise APIError("Background responses are kept in the store: 'background' needs 'store' to be true",
                       param="store", code="invalid_value")
    if req.conversation is not None:
        raise unsupported("conversation", "conversations are not supported; use previous_response_id")
    if req.prompt is not None:
        raise unsupported("prompt", "prompt templates are not supported by this server")


def _effort(req: ResponsesRequest) -> str:
    if req.reasoning is not None and req.reasoning.effort is not None:
        return params.effort_of(req.reasoning.effort, "reasoning.effort")
    return params.effort_of(req.reasoning_effort, "reasoning_effort")


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
        if entry.status in ACTIVE:
            raise APIError(f"Previous response {req.previous_response_id!r} is still {entry.status}; "
                           f"continue it once it has finished", status=409, param="previous_response_id",
                           code="previous_response_in_progress")
        messages, call_names = stored.messages_of(entry), dict(entry.call_names)
    if isinstance(req.input, str):
        new = [Message(role="user", content=req.input)]
    else:
        new = inputs.response_items(req.input, call_names)
    if not new and not messages:
        raise APIError("'input' must not be empty", param="input", code="invalid_value")
    return messages + new, call_names


def _without_oldest_turn(messages: list[Message]) -> list[Message] | None:
    """The conversation from its second user turn on (None when there is only one turn)."""
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    later = [i for i in users if i > 0]
    return messages[later[0]:] if later and len(users) > 1 else None


def _prompt(st: ServerState, req: ResponsesRequest, messages: list[Message], **options) -> list[int]:
    """The prompt; with ``truncation: "auto"`` the oldest turns go until the input and
    ``max_output_tokens`` (at least one token) fit the context."""
    prompt = inputs.render(messages, instructions=req.instructions, **options)
    room = st.context - (req.max_output_tokens or 1)
    while req.truncation == "auto" and len(prompt) > room:
        messages = _without_oldest_turn(messages)
        if messages is None:
            break
        prompt = inputs.render(messages, instructions=req.instructions, **options)
    return prompt


class _Plan(NamedTuple):
    """What a Responses request asks for, worked out once for both routes that need it."""
    messages: list
    call_names: dict
    effort: str | None
    requested: object  # builtin_tools.request_tools' answer
    tools: list
    toolbox: object  # the request's built-in toolbox, None without built-in tools
    rc: object  # params.request_constraint's answer

    @property
    def tool_loop(self) -> bool:
        return self.toolbox is not None and self.rc.tool_choice != "none"


def _plan(st: ServerState, req: ResponsesRequest) -> _Plan:
    messages, call_names = _conversation(st, req)
    requested = builtin_tools.request_tools(req.tools, st.toolbox)
    toolbox = requested.toolbox(st.toolbox) if requested.namespaces else None
    rc = params.request_constraint(req, "responses",
                                   builtin_tools=requested.recipients(toolbox) if toolbox else None)
    return _Plan(messages, call_names, _effort(req), requested,
                 inputs.function_tools(requested.functions), toolbox, rc)


def _plain_prompt(st: ServerState, req: ResponsesRequest, plan: _Plan) -> list[int]:
    """The prompt of a request answered without the built-in tool loop."""
    return _prompt(st, req, plan.messages, reasoning_effort=plan.effort,
                   tools=[] if plan.rc.tool_choice == "none" else plan.tools,
                   response_format=plan.rc.developer_section)


def request_prompt(st: ServerState, req: ResponsesRequest) -> list[int]:
    """The prompt ``POST /v1/responses`` runs for ``req`` (its first model call, with built-in
    tools), for ``POST /v1/responses/input_tokens``."""
    plan = _plan(st, req)
    if plan.tool_loop:
        conversation = inputs.conversation(plan.messages, reasoning_effort=plan.effort,
                                           instructions=req.instructions, tools=plan.tools,
                                           tool_namespaces=plan.toolbox.configs())
        return tool_loop.prompt_of(conversation, plan.rc.developer_section)
    return _plain_prompt(st, req, plan)


def _after(run: ResponseRun, messages: list[Message], call_names: dict[str, str]):
    """The conversation and call names once ``run`` has replied."""
    reply = run.tracker.message()
    names = {**call_names, **{i.call_id: i.name for i in run.tracker.tool_calls}}
    return messages + ([reply] if reply else []), names


@router.post("/v1/responses", responses={**STREAMING, **errors(400, 404, 409, 500, 503)})
async def create_response(req: ResponsesRequest, request: Request):
    st = state(request)
    check(req)
    model = params.model_of(st, req.model)
    plan = _plan(st, req)
    messages, call_names, effort, requested, rc = (plan.messages, plan.call_names, plan.effort,
                                                   plan.requested, plan.rc)
    if plan.tool_loop:
        return await _with_builtin_tools(st, req, request, messages, call_names, effort, requested,
                                         plan.toolbox, rc, model)
    prompt = _plain_prompt(st, req, plan)
    max_new = params.token_budget(st, len(prompt), req.max_output_tokens, "max_output_tokens", "input")
    k = request_sampling.response_logprobs(req.include, req.top_logprobs)
    sampling = request_sampling.sampling(st, req, max_new_tokens=max_new, logprobs=k)
    run = ResponseRun(req, model=model, prompt_len=len(prompt), effort=effort, tools=requested.listed,
                      custom_tools=rc.custom_tools)
    items = stored.input_items(req.input)
    job = generation.submit(st, prompt, sampling, max_new, rc.constraint)
    consumer = run.tracker if k is None else ReplyLogprobs(run.tracker, job, k, TokenBytes(st.tokenizer))
    conversation = lambda: _after(run, messages, call_names)

    def save() -> None:
        if req.store is not False and run.status in stored.FINISHED:
            st.store.put(stored.record(run.json(), items, *conversation()))

    if req.background:
        bg = BackgroundRun(st, run, JobReply(run, job, consumer, st.scheduler), conversation)
        response = bg.begin(stored.record(run.json(), items, messages, call_names, background=True))
        if req.stream:
            return SSEResponse(stored_events(st, run.id, None), on_close=lambda: None)
        return JSONResponse(response)
    if req.stream:
        return SSEResponse(_stream(run, job, consumer, st, save), on_close=lambda: st.scheduler.cancel(job))
    try:
        await generation.collect(job, consumer, request, st.scheduler)
    except ConstraintFailed as e:
        run.fail(f"Generation failed: {e}")
        save()
        return JSONResponse(run.json())
    run.cached_tokens = generation.cached_tokens([job])
    run.complete()
    save()
    return JSONResponse(run.json())


async def _with_builtin_tools(st: ServerState, req: ResponsesRequest, request: Request, messages: list[Message],
                              call_names: dict[str, str], effort: str, requested: builtin_tools.RequestTools,
                              toolbox: Toolbox, rc: RequestConstraint, model: str):
    functions = inputs.function_tools(requested.functions)
    conversation = inputs.conversation(messages, reasoning_effort=effort, instructions=req.instructions,
                                       tools=functions, tool_namespaces=toolbox.configs())
    prompt = tool_loop.prompt_of(conversation, rc.developer_section)
    max_new = params.token_budget(st, len(prompt), req.max_output_tokens, "max_output_tokens", "input")
    tracker = ReplyTracker(item_type=toolbox.item_type, custom_tools=rc.custom_tools)
    run = ResponseRun(req, model=model, prompt_len=len(prompt), effort=effort, tools=requested.listed,
                      tracker=tracker)
    conversation_id = tool_loop.conversation_root(st, req.previous_response_id, run.id)
    run.container_id = tool_loop.container_id(conversation_id)
    k = request_sampling.response_logprobs(req.include, req.top_logprobs)
    sampling = request_sampling.sampling(st, req, max_new_tokens=max_new, logprobs=k)
    return await tool_loop.respond(st, run, request, conversation, toolbox, sampling, messages=messages,
                                   call_names=call_names, conversation_id=conversation_id, constraint=rc,
                                   logprobs=k)


async def _stream(run: ResponseRun, job: Job, consumer, st: ServerState, save):
    ev = StreamEvents(run)
    yield ev.response("response.created")
    yield ev.response("response.in_progress")
    try:
        async for ops in generation.stream(job, consumer, st.scheduler):
            for s in ev.ops(ops):
                yield s
    except EngineError as e:
        for s in ev.ops(run.fail(f"Generation failed: {e}")):
            yield s
        yield ev.event("error", code="server_error", message=run.error["message"], param=None)
        save()
        yield ev.response("response.failed")
        return
    run.cached_tokens = generation.cached_tokens([job])
    run.complete()
    save()
    yield ev.response("response.incomplete" if run.status == "incomplete" else "response.completed")
