"""OpenAI routes: ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from mpo_core.errors import InvalidParameter
from mpo_core.sampling import SamplingParams
from mpo_core.streams import RequestStream, TokenEvent

from ..deps import ServingDep, StoreDep, require_api_key
from ..protocol.errors import ErrorResponse
from ..protocol.openai import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
    _SamplingFields,
)
from ..serving import Choice, ClientGone, Mixing, Serving, merge
from .sse import SSEResponse, sse

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)])
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)
}
MAX_PROMPTS = 64  # prompts in one /v1/completions request
FINISH = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}


def to_sampling(
    body: _SamplingFields, max_new_tokens: int, top_logprobs: int, index: int
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


def resolve(serving: Serving, body: _SamplingFields) -> Mixing:
    serving.check_n(body.n)
    model_profile = serving.profile_from_model(body.model)
    return serving.resolve_mixing(body.weights, body.profile, body.strength, model_profile)


def usage(prompt_tokens: int, choices: list[Choice]) -> dict[str, int]:
    completion = sum(len(c.events) for c in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


class Plan:
    """The sequences of one OpenAI request: prompt i, choice j -> index i * n + j."""

    def __init__(self, prompts: list[list[int]], samplings: list[SamplingParams], n: int) -> None:
        self.prompts = [p for p in prompts for _ in range(n)]
        self.samplings = samplings
        self.prompt_tokens = sum(len(p) for p in prompts)


async def run_plan(
    serving: Serving, plan: Plan, mixing: Mixing, request: Request
) -> list[Choice] | None:
    streams = serving.submit_many(plan.prompts, plan.samplings, mixing)
    try:
        return await serving.collect(streams, request.receive)
    except ClientGone:
        return None


def stream_plan(
    serving: Serving,
    plan: Plan,
    mixing: Mixing,
    render: Callable[[list[RequestStream]], AsyncIterator[str]],
) -> Response:
    streams = serving.submit_many(plan.prompts, plan.samplings, mixing)

    def cancel_all() -> None:
        for stream in streams:
            stream.cancel()

    return SSEResponse(render(streams), mixing.headers(), on_close=cancel_all)


# ---- /v1/completions -------------------------------------------------------------------


def completion_prompts(serving: Serving, body: CompletionRequest) -> list[list[int]]:
    prompts = body.prompts()
    if len(prompts) > MAX_PROMPTS:
        raise InvalidParameter("prompt", f"at most {MAX_PROMPTS} prompts, got {len(prompts)}")
    ids = []
    for prompt in prompts:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidParameter("prompt", "prompt must not be empty")
            ids.append(serving.encode(prompt))
        else:
            ids.append(serving.check_token_ids(prompt, "prompt"))
    return ids


def plan_completion(serving: Serving, body: CompletionRequest) -> tuple[Plan, Mixing]:
    mixing = resolve(serving, body)
    if body.echo and body.logprobs is not None:
        raise InvalidParameter("echo", "echo with logprobs needs prompt logprobs: not supported")
    top = serving.check_top_logprobs(body.logprobs or 0, "logprobs")
    prompts = completion_prompts(serving, body)
    samplings = []
    for ids in prompts:
        max_new = serving.budget(len(ids), body.max_tokens, "max_tokens", "prompt")
        samplings += [to_sampling(body, max_new, top, j) for j in range(body.n)]
    return Plan(prompts, samplings, body.n), mixing


def completion_logprobs(serving: Serving, events: list[TokenEvent], offset: int) -> dict[str, Any]:
    tokens, offsets, top = [], [], []
    for ev in events:
        tokens.append(ev.token_text)
        offsets.append(offset)
        offset += len(ev.text)
        top.append({serving.token_text(i): lp for i, lp in ev.top_logprobs})
    return {
        "tokens": tokens,
        "token_logprobs": [ev.logprob for ev in events],
        "top_logprobs": top,
        "text_offset": offsets,
    }


@router.post("/completions", response_model=CompletionResponse, responses=ERRORS)
async def completions(body: CompletionRequest, request: Request, serving: ServingDep) -> Response:
    plan, mixing = plan_completion(serving, body)
    model = body.model or serving.served_name
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        render = completion_chunks(serving, body, plan, mixing, rid, created, model)
        return stream_plan(serving, plan, mixing, render)
    choices = await run_plan(serving, plan, mixing, request)
    if choices is None:
        return Response(status_code=499)
    out = []
    for index, choice in enumerate(choices):
        prefix = echo_text(serving, body, plan, index)
        item: dict[str, Any] = {
            "index": index,
            "text": prefix + choice.text,
            "logprobs": None,
            "finish_reason": FINISH.get(choice.finish_reason, "stop"),
        }
        if body.logprobs is not None:
            item["logprobs"] = completion_logprobs(serving, choice.events, len(prefix))
        out.append(item)
    content = {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": out, "usage": usage(plan.prompt_tokens, choices), "mixing": mixing.as_dict(),
    }  # fmt: skip
    return JSONResponse(content, headers=mixing.headers())


def echo_text(serving: Serving, body: CompletionRequest, plan: Plan, index: int) -> str:
    if not body.echo:
        return ""
    prompt = body.prompts()[index // body.n]
    return prompt if isinstance(prompt, str) else serving.tokenizer.decode(plan.prompts[index])


def completion_chunks(
    serving: Serving,
    body: CompletionRequest,
    plan: Plan,
    mixing: Mixing,
    rid: str,
    created: int,
    model: str,
) -> Callable[[list[RequestStream]], AsyncIterator[str]]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        data = {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": choices, **extra}  # fmt: skip
        if include_usage:
            data.setdefault("usage", None)
        return sse(data)

    async def render(streams: list[RequestStream]) -> AsyncIterator[str]:
        counts = [0] * len(streams)
        offsets = [0] * len(streams)
        for index in range(len(streams)) if body.echo else ():
            prefix = echo_text(serving, body, plan, index)
            offsets[index] = len(prefix)
            yield chunk([{"index": index, "text": prefix, "logprobs": None, "finish_reason": None}])
        async for index, ev in merge([serving.events(s) for s in streams]):
            counts[index] += 1
            item: dict[str, Any] = {
                "index": index, "text": ev.text, "logprobs": None,
                "finish_reason": FINISH.get(ev.finish_reason or ""),
            }  # fmt: skip
            if body.logprobs is not None:
                item["logprobs"] = completion_logprobs(serving, [ev], offsets[index])
            offsets[index] += len(ev.text)
            yield chunk([item], mixing=mixing.as_dict()) if ev.finish_reason else chunk([item])
        if include_usage:
            completion = sum(counts)
            total = {"prompt_tokens": plan.prompt_tokens, "completion_tokens": completion,
                     "total_tokens": plan.prompt_tokens + completion}  # fmt: skip
            yield chunk([], usage=total)
        yield sse("[DONE]")

    return render


# ---- /v1/chat/completions --------------------------------------------------------------


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
    return serving.encode(str(text), add_special_tokens=False)


def plan_chat(serving: Serving, body: ChatCompletionRequest) -> tuple[Plan, Mixing]:
    mixing = resolve(serving, body)
    top = serving.check_top_logprobs(body.top_logprobs or 0, "top_logprobs")
    prompt = chat_prompt(serving, body)
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_new = serving.budget(len(prompt), body.max_new_tokens(), param, "messages")
    samplings = [to_sampling(body, max_new, top, j) for j in range(body.n)]
    return Plan([prompt], samplings, body.n), mixing


def token_logprob(serving: Serving, ev: TokenEvent) -> dict[str, Any]:
    return {
        "token": ev.token_text,
        "logprob": ev.logprob,
        "bytes": list(ev.token_text.encode()),
        "top_logprobs": [
            {"token": (t := serving.token_text(i)), "logprob": lp, "bytes": list(t.encode())}
            for i, lp in ev.top_logprobs
        ],
        "policy_logprobs": ev.policy_logprobs,
    }


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, serving: ServingDep
) -> Response:
    plan, mixing = plan_chat(serving, body)
    model = body.model or serving.served_name
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        render = chat_chunks(serving, body, plan, mixing, rid, created, model)
        return stream_plan(serving, plan, mixing, render)
    choices = await run_plan(serving, plan, mixing, request)
    if choices is None:
        return Response(status_code=499)
    out = []
    for index, choice in enumerate(choices):
        logprobs = None
        if body.logprobs:
            logprobs = {"content": [token_logprob(serving, ev) for ev in choice.events]}
        out.append({
            "index": index,
            "message": {"role": "assistant", "content": choice.text},
            "logprobs": logprobs,
            "finish_reason": FINISH.get(choice.finish_reason, "stop"),
        })  # fmt: skip
    content = {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": out, "usage": usage(plan.prompt_tokens, choices), "mixing": mixing.as_dict(),
    }  # fmt: skip
    return JSONResponse(content, headers=mixing.headers())


def chat_chunks(
    serving: Serving,
    body: ChatCompletionRequest,
    plan: Plan,
    mixing: Mixing,
    rid: str,
    created: int,
    model: str,
) -> Callable[[list[RequestStream]], AsyncIterator[str]]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        data = {"id": rid, "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": choices, **extra}  # fmt: skip
        if include_usage:
            data.setdefault("usage", None)
        return sse(data)

    async def render(streams: list[RequestStream]) -> AsyncIterator[str]:
        counts = [0] * len(streams)
        for index in range(len(streams)):
            role = {"role": "assistant", "content": ""}
            yield chunk([{"index": index, "delta": role, "logprobs": None, "finish_reason": None}])
        async for index, ev in merge([serving.events(s) for s in streams]):
            counts[index] += 1
            logprobs = {"content": [token_logprob(serving, ev)]} if body.logprobs else None
            item = {
                "index": index,
                "delta": {"content": ev.text} if ev.text or not ev.finish_reason else {},
                "logprobs": logprobs,
                "finish_reason": FINISH.get(ev.finish_reason or ""),
            }
            yield chunk([item], mixing=mixing.as_dict()) if ev.finish_reason else chunk([item])
        if include_usage:
            completion = sum(counts)
            total = {"prompt_tokens": plan.prompt_tokens, "completion_tokens": completion,
                     "total_tokens": plan.prompt_tokens + completion}  # fmt: skip
            yield chunk([], usage=total)
        yield sse("[DONE]")

    return render


# ---- /v1/models ------------------------------------------------------------------------


@router.get("/models", response_model=ModelList, responses=ERRORS)
def models(serving: ServingDep, store: StoreDep, request: Request) -> dict[str, Any]:
    started = int(request.app.state.started_at)
    data = [{"id": serving.served_name, "object": "model", "created": started, "owned_by": "mpo"}]
    for profile in store.list():
        data.append({
            "id": f"{serving.served_name}:{profile.name}",
            "object": "model",
            "created": int(profile.created_at),
            "owned_by": "mpo",
        })  # fmt: skip
    return {"object": "list", "data": data}
