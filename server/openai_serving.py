"""The OpenAI serving path shared by ``/v1/completions`` and ``/v1/chat/completions``.

Plan the sequences (prompt i, choice j), submit them, then either collect them into one
response or stream chunks as tokens arrive. What differs between the two routes, how a
choice and a chunk look, is a small ``Shape`` per route (``routes/openai.py``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from mpo_core.decoding.grammar import Grammar
from mpo_core.decoding.sampling import SamplingParams
from mpo_core.engine.streams import RequestStream, TokenEvent
from mpo_core.errors import InvalidParameter, UnknownProfile

from .errors import APIError
from .fanout import check_n, resolve_mixtures
from .protocol.common import MixingInfo
from .protocol.openai import (
    ChatChoice,
    ChatChunkChoice,
    CompletionChoice,
    CompletionTokensDetails,
    SamplingFields,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from .serving import Choice, ClientGone, ResolvedMixture, Serving, merge
from .sse import SSEResponse, sse

FinishReason = Literal["stop", "length"]
FINISH: dict[str, FinishReason] = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}


# The request's own mixture (None for a list of mixtures), each choice's, and whether
# the request fans out (``mixtures`` given).
Choices = tuple[ResolvedMixture | None, list[ResolvedMixture], bool]


async def resolve(serving: Serving, body: SamplingFields) -> Choices:
    """Each choice's mixture (n of them): the request's own, or with ``mixtures`` the
    fan-out's (``server/fanout.py``)."""
    given = "n" in body.model_fields_set
    n = check_n(serving, body.n, given, body.mixtures, "mixtures", body.persona_count())
    if isinstance(body.mixtures, list):
        if body.model is not None and body.model != serving.served_name:
            raise InvalidParameter(
                "model", "with a list of mixtures, model must be the served name (or left out)"
            )
        return None, await resolve_mixtures(serving, body, body.mixtures, "mixtures", None), True
    blend = await resolve_one(serving, body)
    if body.mixtures is None:
        return blend, [blend] * n, False
    return blend, await resolve_mixtures(serving, body, body.mixtures, "mixtures", blend), True


async def resolve_one(serving: Serving, body: SamplingFields) -> ResolvedMixture:
    adapter = serving.adapter_from_model(body.model)
    if adapter is not None:
        return serving.adapter_mixing(adapter, "model", body)
    model_profile = serving.profile_from_model(body.model)
    try:
        return await serving.resolve_mixing(body, model_profile)
    except UnknownProfile as exc:
        if body.profile is not None or model_profile is None:
            raise
        # the client named the profile through ``model``: the error names that field
        raise APIError(404, str(exc), param="model", code="profile_not_found") from None


@dataclass
class Plan:
    """The sequences of one OpenAI request: prompt i, choice j -> index i * n + j."""

    prompts: list[list[int]]  # one per sequence
    samplings: list[SamplingParams]
    prompt_tokens: int
    mixings: list[ResolvedMixture]  # [n] choice j's mixture
    # The request's own mixture (with "each", the blend); None for a list of mixtures
    blend: ResolvedMixture | None
    fanout: bool = False  # mixtures given: each choice reports its own
    grammar: Grammar | None = None  # response_format, compiled (the route sets it)

    @classmethod
    def build(
        cls,
        prompts: list[list[int]],
        samplings: list[SamplingParams],
        choices: Choices,
    ) -> Plan:
        blend, mixings, fanout = choices
        per_sequence = [p for p in prompts for _ in mixings]
        return cls(per_sequence, samplings, sum(len(p) for p in prompts), mixings, blend, fanout)

    @property
    def n(self) -> int:
        return len(self.mixings)

    def mixing_of(self, index: int) -> ResolvedMixture:
        """Sequence ``index``'s mixture."""
        return self.mixings[index % self.n]

    def info(self) -> MixingInfo | None:
        return None if self.blend is None else self.blend.info()

    def headers(self) -> dict[str, str]:
        return {} if self.blend is None else self.blend.headers()

    def usage(self, completion_tokens: int, speculative: tuple[int, int] | None = None) -> Usage:
        """``speculative``: (drafted, accepted) tokens when speculation is on."""
        usage = Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=self.prompt_tokens + completion_tokens,
        )
        if speculative is not None:
            drafted, accepted = speculative
            usage.completion_tokens_details = CompletionTokensDetails(
                accepted_prediction_tokens=accepted, rejected_prediction_tokens=drafted - accepted
            )
        return usage


