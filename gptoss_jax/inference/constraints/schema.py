"""JSON Schema checks before a constraint is built, and llguidance's JSON options.

A schema goes through three gates, each failure a ``ConstraintError`` naming the request field:

1. It must be valid JSON Schema: the ``jsonschema`` package checks it against its metaschema
   (the draft named by ``$schema``, 2020-12 when absent).
2. Under ``strict``, every keyword must be one the constraint can enforce. ``UNSUPPORTED_KEYWORDS``
   lists what llguidance cannot (it enforces types, enum/const, anyOf, allOf and oneOf where the
   branches are provably disjoint, $ref/$defs, properties/required/additionalProperties/
   patternProperties, min/maxProperties, items/prefixItems/min/maxItems, min/maxLength, pattern
   without look-around, formats date-time/time/date/duration/email/hostname/ipv4/ipv6/uuid/uri,
   numeric bounds and multipleOf); annotations (title, description, default, examples...) are
   ignored. All offending keywords are listed with their location. Without ``strict`` such
   keywords are ignored (llguidance's lenient mode): the output is still valid JSON following
   the rest of the schema, like OpenAI's non-strict mode, which promises no schema adherence.
3. llguidance compiles it (catching what the keyword list cannot: look-around in a pattern, an
   unknown format, overlapping oneOf branches, an unsatisfiable schema, a dangling $ref).

OpenAI's strict mode also demands ``additionalProperties: false`` and every property required;
this server enforces any schema it can instead, so those are not demanded.

Compact JSON (the default) allows no whitespace between JSON tokens: a model constrained to a
schema can otherwise fill an object with whitespace until its budget runs out.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import jsonschema
import llguidance

from gptoss_jax.inference.constraints.spec import ConstraintError, Whitespace

# Keywords that constrain JSON values but that llguidance 1.9 cannot enforce.
UNSUPPORTED_KEYWORDS = frozenset({
    "not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies",
    "unevaluatedProperties", "unevaluatedItems", "contains", "minContains", "maxContains",
    "uniqueItems", "propertyNames", "additionalItems", "$dynamicRef", "$dynamicAnchor",
    "$recursiveRef", "$recursiveAnchor",
})

CHECKED_CACHE = 1024
_checked: dict[tuple, None] = {}
_lock = threading.Lock()

_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SCHEMA_VALUES = ("additionalProperties", "items", "contains", "not", "if", "then", "else",
                  "propertyNames", "unevaluatedItems", "unevaluatedProperties", "additionalItems",
                  "contentSchema")


def json_options(whitespace: Whitespace, strict: bool) -> dict[str, Any]:
    """llguidance's JSON compile options (``x-guidance``) for a layout and strictness."""
    if whitespace not in ("compact", "flexible"):
        raise ValueError(f"whitespace must be 'compact' or 'flexible', got {whitespace!r}")
    opts: dict[str, Any] = {"whitespace_flexible": whitespace == "flexible"}
    if not strict:
        opts["lenient"] = True  # ignore keywords it cannot enforce (implies coerce_one_of)
    return opts


def with_options(schema: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """``schema`` with llguidance's options in its top-level ``x-guidance`` key (a caller's own
    ``x-guidance`` is replaced: compile options are this server's choice, not the client's)."""
    return {"x-guidance": dict(options), **{k: v for k, v in schema.items() if k != "x-guidance"}}


def _where(path: tuple) -> str:
    return ".".join(str(p) for p in path) or "(root)"


def _walk(schema: Any, path: tuple = ()) -> Iterator[tuple[tuple, Mapping[str, Any]]]:
    """Every (sub)schema object with its location, through the keywords that hold schemas."""
    if not isinstance(schema, Mapping):
        return
    yield path, schema
    for key in _SCHEMA_MAPS:
        sub = schema.get(key)
        if isinstance(sub, Mapping):
            for name, s in sub.items():
                yield from _walk(s, (*path, key, name))
    for key in _SCHEMA_LISTS:
        sub = schema.get(key)
        if isinstance(sub, list):
            for i, s in enumerate(sub):
                yield from _walk(s, (*path, key, i))
    for key in _SCHEMA_VALUES:
        sub = schema.get(key)
        if isinstance(sub, list):  # draft-7 tuple form of ``items``
            for i, s in enumerate(sub):
                yield from _walk(s, (*path, key, i))
        elif sub is not None:
            yield from _walk(sub, (*path, key))


def unsupported_keywords(schema: Mapping[str, Any]) -> list[str]:
    """``"keyword at location"`` for each keyword of ``UNSUPPORTED_KEYWORDS`` in ``schema``."""
    return [f"'{k}' at {_where(path)}" for path, s in _walk(schema) for k in s
            if k in UNSUPPORTED_KEYWORDS]


def check_schema(schema: Any, *, strict: bool, whitespace: Whitespace, param: str,
                 what: str) -> dict[str, Any]:
    """Validate a request's JSON Schema; return it with llguidance's options attached.

    ``param`` names the field in errors (``text.format.schema``); ``what`` names the schema in
    messages, as OpenAI does (``response_format 'weather'``, ``function 'get_weather'``).
    """
    if not isinstance(schema, Mapping):
        raise ConstraintError(f"Invalid schema for {what}: a schema must be a JSON object, "
                              f"got {type(schema).__name__}", param=param)
    schema = dict(schema)
    try:
        key = (json.dumps(schema, separators=(",", ":")), strict, whitespace)
    except (TypeError, ValueError) as e:
        raise ConstraintError(f"Invalid schema for {what}: not JSON ({e})", param=param) from None
    if key in _checked:
        return with_options(schema, json_options(whitespace, strict))
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ConstraintError(f"Invalid schema for {what}: {e.message} (at {_where(tuple(e.path))})",
                              param=param) from None
    if strict:
        bad = unsupported_keywords(schema)
        if bad:
            raise ConstraintError(
                f"Invalid schema for {what}: keywords this server cannot enforce: {', '.join(bad)}. "
                f"Unsupported keywords: {', '.join(sorted(UNSUPPORTED_KEYWORDS))}. "
                "Remove them, or set strict to false to have them ignored", param=param,
                code="unsupported_value")
    compiled = with_options(schema, json_options(whitespace, strict))
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        llguidance.LLMatcher.grammar_from_json_schema(compiled))
    if failed:
        raise ConstraintError(f"Invalid schema for {what}: {messages[0]}", param=param)
    _remember(key)
    return compiled


def _remember(key) -> None:
    """Schemas that passed, so a client repeating one skips the metaschema check (~2 ms for
    2020-12 in ``jsonschema``); bounded, oldest forgotten first."""
    with _lock:
        _checked[key] = None
        while len(_checked) > CHECKED_CACHE:
            _checked.pop(next(iter(_checked)))
