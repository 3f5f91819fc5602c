"""gptoss_jax.harmony against openai-harmony: conversations built directly with openai_harmony
objects are the reference for rendering; harmony's own parser for parsing."""

import random

import pytest

oh = pytest.importorskip("openai_harmony")

from gptoss_jax import harmony as H  # noqa: E402
from gptoss_jax.chat import tokenizer as T  # noqa: E402

A, U = oh.Role.ASSISTANT, oh.Role.USER
M = oh.Message.from_role_and_content
DATE = "2025-06-28"
WEATHER = {
    "name": "get_weather",
    "description": "Gets the current weather.\nUse for any city.",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["c", "f"], "default": "c"},
        },
        "required": ["city"],
    },
}
LOOKUP = {"name": "lookup", "description": "No arguments."}
TOOLS_FLAT = [{"type": "function", **WEATHER}, {"type": "function", **LOOKUP}]
TOOLS_NESTED = [{"type": "function", "function": WEATHER}, {"type": "function", "function": LOOKUP}]


@pytest.fixture(scope="module", autouse=True)
def offline(fresh_offline_vocab):
    return fresh_offline_vocab


@pytest.fixture(scope="module")
def enc(offline):
    return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


def system(effort=oh.ReasoningEffort.MEDIUM, date=DATE):
    s = oh.SystemContent.new().with_reasoning_effort(effort)
    return M(oh.Role.SYSTEM, s.with_conversation_start_date(date) if date else s)


def developer(instructions=None, tools=False):
    d = oh.DeveloperContent.new()
    if instructions:
        d = d.with_instructions(instructions)
    if tools:
        d = d.with_function_tools([
            oh.ToolDescription.new(WEATHER["name"], WEATHER["description"], WEATHER["parameters"]),
            oh.ToolDescription.new(LOOKUP["name"], LOOKUP["description"]),
        ])
    return M(oh.Role.DEVELOPER, d)


def call(args, name="get_weather"):
    return (M(A, args).with_channel("commentary").with_recipient(f"functions.{name}")
            .with_content_type("json"))


def tool_result(text, name="get_weather"):
    author = oh.Author.new(oh.Role.TOOL, f"functions.{name}")
    return oh.Message.from_author_and_content(author, text).with_channel("commentary").with_recipient("assistant")


NO_DROP = oh.RenderConversationConfig(auto_drop_analysis=False)


def ref_prompt(enc, msgs, config=NO_DROP):
    return enc.render_conversation_for_completion(oh.Conversation.from_messages(msgs), A, config)


# --- Rendering prompts -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_prompt_effort_and_date(enc, effort):
    got = H.render_prompt([{"role": "user", "content": "Hi there!"}], reasoning_effort=effort, date=DATE)
    want = ref_prompt(enc, [system(oh.ReasoningEffort(effort.capitalize())), M(U, "Hi there!")])
    assert got == want
    assert enc.decode(got).endswith("<|start|>assistant")


def test_prompt_defaults_without_date_and_with_identity(enc):
    got = H.render_prompt([H.Message("user", "Hi")])
    assert got == ref_prompt(enc, [system(date=None), M(U, "Hi")])
    got = H.render_prompt([H.Message("user", "Hi")], model_identity="You are a test model.")
    s = oh.SystemContent.new().with_model_identity("You are a test model.")
    assert got == ref_prompt(enc, [M(oh.Role.SYSTEM, s), M(U, "Hi")])


def test_invalid_reasoning_effort_is_named():
    with pytest.raises(ValueError, match="'extreme'"):
        H.render_prompt([H.Message("user", "Hi")], reasoning_effort="extreme")
    with pytest.raises(ValueError, match="None"):
        H.render_prompt([H.Message("user", "Hi")], reasoning_effort=None)


