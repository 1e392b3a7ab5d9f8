"""The OpenAPI document as the server behaves: its error statuses, body and media types.

Routes declare the statuses they can answer with ``error_responses(...)``; every error has
OpenAI's body (``ErrorResponse``). FastAPI's default 422 ``HTTPValidationError`` is dropped:
validation errors are answered 400 (``errors.validation_error_response``). Streaming
routes declare ``text/event-stream`` and ``/metrics`` ``text/plain`` where they are routed.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from mpo_core.decoding.mixing import MAX_TERM, MAX_WEIGHT
from mpo_core.names import NAME_SCHEMA_PATTERN

from .protocol.common import MAX_STOP_SEQUENCES
from .protocol.errors import ErrorResponse

_DESCRIPTIONS = {
    400: "A bad parameter or body; `error.param` names the field",
    401: "Missing or wrong bearer token (the API key, or the admin token on /admin)",
    403: "Admin routes are disabled: the server has no admin token",
    404: "Unknown model, profile or fit job",
    409: "A fit job is already running",
    413: "The request body is larger than the server accepts",
    429: "Overloaded: retry after the Retry-After header's seconds",
    503: "The engine or the profile store is not ready; retry shortly",
}
# What every route that reads a JSON body can answer, besides its own statuses.
BODY_ERRORS = (400, 413)

ERROR_SCHEMA = {"$ref": "#/components/schemas/ErrorResponse"}
# Before OpenAPI 3.2 the schema of text/event-stream describes one event.
EVENT_STREAM: dict[str, Any] = {
    "text/event-stream": {
        "schema": {
            "type": "object",
            "description": "One server-sent event: `data` is a JSON object (OpenAI streams end "
            "with `[DONE]`); idle streams get `: keep-alive` comments",
            "properties": {
                "data": {"type": "string"},
                "event": {"type": "string"},
                "id": {"type": "string"},
            },
        }
    }
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route: each status with its meaning and OpenAI's error body."""
    return {
        status: {"model": ErrorResponse, "description": _DESCRIPTIONS[status]}
        for status in sorted(set(statuses))
    }


def streaming_ok(description: str) -> dict[int | str, dict[str, Any]]:
    """A 200 that is JSON, or server-sent events when the body asks to stream."""
    return {200: {"description": description, "content": EVENT_STREAM}}


