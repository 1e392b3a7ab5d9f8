"""The TGI serving path shared by ``/generate``, ``/generate_stream`` and ``POST /``.

``prepare`` turns a request into a prompt, the engine's sampling parameters and the
resolved mixture; ``generate_one`` answers with one response, ``stream_response`` with
one server-sent event per token. The routes (``routes/generate.py``) only pick which.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from mpo_core.decoding.grammar import Grammar
from mpo_core.decoding.prompt_logprobs import PromptLogprobs
from mpo_core.decoding.sampling import SamplingParams
from mpo_core.engine.streams import RequestStream, TokenEvent
from mpo_core.errors import InvalidParameter

from .fanout import fanout_size, resolve_mixtures
from .protocol.tgi import (
    TGIBestOfSequence,
    TGIDetails,
    TGIParameters,
    TGIPrefillToken,
    TGIRequest,
    TGIResponse,
    TGIStreamDetails,
    TGIStreamEvent,
    TGIToken,
)
from .serving import Choice, ClientGone, ResolvedMixture, Serving
from .sse import SSEResponse, sse
from .structured import compile_grammar, lorax_format_spec, one_of, tgi_grammar_spec


async def prepare(
    serving: Serving, body: TGIRequest
) -> tuple[list[int], SamplingParams, ResolvedMixture]:
    p = body.parameters
    if p.adapter_id is not None:
        mixing = serving.adapter_mixing(p.adapter_id, "parameters.adapter_id", p)
    else:
        mixing = await serving.resolve_mixing(p)
    prompt_ids = serving.encode(body.inputs, "inputs")
    if p.truncate is not None:
        prompt_ids = prompt_ids[-p.truncate :]
    serving.check_top_logprobs(p.top_n_tokens or 0, "parameters.top_n_tokens")
    max_new = serving.budget(
        len(prompt_ids), p.max_new_tokens, "parameters.max_new_tokens", "inputs", [mixing]
    )
    return prompt_ids, p.to_sampling(max_new), mixing


async def grammar_of(serving: Serving, p: TGIParameters) -> Grammar | None:
    spec = one_of(
        tgi_grammar_spec(p.grammar, "parameters.grammar"),
        lorax_format_spec(p.response_format, "parameters.response_format"),
    )
    return await compile_grammar(serving, spec)


def token(event: TokenEvent) -> TGIToken:
    return TGIToken(
        id=event.token_id,
        text=event.token_piece,
        logprob=event.logprob,
        special=event.special,
        policy_logprobs=event.policy_logprobs,
    )


def top_tokens(serving: Serving, event: TokenEvent) -> list[TGIToken]:
    return [
        TGIToken(id=i, text=serving.token_text(i), logprob=lp, special=serving.is_special(i))
        for i, lp in event.top_logprobs
    ]


def prefill_tokens(serving: Serving, scored: PromptLogprobs | None) -> list[TGIPrefillToken]:
    if scored is None:
        return []
    texts = serving.prompt_pieces(scored.token_ids)
    return [
        TGIPrefillToken(id=token, text=text, logprob=logprob)
        for token, text, logprob in zip(scored.token_ids, texts, scored.logprobs)
    ]


def response_body(
    serving: Serving,
    body: TGIRequest,
    choice: Choice,
    sampled: bool,
    mixing: ResolvedMixture,
    prompt_tokens: int,
    prefill: PromptLogprobs | None = None,
) -> TGIResponse:
    p = body.parameters
    text = (body.inputs if p.return_full_text else "") + choice.text
    info = mixing.info()
    if not p.details:
        return TGIResponse(generated_text=text, mixing=info)
    details = TGIDetails(
        finish_reason=choice.finish_reason,  # type: ignore[arg-type]
        generated_tokens=len(choice.events),
        prompt_tokens=prompt_tokens,
        seed=choice.seed if sampled else None,
        prefill=prefill_tokens(serving, prefill),
        tokens=[token(ev) for ev in choice.events],
    )
    if p.top_n_tokens:  # set only when asked for: the field is left out otherwise
        details.top_tokens = [top_tokens(serving, ev) for ev in choice.events]
    if serving.speculating:
        details.drafted_tokens = choice.drafted_tokens
        details.accepted_tokens = choice.accepted_tokens
    return TGIResponse(generated_text=text, details=details, mixing=info)


async def choice_mixings(
    serving: Serving, p: TGIParameters, blend: ResolvedMixture
) -> list[ResolvedMixture]:
    """Each choice's mixture: the request's alone, or a fan-out's (``server/fanout.py``)."""
    if p.mixtures is None:
        return [blend]
    param = "parameters.mixtures"
    if not p.details:
        raise InvalidParameter(
            param, "mixtures needs details: true (the choices after the first are in "
            "details.best_of_sequences)",
        )  # fmt: skip
    fanout_size(serving, p.mixtures, param, p.persona_count())
    if isinstance(p.mixtures, list) and p.adapter_id is not None:
        raise InvalidParameter(
            "parameters.adapter_id", "adapter_id cannot be combined with a list of mixtures"
        )
    return await resolve_mixtures(serving, p, p.mixtures, param, blend)


