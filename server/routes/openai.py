"""OpenAI routes: ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``.

Both generation routes take one path: plan the sequences (prompt i, choice j), submit
them, then either collect them into one response or stream chunks as tokens arrive. What
differs between the two, how a choice and a chunk look, is a small ``Shape`` per route.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from mpo_core.errors import InvalidParameter
from mpo_core.sampling import SamplingParams
from mpo_core.streams import TokenEvent

from ..deps import ServingDep, StoreDep, require_api_key
from ..openapi import BODY_ERRORS, error_responses, streaming_ok
from ..protocol.common import MixingInfo
from ..protocol.openai import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    SamplingFields,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from ..serving import Choice, ClientGone, Mixing, Serving, merge
from .sse import SSEResponse, sse

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)])
ERRORS = error_responses(*BODY_ERRORS, 401, 404, 429, 503)
MAX_PROMPTS = 64  # prompts in one /v1/completions request
FinishReason = Literal["stop", "length"]
FINISH: dict[str, FinishReason] = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}


def to_sampling(
    body: SamplingFields, max_new_tokens: int, top_logprobs: int, index: int
) -> SamplingParams:
    """Choice ``index`` of a seeded request gets seed + index: distinct, reproducible."""
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=body.temperature if body.temperature is not None else 1.0,
        top_k=body.top_k or 0,
        top_p=body.top_p if body.top_p is not None else 1.0,
        min_p=body.min_p or 0.0,
        repetition_penalty=body.repetition_penalty if body.repetition_penalty is not None else 1.0,
        seed=None if body.seed is None else (body.seed + index) % (2**63),
        stop=body.stop_list(),
        ignore_eos=body.ignore_eos,
        top_logprobs=top_logprobs,
    )


def resolve(serving: Serving, body: SamplingFields) -> Mixing:
    serving.check_n(body.n)
    model_profile = serving.profile_from_model(body.model)
    return serving.resolve_mixing(body.weights, body.profile, body.strength, model_profile)


@dataclass
class Plan:
    """The sequences of one OpenAI request: prompt i, choice j -> index i * n + j."""

    prompts: list[list[int]]  # one per sequence
    samplings: list[SamplingParams]
    prompt_tokens: int
    mixing: Mixing

    @classmethod
    def build(
        cls, prompts: list[list[int]], samplings: list[SamplingParams], n: int, mixing: Mixing
    ) -> Plan:
        per_sequence = [p for p in prompts for _ in range(n)]
        return cls(per_sequence, samplings, sum(len(p) for p in prompts), mixing)

    def usage(self, completion_tokens: int) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=self.prompt_tokens + completion_tokens,
        )


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
        token_text = self.serving.token_text
        return TokenLogprob(
            token=event.token_text,
            logprob=event.logprob,
            bytes=list(event.token_text.encode()),
            top_logprobs=[
                TopLogprob(token=(t := token_text(i)), logprob=lp, bytes=list(t.encode()))
                for i, lp in event.top_logprobs
            ],
            policy_logprobs=event.policy_logprobs,
        )


async def respond(
    serving: Serving, shape: Shape[Any, Any], stream: bool, include_usage: bool, request: Request
) -> Response:
    """The one serving path: submit the plan, then answer whole or as server-sent events."""
    plan = shape.plan
    streams = serving.submit_many(plan.prompts, plan.samplings, plan.mixing)
    if stream:

        def cancel_all() -> None:
            for s in streams:
                s.cancel()

        events = stream_chunks(serving, shape, streams, include_usage)
        keepalive = serving.settings.sse_keepalive_s
        return SSEResponse(
            events, plan.mixing.headers(), on_close=cancel_all, keepalive_s=keepalive
        )
    try:
        finished = await serving.collect(streams, request.receive)
    except ClientGone:
        return Response(status_code=499)
    choices = [shape.choice(index, choice) for index, choice in enumerate(finished)]
    return shape.response(choices, plan.usage(sum(len(c.events) for c in finished)))


async def stream_chunks(
    serving: Serving, shape: Shape[Any, Any], streams: list[Any], include_usage: bool
) -> AsyncIterator[str]:
    """Openings, then one chunk per token (the mixing on each choice's last), usage, [DONE]."""
    extra: dict[str, Any] = {"usage": None} if include_usage else {}
    for index in range(len(streams)):
        opening = shape.opening(index)
        if opening is not None:
            yield shape.chunk([opening], **extra)
    mixing = MixingInfo(**shape.plan.mixing.as_dict())
    completion_tokens = 0
    async for index, event in merge([serving.events(s) for s in streams]):
        completion_tokens += 1
        last = {"mixing": mixing} if event.finish_reason else {}
        yield shape.chunk([shape.delta(index, event)], **extra, **last)
    if include_usage:
        yield shape.chunk([], usage=shape.plan.usage(completion_tokens))
    yield sse("[DONE]")


# ---- /v1/completions -------------------------------------------------------------------


class CompletionShape(Shape[CompletionChoice, CompletionChoice]):
    id_prefix = "cmpl"

    def __init__(self, serving: Serving, plan: Plan, model: str, body: CompletionRequest):
        super().__init__(serving, plan, model)
        self.body = body
        self.offsets = [0] * len(plan.prompts)  # streamed text so far, per choice

    def echo(self, index: int) -> str:
        if not self.body.echo:
            return ""
        prompt = self.body.prompts()[index // self.body.n]
        if isinstance(prompt, str):
            return prompt
        return str(self.serving.tokenizer.decode(self.plan.prompts[index]))

    def logprobs(self, events: list[TokenEvent], offset: int) -> CompletionLogprobs | None:
        if self.body.logprobs is None:
            return None
        offsets = []
        for event in events:
            offsets.append(offset)
            offset += len(event.text)
        token_text = self.serving.token_text
        return CompletionLogprobs(
            tokens=[event.token_text for event in events],
            token_logprobs=[event.logprob for event in events],
            top_logprobs=[{token_text(i): lp for i, lp in ev.top_logprobs} for ev in events],
            text_offset=offsets,
        )

    def choice(self, index: int, choice: Choice) -> CompletionChoice:
        prefix = self.echo(index)
        return CompletionChoice(
            index=index,
            text=prefix + choice.text,
            logprobs=self.logprobs(choice.events, len(prefix)),
            finish_reason=FINISH.get(choice.finish_reason, "stop"),
        )

    def opening(self, index: int) -> CompletionChoice | None:
        if not self.body.echo:
            return None
        prefix = self.echo(index)
        self.offsets[index] = len(prefix)
        return CompletionChoice(index=index, text=prefix, logprobs=None, finish_reason=None)

    def delta(self, index: int, event: TokenEvent) -> CompletionChoice:
        item = CompletionChoice(
            index=index,
            text=event.text,
            logprobs=self.logprobs([event], self.offsets[index]),
            finish_reason=FINISH.get(event.finish_reason or ""),
        )
        self.offsets[index] += len(event.text)
        return item

    def response(self, choices: list[CompletionChoice], usage: Usage) -> JSONResponse:
        mixing = self.plan.mixing
        body = CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices,
            usage=usage, mixing=MixingInfo(**mixing.as_dict()),
        )  # fmt: skip
        return JSONResponse(body.wire(), headers=mixing.headers())

    def chunk(self, choices: list[CompletionChoice], **extra: Any) -> str:
        body = CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, **extra
        )
        return sse(body.wire_json())


