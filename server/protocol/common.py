"""Fields shared by the TGI and OpenAI request models: mixing and extra sampling knobs."""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import AfterValidator, BaseModel, Field

# A stop list: a few non-empty strings (the engine matches them on detokenised text).
MAX_STOP_SEQUENCES = 16
# Upper bound for integer knobs (top_k, versions, token counts): larger values mean
# nothing here and would overflow the 64-bit integers of torch and SQLite.
MAX_INT = 2**31 - 1
# Weights are relative, so a bound costs nothing and keeps their sum finite.
MAX_WEIGHT = 1e9
# Strength extrapolates away from the reference past 1; far past it the mixture is all
# -inf/NaN in float32, so it is bounded (DESIGN §2.1 uses s in about [0, 2]).
MAX_STRENGTH = 100.0


def _check_weights(
    weights: dict[str, float] | list[float] | None,
) -> dict[str, float] | list[float] | None:
    if weights is None:
        return None
    values = list(weights.values()) if isinstance(weights, dict) else list(weights)
    if not values:
        raise ValueError("weights must not be empty")
    for value in values:
        if not math.isfinite(value) or not 0 <= value <= MAX_WEIGHT:
            raise ValueError(f"every weight must be in [0, {MAX_WEIGHT:g}], got {value!r}")
    if sum(values) <= 0:
        raise ValueError("weights must not all be zero")
    return weights


# {policy_name: weight} or a list in policy order; normalised to the simplex by the engine.
Weights = Annotated[dict[str, float] | list[float] | None, AfterValidator(_check_weights)]


class MixingFields(BaseModel):
    """How to blend the policies (DESIGN §2.1); absent fields fall back to the profile."""

    weights: Weights = None
    profile: str | None = Field(default=None, min_length=1, max_length=64)
    strength: float | None = Field(default=None, ge=0, le=MAX_STRENGTH, allow_inf_nan=False)


class MixingInfo(BaseModel):
    """The mixture actually used: normalised weights, strength and the profile, if any."""

    weights: dict[str, float]
    strength: float
    profile: str | None