async def generate_one(
    serving: Serving, body: TGIRequest, request: Request, as_list: bool = False
) -> Response:
    """Run one request to its end; TGI's ``POST /`` wraps the body in a list. A fan-out's
    first choice is the reply, the others its ``details.best_of_sequences``."""
    prompt_ids, sampling, blend = await prepare(serving, body)
    p = body.parameters
    mixings = await choice_mixings(serving, p, blend)
    grammar = await grammar_of(serving, p)
    prefills: list[asyncio.Future[PromptLogprobs]] = []
    if p.decoder_input_details and p.details:  # TGI sends prefill only inside details
        prefills = [asyncio.ensure_future(serving.prompt_logprobs(prompt_ids, m)) for m in mixings]
    samplings = [dataclasses.replace(sampling) for _ in mixings]  # the same seed each
    streams = serving.submit_many([prompt_ids] * len(mixings), samplings, mixings, grammar)
    try:
        choices = await serving.collect(streams, request.receive)
        scored: list[PromptLogprobs | None] = [None] * len(mixings)
        for i, future in enumerate(prefills):
            scored[i] = await future
    except ClientGone:
        return Response(status_code=499)
    finally:
        for future in prefills:
            if not future.done():
                future.cancel()
    sampled, tokens = not sampling.greedy, len(prompt_ids)
    reply = response_body(serving, body, choices[0], sampled, mixings[0], tokens, scored[0])
    if p.mixtures is not None and reply.details is not None:
        reply.details.best_of_sequences = [
            best_of(serving, body, *rest, sampled, tokens)
            for rest in zip(choices[1:], mixings[1:], scored[1:])
        ]
    content = reply.wire()
    headers = mixings[0].headers()
    return JSONResponse([content] if as_list else content, headers=headers)


def best_of(
    serving: Serving,
    body: TGIRequest,
    choice: Choice,
    mixing: ResolvedMixture,
    scored: PromptLogprobs | None,
    sampled: bool,
    prompt_tokens: int,
) -> TGIBestOfSequence:
    """A fan-out's later choice, in TGI's best_of shape, with the mixture it decoded."""
    reply = response_body(serving, body, choice, sampled, mixing, prompt_tokens, scored)
    details = reply.details
    assert details is not None  # a fan-out needs details
    sequence = TGIBestOfSequence(
        generated_text=reply.generated_text,
        finish_reason=details.finish_reason,
        generated_tokens=details.generated_tokens,
        seed=details.seed,
        prefill=details.prefill,
        tokens=details.tokens,
        mixing=mixing.info(),
    )
    for field in ("top_tokens", "drafted_tokens", "accepted_tokens"):
        if field in details.model_fields_set:
            setattr(sequence, field, getattr(details, field))
    return sequence


async def stream_events(
    serving: Serving,
    body: TGIRequest,
    stream: RequestStream,
    sampled: bool,
    mixing: ResolvedMixture,
) -> AsyncIterator[str]:
    """One event per token; the last adds the full text, the mixing and (details) a summary."""
    p = body.parameters
    text = body.inputs if p.return_full_text else ""
    async for event in serving.events(stream):
        text += event.text
        last: dict[str, Any] = {}
        if event.finish_reason is not None:
            last = {"generated_text": text, "mixing": mixing.info()}
            if p.details:
                details = TGIStreamDetails(
                    finish_reason=event.finish_reason,  # type: ignore[arg-type]
                    generated_tokens=event.index + 1,
                    prompt_tokens=stream.prompt_tokens,
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


async def stream_response(serving: Serving, body: TGIRequest) -> Response:
    """Submit one request and answer with its events as they come."""
    if body.parameters.mixtures is not None:
        raise InvalidParameter(
            "parameters.mixtures",
            "mixtures is not supported when streaming tokens (as TGI's best_of)",
        )
    if body.parameters.decoder_input_details:
        raise InvalidParameter(
            "parameters.decoder_input_details",
            "decoder_input_details is not supported when streaming tokens (as in TGI)",
        )
    prompt_ids, sampling, mixing = await prepare(serving, body)
    grammar = await grammar_of(serving, body.parameters)
    (stream,) = serving.submit_many([prompt_ids], [sampling], mixing, grammar)
    events = stream_events(serving, body, stream, not sampling.greedy, mixing)
    keepalive = serving.settings.sse_keepalive_s
    return SSEResponse(events, mixing.headers(), on_close=stream.cancel, keepalive_s=keepalive)
