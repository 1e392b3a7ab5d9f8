"""Schemathesis hooks for tests/server/test_live_server.py (``SCHEMATHESIS_HOOKS``).

``documented_positive_acceptance``: schemathesis' positive_data_acceptance (a body the
schema allows must not get a 400), except the 400s of rules that docs/server.md documents
and JSON Schema cannot state. Each exception is matched on the error's ``param`` and its
message, so any other 400 for a schema-valid body still fails the run.
"""

from __future__ import annotations

import json
import re

import schemathesis
from schemathesis.openapi.checks import RejectedPositiveData
from schemathesis.specs.openapi.checks import positive_data_acceptance

# (param pattern, message pattern): the documented rules JSON Schema cannot state.
DOCUMENTED = [
    # prompt + new tokens must fit the context: a count in tokens
    (r".*", r"exceeds the context limit|leaves no room to generate"),
    # a file the server must have, a reward set it must be configured with
    (r"prompt_file", r"is not a file under"),
    (r"rewards", r"reward set"),
    # a JSON schema or a regex the grammar library cannot compile
    (r"(parameters\.)?(grammar|response_format)(\..*)?", r".*"),
    # a chat template may refuse a conversation (the roles it takes are its own)
    (r"messages", r"the chat template rejected"),
    # signed weights: their sum must be above 0 and each within the bound once normalised
    (
        r"(parameters\.)?(mixtures(\.\d+)?\.?)?(weights(\..*)?)?",
        r"sum to more than 0|once the weights are normalised",
    ),
    # a fan-out: n (if given) is the number of mixtures; a list takes no mixing fields of
    # the request's own; TGI answers a fan-out whole, never as a stream
    (r"n", r"number of choices with mixtures"),
    (r"weights|profile|strength|plausibility|model|parameters\.adapter_id", r"list of mixtures"),
    (r"parameters\.mixtures", r"not supported when streaming"),
    # prefill details are for whole replies: /generate_stream shares /generate's schema
    (r"parameters\.decoder_input_details", r"not supported when streaming"),
]


def documented(body: object) -> bool:
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return False
    param = body["error"].get("param") or ""
    message = body["error"].get("message") or ""
    return any(re.fullmatch(p, param) and re.search(m, message) for p, m in DOCUMENTED)


@schemathesis.check
def documented_positive_acceptance(ctx, response, case):  # type: ignore[no-untyped-def]
    try:
        return positive_data_acceptance(ctx, response, case)
    except RejectedPositiveData:
        try:
            body = json.loads(response.content)
        except ValueError:
            raise
        if response.status_code == 400 and documented(body):
            return None
        raise
