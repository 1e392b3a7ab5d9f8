"""Admin shapes: weight profiles under ``/admin/profiles``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mpo_core.decoding.mixing import MAX_STRENGTH
from mpo_core.errors import InvalidParameter
from mpo_core.names import Name

from .common import MAX_INT, JSONObject, OptInt, Personas, Weights, persona_map


class ProfilePut(BaseModel):
    """``PUT /admin/profiles/{name}``: new content, or ``version`` to roll back to it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    weights: Weights = None
    strength: float = Field(default=1.0, ge=0, le=MAX_STRENGTH, allow_inf_nan=False)
    meta: JSONObject = Field(default_factory=dict)
    version: OptInt = Field(default=None, ge=1, le=MAX_INT)  # copy this old version as the newest
    default: bool | None = None  # true: mark this profile default
    # Personas the profile brings (persona families), as a request's; its weights name them
    personas: Personas = None

    @model_validator(mode="after")
    def _weights_xor_version(self) -> ProfilePut:
        if (self.weights is None) == (self.version is None):
            raise InvalidParameter(
                "weights" if self.weights is None else "version",
                "give either weights (new content) or version (a rollback), not both",
            )
        if self.version is not None and self.personas is not None:
            raise InvalidParameter(
                "personas", "a rollback takes the version's own personas; give no personas"
            )
        return self

    def own_personas(self) -> dict[str, Any] | None:
        """The ``personas`` field as the engine and the stores take them."""
        return persona_map(self.personas)


class DefaultPut(BaseModel):
    """``PUT /admin/profiles``: mark the default profile (null: uniform weights)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    default: Name | None


class ProfileOut(BaseModel):
    name: str
    version: int
    weights: dict[str, float]
    strength: float
    meta: dict[str, Any]
    created_at: float
    is_default: bool = False
    deleted: bool = False  # the version that deleted the profile (empty weights)
    personas: dict[str, Any] = {}  # the personas it brings: {name: text | {system|prefix}}


class ProfileList(BaseModel):
    default: str | None
    profiles: list[ProfileOut]


class ProfileHistory(BaseModel):
    name: str
    deleted: bool = False  # the newest version deleted the profile
    versions: list[ProfileOut]
    next: int | None = None  # the ``after`` of the next page; null on the last
