"""TGI shapes: ``POST /generate`` and ``POST /generate_stream``.

Sampling follows TGI: greedy unless ``do_sample`` is true or a sampling knob
(``temperature``, ``top_k``, ``top_p``) is set. ``temperature`` 0 is greedy.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .common import MAX_INT, MAX_STOP_SEQUENCES, MixingFields, MixingInfo, Text, WireModel


class TGIParameters(MixingFields):
    model_config = ConfigDict(extra="forbid", strict=True)

    best_of: int | None = Field(default=None, ge=1, le=1)  # only 1: no best-of search
    decoder_input_details: Literal[False] = False  # prompt logprobs are not computed
    details: bool = False
    do_sample: bool = False
    max_new_tokens: int | None = Field(default=None, ge=1, le=MAX_INT)
    repetition_penalty: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    return_full_text: bool = False
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    temperature: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=0, le=MAX_INT)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    min_p: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    top_n_tokens: int | None = Field(default=None, ge=0, le=MAX_INT)
    truncate: int | None = Field(
        default=None, ge=1, le=MAX_INT
    )  # keep only the last N prompt tokens
    typical_p: float | None = Field(default=None, gt=0, le=1)  # only 1 (off) is accepted
    watermark: Literal[False] = False
    ignore_eos: bool = False
    speculative: bool = True  # false: no speculative decoding for this request
    # Sent (as null) by TGI's own client; accepted only at their neutral value.
    frequency_penalty: float | None = Field(default=None, ge=0, le=0)  # not supported
    grammar: None = None  # guided decoding is not supported
    adapter_id: None = None  # one family, no per-request adapter

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, stop: list[str]) -> list[str]:
        if any(not s for s in stop):
            raise ValueError("stop sequences must be non-empty strings")
        return stop

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


class TGIDetails(WireModel):
    # top_tokens only with top_n_tokens; the speculative counts when speculation is on
    omit_unless_given = frozenset({"top_tokens", "drafted_tokens", "accepted_tokens"})

    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None
    prefill: list[TGIToken] = Field(default_factory=list)
    tokens: list[TGIToken] = Field(default_factory=list)
    top_tokens: list[list[TGIToken]] | None = None
    best_of_sequences: None = None
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
