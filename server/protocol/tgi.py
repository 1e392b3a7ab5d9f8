"""TGI shapes: ``POST /generate`` and ``POST /generate_stream``.

Sampling follows TGI: greedy unless ``do_sample`` is true or a sampling knob
(``temperature``, ``top_k``, ``top_p``) is set. ``temperature`` 0 is greedy.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mpo_core.decoding.sampling import SamplingParams
from mpo_core.names import Name

from .common import (
    MAX_INT,
    MAX_SEED,
    MAX_STOP_SEQUENCES,
    Int,
    JSONObject,
    MixingFields,
    MixingInfo,
    Mixtures,
    OptInt,
    Text,
    WireModel,
)


class TGIParameters(MixingFields):
    model_config = ConfigDict(extra="forbid", strict=True)

    best_of: OptInt = Field(default=None, ge=1, le=1)  # only 1: no best-of search
    # each prompt token's log-prob under the request's mixture (details.prefill)
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    max_new_tokens: OptInt = Field(default=None, ge=1, le=MAX_INT)
    repetition_penalty: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    return_full_text: bool = False
    seed: OptInt = Field(default=None, ge=0, le=MAX_SEED)
    stop: list[Text] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    temperature: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    top_k: OptInt = Field(default=None, ge=0, le=MAX_INT)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    min_p: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    top_n_tokens: OptInt = Field(default=None, ge=0, le=MAX_INT)
    truncate: OptInt = Field(default=None, ge=1, le=MAX_INT)  # keep only the last N prompt tokens
    typical_p: float | None = Field(default=None, gt=0, le=1)  # only 1 (off) is accepted
    watermark: bool = Field(default=False, json_schema_extra={"enum": [False]})  # only false
    ignore_eos: bool = False
    stop_token_ids: list[Int] | None = Field(default=None, max_length=MAX_STOP_SEQUENCES)
    speculative: bool = True  # false: no speculative decoding for this request
    # Sent (as null) by TGI's own client; accepted only at their neutral value.
    frequency_penalty: float | None = Field(default=None, ge=0, le=0)  # not supported
    # {"type": "json" | "regex", "value": ...}: constrained decoding (server/structured.py)
    grammar: JSONObject | None = None
    # one policy (or the reference) alone, by name: TGI multi-LoRA's and LoRAX's field
    adapter_id: Name | None = None
    # Sent by LoRAX's client (lorax-client): its JSON mode, its name for ignore_eos and
    # fields about adapters it would download, accepted only at their neutral value.
    response_format: JSONObject | None = None  # {"type": "json_object", "schema": ...}
    ignore_eos_token: bool = False
    adapter_source: None = None
    merged_adapters: None = None
    api_token: Text | None = None  # for private adapters on a hub: nothing to download here
    return_k_alternatives: None = None
    # fan-out: the reply under mixture 1, details.best_of_sequences under the others
    mixtures: Mixtures = None

    @property
    def samples(self) -> bool:
        """TGI samples when asked to, or when any sampling knob is set; temperature 0 is greedy."""
        if self.temperature == 0:
            return False
        knobs = (
            (self.temperature not in (None, 1.0))
            or bool(self.top_k)
            or (self.top_p not in (None, 1.0))
            or (self.min_p not in (None, 0.0))
        )
        return self.do_sample or knobs

    def to_sampling(self, max_new_tokens: int) -> SamplingParams:
        """The engine's parameters; ``max_new_tokens`` is what the context allows (Serving)."""
        temperature = self.temperature if self.temperature is not None else 1.0
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature if self.samples else 0.0,
            top_k=self.top_k or 0,
            top_p=self.top_p if self.top_p is not None else 1.0,
            min_p=self.min_p or 0.0,
            repetition_penalty=(
                self.repetition_penalty if self.repetition_penalty is not None else 1.0
            ),
            seed=self.seed,
            stop=list(self.stop),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos or self.ignore_eos_token,
            top_logprobs=self.top_n_tokens or 0,
            speculative=self.speculative,
        )

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, stop: list[str]) -> list[str]:
        if any(not s for s in stop):
            raise ValueError("stop sequences must be non-empty strings")
        return stop

    @field_validator("watermark")
    @classmethod
    def _no_watermark(cls, watermark: bool) -> bool:
        if watermark:
            raise ValueError("watermarking is not supported; leave watermark false")
        return watermark

    @field_validator("typical_p")
    @classmethod
    def _no_typical(cls, typical_p: float | None) -> float | None:
        if typical_p is not None and typical_p < 1:
            raise ValueError("typical sampling is not supported; leave typical_p unset")
        return typical_p


class TGIRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    inputs: Text = Field(min_length=1)
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False  # POST / streams when true; /generate(_stream) ignore it


class TGIToken(WireModel):
    id: int
    text: str
    logprob: float | None
    special: bool
    policy_logprobs: dict[str, float | None] | None = None  # each policy's log-prob of it


class TGIPrefillToken(WireModel):
    id: int
    text: str
    logprob: float | None  # under the request's mixture; None for the first token


class TGIBestOfSequence(WireModel):
    """A fan-out's choice after the first (``parameters.mixtures``), as TGI's best_of."""

    omit_unless_given = frozenset({"top_tokens", "drafted_tokens", "accepted_tokens"})

    generated_text: str
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None
    prefill: list[TGIPrefillToken] = Field(default_factory=list)
    tokens: list[TGIToken] = Field(default_factory=list)
    top_tokens: list[list[TGIToken]] | None = None
    drafted_tokens: int | None = None
    accepted_tokens: int | None = None
    mixing: MixingInfo


class TGIDetails(WireModel):
    # top_tokens only with top_n_tokens; the speculative counts when speculation is on
    omit_unless_given = frozenset({"top_tokens", "drafted_tokens", "accepted_tokens"})

    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    prompt_tokens: int  # LoRAX's clients require it; TGI's ignore it
    seed: int | None
    prefill: list[TGIPrefillToken] = Field(default_factory=list)
    tokens: list[TGIToken] = Field(default_factory=list)
    top_tokens: list[list[TGIToken]] | None = None
    best_of_sequences: list[TGIBestOfSequence] | None = None  # a fan-out's other choices
    drafted_tokens: int | None = None  # speculative decoding: tokens drafted for the reply
    accepted_tokens: int | None = None  # of those, kept


class TGIResponse(WireModel):
    omit_unless_given = frozenset({"details"})  # only with details: true

    generated_text: str
    details: TGIDetails | None = None
    mixing: MixingInfo


class TGIStreamDetails(WireModel):
    omit_unless_given = frozenset({"drafted_tokens", "accepted_tokens"})

    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    prompt_tokens: int
    seed: int | None
    drafted_tokens: int | None = None
    accepted_tokens: int | None = None


class TGIStreamEvent(WireModel):
    omit_unless_given = frozenset({"mixing"})

    index: int
    token: TGIToken
    top_tokens: list[TGIToken] | None = None
    generated_text: str | None = None
    details: TGIStreamDetails | None = None
    mixing: MixingInfo | None = None  # on the last event