def test_prompt_developer_instructions(enc):
    want = ref_prompt(enc, [system(), developer("Answer in French.\n\nBe brief."), M(U, "Hello")])
    got = H.render_prompt(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        instructions="Answer in French.", date=DATE)
    assert got == want
    # OpenAI-style system / developer messages both become developer instructions.
    got = H.render_prompt(
        [{"role": "developer", "content": "Answer in French."}, {"role": "system", "content": "Be brief."},
         {"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}],
        date=DATE)
    assert got == want


@pytest.mark.parametrize("tools", [TOOLS_FLAT, TOOLS_NESTED], ids=["responses", "chat_completions"])
def test_prompt_function_tools(enc, tools):
    got = H.render_prompt([H.Message("user", "Weather in Oslo?")], tools=tools,
                          instructions="Use tools.", date=DATE)
    want = ref_prompt(enc, [system(), developer("Use tools.", tools=True), M(U, "Weather in Oslo?")])
    assert got == want
    text = enc.decode(got)
    assert "namespace functions" in text and "type get_weather = (_: {" in text
    assert "Calls to these tools must go to the commentary channel: 'functions'." in text


def test_unsupported_tool_type():
    with pytest.raises(ValueError, match="browser"):
        H.render_prompt([H.Message("user", "x")], tools=[{"type": "browser"}])


def test_multi_turn_tool_call_drops_finished_reasoning(enc):
    msgs = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "thinking": "Greet them.", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "reasoning_content": "Need the weather tool.", "content": "Checking.",
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
    ]
    got = H.render_prompt(msgs, tools=TOOLS_FLAT, date=DATE)
    want = ref_prompt(enc, [
        system(), developer(tools=True), M(U, "Hi"),
        M(A, "Hello! How can I help?").with_channel("final"),  # finished turn: reasoning dropped
        M(U, "Weather in Oslo?"),
        M(A, "Need the weather tool.").with_channel("analysis"),  # turn in progress: kept
        M(A, "Checking.").with_channel("commentary"),
        call('{"city":"Oslo"}'),
        tool_result('{"temp": 21}'),
    ])
    assert got == want
    # Same with the project's own message objects.
    objs = [
        H.Message("user", "Hi"),
        H.Message("assistant", "Hello! How can I help?", thinking="Greet them."),
        H.Message("user", "Weather in Oslo?"),
        H.Message("assistant", "Checking.", thinking="Need the weather tool.",
                  tool_calls=[H.ToolCall("get_weather", '{"city":"Oslo"}')]),
        H.Message("tool", '{"temp": 21}', name="get_weather"),
    ]
    assert H.render_prompt(objs, tools=TOOLS_NESTED, date=DATE) == want


def test_reasoning_drop_agrees_with_harmony_auto_drop(enc):
    """Where openai-harmony's auto_drop_analysis applies (the last assistant message is final,
    one finished turn), both drop the same reasoning."""
    msgs = [H.Message("user", "2+2?"), H.Message("assistant", "4", thinking="Add."), H.Message("user", "3+3?")]
    harmony_dropped = ref_prompt(enc, [
        system(), M(U, "2+2?"), M(A, "Add.").with_channel("analysis"), M(A, "4").with_channel("final"),
        M(U, "3+3?")], config=oh.RenderConversationConfig(auto_drop_analysis=True))
    assert H.render_prompt(msgs, date=DATE) == harmony_dropped
    assert "Add." not in enc.decode(harmony_dropped)


# --- Training sequences ----------------------------------------------------------------------


def _segments(msgs):
    """(start, end) of each run of assistant messages the model samples in one go."""
    out, start = [], None
    for i, m in enumerate(msgs):
        if m.author.role == A:
            start = i if start is None else start
            if m.recipient is not None or i + 1 == len(msgs) or msgs[i + 1].author.role != A:
                out.append((start, i + 1))
                start = None
    return out


@pytest.mark.parametrize("tools", [None, TOOLS_FLAT])
def test_render_training_tokens_and_mask(enc, tools):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "thinking": "Old thought.", "content": "Hello!"},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "thinking": "Use the tool.",
         "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]},
        {"role": "tool", "name": "get_weather", "content": "21C"},
        {"role": "assistant", "thinking": "Report it.", "content": "It is 21C in Oslo."},
    ]
    tokens, mask = H.render_training(msgs, tools=tools, date=DATE)
    ref_msgs = [
        system(), developer("Be brief.", tools=bool(tools)), M(U, "Hi"),
        M(A, "Hello!").with_channel("final"),
        M(U, "Weather in Oslo?"),
        M(A, "Use the tool.").with_channel("analysis"),
        call('{"city": "Oslo"}'),
        tool_result("21C"),
        M(A, "Report it.").with_channel("analysis"),
        M(A, "It is 21C in Oslo.").with_channel("final"),
    ]
    conv = oh.Conversation.from_messages(ref_msgs)
    assert tokens == enc.render_conversation_for_training(conv, NO_DROP)
    assert tokens[-1] == T.Tokenizer.return_
    assert len(mask) == len(tokens)

    # The mask, from harmony's own split into prompt and completion: each sampled segment spans
    # from the end of the prompt harmony renders before it to the end of the segment.
    want = [0] * len(tokens)
    for start, end in _segments(ref_msgs):
        prompt = ref_prompt(enc, ref_msgs[:start])
        upto = enc.render_conversation(oh.Conversation.from_messages(ref_msgs[:end]), NO_DROP)
        assert tokens[: len(prompt)] == prompt
        assert tokens[: len(upto) - 1] == upto[:-1]
        want[len(prompt): len(upto)] = [1] * (len(upto) - len(prompt))
        if end < len(ref_msgs) and ref_msgs[end - 1].channel == "final":
            assert tokens[len(upto) - 1] == T.Tokenizer.end
            want[len(upto) - 1] = 0  # the model sampled <|return|> there, not this <|end|>
    assert mask == want
    trained = enc.decode([t for t, m in zip(tokens, mask) if m])
    assert trained == (
        "<|channel|>final<|message|>Hello!"
        "<|channel|>analysis<|message|>Use the tool.<|end|>"
        '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Oslo"}<|call|>'
        "<|channel|>analysis<|message|>Report it.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>It is 21C in Oslo.<|return|>"
    )


