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
from .rules import unicode_problem

NAME_RULE = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}"
NAME_PATTERN = re.compile(NAME_RULE)
# For JSON Schema (ECMA-262 regular expressions), where ``$`` is the end of the input.
NAME_SCHEMA_PATTERN = f"^{NAME_RULE}$"
NAME_HINT = "use 1-64 letters, digits, '_', '.', '-' starting with a letter or digit"


def is_valid_name(name: object) -> bool:
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None


def name_problem(name: object, kind: str = "") -> str | None:
    """Why ``name`` breaks the rule, or None. Text that is not Unicode is said as such
    (the text rule of ``mpo_core/rules.py``, which every text field shares)."""
    if isinstance(name, str):
        problem = unicode_problem(name)
        if problem is not None:
            return f"invalid {kind + ' ' if kind else ''}name: {problem}"
    if not is_valid_name(name):
        return f"invalid {kind + ' ' if kind else ''}name {name!r}: {NAME_HINT}"
    return None


def check_name(name: object, param: str = "name", kind: str = "profile") -> str:
    """``name`` if it obeys the rule, else InvalidParameter naming ``param``."""
    problem = name_problem(name, kind)
    if problem is not None:
        raise InvalidParameter(param, problem)
    assert isinstance(name, str)
    return name


def _validate(name: str) -> str:
    problem = name_problem(name)
    if problem is not None:
        raise ValueError(problem)
    return name


# The rule as a pydantic field type (request bodies, the policy-set config); the schema
# shows the pattern, the check is ``fullmatch``.
Name = Annotated[
    str,
    Field(json_schema_extra={"pattern": NAME_SCHEMA_PATTERN}, min_length=1, max_length=64),
    AfterValidator(_validate),
]


# What an OpenAI ``model`` may be: the served name, ``<served>:<profile>``,
# ``<served>/<policy>`` or a bare policy; each part a name.
MODEL_RULE = rf"{NAME_RULE}(?:[:/]{NAME_RULE})?"
MODEL_PATTERN = re.compile(MODEL_RULE)
MODEL_HINT = (
    "use the served name, '<served>:<profile>', '<served>/<policy>' or a policy name "
    "(see GET /v1/models)"
)


def _validate_model(model: str) -> str:
    problem = unicode_problem(model)
    if problem is not None:
        raise ValueError(f"invalid model: {problem}")
    if MODEL_PATTERN.fullmatch(model) is None:
        raise ValueError(f"invalid model {model!r}: {MODEL_HINT}; each name: {NAME_HINT}")
    return model


ModelName = Annotated[
    str,
    Field(json_schema_extra={"pattern": f"^{MODEL_RULE}$"}, min_length=1, max_length=129),
    AfterValidator(_validate_model),
]
