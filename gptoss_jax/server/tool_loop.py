"""A Responses request with built-in tools: the server runs the harmony tool loop.

:func:`respond` drives :func:`gptoss_jax.tools.run_tool_loop` with a ``generate`` that renders
each prompt (``chat.render.render_harmony``), runs it as a scheduler job and feeds the tokens to
the response's :class:`~gptoss_jax.server.reply.ReplyTracker`: every call of a built-in
recipient (``browser.*``, ``python``, an MCP server's namespace) is executed, its result
appended as a harmony tool message, and the model continues, until it answers, calls a
function of the client (a ``function_call`` item, as without tools), or a limit ends the loop:

* the request's ``max_tool_calls`` or the server's ``--max-tool-iterations``: the call that would
  exceed it is not run (its item ``incomplete``) and the response is ``incomplete`` with
  ``incomplete_details.reason`` ``"max_tool_calls"`` (OpenAI's API says further calls are
  ignored, and its reasons name no limit on calls: this one says which limit ended it);
* ``max_output_tokens`` (all model calls together) or the context: ``incomplete``,
  ``"max_output_tokens"``, as without tools.

Every model call is held to the request's constraint (``text.format`` for the final answer,
strict function arguments, custom tools' grammars, ``tool_choice``, with the hosted tools'
recipients allowed): a forcing ``tool_choice`` holds for the first call, the calls after a tool
has run use ``RequestConstraint.after_tool_call`` (``auto`` again; see
``inference.constraints.request``). A JSON schema is shown to the model in the developer
message's ``# Response Formats`` section in every prompt. A constraint that dead-ends ends the
response ``failed`` (as without tools).

Each model call after the first counts its prompt (with the tool results in it) in
``usage.input_tokens``; tool results are truncated to the server's budget (``build_tools``'s
output limit) before the model sees them. The stored conversation (``previous_response_id``)
keeps the calls and their results; the chain's first response names the conversation, whose
stateful tools (a jupyter kernel) live along the chain. A response that enables an MCP server
its chain has not seen yet starts with an ``mcp_list_tools`` item of the server's tools, as
OpenAI's API does. A client that goes away cancels the running job and closes the tool session
(the sandbox kills a running call).

``background: true`` runs the loop as any background response runs
(:class:`~gptoss_jax.server.background_responses.BackgroundRun`, with the loop as its reply): a
poll sees the items so far, a stream's events are stored for ``starting_after``, and a cancel
stops the model call and the tool call in flight. Logprobs (``include:
["message.output_text.logprobs"]``, ``top_logprobs``) are those of each message's tokens from
the model call that wrote it (:class:`~gptoss_jax.server.choices.ReplyLogprobs` on every call);
a final answer's citations are shown as links, so its logprobs are those of the text the model
wrote, not of the text shown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import openai_harmony as oh
from fastapi import Request
from fastapi.responses import JSONResponse

from gptoss_jax.chat.encoding import ENDOFTEXT, harmony_encoding
from gptoss_jax.chat.messages import Message
from gptoss_jax.chat.render import from_harmony, render_harmony
from gptoss_jax.chat.tokenizer import load_tokenizer
from gptoss_jax.inference.constraints import RequestConstraint, splice_response_format
from gptoss_jax.inference.logprobs import TokenBytes
from gptoss_jax.inference.sampling import SamplingParams
from gptoss_jax.server import generation, stored
from gptoss_jax.server.background_responses import BackgroundRun, stored_events
from gptoss_jax.server.choices import ReplyLogprobs
from gptoss_jax.server.citations import Citations
from gptoss_jax.server.errors import APIError
from gptoss_jax.server.generation import SSEResponse
from gptoss_jax.server.reply import Op
from gptoss_jax.server.response_output import ResponseRun, StreamEvents
from gptoss_jax.server.scheduler import ConstraintFailed, EngineError, Job
from gptoss_jax.server.state import ServerState
from gptoss_jax.tools import LoopDone, McpTool, Toolbox, ToolCallEvent, ToolResultEvent, run_tool_loop

_CALL_LIMITS = ("max_tool_calls", "max_tool_iterations")


def _chain(st: ServerState, previous_response_id: str | None) -> Iterator[tuple[str, dict]]:
    """The stored responses a request follows, newest first (to the first, or to one the store
    no longer has): ``(id, response object)``."""
    seen: set[str] = set()
    while previous_response_id is not None and previous_response_id not in seen:
        seen.add(previous_response_id)
        entry = st.store.get(previous_response_id)
        if entry is None:
            return
        yield previous_response_id, entry.response
        previous_response_id = entry.response.get("previous_response_id")


def conversation_root(st: ServerState, previous_response_id: str | None, response_id: str) -> str:
    """The id of a response's conversation: the first response of its ``previous_response_id``
    chain (the response itself when it starts one). It keys stateful tools: the jupyter kernel."""
    ids = [rid for rid, _ in _chain(st, previous_response_id)]
    return ids[-1] if ids else response_id


def unlisted_servers(st: ServerState, previous_response_id: str | None, toolbox: Toolbox) -> list[McpTool]:
    """The MCP servers of ``toolbox`` whose tools no earlier response of the chain listed (an
    ``mcp_list_tools`` item): OpenAI's API lists a server's tools once per conversation."""
    servers = {ns: t for ns, t in toolbox.tools.items() if isinstance(t, McpTool)}
    for _, response in _chain(st, previous_response_id if servers else None):
        for item in response.get("output") or ():
            if item.get("type") == "mcp_list_tools":
                servers.pop(item.get("server_label"), None)
    return list(servers.values())


def prompt_of(messages: list[oh.Message], response_format: str | None) -> list[int]:
    """A model call's prompt: the conversation so far, with the ``# Response Formats`` section
    (``RequestConstraint.developer_section``) ending its developer message."""
    prompt = render_harmony(messages)
    return splice_response_format(prompt, response_format, load_tokenizer()) if response_format else prompt


def container_id(conversation_id: str) -> str:
    """The python tool's container for a conversation (its kernel, for a stateful backend)."""
    return "cntr_" + conversation_id.partition("_")[2]