def install_openapi(app: FastAPI) -> None:
    """Replace ``app.openapi`` with a builder that drops FastAPI's unused 422."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                routes=app.routes,
            )
            for path_item in schema.get("paths", {}).values():
                for operation in path_item.values():
                    responses = operation.get("responses", {})
                    responses.pop("422", None)
                    for status, response in responses.items():
                        if status.startswith(("4", "5")):  # errors are JSON on every route
                            response["content"] = {"application/json": {"schema": ERROR_SCHEMA}}
            schemas = schema.get("components", {}).get("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            add_security(app, schema)
            serving = getattr(app.state, "serving", None)
            policies = list(serving.engine.policy_names) if serving is not None else None
            tighten(schemas, policies)
            if serving is not None:
                limit_counts(schemas, serving)
                persona_fields(schemas, serving)
            if policies is None:  # before start-up: the weights' names are not known yet
                return schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = build  # type: ignore[method-assign]


SECURITY_SCHEMES = {
    "apiKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "The API key (`--api-key` / `MPO_API_KEY`): the inference routes and "
        "/info, when the server has one",
    },
    "adminToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "The admin token (`--admin-token` / `MPO_ADMIN_TOKEN`): /admin/*",
    },
}


def add_security(app: FastAPI, schema: dict[str, Any]) -> None:
    """``securitySchemes`` and each operation's ``security``: /admin/* takes the admin
    token; every other operation that can answer 401 takes the API key, when the server
    has one. The rest (/health, /metrics, the documents) are open."""
    schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
    api_key_set = app.state.settings.api_key is not None
    for path, path_item in schema.get("paths", {}).items():
        for operation in path_item.values():
            if path.startswith("/admin"):
                operation["security"] = [{"adminToken": []}]
            elif api_key_set and "401" in operation.get("responses", {}):
                operation["security"] = [{"apiKey": []}]


def _path_pattern(template: str) -> re.Pattern[str]:
    """``/admin/profiles/{name}`` -> a regex matching the paths it routes."""
    parts = re.split(r"(\{[^}/]+\})", template)
    return re.compile("".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts))


def operations_at(app: FastAPI, path: str) -> dict[str, dict[str, Any]]:
    """The document's operations for a request path, by upper-case method: what the 405's
    ``Allow`` lists and what the body limit checks tokens against."""
    table = getattr(app.state, "operation_table", None)
    if table is None:
        paths = app.openapi().get("paths", {})
        table = [(_path_pattern(t), item) for t, item in paths.items()]
        app.state.operation_table = table
    found: dict[str, dict[str, Any]] = {}
    for pattern, item in table:
        if pattern.fullmatch(path):
            found.update({method.upper(): op for method, op in item.items()})
    return found


# ---- what the server accepts, written where pydantic's schema cannot say it ----------


def weights_schema(policies: list[str]) -> dict[str, Any]:
    """Weights as the engine takes them: the loaded policies' names (or one number each, in
    their order), finite and signed, at least one above 0. That they sum to more than 0 and
    stay within MAX_TERM once normalised is beyond JSON Schema (docs/server.md)."""
    number = {"type": "number", "minimum": -MAX_WEIGHT, "maximum": MAX_WEIGHT}
    some_positive = [
        {"required": [name], "properties": {name: {"exclusiveMinimum": 0}}} for name in policies
    ]
    return {
        "anyOf": [
            {
                "type": "object",
                "properties": {name: number for name in policies},
                "additionalProperties": False,
                "minProperties": 1,
                "anyOf": some_positive,
            },
            {
                "type": "array",
                "items": number,
                "minItems": len(policies),
                "maxItems": len(policies),
                "contains": {"exclusiveMinimum": 0},
            },
        ],
        "description": f"{{policy: weight}} or one weight per policy, in the order {policies}; "
        f"signed, normalised to sum 1 (the sum must be above 0), each then within "
        f"[-{MAX_TERM:g}, {MAX_TERM:g}]",
    }


_NOT_NULL = {"not": {"type": "null"}}


def _given(*fields: str) -> dict[str, Any]:
    """The fields are present and not null (the server takes null as absent)."""
    return {"required": list(fields), "properties": {f: _NOT_NULL for f in fields}}


def _needs(field: str, when: dict[str, Any], flag: str) -> dict[str, Any]:
    """``field`` (as ``when`` says) needs ``flag`` set to true."""
    condition = {"required": [field], **when}
    condition.setdefault("properties", {})
    return {"if": condition, "then": {"required": [flag], "properties": {flag: {"const": True}}}}


def _no_eos_ignored(flag: str, field: str, grammar: dict[str, Any]) -> dict[str, Any]:
    """``flag`` true cannot go with ``field`` asking for a grammar (EOS ends a grammar)."""
    both = {flag: {"const": True}, field: grammar}
    return {"not": {"required": [flag, field], "properties": both}}


def _exactly_one(schema: dict[str, Any], first: str, second: str) -> None:
    schema["oneOf"] = [_given(first), _given(second)]


NON_EMPTY_STOP = {"type": "string", "minLength": 1}
REQUESTS = {
    "TGIParameters",
    "CompletionRequest",
    "ChatCompletionRequest",
    "ProfilePut",
    "MixtureSpec",
}
_TEXT: dict[str, Any] = {"type": "string", "minLength": 1}
_IDS: dict[str, Any] = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
PROMPT: dict[str, Any] = {
    "anyOf": [
        _TEXT,
        {"type": "array", "items": _TEXT, "minItems": 1},
        _IDS,
        {"type": "array", "items": _IDS, "minItems": 1},
    ],
    "description": "text, several texts, token ids, or several lists of token ids",
}


_SCHEMA_NOTE = "; the schema must be one the grammar library compiles (else a 400 naming the field)"
# An OpenAI response_format that becomes a grammar.
OPENAI_GRAMMAR = {
    "type": "object",
    "required": ["type"],
    "properties": {"type": {"enum": ["json_object", "json_schema"]}},
}
OPENAI_FORMAT = {
    "anyOf": [
        {
            "type": "object",
            "properties": {"type": {"enum": ["text", "json_object"]}},
            "additionalProperties": False,
        },
        {
            "type": "object",
            "required": ["type", "json_schema"],
            "properties": {
                "type": {"const": "json_schema"},
                "json_schema": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "description": {"type": "string"},
                        "schema": {"type": "object"},
                        "strict": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
                    },
                    "additionalProperties": False,
                },
            },
            "additionalProperties": False,
        },
        {"type": "null"},
    ],
    "description": "text (also {}), json_object or json_schema" + _SCHEMA_NOTE,
}
LORAX_FORMAT = {
    "anyOf": [
        {
            "type": "object",
            "required": ["type"],
            "properties": {
                "type": {"const": "json_object"},
                "schema": {"anyOf": [{"type": "object"}, {"type": "null"}]},
            },
            "additionalProperties": False,
        },
        {"type": "null"},
    ],
    "description": "LoRAX's JSON mode" + _SCHEMA_NOTE,
}
TGI_GRAMMAR = {
    "anyOf": [
        {
            "type": "object",
            "required": ["type", "value"],
            "properties": {"type": {"enum": ["json", "json_schema"]}, "value": {}},
            "additionalProperties": False,
        },
        {
            "type": "object",
            "required": ["type", "value"],
            "properties": {"type": {"const": "regex"}, "value": {"type": "string"}},
            "additionalProperties": False,
        },
        {"type": "null"},
    ],
    "description": "a JSON schema or a regular expression"
    + _SCHEMA_NOTE.replace("schema must", "schema or pattern must"),
}


def tighten(schemas: dict[str, Any], policies: list[str] | None) -> None:
    """The request schemas, narrowed to what the server accepts (schemathesis checks it):
    policy names in weights, either-or rules, non-empty stop strings, the neutral values
    of the unsupported penalties, the chat roles every template takes."""
    for name in REQUESTS & set(schemas):
        schema = schemas[name]
        props = schema.get("properties", {})
        if policies is not None and "weights" in props:
            nullable = name != "ProfilePut"
            props["weights"] = weights_schema(policies)
            if nullable:
                props["weights"]["anyOf"].append({"type": "null"})
        if "weights" in props and "profile" in props:  # weights or a profile, not both
            schema["not"] = _given("weights", "profile")
        if name in ("CompletionRequest", "ChatCompletionRequest"):
            stop = {"type": "array", "items": NON_EMPTY_STOP, "maxItems": MAX_STOP_SEQUENCES}
            props["stop"] = {"anyOf": [NON_EMPTY_STOP, stop, {"type": "null"}]}
            props["logit_bias"] = {
                "anyOf": [{"type": "object", "maxProperties": 0}, {"type": "null"}],
                "description": "not supported: only {} or null",
            }
            for penalty in ("presence_penalty", "frequency_penalty"):
                props[penalty] = {**props[penalty], "enum": [0], "description": "only 0"}
        if name == "CompletionRequest":
            props["prompt"] = PROMPT
            props["best_of"] = {"type": "null", "description": "only null (or n itself)"}
        if name in ("CompletionRequest", "ChatCompletionRequest"):
            props["response_format"] = OPENAI_FORMAT
            rules = [_needs("stream_options", _given("stream_options"), "stream")]
            if name == "ChatCompletionRequest":
                positive = {"properties": {"top_logprobs": {"type": "integer", "minimum": 1}}}
                rules.append(_needs("top_logprobs", positive, "logprobs"))
            rules.append(_no_eos_ignored("ignore_eos", "response_format", OPENAI_GRAMMAR))
            schema["allOf"] = rules
        if name == "TGIParameters":
            schema["allOf"] = [
                _no_eos_ignored(flag, field, _NOT_NULL)
                for flag in ("ignore_eos", "ignore_eos_token")
                for field in ("grammar", "response_format")
            ]
            # a fan-out's other choices are in details.best_of_sequences
            schema["allOf"].append(_needs("mixtures", _given("mixtures"), "details"))
            props["stop"] = {**props["stop"], "items": NON_EMPTY_STOP}
            props["response_format"] = LORAX_FORMAT
            props["grammar"] = TGI_GRAMMAR
            props["typical_p"] = {"anyOf": [{"const": 1}, {"type": "null"}], "description": "off"}
    if "ProfilePut" in schemas:
        _exactly_one(schemas["ProfilePut"], "weights", "version")
    if "FitRequest" in schemas:
        _exactly_one(schemas["FitRequest"], "prompts", "prompt_file")
    if "PersonaPrompt" in schemas:
        _exactly_one(schemas["PersonaPrompt"], "system", "prefix")
    if "ChatMessage" in schemas:
        role = schemas["ChatMessage"]["properties"]["role"]
        role["enum"] = ["system", "user", "assistant"]
        role["description"] = (
            "developer and tool messages are passed to the model's chat template too, "
            "which may refuse them (400)"
        )


def persona_fields(schemas: dict[str, Any], serving: Any) -> None:
    """``personas``: on a family that runs them, at most the engine's limit, named by the
    name rule, and the weights may name them (which names a request brings, and that they
    differ from the family's members, is beyond JSON Schema: docs/server.md); elsewhere
    only null or {}."""
    engine = serving.engine
    limit = engine.limits.max_request_personas if engine.own_personas.rules is not None else 0
    models = ("TGIParameters", "CompletionRequest", "ChatCompletionRequest", "MixtureSpec")
    for name in (*models, "ProfilePut"):
        props = schemas.get(name, {}).get("properties", {})
        if "personas" not in props:
            continue
        if limit == 0:
            props["personas"] = {
                "anyOf": [{"type": "object", "maxProperties": 0}, {"type": "null"}],
                "description": "not supported by this family (persona families only): "
                "only {} or null",
            }
            continue
        for member in props["personas"].get("anyOf", []):
            if member.get("type") == "object":
                member["maxProperties"] = limit
                member["propertyNames"] = {"pattern": NAME_SCHEMA_PATTERN}
        props["personas"]["description"] = (
            f"at most {limit} personas this request adds: {{name: system message or "
            "{system} or {prefix}}, usable by name in weights; a name must differ from the "
            "family's members"
        )
        weights = props.get("weights", {})
        for member in weights.get("anyOf", []):
            if member.get("type") == "object":  # a request's personas too
                member.pop("anyOf", None)
                member["additionalProperties"] = member["properties"][
                    next(iter(member["properties"]))
                ]
                member["propertyNames"] = {"pattern": NAME_SCHEMA_PATTERN}
            elif member.get("type") == "array":
                member["maxItems"] = member["minItems"] + limit
        if weights:
            weights["description"] += (
                "; with personas, the weights may name them too (a list: the policies, "
                "then the personas in the request's order)"
            )


def limit_counts(schemas: dict[str, Any], serving: Any) -> None:
    """The server's own bounds on counts: alternatives per token, choices per request."""
    top = min(serving.settings.max_top_logprobs, serving.engine.limits.max_top_logprobs)
    bounds = {
        ("TGIParameters", "top_n_tokens"): top,
        ("CompletionRequest", "logprobs"): top,
        ("ChatCompletionRequest", "top_logprobs"): top,
        ("CompletionRequest", "n"): serving.settings.max_n,
        ("ChatCompletionRequest", "n"): serving.settings.max_n,
    }
    for (model, field), maximum in bounds.items():
        prop = schemas.get(model, {}).get("properties", {}).get(field)
        if prop is None:
            continue
        for member in prop.get("anyOf", [prop]):
            if member.get("type") == "integer":
                member["maximum"] = maximum
    # A fan-out has at most max_n choices.
    for model in ("TGIParameters", "CompletionRequest", "ChatCompletionRequest"):
        prop = schemas.get(model, {}).get("properties", {}).get("mixtures", {})
        for member in prop.get("anyOf", []):
            if member.get("type") == "array":
                member["maxItems"] = serving.settings.max_n
    # Token ids: inside the vocabulary.
    last_id = int(serving.engine.policy_set.vocab_size) - 1
    for model in ("TGIParameters", "CompletionRequest", "ChatCompletionRequest"):
        props = schemas.get(model, {}).get("properties", {})
        for member in props.get("stop_token_ids", {}).get("anyOf", []):
            if member.get("type") == "array":
                member["items"] = {**member.get("items", {}), "minimum": 0, "maximum": last_id}
        if model == "CompletionRequest" and "prompt" in props:
            ids = {**_IDS, "items": {**_IDS["items"], "maximum": last_id}}
            texts = [m for m in PROMPT["anyOf"] if m.get("items", {}).get("type") != "integer"]
            texts = [m for m in texts if m.get("items") != _IDS]
            props["prompt"] = {
                **PROMPT,
                "anyOf": [*texts, ids, {"type": "array", "items": ids, "minItems": 1}],
            }
    # New tokens: prompt + new tokens must fit the context, a rule in tokens that no JSON
    # Schema can state (the documented exception); a prompt has one token at least.
    room = serving.engine.max_context - 1
    for model, field in (
        ("TGIParameters", "max_new_tokens"),
        ("CompletionRequest", "max_tokens"),
        ("ChatCompletionRequest", "max_tokens"),
        ("ChatCompletionRequest", "max_completion_tokens"),
    ):
        prop = schemas.get(model, {}).get("properties", {}).get(field)
        if prop is None:
            continue
        for member in prop.get("anyOf", [prop]):
            if member.get("type") == "integer":
                member["maximum"] = room
        prop["description"] = (
            f"at most {room}; prompt + {field} must fit the context limit of "
            f"{room + 1} tokens (else a 400 naming {field})"
        )
    chat = schemas.get("ChatCompletionRequest", {}).get("properties", {})
    if "tools" in chat:
        chat["tools"] = {"anyOf": [{"type": "array", "maxItems": 0}, {"type": "null"}],
                         "description": "tools are not supported"}  # fmt: skip
