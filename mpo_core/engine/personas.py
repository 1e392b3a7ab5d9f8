"""A request's own personas as the engine sees them (docs/server.md, "Request personas").

Their prompt rules are made once per distinct text (``models.personas.PersonaRules``), a
request may bring at most ``limit``, the plain model's name is reserved, and their
openings may take context a request's prompt then cannot use.
"""

from __future__ import annotations

from typing import Any

from ..decoding.mixing import Mixture
from ..models.personas import MAX_REQUEST_PERSONAS, PersonaRules, RequestPersona
from ..models.policies import PolicySet
from ..runners import PolicyRunner, request_persona_rules
from .requests import request_personas


def persona_slots(limits: Any) -> int:
    """The most personas a request may bring under ``limits`` (``EngineLimits``)."""
    return min(limits.max_request_personas, MAX_REQUEST_PERSONAS)


class EnginePersonas:
    """What an engine knows of request personas: none unless its runner has them."""

    def __init__(self, policy_set: PolicySet, runner: PolicyRunner, limits: Any) -> None:
        has = runner.capabilities.request_personas
        # The prompt rules, once per distinct text (None: the runner has no request personas).
        self.rules: PersonaRules | None = request_persona_rules(policy_set) if has else None
        self.limit = persona_slots(limits) if has else 0
        plain = policy_set.reference_name
        self.reserved = [plain] if plain is not None else []  # a persona may not take it
        self._runner = runner

    def of(self, mixture: Mixture) -> tuple[RequestPersona, ...]:
        """The mixture's own personas, as the runner takes them (400 where it has none)."""
        return request_personas(mixture, self.rules)

    def opening_tokens(self, mixture: Mixture) -> int:
        """The tokens the mixture's own personas' openings take from the context, past the
        room the limit leaves (a request's prompt + new tokens must leave them free)."""
        if self.rules is None or not mixture.request_personas:
            return 0
        return self.rules.beyond_room(request_personas(mixture, self.rules))

    def cache_stats(self) -> dict[str, int] | None:
        """Look-ups of request personas' caches (None: the runner has no request personas):
        their openings' KV (the runner's, ``describe()``) and their prompt rules."""
        rules = self.rules
        if rules is None:
            return None
        openings = self._runner.describe().get("request_persona_openings", {})
        return {
            "opening_hits": int(openings.get("hits", 0)),
            "opening_misses": int(openings.get("misses", 0)),
            "rule_hits": rules.hits,
            "rule_misses": rules.misses,
        }
