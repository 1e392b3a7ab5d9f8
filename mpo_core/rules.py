"""The token rules every entry point shares, each written once.

A request reaches the engine from the TGI and OpenAI routes, the fit jobs and direct
callers (scripts, the fit driver). Each of them checks token ids against the vocabulary
and token counts against the context limit before any work starts, so that the client
gets a 400 naming its parameter; all of them call these functions, so the rule and its
message are the same everywhere.

The text rule is here too: every string a client sends (prompts, stops, names, keys and
values inside a JSON schema or a grammar, ...) must be Unicode text. JSON can escape a
lone surrogate (``"\\ud800"``), which is no character: no tokenizer, regex compiler or
UTF-8 response body takes it. The request models call ``valid_text`` / ``valid_json_text``
on every text field (the ``Text`` type of ``server/protocol/common.py``), so each such
string is a 400 naming its field, whichever field it is; names obey the stricter name rule
of ``mpo_core/names.py``, which calls the same check first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .errors import InvalidParameter


def unicode_problem(text: str) -> str | None:
    """Why ``text`` is not Unicode text, or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"not valid Unicode: lone surrogate at position {exc.start}"
    return None


def json_text_problem(value: object, where: str = "") -> str | None:
    """The first string (object key or value, at any depth) of a JSON value that is not
    Unicode text, said with its path (``properties.<key 1>``), or None."""
    if isinstance(value, str):
        problem = unicode_problem(value)
        return None if problem is None else f"{where or 'the value'} is {problem}"
    if isinstance(value, Mapping):
        for i, (key, item) in enumerate(value.items()):
            problem = unicode_problem(str(key))
            if problem is not None:
                return f"key {i} of {where or 'the object'} is {problem}"
            found = json_text_problem(item, f"{where}.{key}" if where else str(key))
            if found is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = json_text_problem(item, f"{where}[{i}]" if where else f"[{i}]")
            if found is not None:
                return found
    return None


def check_text(text: str, param: str) -> str:
    """``text`` if it is Unicode text, else InvalidParameter naming ``param`` (text made
    after validation, such as a chat template's output)."""
    problem = unicode_problem(text)
    if problem is not None:
        raise InvalidParameter(param, f"{param} is {problem}")
    return text


def valid_text(text: str) -> str:
    """The rule as a pydantic validator: ValueError, which the HTTP layer turns into a 400
    naming the field."""
    problem = unicode_problem(text)
    if problem is not None:
        raise ValueError(problem)
    return text


def valid_json_text(value: object) -> object:
    """Every string of a JSON value (a schema, a grammar, metadata) is Unicode text."""
    problem = json_text_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def check_token_ids(ids: Iterable[object], vocab_size: int, param: str) -> list[int]:
    """Every id an integer in ``[0, vocab_size)``; else InvalidParameter naming ``param``."""
    checked: list[int] = []
    for token_id in ids:
        if isinstance(token_id, bool) or not isinstance(token_id, int):
            raise InvalidParameter(param, f"{param}: token id {token_id!r} is not an integer")
        if not 0 <= token_id < vocab_size:
            raise InvalidParameter(
                param,
                f"{param}: token id {token_id} is outside the vocabulary [0, {vocab_size})",
            )
        checked.append(token_id)
    return checked


def check_context(
    prompt_tokens: int,
    max_new_tokens: int | None,
    limit: int,
    param: str = "max_new_tokens",
    prompt_param: str = "prompt",
    prompt_label: str = "prompt",
) -> int:
    """The room left for new tokens (``limit - prompt_tokens``) after checking both counts.

    The prompt alone must leave room for one token (else the error names ``prompt_param``),
    and prompt + ``max_new_tokens`` must fit the limit (else it names ``param``).
    """
    if prompt_tokens >= limit:
        raise InvalidParameter(
            prompt_param,
            f"the {prompt_label} has {prompt_tokens} tokens; the context limit is {limit} "
            "tokens (prompt + new tokens), which leaves no room to generate",
        )
    if max_new_tokens is not None and prompt_tokens + max_new_tokens > limit:
        raise InvalidParameter(
            param,
            f"{prompt_label} ({prompt_tokens} tokens) + {param} ({max_new_tokens}) = "
            f"{prompt_tokens + max_new_tokens} exceeds the context limit of {limit} tokens",
        )
    return limit - prompt_tokens
