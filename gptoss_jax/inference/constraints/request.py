"""OpenAI request parameters -> a compiled turn constraint, checked before a slot is taken.

``from_responses`` reads a Responses request (``text.format``, ``tools``, ``tool_choice``,
``parallel_tool_calls``), ``from_chat`` a Chat Completions one (``response_format``, ``tools``,
``tool_choice``, ``parallel_tool_calls``). Either returns a ``RequestConstraint`` or raises a
``ConstraintError`` whose ``param`` names the field as OpenAI's error object does
(``text.format.schema``, ``response_format.json_schema.schema``, ``tools[2].parameters``,
``tools[0].function.parameters``, ``tool_choice``). ``generate_constraint`` does the same for the
Python API's ``response_format=`` (a schema, ``Regex``, ``Lark``...).

Semantics (OpenAI's API reference; vLLM where it is silent):

* ``text.format`` / ``response_format``: ``text`` (free), ``json_object`` (any JSON object),
  ``json_schema`` (the schema, enforced; ``strict: true`` rejects keywords that cannot be
  enforced, otherwise they are ignored).
* Function tools: with ``strict: true`` the arguments follow ``parameters``; with ``strict:
  false`` they are any JSON object. Absent ``strict`` means the API's default: true for
  Responses (enforced, unsupported keywords ignored), false for Chat. Omitted ``parameters``
  is an empty parameter list.
* Custom tools (``format`` text or grammar with ``syntax`` lark / regex): the call's body
  follows the grammar (see ``grammar`` for the harmony form chosen).
* ``tool_choice``: ``none`` forbids every recipient (built-in tools too), ``auto`` allows a
  final answer or calls, ``required`` forces a call, a named function / custom tool forces that
  one, ``allowed_tools`` narrows the set (mode auto or required); a hosted tool type in
  ``builtin_tools`` (``{"type": "web_search_preview"}``, ``{"type": "code_interpreter"}``)
  forces one of its recipients, ``{"type": "mcp", "server_label": L}`` one of that MCP server's
  tools (``name``: that one). ``parallel_tool_calls: false``: one call.
* Hosted tools listed in ``tools`` (web_search, code_interpreter, mcp...) are the server's to
  map: it passes the recipients this request enabled as ``builtin_tools`` ({tool choice type:
  recipients}; an MCP server under ``"mcp:" + server_label``).
* A server that runs tools itself (the built-in tool loop) makes several model calls for one
  response. A forcing ``tool_choice`` (``required``, a named tool, a hosted type) holds for the
  first of them; once a tool has run the choice is ``auto`` again over the same tools
  (``allowed_tools`` keeps its narrowed set), else every call would be forced to call again and
  the loop could never answer: ``RequestConstraint.after_tool_call``. OpenAI's API reference is
  silent on this; it is what OpenAI's Agents SDK does by default (``reset_tool_choice``). The
  final answer's format and the tools' argument schemas hold on every call.
* No constraint at all (``constraint`` None) when the final answer is free and no tool is
  declared: an unconstrained slot costs nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import llguidance

from gptoss_jax.inference.constraints.compiled import (
    Constraint,
    compile_body,
    compile_turn,
    grammar_problem,
)
from gptoss_jax.inference.constraints.prompt import response_formats_section
from gptoss_jax.inference.constraints.schema import check_schema
from gptoss_jax.inference.constraints.spec import (
    Body,
    ConstraintError,
    JsonObject,
    JsonSchema,
    Lark,
    Regex,
    Text,
    Tool,
    TurnSpec,
    Whitespace,
)

Api = Literal["responses", "chat"]
NAME = re.compile(r"[a-zA-Z0-9_-]+")  # OpenAI's pattern for format and function names
MAX_NAME = 64
RECIPIENT = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
EMPTY_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclasses.dataclass(frozen=True)
class RequestConstraint:
    """What one request asks of its turn.

    ``constraint``: the compiled grammar for the slot, None when nothing needs enforcing.
    ``tools``: every function and custom tool the request declares (for the developer message
    and for parsing calls). ``tool_choice``: "none", "auto" or "required" once names are
    resolved. ``developer_section``: the ``# Response Formats`` text for a JSON schema, to end
    the developer message with (``prompt.splice_response_format``), else None.
    """
    constraint: Constraint | None
    spec: TurnSpec
    tools: tuple[Tool, ...]
    tool_choice: str
    developer_section: str | None
    later: TurnSpec | None = None  # the turn once a tool has run, when tool_choice forced a call

    @property
    def custom_tools(self) -> frozenset[str]:
        """Names whose calls are ``custom_tool_call`` items (the rest are function calls)."""
        return frozenset(t.name for t in self.tools if t.kind == "custom")

    @functools.cached_property
    def after_tool_call(self) -> Constraint | None:
        """The constraint of a model call made after a tool has run in the same response (a
        server-side tool loop): ``constraint`` itself unless ``tool_choice`` forced a call, in
        which case the choice is ``auto`` again (module docstring)."""
        return self.constraint if self.later is None else compile_turn(self.later)


# ---------------------------------------------------------------------------------------------
# Field helpers
# ---------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Request objects may be pydantic models (the server's schemas): use their JSON form."""
    dump = getattr(value, "model_dump", None)
    return dump(by_alias=True, exclude_none=True) if callable(dump) else value