class LoopedResponse:
    """One response generated through the tool loop; ``ops()`` yields its item operations."""

    def __init__(self, st: ServerState, run: ResponseRun, conversation: list[oh.Message], toolbox: Toolbox,
                 sampling: SamplingParams, *, conversation_id: str, constraint: RequestConstraint | None = None,
                 logprobs: int | None = None):
        self.st, self.run, self.conversation, self.sampling = st, run, conversation, sampling
        self.constraint = constraint
        self.logprobs = logprobs  # top-k of the messages' logprobs (None: not asked)
        self._token_bytes = TokenBytes(st.tokenizer) if logprobs is not None else None
        self.session = toolbox.session(conversation_id)
        self.citations = Citations(self.session.resolve_citations)
        self.new_messages: list[Message] = []  # the reply for the stored conversation
        self._ops: list[Op] = []
        for server in unlisted_servers(st, run.req.previous_response_id, toolbox):
            self._ops += run.tracker.add_listing(server.namespace, server.listing())
        self._job: Job | None = None
        self._rounds = 0
        self._out_of_context = False

    def _constraint(self):
        """The compiled constraint of the next model call (a forced choice only for the first)."""
        rc = self.constraint
        if rc is None:
            return None
        return rc.after_tool_call if self._rounds else rc.constraint

    async def _generate(self, messages: list[oh.Message], budget: int | None) -> AsyncIterator[int]:
        prompt = prompt_of(messages, self.constraint.developer_section if self.constraint else None)
        room = self.st.context - len(prompt)
        n = room if budget is None else min(budget, room)
        if n < 1:
            self._out_of_context = True
            return
        tracker = self.run.tracker
        constraint = self._constraint()
        if self._rounds:
            self.run.extra_input_tokens += len(prompt)
            tracker.next_round()
        self._rounds += 1
        job = generation.submit(self.st, prompt, self.sampling, n, constraint)
        self._job = job
        consumer = tracker if self.logprobs is None else ReplyLogprobs(tracker, job, self.logprobs,
                                                                       self._token_bytes)
        try:
            async for tok, finish in job.tokens():
                self._ops += consumer.feed(tok, finish)
                if finish == "length" and n == room:
                    self._out_of_context = True
                if tok != ENDOFTEXT:  # a generation stop that openai-harmony would read as text
                    yield tok
                if finish is None and tracker.stopped:  # malformed output: stop generating
                    break
        finally:
            self.st.scheduler.cancel(job)
            self._job = None

    async def ops(self) -> AsyncIterator[list[Op]]:
        """The response's item operations as the loop runs; the run is complete at the end.
        Raises :class:`EngineError` when the engine fails."""
        req, tracker = self.run.req, self.run.tracker
        loop = run_tool_loop(self.conversation, self._generate, self.session, harmony_encoding(),
                             max_tool_calls=req.max_tool_calls, max_tokens=req.max_output_tokens)
        try:
            async for ev in loop:
                if isinstance(ev, ToolCallEvent) and tracker.pending_call is not None:
                    self._ops += tracker.start_call(tracker.pending_call)
                elif isinstance(ev, ToolResultEvent) and tracker.pending_call is not None:
                    self.run.tool_output_tokens += len(ev.tokens)
                    self._ops += tracker.resolve(tracker.pending_call, ev.result.item, failed=ev.result.error)
                elif isinstance(ev, LoopDone):
                    self._finish(ev)
                ops = self.citations.shape(self._take())
                if ops:
                    yield ops
        finally:
            await loop.aclose()

    def _take(self) -> list[Op]:
        ops, self._ops = self._ops, []
        return ops

    def _finish(self, done: LoopDone) -> None:
        tracker = self.run.tracker
        kept = done.messages
        if done.reason in _CALL_LIMITS:
            if tracker.pending_call is not None:
                self._ops += tracker.abandon(tracker.pending_call)
            kept = [m for m in done.messages if m is not done.pending_call]  # never run: not history
        self._ops += tracker.end("stop")
        self.new_messages = from_harmony(kept)
        incomplete = None
        if done.reason in _CALL_LIMITS:
            incomplete = "max_tool_calls"
        elif done.reason == "max_tokens" or (done.reason == "stopped" and self._out_of_context):
            incomplete = "max_output_tokens"
        self.run.complete(incomplete)

    def cancel(self) -> None:
        """Stop the model call in flight (the client went away)."""
        if self._job is not None:
            self.st.scheduler.cancel(self._job)

    async def aclose(self) -> None:
        await self.session.aclose()


