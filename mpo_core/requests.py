"""A generation request, and its engine-side state once checked (``prepare``)."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .detokenize import ReplyText
from .errors import InvalidParameter
from .kv_budget import GiB, KVBudget
from .mixing import Mixture
from .policies import PolicySet
from .sampling import SamplingParams
from .streams import RequestStream


@dataclass
class EngineLimits:
    max_running: int = 16  # sequences decoded together
    max_queued: int = 64  # requests waiting for a slot; beyond that submit raises Overloaded
    max_context: int | None = None  # prompt + new tokens; None = the models' own limit
    max_top_logprobs: int = 20
    score_chunk_tokens: int = 4096  # tokens per scoring chunk between decode steps
    retry_after_s: float = 1.0  # what Overloaded tells callers to wait
    # KV-cache memory budget (kv_budget): bytes, else this fraction of the memory available
    # when the engine starts; a request is admitted only when its worst-case cache fits.
    kv_cache_bytes: int | None = None
    kv_cache_fraction: float = 0.5


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    mixture: Mixture | None = None  # None = uniform weights, strength 1 (Engine.mixture builds one)
    request_id: str | None = None


@dataclass
class SequenceState:
    """Engine-side state of one request."""

    sid: int
    request: GenerationRequest
    mixture: Mixture
    stream: RequestStream
    generator: torch.Generator
    token_ids: list[int]  # prompt + generated
    reply: ReplyText  # the reply's text so far, stop strings applied
    generated: list[int] = field(default_factory=list)

    @property
    def coefs(self) -> tuple[float, ...]:  # [K + 1] policies, then the reference
        return self.mixture.coefficients

    @property
    def sampling(self) -> SamplingParams:
        return self.request.sampling

    @property
    def worst_case_tokens(self) -> int:  # the most columns its cache rows can reach
        return len(self.request.prompt_ids) + self.sampling.max_new_tokens


def prepare(
    request: GenerationRequest,
    policy_set: PolicySet,
    limits: EngineLimits,
    max_context: int,
    sid: int,
    on_cancel: Callable[[], None],
    budget: KVBudget | None = None,
) -> SequenceState:
    """Check a request against the policy set and the limits; raise InvalidParameter if bad."""
    params = request.sampling
    params.validate(policy_set.vocab_size, limits.max_top_logprobs)
    prompt = list(request.prompt_ids)
    if not prompt:
        raise InvalidParameter("prompt", "the prompt is empty: at least one token is needed")
    vocab = policy_set.vocab_size
    bad = next((t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab), None)
    if bad is not None:
        raise InvalidParameter("prompt", f"prompt token id {bad!r} is outside [0, {vocab})")
    total = len(prompt) + params.max_new_tokens
    if total > max_context:
        raise InvalidParameter(
            "max_new_tokens",
            f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) "
            f"= {total} exceeds the context limit of {max_context} tokens",
        )
    given = request.mixture
    # Rebuilt through the one set of rules: a mixture made for another policy set fails here.
    mixture = Mixture.build(
        policy_set.names,
        given.as_dict() if given is not None else None,
        given.strength if given is not None else 1.0,
        has_reference=policy_set.reference is not None,
    )
    if budget is not None and not budget.fits([(mixture.coefficients, total)]):
        need = budget.worst_case([(mixture.coefficients, total)])
        raise InvalidParameter(
            "max_new_tokens",
            f"prompt + max_new_tokens = {total} tokens need up to {need / GiB:.2f} GiB of KV "
            f"cache, more than the server's whole KV cache budget of "
            f"{budget.budget_bytes / GiB:.2f} GiB ({budget.tokens} tokens over all models); "
            "ask for fewer tokens",
        )
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    generator = torch.Generator(device=policy_set.device)
    generator.manual_seed(seed)
    stream = RequestStream(
        request_id=request.request_id or uuid.uuid4().hex,
        weights=mixture.as_dict(),
        strength=mixture.strength,
        prompt_tokens=len(prompt),
        seed=seed,
        on_cancel=on_cancel,
    )
    reply = ReplyText(policy_set.tokenizer, list(params.stop))
    return SequenceState(sid, request, mixture, stream, generator, prompt, reply)