def completion_prompts(serving: Serving, body: CompletionRequest) -> list[list[int]]:
    prompts = body.prompts()
    if len(prompts) > MAX_PROMPTS:
        raise InvalidParameter("prompt", f"at most {MAX_PROMPTS} prompts, got {len(prompts)}")
    ids = []
    for prompt in prompts:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidParameter("prompt", "prompt must not be empty")
            ids.append(serving.encode(prompt, "prompt"))
        else:
            ids.append(serving.check_token_ids(prompt, "prompt"))
    return ids


def plan_completion(serving: Serving, body: CompletionRequest) -> Plan:
    mixing = resolve(serving, body)
    if body.echo and body.logprobs is not None:
        raise InvalidParameter("echo", "echo with logprobs needs prompt logprobs: not supported")
    top = serving.check_top_logprobs(body.logprobs or 0, "logprobs")
    prompts = completion_prompts(serving, body)
    samplings = []
    for ids in prompts:
        max_new = serving.budget(len(ids), body.max_tokens, "max_tokens", "prompt")
        samplings += [to_sampling(body, max_new, top, j) for j in range(body.n)]
    serving.check_capacity(len(samplings), "n" if body.n > 1 else "prompt")
    return Plan.build(prompts, samplings, body.n, mixing)


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses={**ERRORS, **streaming_ok("The completion, or chunks when `stream` is true")},
)
async def completions(body: CompletionRequest, request: Request, serving: ServingDep) -> Response:
    plan = plan_completion(serving, body)
    shape = CompletionShape(serving, plan, body.model or serving.served_name, body)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await respond(serving, shape, body.stream, include_usage, request)


