"""The one rule for names users write: policies, the served name, profiles.

A name is 1-64 ASCII letters, digits, ``_``, ``.`` or ``-``, starting with a letter or a
digit. It travels in URLs, in response headers (``X-MPO-Profile``) and in the
``<served>:<profile>`` model id, so no control character, space or colon may pass. The
rule is matched with ``fullmatch``: a pattern ending in ``$`` would also accept a name
followed by a newline, which then breaks the header it is echoed in.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field

from .errors import InvalidParameter

NAME_RULE = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}"
NAME_PATTERN = re.compile(NAME_RULE)
# For JSON Schema (ECMA-262 regular expressions), where ``$`` is the end of the input.
NAME_SCHEMA_PATTERN = f"^{NAME_RULE}$"
NAME_HINT = "use 1-64 letters, digits, '_', '.', '-' starting with a letter or digit"


def is_valid_name(name: object) -> bool:
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None


def check_name(name: object, param: str = "name", kind: str = "profile") -> str:
    """``name`` if it obeys the rule, else InvalidParameter naming ``param``."""
    if not is_valid_name(name):
        raise InvalidParameter(param, f"invalid {kind} name {name!r}: {NAME_HINT}")
    assert isinstance(name, str)
    return name


def _validate(name: str) -> str:
    if not is_valid_name(name):
        raise ValueError(f"invalid name {name!r}: {NAME_HINT}")
    return name


# The rule as a pydantic field type (request bodies, the policy-set config); the schema
# shows the pattern, the check is ``fullmatch``.
Name = Annotated[
    str,
    Field(json_schema_extra={"pattern": NAME_SCHEMA_PATTERN}, min_length=1, max_length=64),
    AfterValidator(_validate),
]
