"""Fields shared by the TGI and OpenAI request models: mixing and extra sampling knobs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from mpo_core.decoding.mixing import MAX_STRENGTH, check_weight_list, check_weight_map
from mpo_core.errors import InvalidParameter

# A stop list: a few non-empty strings (the engine matches them on detokenised text).
MAX_STOP_SEQUENCES = 16
# Upper bound for integer knobs (top_k, versions, token counts): larger values mean
# nothing here and would overflow the 64-bit integers of torch and SQLite.
MAX_INT = 2**31 - 1


def _check_weights(
    weights: dict[str, float] | list[float] | None,
) -> dict[str, float] | list[float] | None:
    """The core's weight rules, whatever the names (the engine checks them against its own)."""
    if weights is None:
        return None
    if isinstance(weights, Mapping):
        return check_weight_map(weights)
    return check_weight_list(weights)


# {policy_name: weight} or a list in policy order; normalised to the simplex by the engine.
Weights = Annotated[dict[str, float] | list[float] | None, AfterValidator(_check_weights)]


class MixingFields(BaseModel):
    """How to blend the policies (docs/architecture.md); absent fields fall back to the profile.

    Request models are strict: a number must be a JSON number and a flag a JSON boolean
    (``"10"`` or ``true`` for a count, ``0`` for a flag are rejected, not converted).
    """

    model_config = ConfigDict(strict=True)

    weights: Weights = None
    profile: str | None = Field(default=None, min_length=1, max_length=64)
    strength: float | None = Field(default=None, ge=0, le=MAX_STRENGTH, allow_inf_nan=False)


def unicode_problem(text: str) -> str | None:
    """Why ``text`` cannot be tokenised, or None: JSON may escape a lone surrogate
    (``"\\ud800"``), which is no text, and no tokenizer takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"not valid Unicode: lone surrogate at position {exc.start}"
    return None


def check_unicode(text: str, param: str) -> str:
    """Text made after validation (a chat template's output): InvalidParameter naming ``param``."""
    problem = unicode_problem(text)
    if problem is not None:
        raise InvalidParameter(param, f"{param} is {problem}")
    return text


def _valid_unicode(text: str) -> str:
    problem = unicode_problem(text)
    if problem is not None:
        raise ValueError(problem)  # pydantic names the field
    return text


# Text that reaches the tokenizer (prompts, chat content).
Text = Annotated[str, AfterValidator(_valid_unicode)]


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
    """The mixture actually used: normalised weights, strength and the profile, if any."""

    weights: dict[str, float]
    strength: float
    profile: str | None