# ---- /v1/chat/completions --------------------------------------------------------------


class ChatShape(Shape[ChatChoice, ChatChunkChoice]):
    id_prefix = "chatcmpl"

    def __init__(self, serving: Serving, plan: Plan, model: str, body: ChatCompletionRequest):
        super().__init__(serving, plan, model)
        self.body = body

    def logprobs(self, events: list[TokenEvent]) -> ChoiceLogprobs | None:
        if not self.body.logprobs:
            return None
        return ChoiceLogprobs(content=[self.token_logprob(event) for event in events])

    def choice(self, index: int, choice: Choice) -> ChatChoice:
        return ChatChoice(
            index=index,
            message=AssistantMessage(content=choice.text),
            logprobs=self.logprobs(choice.events),
            finish_reason=FINISH.get(choice.finish_reason, "stop"),
        )

    def opening(self, index: int) -> ChatChunkChoice:
        delta = ChatDelta(role="assistant", content="")
        return ChatChunkChoice(index=index, delta=delta, logprobs=None, finish_reason=None)

    def delta(self, index: int, event: TokenEvent) -> ChatChunkChoice:
        # The last event of a stop may carry no text: its delta is then empty.
        has_text = bool(event.text) or not event.finish_reason
        return ChatChunkChoice(
            index=index,
            delta=ChatDelta(content=event.text) if has_text else ChatDelta(),
            logprobs=self.logprobs([event]),
            finish_reason=FINISH.get(event.finish_reason or ""),
        )

    def response(self, choices: list[ChatChoice], usage: Usage) -> JSONResponse:
        mixing = self.plan.mixing
        body = ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices,
            usage=usage, mixing=MixingInfo(**mixing.as_dict()),
        )  # fmt: skip
        return JSONResponse(body.wire(), headers=mixing.headers())

    def chunk(self, choices: list[ChatChunkChoice], **extra: Any) -> str:
        body = ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, **extra
        )
        return sse(body.wire_json())


def chat_prompt(serving: Serving, body: ChatCompletionRequest) -> list[int]:
    tokenizer = serving.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidParameter(
            "messages",
            "this model has no chat template, so /v1/chat/completions cannot build a prompt; "
            "use /v1/completions with a plain prompt instead",
        )
    messages = [m.model_dump(exclude_none=True) | {"content": m.text()} for m in body.messages]
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=body.add_generation_prompt
        )
    except Exception as exc:  # template errors (role order, ...) are the client's to fix
        raise InvalidParameter(
            "messages", f"the chat template rejected the messages: {exc}"
        ) from None
    return serving.encode(str(text), "messages", add_special_tokens=False)


def plan_chat(serving: Serving, body: ChatCompletionRequest) -> Plan:
    mixing = resolve(serving, body)
    top = serving.check_top_logprobs(body.top_logprobs or 0, "top_logprobs")
    prompt = chat_prompt(serving, body)
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_new = serving.budget(len(prompt), body.max_new_tokens(), param, "messages")
    samplings = [to_sampling(body, max_new, top, j) for j in range(body.n)]
    serving.check_capacity(len(samplings), "n")
    return Plan.build([prompt], samplings, body.n, mixing)


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**ERRORS, **streaming_ok("The completion, or chunks when `stream` is true")},
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, serving: ServingDep
) -> Response:
    plan = plan_chat(serving, body)
    shape = ChatShape(serving, plan, body.model or serving.served_name, body)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await respond(serving, shape, body.stream, include_usage, request)


# ---- /v1/models ------------------------------------------------------------------------


@router.get("/models", response_model=ModelList, responses=error_responses(401, 503))
def models(serving: ServingDep, store: StoreDep, request: Request) -> dict[str, Any]:
    started = int(request.app.state.started_at)
    cards = [ModelCard(id=serving.served_name, created=started)]
    cards += [
        ModelCard(id=f"{serving.served_name}:{p.name}", created=int(p.created_at))
        for p in store.list()
    ]
    return ModelList(data=cards).wire()
