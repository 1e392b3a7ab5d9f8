"""OpenAI routes: ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``.

Both generation routes take one path (``openai_serving.respond``); each route gives its
``Shape``: how a whole choice, an opening chunk and a token's chunk look.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from mpo_core.decoding.prompt_logprobs import PromptLogprobs
from mpo_core.engine.streams import TokenEvent
from mpo_core.errors import InvalidParameter

from ..deps import ServingDep, StoreDep, require_api_key
from ..openai_serving import FINISH, Choices, Plan, Shape, listed, resolve, respond
from ..openapi import BODY_ERRORS, error_responses, streaming_ok
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
    Usage,
)
from ..serving import Choice, Serving
from ..sse import sse
from ..structured import compile_grammar, response_format_spec

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)])
ERRORS = error_responses(*BODY_ERRORS, 401, 404, 429, 503)
MAX_PROMPTS = 64  # prompts in one /v1/completions request


# ---- /v1/completions -------------------------------------------------------------------


class CompletionShape(Shape[CompletionChoice, CompletionChoice]):
    id_prefix = "cmpl"

    def __init__(self, serving: Serving, plan: Plan, model: str, body: CompletionRequest):
        super().__init__(serving, plan, model)
        self.body = body
        self.offsets = [0] * len(plan.prompts)  # streamed text so far, per choice
        # echo + logprobs: each sequence's prompt log-probs under its mixture (score_prompts)
        self.prompt_scores: list[PromptLogprobs] = []

    async def score_prompts(self) -> None:
        """Each prompt scored once per distinct mixture of its choices."""
        top = self.body.logprobs or 0
        plan = self.plan
        scored: dict[tuple[int, Any], PromptLogprobs] = {}
        for index, ids in enumerate(plan.prompts):
            mixing = plan.mixing_of(index)
            key = (index // plan.n, mixing.mixture)
            if key not in scored:
                scored[key] = await self.serving.prompt_logprobs(ids, mixing, top)
            self.prompt_scores.append(scored[key])

    def prompt_logprobs(self, index: int) -> CompletionLogprobs | None:
        """The echoed prompt's entries (the first, and in a persona family the opening a
        persona replaces, have no log-prob), offsets from 0."""
        if not self.prompt_scores:
            return None
        scored = self.prompt_scores[index]
        token_text = self.serving.token_text
        texts = self.serving.prompt_pieces(scored.token_ids)
        offsets = [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
        return CompletionLogprobs(
            tokens=[token_text(t) for t in scored.token_ids],
            token_logprobs=list(scored.logprobs),
            top_logprobs=[
                None if logprob is None else {token_text(i): lp for i, lp in top}
                for logprob, top in zip(scored.logprobs, scored.top_logprobs)
            ],
            text_offset=offsets,
        )

    def echo(self, index: int) -> str:
        if not self.body.echo:
            return ""
        prompt = self.body.prompts()[index // self.plan.n]
        if isinstance(prompt, str):
            return prompt
        return str(self.serving.tokenizer.decode(self.plan.prompts[index]))

    def logprobs(self, events: list[TokenEvent], offset: int) -> CompletionLogprobs | None:
        if self.body.logprobs is None:
            return None
        events = listed(events)
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
        logprobs = self.logprobs(choice.events, len(prefix))
        echoed = self.prompt_logprobs(index)
        if logprobs is not None and echoed is not None:
            logprobs = CompletionLogprobs(
                tokens=echoed.tokens + logprobs.tokens,
                token_logprobs=echoed.token_logprobs + logprobs.token_logprobs,
                top_logprobs=echoed.top_logprobs + logprobs.top_logprobs,
                text_offset=echoed.text_offset + logprobs.text_offset,
            )
        return CompletionChoice(
            index=index,
            text=prefix + choice.text,
            logprobs=logprobs,
            finish_reason=FINISH.get(choice.finish_reason, "stop"),
        )

    def opening(self, index: int) -> CompletionChoice | None:
        if not self.body.echo:
            return None
        prefix = self.echo(index)
        self.offsets[index] = len(prefix)
        echoed = self.prompt_logprobs(index)
        return CompletionChoice(index=index, text=prefix, logprobs=echoed, finish_reason=None)

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
        plan = self.plan
        body = CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices,
            usage=usage, mixing=plan.info(),
        )  # fmt: skip
        return JSONResponse(body.wire(), headers=plan.headers())

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


def seed_index(choices: Choices, j: int) -> int:
    """Choice j's seed offset: j, except in a fan-out, where every choice takes the
    request's seed (choice j then equals a separate request with mixture j)."""
    return 0 if choices[2] else j


async def plan_completion(serving: Serving, body: CompletionRequest) -> Plan:
    choices = await resolve(serving, body)
    n = len(choices[1])
    top = serving.check_top_logprobs(body.logprobs or 0, "logprobs")
    prompts = completion_prompts(serving, body)
    samplings = []
    for ids in prompts:
        max_new = serving.budget(len(ids), body.max_tokens, "max_tokens", "prompt", choices[1])
        samplings += [body.to_sampling(max_new, top, seed_index(choices, j)) for j in range(n)]
    serving.check_capacity(len(samplings), "n" if n > 1 else "prompt")
    return Plan.build(prompts, samplings, choices)


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses={**ERRORS, **streaming_ok("The completion, or chunks when `stream` is true")},
)
async def completions(body: CompletionRequest, request: Request, serving: ServingDep) -> Response:
    plan = await plan_completion(serving, body)
    plan.grammar = await compile_grammar(serving, response_format_spec(body.response_format))
    shape = CompletionShape(serving, plan, body.model or serving.served_name, body)
    if body.echo and body.logprobs is not None:
        await shape.score_prompts()
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
        return ChoiceLogprobs(content=[self.token_logprob(event) for event in listed(events)])

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
            logprobs=None if event.stop_token else self.logprobs([event]),
            finish_reason=FINISH.get(event.finish_reason or ""),
        )

    def response(self, choices: list[ChatChoice], usage: Usage) -> JSONResponse:
        plan = self.plan
        body = ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices,
            usage=usage, mixing=plan.info(),
        )  # fmt: skip
        return JSONResponse(body.wire(), headers=plan.headers())

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


async def plan_chat(serving: Serving, body: ChatCompletionRequest) -> Plan:
    choices = await resolve(serving, body)
    top = serving.check_top_logprobs(body.top_logprobs or 0, "top_logprobs")
    prompt = chat_prompt(serving, body)
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_new = serving.budget(len(prompt), body.max_new_tokens(), param, "messages", choices[1])
    samplings = [
        body.to_sampling(max_new, top, seed_index(choices, j)) for j in range(len(choices[1]))
    ]
    serving.check_capacity(len(samplings), "n")
    return Plan.build([prompt], samplings, choices)


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**ERRORS, **streaming_ok("The completion, or chunks when `stream` is true")},
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, serving: ServingDep
) -> Response:
    plan = await plan_chat(serving, body)
    plan.grammar = await compile_grammar(serving, response_format_spec(body.response_format))
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
    # Each policy (and the reference) alone, named as vLLM names a LoRA adapter: its own
    # name, with the served family as its parent ("<served>/<name>" works too).
    cards += [
        ModelCard(id=name, created=started, parent=serving.served_name)
        for name in serving.adapter_names()
    ]
    return ModelList(data=cards).wire()