def _mapping(value: Any, param: str) -> Mapping[str, Any]:
    value = _plain(value)
    if not isinstance(value, Mapping):
        raise ConstraintError(f"Invalid type for '{param}': expected an object, but got "
                              f"{type(value).__name__} instead.", param=param, code="invalid_type")
    return value


def _require(obj: Mapping[str, Any], key: str, param: str) -> Any:
    if obj.get(key) is None:
        raise ConstraintError(f"Missing required parameter: '{param}'.", param=param,
                              code="missing_required_parameter")
    return obj[key]


def _string(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise ConstraintError(f"Invalid type for '{param}': expected a string, but got "
                              f"{type(value).__name__} instead.", param=param, code="invalid_type")
    return value


def _optional_bool(value: Any, param: str) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ConstraintError(f"Invalid type for '{param}': expected a boolean, but got "
                              f"{type(value).__name__} instead.", param=param, code="invalid_type")
    return value


def _name(obj: Mapping[str, Any], param: str) -> str:
    name = _string(_require(obj, "name", param), param)
    if not NAME.fullmatch(name):
        raise ConstraintError(f"Invalid '{param}': string does not match pattern. Expected a "
                              f"string that matches the pattern '^[a-zA-Z0-9_-]+$'.", param=param)
    if len(name) > MAX_NAME:
        raise ConstraintError(f"Invalid '{param}': string too long. Expected a string with "
                              f"maximum length {MAX_NAME}, but got a string with length "
                              f"{len(name)} instead.", param=param, code="string_above_max_length")
    return name


def _invalid(param: str, value: Any, allowed: Sequence[str]) -> ConstraintError:
    listed = ", ".join(f"'{a}'" for a in allowed[:-1]) + f", and '{allowed[-1]}'"
    return ConstraintError(f"Invalid value: {value!r}. Supported values are: {listed}.",
                           param=param)


# ---------------------------------------------------------------------------------------------
# Bodies: response formats, function parameters, custom tool grammars
# ---------------------------------------------------------------------------------------------


def _format_body(fmt: Any, api: Api, param: str, whitespace: Whitespace) -> Body:
    if fmt is None:
        return Text()
    fmt = _mapping(fmt, param)
    kind = _require(fmt, "type", f"{param}.type")
    if kind == "text":
        return Text()
    if kind == "json_object":
        return JsonObject()
    if kind != "json_schema":
        raise _invalid(f"{param}.type", kind, ["text", "json_schema", "json_object"])
    if api == "chat":
        param = f"{param}.json_schema"
        fmt = _mapping(_require(fmt, "json_schema", param), param)
    name = _name(fmt, f"{param}.name")
    strict = bool(_optional_bool(fmt.get("strict"), f"{param}.strict"))
    description = fmt.get("description")
    if description is not None:
        _string(description, f"{param}.description")
    if api == "chat" and fmt.get("schema") is None:
        return JsonObject()  # Chat's json_schema.schema is optional: no schema, any object
    schema = _require(fmt, "schema", f"{param}.schema")
    check_schema(schema, strict=strict, whitespace=whitespace, param=f"{param}.schema",
                 what=f"response_format '{name}'")
    return JsonSchema(dict(schema), strict=strict, name=name, description=description)


def _function_body(fn: Mapping[str, Any], name: str, api: Api, param: str,
                   whitespace: Whitespace) -> Body:
    strict = _optional_bool(fn.get("strict"), f"{param}.strict")
    params = fn.get("parameters")
    if params is None:
        params = EMPTY_PARAMETERS
    what = f"function '{name}'"
    pparam = f"{param}.parameters"
    if isinstance(params, Mapping) and params.get("type", "object") != "object":
        raise ConstraintError(f"Invalid schema for {what}: schema must be a JSON Schema of "
                              f"'type: \"object\"', got 'type: {json.dumps(params.get('type'))}'.",
                              param=pparam)
    check_schema(params, strict=bool(strict), whitespace=whitespace, param=pparam, what=what)
    if strict:
        return JsonSchema(dict(params), strict=True, name=name)
    if strict is None and api == "responses":  # its default: enforced, unenforceable keywords ignored
        return JsonSchema(dict(params), strict=False, name=name)
    return JsonObject()


def _grammar_body(syntax: Any, definition: Any, param: str, syntax_param: str) -> Body:
    definition = _string(definition, param)
    if syntax == "lark":
        body: Body = Lark(definition)
        problem = grammar_problem(definition)
    elif syntax == "regex":
        body = Regex(definition)
        problem = grammar_problem(f"start: /{llguidance.regex_to_lark(definition, '')}/")
    else:
        raise _invalid(syntax_param, syntax, ["lark", "regex"])
    if problem:
        raise ConstraintError(f"Invalid grammar: {problem}", param=param)
    return body


def _custom_body(c: Mapping[str, Any], api: Api, param: str) -> Body:
    fmt = c.get("format")
    fparam = f"{param}.format"
    if fmt is None:
        return Text()
    fmt = _mapping(fmt, fparam)
    kind = _require(fmt, "type", f"{fparam}.type")
    if kind == "text":
        return Text()
    if kind != "grammar":
        raise _invalid(f"{fparam}.type", kind, ["text", "grammar"])
    if api == "chat":
        fparam = f"{fparam}.grammar"
        fmt = _mapping(_require(fmt, "grammar", fparam), fparam)
    syntax = _require(fmt, "syntax", f"{fparam}.syntax")
    definition = _require(fmt, "definition", f"{fparam}.definition")
    return _grammar_body(syntax, definition, f"{fparam}.definition", f"{fparam}.syntax")


def _tools(tools: Any, api: Api, whitespace: Whitespace) -> tuple[Tool, ...]:
    if tools is None:
        return ()
    tools = _plain(tools)
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
        raise ConstraintError("Invalid type for 'tools': expected an array.", param="tools",
                              code="invalid_type")
    out: list[Tool] = []
    seen: set[str] = set()
    for i, raw in enumerate(tools):
        param = f"tools[{i}]"
        entry = _mapping(raw, param)
        kind = _require(entry, "type", f"{param}.type")
        if kind not in ("function", "custom"):
            continue  # a hosted tool: the server maps it (``builtin_tools``)
        if api == "chat":
            param = f"{param}.{kind}"
            entry = _mapping(_require(entry, kind, param), param)
        name = _name(entry, f"{param}.name")
        if name in seen:
            raise ConstraintError(f"Invalid '{param}.name': duplicate tool name {name!r}.",
                                  param=f"{param}.name")
        seen.add(name)
        description = entry.get("description")
        if kind == "function":
            body = _function_body(entry, name, api, param, whitespace)
        else:
            body = _custom_body(entry, api, param)
        out.append(Tool(name, kind, body, description))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# tool_choice
# ---------------------------------------------------------------------------------------------


def _named(entry: Mapping[str, Any], api: Api, param: str) -> tuple[str, str]:
    kind = _require(entry, "type", f"{param}.type")
    if api == "chat" and kind in ("function", "custom"):
        entry = _mapping(_require(entry, kind, f"{param}.{kind}"), f"{param}.{kind}")
        return kind, _string(_require(entry, "name", f"{param}.{kind}.name"), f"{param}.{kind}.name")
    if kind in ("function", "custom"):
        return kind, _string(_require(entry, "name", f"{param}.name"), f"{param}.name")
    if kind == "mcp":
        label = _string(_require(entry, "server_label", f"{param}.server_label"), f"{param}.server_label")
        name = entry.get("name")
        return f"mcp:{label}", "" if name is None else _string(name, f"{param}.name")
    return kind, ""


def _pick(kind: str, name: str, tools: tuple[Tool, ...], builtin: Mapping[str, tuple[str, ...]],
          param: str) -> tuple[tuple[Tool, ...], tuple[str, ...]]:
    if kind in ("function", "custom"):
        hit = tuple(t for t in tools if t.kind == kind and t.name == name)
        if not hit:
            raise ConstraintError(f"Tool choice '{kind}' with name '{name}' not found in 'tools' "
                                  "parameter.", param=param)
        return hit, ()
    if kind.startswith("mcp:"):
        label = kind[4:]
        if kind not in builtin:
            raise ConstraintError(f"Tool choice 'mcp' with server_label '{label}' not found in "
                                  "'tools' parameter.", param=f"{param}.server_label")
        recipients = builtin[kind]
        if name:
            recipients = tuple(r for r in recipients if r.partition(".")[2] == name)
            if not recipients:
                raise ConstraintError(f"Tool choice 'mcp' names tool '{name}', which MCP server "
                                      f"'{label}' does not offer.", param=f"{param}.name")
        if not recipients:
            raise ConstraintError(f"Tool choice 'mcp': MCP server '{label}' offers no tools.",
                                  param=param)
        return (), recipients
    if kind in builtin:
        return (), builtin[kind]
    raise ConstraintError(f"Tool choice '{kind}' not found in 'tools' parameter.", param=param)


def _tool_choice(choice: Any, api: Api, tools: tuple[Tool, ...],
                 builtin: Mapping[str, tuple[str, ...]]):
    """(mode, callable tools, callable built-in recipients, narrowed): ``narrowed`` when an
    ``allowed_tools`` choice cut the set (it stays cut after a tool call)."""
    everything = tuple(dict.fromkeys(r for rs in builtin.values() for r in rs))  # keys may alias
    choice = _plain(choice) if choice is not None else "auto"
    param = "tool_choice"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise _invalid(param, choice, ["none", "auto", "required"])
        if choice == "none":
            return "none", (), (), False
        if choice == "required" and not tools and not everything:
            raise ConstraintError("Invalid value for 'tool_choice': 'required' is only allowed "
                                  "when 'tools' are specified.", param=param)
        return choice, tools, everything, False
    choice = _mapping(choice, param)
    kind = _require(choice, "type", f"{param}.type")
    if kind != "allowed_tools":
        if not tools and not everything:
            raise ConstraintError("Invalid value for 'tool_choice': 'tool_choice' is only "
                                  "allowed when 'tools' are specified.", param=param)
        return ("required", *_pick(*_named(choice, api, param), tools, builtin, param), False)
    spec = choice
    if api == "chat":
        spec = _mapping(_require(choice, "allowed_tools", f"{param}.allowed_tools"),
                        f"{param}.allowed_tools")
        param = f"{param}.allowed_tools"
    mode = _require(spec, "mode", f"{param}.mode")
    if mode not in ("auto", "required"):
        raise _invalid(f"{param}.mode", mode, ["auto", "required"])
    listed = _require(spec, "tools", f"{param}.tools")
    if not isinstance(listed, Sequence) or isinstance(listed, (str, bytes)):
        raise ConstraintError(f"Invalid type for '{param}.tools': expected an array.",
                              param=f"{param}.tools", code="invalid_type")
    picked_tools: list[Tool] = []
    picked_builtin: list[str] = []
    for j, raw in enumerate(listed):
        p = f"{param}.tools[{j}]"
        got_tools, got_builtin = _pick(*_named(_mapping(raw, p), api, p), tools, builtin, p)
        picked_tools += [t for t in got_tools if t not in picked_tools]
        picked_builtin += [r for r in got_builtin if r not in picked_builtin]
    if mode == "required" and not picked_tools and not picked_builtin:
        raise ConstraintError(f"Invalid value for '{param}.tools': mode 'required' needs at "
                              "least one tool.", param=f"{param}.tools")
    return mode, tuple(picked_tools), tuple(picked_builtin), True


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def _builtin(builtin_tools: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    out = {}
    for kind, recipients in builtin_tools.items():
        for r in recipients:
            if not RECIPIENT.fullmatch(r):
                raise ValueError(f"built-in tool recipient {r!r} is not a dotted name")
        out[kind] = tuple(recipients)
    return out


def _build(final: Body, tools: tuple[Tool, ...], choice: Any, parallel: Any, api: Api,
           builtin_tools: Mapping[str, Sequence[str]], whitespace: Whitespace) -> RequestConstraint:
    builtin = _builtin(builtin_tools)
    parallel = _optional_bool(parallel, "parallel_tool_calls")
    mode, callable_tools, callable_builtin, narrowed = _tool_choice(choice, api, tools, builtin)
    spec = TurnSpec(final=None if mode == "required" else final, tools=callable_tools,
                    parallel_calls=parallel is not False, builtin_recipients=callable_builtin,
                    whitespace=whitespace)
    declared = bool(tools) or any(builtin.values())
    constraint = compile_turn(spec) if declared or not isinstance(final, Text) else None
    later = None
    if mode == "required":  # after a tool call: auto over the same tools (narrowed ones stay so)
        everything = tuple(dict.fromkeys(r for rs in builtin.values() for r in rs))
        later = dataclasses.replace(spec, final=final, tools=callable_tools if narrowed else tools,
                                    builtin_recipients=callable_builtin if narrowed else everything)
    section = (response_formats_section(final.name, final.schema, final.description)
               if isinstance(final, JsonSchema) else None)
    return RequestConstraint(constraint, spec, tools, mode, section, later)


def from_responses(request: Any, *, builtin_tools: Mapping[str, Sequence[str]] | None = None,
                   whitespace: Whitespace = "compact") -> RequestConstraint:
    """The constraint for a Responses API request (a dict or the server's request model)."""
    request = _mapping(request, "body")
    text = request.get("text")
    fmt = _mapping(text, "text").get("format") if text is not None else None
    final = _format_body(fmt, "responses", "text.format", whitespace)
    tools = _tools(request.get("tools"), "responses", whitespace)
    return _build(final, tools, request.get("tool_choice"), request.get("parallel_tool_calls"),
                  "responses", builtin_tools or {}, whitespace)


def from_chat(request: Any, *, builtin_tools: Mapping[str, Sequence[str]] | None = None,
              whitespace: Whitespace = "compact") -> RequestConstraint:
    """The constraint for a Chat Completions request (a dict or the server's request model)."""
    request = _mapping(request, "body")
    final = _format_body(request.get("response_format"), "chat", "response_format", whitespace)
    tools = _tools(request.get("tools"), "chat", whitespace)
    return _build(final, tools, request.get("tool_choice"), request.get("parallel_tool_calls"),
                  "chat", builtin_tools or {}, whitespace)


# ---------------------------------------------------------------------------------------------
# The Python API: ``generate(..., response_format=...)``
# ---------------------------------------------------------------------------------------------


def response_format_body(value: Any) -> Body:
    """A ``Body`` from what the Python API accepts as ``response_format``.

    A ``Body`` (``JsonSchema``, ``JsonObject``, ``Regex``, ``Lark``, ``Text``); a pydantic model
    class (its JSON schema, strict, objects closed to extra keys unless the model says otherwise,
    as the openai client's ``parse`` sends it); an OpenAI-style format dict (``{"type": "json_schema",
    ...}`` in either API's shape, ``{"type": "json_object"}``, ``{"type": "text"}``) or ours
    (``{"type": "regex", "pattern": ...}``, ``{"type": "lark", "definition": ...}``); any other
    dict, or JSON text of one, is a JSON Schema (strict).
    """
    if isinstance(value, (JsonSchema, JsonObject, Regex, Lark, Text)):
        return value
    schema_of = getattr(value, "model_json_schema", None)
    if isinstance(value, type) and callable(schema_of):
        return JsonSchema(_closed(schema_of()), strict=True, name=value.__name__)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConstraintError(f"response_format text is not JSON ({e}); pass Regex(...) or "
                                  "Lark(...) for a regex or grammar", param="response_format") from None
    value = _mapping(value, "response_format")
    kind = value.get("type")
    if kind == "json_schema":
        inner = value.get("json_schema", value)
        return JsonSchema(dict(_require(inner, "schema", "response_format.schema")),
                          strict=inner.get("strict", True) is not False,
                          name=inner.get("name", "response"), description=inner.get("description"))
    if kind == "json_object":
        return JsonObject()
    if kind == "text":
        return Text()
    if kind == "regex":
        return Regex(_string(_require(value, "pattern", "response_format.pattern"),
                             "response_format.pattern"))
    if kind in ("lark", "grammar"):
        return Lark(_string(_require(value, "definition", "response_format.definition"),
                            "response_format.definition"))
    return JsonSchema(dict(value), strict=True)


def _closed(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object schema that does not say."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def generate_constraint(response_format: Any, *, harmony: bool = True,
                        whitespace: Whitespace = "compact") -> Constraint | None:
    """The constraint for ``generate(..., response_format=...)``: the whole harmony turn when
    the prompt is a chat (``harmony``), else the bare body. None for free text."""
    body = response_format_body(response_format)
    if isinstance(body, Text):
        return None
    if isinstance(body, JsonSchema):
        check_schema(body.schema, strict=body.strict, whitespace=whitespace,
                     param="response_format", what=f"response_format '{body.name}'")
    elif isinstance(body, (Lark, Regex)):
        syntax = "lark" if isinstance(body, Lark) else "regex"
        text = body.grammar if isinstance(body, Lark) else body.pattern
        _grammar_body(syntax, text, "response_format", "response_format")
    if not harmony:
        return compile_body(body, whitespace=whitespace)
    return compile_turn(TurnSpec(final=body, whitespace=whitespace))