def test_render_training_single_turn_keeps_its_reasoning(enc):
    tokens, mask = H.render_training([H.Message("user", "Hi"), H.Message("assistant", "Hello", thinking="Greet.")])
    conv = oh.Conversation.from_messages([
        system(date=None), M(U, "Hi"), M(A, "Greet.").with_channel("analysis"), M(A, "Hello").with_channel("final")])
    assert tokens == enc.render_conversation_for_training(conv, NO_DROP)
    assert "Greet." in enc.decode([t for t, m in zip(tokens, mask) if m])


# --- Parsing ---------------------------------------------------------------------------------

HEADER = 2  # <|start|> assistant


def completion(enc, msgs, training=True):
    """Tokens a model would generate for ``msgs`` (assistant messages), after <|start|>assistant."""
    conv = oh.Conversation.from_messages(msgs)
    full = enc.render_conversation_for_training(conv, NO_DROP) if training else enc.render_conversation(conv, NO_DROP)
    assert enc.decode(full[:HEADER]) == "<|start|>assistant"
    return full[HEADER:]


def as_constrained(m):
    return m.with_content_type("<|constrain|>json")


REPLY_FINAL = [M(A, "User says hi. Answer 🤖 politely — ok.").with_channel("analysis"),
               M(A, "Hello! 東京 is nice 🤖.").with_channel("final")]
REPLY_CALL = [M(A, "Need weather.").with_channel("analysis"),
              M(A, "Let me check.").with_channel("commentary"),
              as_constrained(call('{"city": "Zürich"}'))]


def test_parse_final_reply(enc):
    tokens = completion(enc, REPLY_FINAL)
    assert tokens[-1] == T.Tokenizer.return_
    r = H.parse_reply(tokens)
    assert r == H.Reply(analysis="User says hi. Answer 🤖 politely — ok.", final="Hello! 東京 is nice 🤖.",
                        complete=True)
    assert r.to_message() == H.Message("assistant", "Hello! 東京 is nice 🤖.",
                                       thinking="User says hi. Answer 🤖 politely — ok.")


def test_parse_tool_call_reply(enc):
    tokens = completion(enc, REPLY_CALL)
    assert tokens[-1] == T.Tokenizer.call
    r = H.parse_reply(tokens)
    assert r.analysis == "Need weather." and r.commentary == ["Let me check."] and r.final == ""
    assert r.tool_calls == [H.ToolCall("get_weather", '{"city": "Zürich"}', "functions.get_weather")]
    assert r.complete and r.error is None
    # The same as openai-harmony's own parse.
    ref = enc.parse_messages_from_completion_tokens(tokens, A)
    assert [(m.channel, m.recipient, m.content[0].text) for m in ref] == [
        ("analysis", None, "Need weather."), ("commentary", None, "Let me check."),
        ("commentary", "functions.get_weather", '{"city": "Zürich"}')]


