"""The token rules every entry point shares, each written once.

A request reaches the engine from the TGI and OpenAI routes, the fit jobs and direct
callers (scripts, the fit driver). Each of them checks token ids against the vocabulary
and token counts against the context limit before any work starts, so that the client
gets a 400 naming its parameter; all of them call these functions, so the rule and its
message are the same everywhere. (The wire-format rule, text that is valid Unicode,
lives with the request models: ``server/protocol/common.py``.)
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import InvalidParameter


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
