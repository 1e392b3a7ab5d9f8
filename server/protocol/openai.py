"""OpenAI shapes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

Fields OpenAI defines but this server cannot honour are accepted only at their neutral
value (``presence_penalty=0``, no ``tools``, ...) so that a request never silently means
something else. Extra fields beyond OpenAI's: ``weights``, ``profile``, ``strength`` (mixing)
and vLLM's ``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mpo_core.decoding.sampling import SamplingParams
from mpo_core.errors import InvalidParameter
from mpo_core.names import ModelName
from mpo_core.rules import valid_json_text

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


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class SamplingFields(MixingFields):
    """What completions and chat share."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: ModelName | None = None
    temperature: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    n: Int = Field(default=1, ge=1, le=MAX_INT)  # upper limit is a server setting (max_n)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: OptInt = Field(default=None, ge=0, le=MAX_SEED)
    presence_penalty: float = 0.0  # not supported: only 0 (use repetition_penalty)
    frequency_penalty: float = 0.0  # not supported: only 0
    logit_bias: dict[Text, float] | None = None
    user: Text | None = None
    top_k: OptInt = Field(default=None, ge=0, le=MAX_INT)
    min_p: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    repetition_penalty: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    ignore_eos: bool = False
    # vLLM's name: token ids that end the reply like EOS (special tokens such as an
    # end-of-turn marker, which stop strings never see: they match the decoded text)
    stop_token_ids: list[Int] | None = Field(default=None, max_length=MAX_STOP_SEQUENCES)
    speculative: bool = True  # false: no speculative decoding for this request
    mixtures: Mixtures = None  # fan-out: choice i under mixture i (server/fanout.py)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> str | list[str] | None:
        items = [stop] if isinstance(stop, str) else (stop or [])
        if len(items) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s for s in items):
            raise ValueError("stop sequences must be non-empty strings")
        return stop

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _zero_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("only 0 is supported; use repetition_penalty instead")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias:
            raise ValueError("logit_bias is not supported")
        return bias

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise InvalidParameter(
                "stream_options", "stream_options is only allowed when stream is true"
            )
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def to_sampling(self, max_new_tokens: int, top_logprobs: int, index: int) -> SamplingParams:
        """Choice ``index`` of a seeded request gets seed + index: distinct, reproducible.

        ``max_new_tokens`` and ``top_logprobs`` are what the server allows (Serving)."""
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=self.temperature if self.temperature is not None else 1.0,
            top_k=self.top_k or 0,
            top_p=self.top_p if self.top_p is not None else 1.0,
            min_p=self.min_p or 0.0,
            repetition_penalty=(
                self.repetition_penalty if self.repetition_penalty is not None else 1.0
            ),
            seed=None if self.seed is None else (self.seed + index) % (2**63),
            stop=self.stop_list(),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            top_logprobs=top_logprobs,
            speculative=self.speculative,
        )


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] | list[Int] | list[list[Int]]
    max_tokens: OptInt = Field(default=16, ge=1, le=MAX_INT)
    logprobs: OptInt = Field(default=None, ge=0, le=MAX_INT)  # top alternatives per token
    echo: bool = False
    best_of: OptInt = Field(default=None, ge=1, le=MAX_INT)
    suffix: None = None
    # vLLM takes it on completions too; checked and compiled in server/structured.py
    response_format: JSONObject | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty_prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt must not be an empty list")
        if isinstance(prompt, list) and any(isinstance(p, list) and not p for p in prompt):
            raise ValueError("a token-id prompt must not be empty")
        return prompt

    @model_validator(mode="after")
    def _best_of_is_n(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidParameter("best_of", "best_of is not supported (it may only equal n)")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: strings, or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(
        extra="allow", strict=True
    )  # name, tool_call_id, ... pass to the template

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None  # the author's name, for templates that render it

    @model_validator(mode="after")
    def _extras_are_text(self) -> ChatMessage:
        """The other fields a template may read (tool_call_id, ...): JSON whose strings
        are text, like every declared field."""
        valid_json_text(self.model_extra or {})
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: OptInt = Field(default=None, ge=1, le=MAX_INT)
    max_completion_tokens: OptInt = Field(default=None, ge=1, le=MAX_INT)
    logprobs: bool = False
    top_logprobs: OptInt = Field(default=None, ge=0, le=MAX_INT)
    response_format: JSONObject | None = None  # text, json_object, json_schema
    tools: list[JSONObject] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            raise InvalidParameter("top_logprobs", "top_logprobs needs logprobs set to true")
        if self.tools:
            raise InvalidParameter("tools", "tools are not supported")
        return self

    def max_new_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )


# ---- responses ------------------------------------------------------------------------


class CompletionTokensDetails(WireModel):
    """OpenAI's prediction counts, here those of speculative decoding: drafted tokens the
    mixture kept, and those it rejected."""

    accepted_prediction_tokens: int
    rejected_prediction_tokens: int


class Usage(WireModel):
    omit_unless_given = frozenset({"completion_tokens_details"})  # when speculation is on

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails | None = None


class CompletionLogprobs(WireModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(WireModel):
    omit_unless_given = frozenset({"mixing"})  # a fan-out's choice: its own mixture

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    mixing: MixingInfo | None = None


class CompletionResponse(WireModel):
    """A full completion, and (``usage`` and ``mixing`` left out) each streamed chunk."""

    omit_unless_given = frozenset({"usage", "system_fingerprint", "mixing"})
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    mixing: MixingInfo | None = None


class TopLogprob(WireModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)
    policy_logprobs: dict[str, float | None] | None = None


class ChoiceLogprobs(WireModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(WireModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(WireModel):
    omit_unless_given = frozenset({"mixing"})  # a fan-out's choice: its own mixture

    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    mixing: MixingInfo | None = None


class ChatCompletionResponse(WireModel):
    omit_unless_given = frozenset({"system_fingerprint"})

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    mixing: MixingInfo | None = None


class ChatDelta(WireModel):
    """What a chunk adds: the role on the first, then content; the last may be empty."""

    omit_unless_given = frozenset({"role", "content"})

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(WireModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(WireModel):
    """One streamed chunk; ``usage`` is on every chunk only with ``include_usage``, and
    ``mixing`` on each choice's last."""

    omit_unless_given = frozenset({"usage", "system_fingerprint", "mixing"})

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    mixing: MixingInfo | None = None


class ModelCard(WireModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mpo"
    parent: str | None = None  # a single policy's card: the family it belongs to (as vLLM)


class ModelList(WireModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