def test_parse_accepts_the_start_header_and_endoftext(enc):
    full = [T.Tokenizer.start] + enc.encode("assistant") + completion(enc, REPLY_FINAL)
    assert H.parse_reply(full).final == "Hello! 東京 is nice 🤖."
    eot = completion(enc, REPLY_FINAL)[:-1] + [T.Tokenizer.endoftext]
    r = H.parse_reply(eot)
    assert r.final == "Hello! 東京 is nice 🤖." and r.complete and r.error is None


def test_parse_truncated_content_is_incomplete(enc):
    tokens = completion(enc, REPLY_FINAL)[:-3]
    r = H.parse_reply(tokens)
    assert r.error is None and not r.complete
    ref = enc.parse_messages_from_completion_tokens(tokens, A)
    assert r.final == ref[-1].content[0].text


def test_tokens_after_stop_are_reported(enc):
    tokens = completion(enc, REPLY_FINAL) + enc.encode("junk")
    r = H.parse_reply(tokens)
    assert r.final == "Hello! 東京 is nice 🤖." and not r.complete and "ignored" in r.error


# --- Streaming -------------------------------------------------------------------------------


def run_stream(tokens, finish=True):
    s, events = H.ReplyStream(), []
    for t in tokens:
        events += s.feed(t)
    if finish:
        events += s.finish()
    return s, events


def stream_messages(events):
    """(kind, channel or name, text) per message, from the start events and deltas."""
    out = []
    for e in events:
        if isinstance(e, H.ChannelStart):
            out.append(["text", e.channel, ""])
        elif isinstance(e, H.ToolCallStart):
            out.append(["call", e.name, ""])
        elif isinstance(e, (H.TextDelta, H.ToolCallDelta)):
            assert out and out[-1][1] == (e.channel if isinstance(e, H.TextDelta) else e.name)
            out[-1][2] += e.text
    return [tuple(m) for m in out]


@pytest.mark.parametrize("case", ["final", "call", "truncated", "split_utf8"])
def test_stream_matches_batch(enc, case):
    if case == "final":
        tokens = completion(enc, REPLY_FINAL)
    elif case == "call":
        tokens = completion(enc, REPLY_CALL)
    elif case == "truncated":
        tokens = completion(enc, REPLY_CALL)[:-4]
    else:  # stop in the middle of a character that spans two tokens
        tokens = completion(enc, [M(A, "🤖").with_channel("final")], training=False)[:-1]
        assert len(tokens) >= 5 and enc.decode(tokens[-1:]) == "\ufffd"
        tokens = tokens[:-1]
    s, events = run_stream(tokens)
    done = [e for e in events if isinstance(e, H.Done)]
    assert len(done) == 1 and events[-1] is done[0]
    assert done[0].reply == H.parse_reply(tokens) == s.reply
    ref = enc.parse_messages_from_completion_tokens(tokens, A)
    want = [("call", m.recipient.split(".", 1)[1], m.content[0].text) if m.recipient
            else ("text", m.channel, m.content[0].text) for m in ref]
    assert stream_messages(events) == want
    assert s.feed(tokens[0]) == [] and s.finish() == []  # nothing after Done


@pytest.mark.parametrize("case", ["final", "call", "truncated"])
def test_stream_message_ends_match_harmony(enc, case):
    tokens = {"final": completion(enc, REPLY_FINAL), "call": completion(enc, REPLY_CALL),
              "truncated": completion(enc, REPLY_CALL)[:-4]}[case]
    _, events = run_stream(tokens)
    ends = [e for e in events if isinstance(e, H.MessageEnd)]
    ref = enc.parse_messages_from_completion_tokens(tokens, A)
    assert [(e.channel, e.recipient, e.text) for e in ends] == [
        (m.channel, m.recipient, m.content[0].text) for m in ref]
    # each message: start, its deltas (adding up to the whole text), its end; then Done
    kinds = [type(e).__name__ for e in events]
    assert kinds[-2:] == ["MessageEnd", "Done"]
    starts = [i for i, k in enumerate(kinds) if k in ("ChannelStart", "ToolCallStart")]
    for start, end in zip(starts, [i for i, k in enumerate(kinds) if k == "MessageEnd"]):
        deltas = events[start + 1:end]
        assert all(isinstance(d, (H.TextDelta, H.ToolCallDelta)) for d in deltas)
        assert "".join(d.text for d in deltas) == events[end].text


