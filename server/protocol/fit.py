"""Shapes of the fit-job admin routes: ``/admin/fit[/{id}]``."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from mpo_core.errors import InvalidParameter
from mpo_core.names import Name
from mpo_core.rules import valid_text

from .common import MAX_SEED, Int, OptInt

MAX_FIT_PROMPTS = 10_000
# A prompt to fit on: text with something besides whitespace in it.
Prompt = Annotated[
    str, Field(min_length=1, json_schema_extra={"pattern": r"\S"}), AfterValidator(valid_text)
]


class FitState(str, Enum):
    """A fit job's state: the active ones in the order a job passes them, then the final."""

    QUEUED = "queued"
    SAMPLING = "sampling"
    SCORING = "scoring"
    OPTIMISING = "optimising"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def active(self) -> bool:
        return self not in FINAL_STATES


FINAL_STATES = frozenset({FitState.DONE, FitState.FAILED, FitState.CANCELLED})


class FitRequest(BaseModel):
    """``POST /admin/fit``: learn MaxMin mixing weights (docs/fitting.md) and store them."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompts: list[Prompt] | None = Field(default=None, min_length=1, max_length=MAX_FIT_PROMPTS)
    # a file under <data_dir>/prompts: one prompt a line
    prompt_file: (
        Annotated[
            str,
            Field(min_length=1, json_schema_extra={"pattern": "^[^\\u0000]+$"}),  # no NUL
            AfterValidator(valid_text),
        ]
        | None
    ) = None
    samples_per_prompt: Int = Field(default=8, ge=2, le=256)  # m
    max_new_tokens: Int = Field(default=32, ge=1)
    iterations: Int = Field(default=500, ge=1, le=1_000_000)  # T
    step_size: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # eta
    batch_size: OptInt = Field(default=None, ge=1, le=MAX_FIT_PROMPTS)  # prompts a step (b)
    seed: Int = Field(default=0, ge=0, le=MAX_SEED)
    profile: Name = "fitted"
    activate: bool = False  # make the stored profile the default
    # Fit to a reward set configured on the server (docs/fitting.md), by name; None: the
    # implicit fit. The options below apply to reward fits only; samples_per_prompt is then
    # the replies per prompt of each round and iterations the ascent steps per refit.
    rewards: Name | None = None
    reference_samples: Int = Field(default=8, ge=1, le=256)  # m_ref
    rounds: Int = Field(default=2, ge=0, le=20)
    tolerance: float = Field(default=0.02, ge=0, allow_inf_nan=False)
    kl_coef: float = Field(default=0.02, ge=0, allow_inf_nan=False)
    fit_strength: bool = False

    @model_validator(mode="after")
    def _one_prompt_source(self) -> FitRequest:
        if (self.prompts is None) == (self.prompt_file is None):
            raise InvalidParameter(
                "prompts" if self.prompts is None else "prompt_file",
                "give exactly one of prompts (a list) or prompt_file",
            )
        return self


class FitJobOut(BaseModel):
    id: str
    state: FitState
    progress: float  # 0..1 over the whole job
    phase_progress: float  # 0..1 within the current phase
    created_at: float
    started_at: float | None
    finished_at: float | None
    eta_seconds: float | None
    request: dict[str, Any]
    error: str | None = None
    weights: dict[str, float] | None = None
    profile: dict[str, Any] | None = None  # the stored profile version, once done
    report: dict[str, Any] | None = None
    owner: str | None = None  # the id of the server process running (or that ran) the job