ChoiceT = TypeVar("ChoiceT", CompletionChoice, ChatChoice)
ChunkChoiceT = TypeVar("ChunkChoiceT", CompletionChoice, ChatChunkChoice)


class Shape(Generic[ChoiceT, ChunkChoiceT]):
    """How one route writes choices: whole (``choice``) or a token at a time (``delta``)."""

    id_prefix = ""

    def __init__(self, serving: Serving, plan: Plan, model: str) -> None:
        self.serving = serving
        self.plan = plan
        self.model = model
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def choice(self, index: int, choice: Choice) -> ChoiceT:
        raise NotImplementedError

    def opening(self, index: int) -> ChunkChoiceT | None:
        """A chunk sent for choice ``index`` before its first token, if any."""
        return None

    def delta(self, index: int, event: TokenEvent) -> ChunkChoiceT:
        raise NotImplementedError

    def response(self, choices: list[ChoiceT], usage: Usage) -> JSONResponse:
        raise NotImplementedError

    def chunk(self, choices: list[ChunkChoiceT], **extra: Any) -> str:
        raise NotImplementedError

    def token_logprob(self, event: TokenEvent) -> TokenLogprob:
        serving = self.serving
        return TokenLogprob(
            token=event.token_text,
            logprob=event.logprob,
            bytes=list(event.token_bytes),
            top_logprobs=[
                TopLogprob(token=serving.token_text(i), logprob=lp, bytes=serving.token_bytes(i))
                for i, lp in event.top_logprobs
            ],
            policy_logprobs=event.policy_logprobs,
        )


def listed(events: list[TokenEvent]) -> list[TokenEvent]:
    """The events OpenAI lists in ``logprobs``: not the EOS / stop token that ended the reply
    (it is no part of the text, as OpenAI leaves out the end-of-turn token)."""
    return [event for event in events if not event.stop_token]


async def respond(
    serving: Serving, shape: Shape[Any, Any], stream: bool, include_usage: bool, request: Request
) -> Response:
    """The one serving path: submit the plan, then answer whole or as server-sent events."""
    plan = shape.plan
    mixings = [plan.mixing_of(i) for i in range(len(plan.prompts))]
    streams = serving.submit_many(plan.prompts, plan.samplings, mixings, plan.grammar)
    if stream:

        def cancel_all() -> None:
            for s in streams:
                s.cancel()

        events = stream_chunks(serving, shape, streams, include_usage)
        keepalive = serving.settings.sse_keepalive_s
        return SSEResponse(events, plan.headers(), on_close=cancel_all, keepalive_s=keepalive)
    try:
        finished = await serving.collect(streams, request.receive)
    except ClientGone:
        return Response(status_code=499)
    choices = [shape.choice(index, choice) for index, choice in enumerate(finished)]
    if plan.fanout:  # each choice reports the mixture it was decoded under
        for index, item in enumerate(choices):
            item.mixing = plan.mixing_of(index).info()
    counts = (sum(c.drafted_tokens for c in finished), sum(c.accepted_tokens for c in finished))
    usage = plan.usage(sum(len(c.events) for c in finished), speculative_counts(serving, counts))
    return shape.response(choices, usage)


def speculative_counts(serving: Serving, counts: tuple[int, int]) -> tuple[int, int] | None:
    """A reply's (drafted, accepted) tokens for ``usage``, when the engine speculates."""
    return counts if serving.speculating else None


async def stream_chunks(
    serving: Serving, shape: Shape[Any, Any], streams: list[RequestStream], include_usage: bool
) -> AsyncIterator[str]:
    """Openings, then one chunk per token (the mixing on each choice's last), usage, [DONE]."""
    extra: dict[str, Any] = {"usage": None} if include_usage else {}
    for index in range(len(streams)):
        opening = shape.opening(index)
        if opening is not None:
            yield shape.chunk([opening], **extra)
    plan = shape.plan
    completion_tokens = 0
    async for index, event in merge([serving.events(s) for s in streams]):
        completion_tokens += 1
        last = {"mixing": plan.mixing_of(index).info()} if event.finish_reason else {}
        yield shape.chunk([shape.delta(index, event)], **extra, **last)
    if include_usage:
        counts = (sum(s.drafted_tokens for s in streams), sum(s.accepted_tokens for s in streams))
        usage = shape.plan.usage(completion_tokens, speculative_counts(serving, counts))
        yield shape.chunk([], usage=usage)
    yield sse("[DONE]")
