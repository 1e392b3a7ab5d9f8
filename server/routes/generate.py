"""TGI routes: ``POST /generate``, ``POST /generate_stream`` and TGI's ``POST /``.

``POST /`` is TGI's compatibility route, the one its Python client and
``huggingface_hub.InferenceClient.text_generation`` call: the body's ``stream`` picks
generate_stream (events) or generate, answered as TGI does, a list of one response.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from mpo_core.sampling import SamplingParams
from mpo_core.streams import RequestStream, TokenEvent

from ..deps import ServingDep, require_api_key
from ..openapi import BODY_ERRORS, EVENT_STREAM, error_responses, streaming_ok
from ..protocol.common import MixingInfo
from ..protocol.tgi import (
    TGIDetails,
    TGIParameters,
    TGIRequest,
    TGIResponse,
    TGIStreamDetails,
    TGIStreamEvent,
    TGIToken,
)
from ..serving import Choice, ClientGone, Mixing, Serving
from .sse import SSEResponse, sse

router = APIRouter(tags=["tgi"], dependencies=[Depends(require_api_key)])
ERRORS = error_responses(*BODY_ERRORS, 401, 404, 429, 503)


def is_sampling(p: TGIParameters) -> bool:
    """TGI samples when asked to, or when any sampling knob is set; temperature 0 is greedy."""
    if p.temperature == 0:
        return False
    knobs = (p.temperature not in (None, 1.0)) or bool(p.top_k) or (p.top_p not in (None, 1.0))
    return p.do_sample or knobs or (p.min_p not in (None, 0.0))


def to_sampling(p: TGIParameters, max_new_tokens: int) -> SamplingParams:
    sampling = is_sampling(p)
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=(p.temperature if p.temperature is not None else 1.0) if sampling else 0.0,
        top_k=p.top_k or 0,
        top_p=p.top_p if p.top_p is not None else 1.0,
        min_p=p.min_p or 0.0,
        repetition_penalty=p.repetition_penalty if p.repetition_penalty is not None else 1.0,
        seed=p.seed,
        stop=list(p.stop),
        ignore_eos=p.ignore_eos,
        top_logprobs=p.top_n_tokens or 0,
        speculative=p.speculative,
    )


def prepare(serving: Serving, body: TGIRequest) -> tuple[list[int], SamplingParams, Mixing]:
    p = body.parameters
    mixing = serving.resolve_mixing(p.weights, p.profile, p.strength)
    prompt_ids = serving.encode(body.inputs, "inputs")
    if p.truncate is not None:
        prompt_ids = prompt_ids[-p.truncate :]
    serving.check_top_logprobs(p.top_n_tokens or 0, "parameters.top_n_tokens")
    max_new = serving.budget(
        len(prompt_ids), p.max_new_tokens, "parameters.max_new_tokens", "inputs"
    )
    return prompt_ids, to_sampling(p, max_new), mixing


def token(event: TokenEvent) -> TGIToken:
    return TGIToken(
        id=event.token_id,
        text=event.token_text,
        logprob=event.logprob,
        special=event.special,
        policy_logprobs=event.policy_logprobs,
    )


def top_tokens(serving: Serving, event: TokenEvent) -> list[TGIToken]:
    return [
        TGIToken(id=i, text=serving.token_text(i), logprob=lp, special=serving.is_special(i))
        for i, lp in event.top_logprobs
    ]


def response_body(
    serving: Serving, body: TGIRequest, choice: Choice, sampled: bool, mixing: Mixing
) -> TGIResponse:
    p = body.parameters
    text = (body.inputs if p.return_full_text else "") + choice.text
    info = MixingInfo(**mixing.as_dict())
    if not p.details:
        return TGIResponse(generated_text=text, mixing=info)
    details = TGIDetails(
        finish_reason=choice.finish_reason,  # type: ignore[arg-type]
        generated_tokens=len(choice.events),
        seed=choice.seed if sampled else None,
        tokens=[token(ev) for ev in choice.events],
    )
    if p.top_n_tokens:  # set only when asked for: the field is left out otherwise
        details.top_tokens = [top_tokens(serving, ev) for ev in choice.events]
    if serving.speculating:
        details.drafted_tokens = choice.drafted_tokens
        details.accepted_tokens = choice.accepted_tokens
    return TGIResponse(generated_text=text, details=details, mixing=info)


async def generate_one(
    serving: Serving, body: TGIRequest, request: Request, as_list: bool = False
) -> Response:
    """Run one request to its end; TGI's ``POST /`` wraps the body in a list."""
    prompt_ids, sampling, mixing = prepare(serving, body)
    streams = serving.submit_many([prompt_ids], [sampling], mixing)
    try:
        (choice,) = await serving.collect(streams, request.receive)
    except ClientGone:
        return Response(status_code=499)
    content = response_body(serving, body, choice, not sampling.greedy, mixing).wire()
    return JSONResponse([content] if as_list else content, headers=mixing.headers())


@router.post("/generate", response_model=TGIResponse, responses=ERRORS)
async def generate(body: TGIRequest, request: Request, serving: ServingDep) -> Response:
    return await generate_one(serving, body, request)


async def stream_events(
    serving: Serving, body: TGIRequest, stream: RequestStream, sampled: bool, mixing: Mixing
) -> AsyncIterator[str]:
    """One event per token; the last adds the full text, the mixing and (details) a summary."""
    p = body.parameters
    text = body.inputs if p.return_full_text else ""
    async for event in serving.events(stream):
        text += event.text
        last: dict[str, Any] = {}
        if event.finish_reason is not None:
            last = {"generated_text": text, "mixing": MixingInfo(**mixing.as_dict())}
            if p.details:
                details = TGIStreamDetails(
                    finish_reason=event.finish_reason,  # type: ignore[arg-type]
                    generated_tokens=event.index + 1,
                    seed=stream.seed if sampled else None,
                )
                if serving.speculating:
                    details.drafted_tokens = stream.drafted_tokens
                    details.accepted_tokens = stream.accepted_tokens
                last["details"] = details
        chunk = TGIStreamEvent(
            index=event.index,
            token=token(event),
            top_tokens=top_tokens(serving, event) if p.top_n_tokens else None,
            **last,
        )
        yield sse(chunk.wire_json())


@router.post(
    "/generate_stream",
    status_code=200,
    response_class=SSEResponse,
    responses={**ERRORS, 200: {"description": "One event per token", "content": EVENT_STREAM}},
)
async def generate_stream(body: TGIRequest, serving: ServingDep) -> Response:
    prompt_ids, sampling, mixing = prepare(serving, body)
    (stream,) = serving.submit_many([prompt_ids], [sampling], mixing)
    events = stream_events(serving, body, stream, not sampling.greedy, mixing)
    keepalive = serving.settings.sse_keepalive_s
    return SSEResponse(events, mixing.headers(), on_close=stream.cancel, keepalive_s=keepalive)


@router.post(
    "/",
    response_model=list[TGIResponse],
    responses={**ERRORS, **streaming_ok("A list of one response, or events when `stream` is true")},
)
async def tgi_compat(body: TGIRequest, request: Request, serving: ServingDep) -> Response:
    """TGI's compatibility route: events when ``stream`` is true, else a list of one."""
    if body.stream:
        return await generate_stream(body, serving)
    return await generate_one(serving, body, request, as_list=True)
