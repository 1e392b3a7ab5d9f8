"""Fields shared by the TGI and OpenAI request models: mixing and extra sampling knobs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)

from mpo_core.decoding.mixing import MAX_STRENGTH, check_weight_list, check_weight_map
from mpo_core.names import Name, name_problem
from mpo_core.rules import check_text, valid_json_text, valid_text

# A stop list: a few non-empty strings (the engine matches them on detokenised text).
MAX_STOP_SEQUENCES = 16
# Upper bound for integer knobs (top_k, versions, token counts): larger values mean
# nothing here and would overflow the 64-bit integers of torch and SQLite.
MAX_INT = 2**31 - 1
# Seeds: integers a JSON number (a double) holds exactly (JavaScript's MAX_SAFE_INTEGER),
# so that a client or a schema checker comparing doubles agrees with the server on the
# bound; a choice's seed + its index stays below 2**63 (torch's generators take int64).
MAX_SEED = 2**53 - 1


def _check_weights(
    weights: dict[str, float] | list[float] | None,
) -> dict[str, float] | list[float] | None:
    """The core's weight rules, whatever the names (the engine checks them against its own)."""
    if weights is None:
        return None
    if isinstance(weights, Mapping):
        for name in weights:
            problem = name_problem(name, "policy")
            if problem is not None:
                raise ValueError(problem)  # pydantic names the field
        return check_weight_map(weights)
    return check_weight_list(weights)


# {policy_name: weight} or a list in policy order; normalised to the simplex by the engine.
Weights = Annotated[dict[str, float] | list[float] | None, AfterValidator(_check_weights)]


class PersonaPrompt(BaseModel):
    """A persona a request brings, as an object: exactly one of a system message (the chat
    template renders it) or a raw prefix (its tokens go before the prompt)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    system: Annotated[str, AfterValidator(valid_text), Field(min_length=1)] | None = None
    prefix: Annotated[str, AfterValidator(valid_text), Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> PersonaPrompt:
        if (self.system is None) == (self.prefix is None):
            raise ValueError("give exactly one of system (a system message) or prefix (raw text)")
        return self


def _check_personas(
    personas: dict[str, str | PersonaPrompt] | None,
) -> dict[str, str | PersonaPrompt] | None:
    """The name rule on the personas' names (the engine checks the count and clashes)."""
    for name in personas or {}:
        problem = name_problem(name, "persona")
        if problem is not None:
            raise ValueError(problem)  # pydantic names the field
    return personas


# {name: "a system message" | {"system": ...} | {"prefix": ...}}: members this request
# adds on a persona family, usable by name in its weights (docs/server.md).
PersonaValue = Annotated[str, AfterValidator(valid_text), Field(min_length=1)] | PersonaPrompt
Personas = Annotated[dict[str, PersonaValue] | None, AfterValidator(_check_personas)]


def persona_map(personas: dict[str, str | PersonaPrompt] | None) -> dict[str, Any] | None:
    """Personas as the engine and the stores take them: {name: text or {system|prefix}}."""
    if personas is None:
        return None
    return {
        name: value if isinstance(value, str) else value.model_dump(exclude_none=True)
        for name, value in personas.items()
    }


class MixingFields(BaseModel):
    """How to blend the policies (docs/architecture.md); absent fields fall back to the profile.

    Request models are strict: a number must be a JSON number and a flag a JSON boolean
    (``"10"`` or ``true`` for a count, ``0`` for a flag are rejected, not converted).
    """

    model_config = ConfigDict(strict=True)

    weights: Weights = None
    profile: Name | None = None
    strength: float | None = Field(default=None, ge=0, le=MAX_STRENGTH, allow_inf_nan=False)
    # Li et al.'s alpha, in force when a policy's term is negative (null: the default, 0.1)
    plausibility: float | None = Field(default=None, ge=0, lt=1, allow_inf_nan=False)
    # Personas this request adds (persona families): {name: system message or object}
    personas: Personas = None

    def persona_count(self) -> int:
        """How many personas the request brings."""
        return len(self.personas or {})

    def persona_map(self) -> dict[str, Any] | None:
        """``personas`` as the engine takes them: {name: text or {system|prefix: text}}."""
        return persona_map(self.personas)


class MixtureSpec(MixingFields):
    """One mixture of a fan-out (``mixtures``): its weights or profile, its strength, its
    plausibility and its personas, each as on a request (absent: the same fallbacks)."""

    model_config = ConfigDict(extra="forbid", strict=True)


# A fan-out: choice i under mixture i (a spec or a profile's name), or "each": one choice
# per policy alone, then the request's own blend (docs/server.md, "Fan-out").
Mixtures = Annotated[list[Name | MixtureSpec], Field(min_length=1)] | Literal["each"] | None


# The one text rule (mpo_core/rules.py), on every text field of every request model: a
# string that is not Unicode text is a 400 naming its field. ``check_unicode`` is the rule
# for text made after validation (a chat template's output).
check_unicode = check_text

# Text: prompts, stops, chat content and names, user, ... ; JSON: any JSON value whose
# strings (keys and values, at any depth) are text: schemas, grammars, metadata.
Text = Annotated[str, AfterValidator(valid_text)]
JSONObject = Annotated[dict[str, Any], AfterValidator(valid_json_text)]


def _integral(value: object) -> object:
    """JSON does not tell 3 from 3.0 (nor does JSON Schema's ``integer``): a float with no
    fraction is that integer. Strings and booleans stay refused (the models are strict)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# An integer field of a request body, and an optional one (the validator wraps the whole
# union, so that Field bounds still reach the schema as minimum / maximum).
Int = Annotated[int, BeforeValidator(_integral)]
OptInt = Annotated[int | None, BeforeValidator(_integral)]


class WireModel(BaseModel):
    """A response shape: every field is sent, except the optional extras named in
    ``omit_unless_given``, which are sent only when the code that built it gave them."""

    omit_unless_given: ClassVar[frozenset[str]] = frozenset()

    def model_post_init(self, context: Any, /) -> None:
        self.__pydantic_fields_set__.update(set(type(self).model_fields) - self.omit_unless_given)

    def wire(self) -> dict[str, Any]:
        """The JSON-ready body (non-finite floats become null)."""
        return self.model_dump(mode="json", exclude_unset=True)

    def wire_json(self) -> str:
        return self.model_dump_json(exclude_unset=True)


class MixingInfo(BaseModel):
    """The mixture actually used: normalised weights, strength, the plausibility alpha in
    force (0 when no policy's term is negative) and the profile, if any."""

    weights: dict[str, float]
    strength: float
    plausibility: float
    profile: str | None