def test_message_cut_by_malformed_output_has_no_end(enc):
    e = lambda text: enc.encode(text, allowed_special="all")
    tokens = e("<|channel|>analysis<|message|>Hm<|end|><|start|>assistant<|channel|>final<|message|>Hi")
    _, events = run_stream(tokens + [10**7])  # an id outside the vocabulary, inside "Hi"'s message
    assert [(e.channel, e.text) for e in events if isinstance(e, H.MessageEnd)] == [("analysis", "Hm")]
    assert isinstance(events[-1], H.Done) and events[-1].reply.error
    assert events[-1].reply.final == "Hi"  # what parsed is kept


def test_stream_stops_itself_on_stop_token(enc):
    s, events = run_stream(completion(enc, REPLY_FINAL), finish=False)
    assert s.done and isinstance(events[-1], H.Done) and events[-1].reply.complete


# --- Malformed output ------------------------------------------------------------------------


def malformed_cases(enc):
    e = lambda text: enc.encode(text, allowed_special="all")
    rng = random.Random(0)
    cases = {f"random{i}": [rng.randrange(0, 201088) for _ in range(rng.randrange(1, 40))] for i in range(6)}
    cases.update({
        "empty": [],
        "truncated_header": e("<|channel|>fin"),
        "header_then_return": e("<|channel|>final<|return|>"),
        "unexpected_message_token": e("<|channel|>final<|message|>Hi<|end|><|message|>more"),
        "unexpected_start_in_header": e("<|channel|>final<|start|><|message|>x<|return|>"),
        "user_turn_in_reply": e("<|channel|>final<|message|>Hi<|end|><|start|>user<|message|>Hey<|end|>"),
        "out_of_range_token": e("<|channel|>final<|message|>Hi") + [10**7],
    })
    return cases


def test_malformed_output_never_raises(enc):
    for name, tokens in malformed_cases(enc).items():
        r = H.parse_reply(tokens)
        assert isinstance(r, H.Reply), name
        assert r.error and not r.complete, name
        s, events = run_stream(tokens)
        assert s.done and isinstance(events[-1], H.Done), name
        assert sum(isinstance(ev, H.Done) for ev in events) == 1, name
        assert events[-1].reply.error and not events[-1].reply.complete, name


def test_malformed_output_keeps_what_parsed(enc):
    cases = malformed_cases(enc)
    for name in ("unexpected_message_token", "user_turn_in_reply", "out_of_range_token"):
        r = H.parse_reply(cases[name])
        assert r.final == "Hi", name
        s, _ = run_stream(cases[name])
        assert s.reply.final == "Hi", name


# --- Message model ---------------------------------------------------------------------------


def test_reasoning_only_messages_of_finished_turns_are_dropped(enc):
    import datetime

    msgs = [H.Message("user", "Hi"), H.Message("assistant", thinking="Hmm."),
            H.Message("assistant", "Hello", thinking="Greet."), H.Message("user", "Bye")]
    want = ref_prompt(enc, [system(), M(U, "Hi"), M(A, "Hello").with_channel("final"), M(U, "Bye")])
    assert H.render_prompt(msgs, date=datetime.datetime(2025, 6, 28, 13, 45)) == want


def test_message_validation():
    with pytest.raises(ValueError, match="bogus"):
        H.Message("bogus", "x")
    with pytest.raises(ValueError, match="name"):
        H.Message("tool", "x")
    with pytest.raises(ValueError, match="assistant"):
        H.Message("user", "x", thinking="y")
    m = H.Message("assistant", tool_calls=[{"function": {"name": "f", "arguments": {"a": 1}}}])
    assert m.tool_calls == (H.ToolCall("f", '{"a": 1}'),) and m.tool_calls[0].target == "functions.f"
