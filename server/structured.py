"""Structured output over HTTP: the request fields that become a grammar.

- OpenAI ``response_format``: ``{"type": "text"}`` (nothing), ``{"type": "json_object"}``
  (any JSON object), ``{"type": "json_schema", "json_schema": {"name", "schema",
  "strict"}}``;
- TGI ``parameters.grammar``: ``{"type": "json", "value": <schema>}`` or
  ``{"type": "regex", "value": "<pattern>"}``;
- LoRAX ``parameters.response_format``: ``{"type": "json_object", "schema": <schema>}``.

Each becomes a core ``GrammarSpec`` naming the parameter it came from; the engine compiles
it (a worker thread: a large schema takes a while) and a schema or pattern the library
cannot compile is a 400 naming that parameter.
"""

from __future__ import annotations

import asyncio
from typing import Any

from mpo_core.decoding.grammar import Grammar, GrammarSpec
from mpo_core.errors import InvalidParameter

from .serving import Serving


def _expect_keys(value: dict[str, Any], allowed: set[str], param: str) -> None:
    extra = sorted(set(value) - allowed)
    if extra:
        raise InvalidParameter(param, f"unknown field(s) {extra} in {param}")


def response_format_spec(
    response_format: dict[str, Any] | None, param: str = "response_format"
) -> GrammarSpec | None:
    """OpenAI's ``response_format`` as a grammar (None for text)."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind in (None, "text"):
        _expect_keys(response_format, {"type"}, param)
        return None
    if kind == "json_object":
        _expect_keys(response_format, {"type"}, param)
        return GrammarSpec("json_object", param=param)
    if kind == "json_schema":
        _expect_keys(response_format, {"type", "json_schema"}, param)
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise InvalidParameter(
                param, "response_format json_schema needs a 'json_schema' object"
            )
        _expect_keys(spec, {"name", "description", "schema", "strict"}, f"{param}.json_schema")
        if not isinstance(spec.get("name"), str) or not spec["name"]:
            raise InvalidParameter(param, "response_format.json_schema needs a 'name'")
        if "strict" in spec and not isinstance(spec["strict"], (bool, type(None))):
            raise InvalidParameter(param, "response_format.json_schema.strict must be a boolean")
        # A schema is always enforced, strict or not: the grammar cannot half-apply it.
        return GrammarSpec("json_schema", spec.get("schema", {}), param=param)
    raise InvalidParameter(
        param,
        f"response_format type {kind!r} is not supported: use 'text', 'json_object' or "
        "'json_schema'",
    )


def tgi_grammar_spec(grammar: dict[str, Any] | None, param: str) -> GrammarSpec | None:
    """TGI's ``grammar`` (``{"type": "json" | "regex", "value": ...}``) as a grammar."""
    if grammar is None:
        return None
    _expect_keys(grammar, {"type", "value"}, param)
    kind = grammar.get("type")
    if "value" not in grammar:
        raise InvalidParameter(param, f"{param} needs a 'value'")
    if kind in ("json", "json_schema"):
        return GrammarSpec("json_schema", grammar["value"], param=param)
    if kind == "regex":
        return GrammarSpec("regex", grammar["value"], param=param)
    raise InvalidParameter(param, f"grammar type {kind!r} is not supported: use 'json' or 'regex'")


def lorax_format_spec(response_format: dict[str, Any] | None, param: str) -> GrammarSpec | None:
    """LoRAX's ``response_format`` (``{"type": "json_object", "schema": ...}``)."""
    if response_format is None:
        return None
    _expect_keys(response_format, {"type", "schema"}, param)
    if response_format.get("type") != "json_object":
        raise InvalidParameter(param, f"{param} type must be 'json_object'")
    schema = response_format.get("schema")
    if schema is None:
        return GrammarSpec("json_object", param=param)
    return GrammarSpec("json_schema", schema, param=param)


def one_of(*specs: GrammarSpec | None) -> GrammarSpec | None:
    """At most one grammar per request."""
    given = [spec for spec in specs if spec is not None]
    if len(given) > 1:
        raise InvalidParameter(
            given[1].param, f"give either {given[0].param} or {given[1].param}, not both"
        )
    return given[0] if given else None


async def compile_grammar(serving: Serving, spec: GrammarSpec | None) -> Grammar | None:
    """Compile off the event loop; InvalidParameter (a 400) names the parameter."""
    if spec is None:
        return None
    return await asyncio.to_thread(serving.engine.compile_grammar, spec)