def _conversation_after(run: ResponseRun, looped: LoopedResponse, messages: list[Message],
                        call_names: dict[str, str]) -> tuple[list[Message], dict[str, str]]:
    """The conversation and call names once the loop has replied (for the store)."""
    names = {**call_names, **{i.call_id: i.name for i in run.tracker.tool_calls}}
    return messages + looped.new_messages, names


def _save(st: ServerState, run: ResponseRun, looped: LoopedResponse, messages: list[Message],
          call_names: dict[str, str]) -> None:
    if run.req.store is False or run.status not in stored.FINISHED:
        return
    st.store.put(stored.record(run.json(), stored.input_items(run.req.input),
                               *_conversation_after(run, looped, messages, call_names)))


async def _collect(looped: LoopedResponse, request: Request) -> None:
    """Run the loop to its end for a plain request; a client that disconnects cancels it."""

    async def run():
        async for _ in looped.ops():
            pass

    try:
        runner = await generation.run_while_connected(run(), request, looped.cancel)
    finally:
        await looped.aclose()
    try:
        runner.result()  # an engine error, or CancelledError for a client that left
    except ConstraintFailed as e:  # the response fails; the server carries on
        looped.run.fail(f"Generation failed: {e}")
    except EngineError as e:
        raise APIError(f"Generation failed: {e}", status=500, type="server_error", code="server_error") from None


async def _stream(looped: LoopedResponse, save) -> AsyncIterator[str]:
    run = looped.run
    ev = StreamEvents(run)
    yield ev.response("response.created")
    yield ev.response("response.in_progress")
    try:
        async for ops in looped.ops():
            for s in ev.ops(ops):
                yield s
    except EngineError as e:
        for s in ev.ops(run.fail(f"Generation failed: {e}")):
            yield s
        yield ev.event("error", code="server_error", message=run.error["message"], param=None)
        save()
        yield ev.response("response.failed")
        return
    finally:
        await looped.aclose()
    save()
    yield ev.response("response.incomplete" if run.status == "incomplete" else "response.completed")


async def respond(st: ServerState, run: ResponseRun, request: Request, conversation: list[oh.Message],
                  toolbox: Toolbox, sampling: SamplingParams, *, messages: list[Message],
                  call_names: dict[str, str], conversation_id: str, constraint: RequestConstraint | None = None,
                  logprobs: int | None = None):
    """The response to a request whose tools include built-in ones (plain JSON, a stream, or a
    background response); ``constraint``: the request's (``params.request_constraint``), held on
    every model call; ``logprobs``: the top-k of the messages' logprobs (None: not asked)."""
    looped = LoopedResponse(st, run, conversation, toolbox, sampling, conversation_id=conversation_id,
                            constraint=constraint, logprobs=logprobs)

    def save():
        _save(st, run, looped, messages, call_names)

    if run.req.background:
        bg = BackgroundRun(st, run, looped, lambda: _conversation_after(run, looped, messages, call_names))
        response = bg.begin(stored.record(run.json(), stored.input_items(run.req.input), messages, call_names,
                                          background=True))
        if run.req.stream:
            return SSEResponse(stored_events(st, run.id, None), on_close=lambda: None)
        return JSONResponse(response)
    if run.req.stream:
        return SSEResponse(_stream(looped, save), on_close=looped.cancel)
    await _collect(looped, request)
    save()
    return JSONResponse(run.json())
