"""A generation request, and its engine-side state once checked (``prepare``)."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..decoding.grammar import Grammar, RowGrammar
from ..decoding.mixing import Mixture
from ..decoding.sampling import SamplingParams
from ..errors import InvalidParameter
from ..models.kv_budget import KVBudget, format_bytes
from ..models.personas import PersonaRules, RequestPersona
from ..models.policies import PolicySet
from ..rules import check_context, check_token_ids
from .detokenize import ReplyReader, TokenTexts
from .streams import RequestStream


@dataclass
class EngineLimits:
    max_running: int = 16  # sequences decoded together
    max_queued: int = 64  # requests waiting for a slot; beyond that submit raises Overloaded
    max_context: int | None = None  # prompt + new tokens; None = the models' own limit
    max_top_logprobs: int = 20
    score_chunk_tokens: int = 4096  # tokens per scoring chunk between decode steps
    # Chunked prefill: a prompt longer than this is split over steps, decode steps of the
    # others in between, such prompts adding at most this many tokens a step (shorter
    # ones join whole); 0 = no chunks, every prompt in one piece. 32: what
    # bench/chunked_prefill.py picked on the CPU (docs/benchmarks.md); a GPU wants more.
    prefill_chunk_tokens: int = 32
    retry_after_s: float = 1.0  # what Overloaded tells callers to wait
    # KV-cache memory budget (kv_budget): bytes, else this fraction of the memory available
    # when the engine starts; a request is admitted only when its worst-case cache fits.
    kv_cache_bytes: int | None = None
    kv_cache_fraction: float = 0.5
    # Personas a request may bring on a persona family (personas.MAX_REQUEST_PERSONAS at most)
    max_request_personas: int = 4


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    mixture: Mixture | None = None  # None = uniform weights, strength 1 (Engine.mixture builds one)
    request_id: str | None = None
    grammar: Grammar | None = None  # constrains the reply (Engine.compile_grammar builds one)


@dataclass
class SequenceState:
    """Engine-side state of one request."""

    sid: int
    request: GenerationRequest
    mixture: Mixture
    stream: RequestStream
    generator: torch.Generator
    token_ids: list[int]  # prompt + generated
    generated: list[int] = field(default_factory=list)
    grammar: RowGrammar | None = None  # this sequence's place in its request's grammar
    prefilled: int = 0  # prompt tokens run by chunks before its last (chunked prefill)
    request_personas: tuple[RequestPersona, ...] = ()  # the mixture's own personas, as token ids

    @property
    def coefs(self) -> tuple[float, ...]:  # [K + 1 (+ R)] policies, the reference, personas
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
    token_texts: TokenTexts | None = None,
    budget: KVBudget | None = None,
    persona_rules: PersonaRules | None = None,
) -> SequenceState:
    """Check a request against the policy set and the limits; raise InvalidParameter if bad.
    ``persona_rules``: the request personas' prompt rules (None: the runner has none)."""
    params = request.sampling
    params.validate(policy_set.vocab_size, limits.max_top_logprobs)
    prompt = list(request.prompt_ids)
    if not prompt:
        raise InvalidParameter("prompt", "the prompt is empty: at least one token is needed")
    check_token_ids(prompt, policy_set.vocab_size, "prompt")
    if request.grammar is not None and params.ignore_eos:
        raise InvalidParameter(
            "ignore_eos", "ignore_eos cannot be combined with a grammar: EOS ends the grammar"
        )
    has_reference = policy_set.reference is not None
    mixture = request.mixture
    if mixture is None:
        mixture = Mixture.build(policy_set.names, None, 1.0, has_reference=has_reference)
    else:  # built once by its caller: a mixture made for another policy set fails here
        mixture.check_fits(policy_set.names, has_reference)
    personas = request_personas(mixture, persona_rules)
    # A request persona's opening longer than the family's takes the rest from the context.
    beyond = persona_rules.beyond_room(personas) if persona_rules is not None else 0
    check_context(len(prompt) + beyond, params.max_new_tokens, max_context)
    total = len(prompt) + params.max_new_tokens
    if budget is not None and not budget.fits([(mixture.coefficients, total)]):
        need = budget.worst_case([(mixture.coefficients, total)])
        raise InvalidParameter(
            "max_new_tokens",
            f"prompt + max_new_tokens = {total} tokens need up to {format_bytes(need)} of KV "
            f"cache, more than the server's whole KV cache budget of "
            f"{format_bytes(budget.budget_bytes)} ({budget.tokens} tokens over all models); "
            "ask for fewer tokens",
        )
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    generator = torch.Generator(device=policy_set.device)
    generator.manual_seed(seed)
    tokenizer = policy_set.tokenizer
    texts = token_texts if token_texts is not None else TokenTexts(tokenizer, policy_set.vocab_size)
    stream = RequestStream(
        request_id=request.request_id or uuid.uuid4().hex,
        weights=mixture.as_dict(),
        strength=mixture.strength,
        prompt_tokens=len(prompt),
        seed=seed,
        on_cancel=on_cancel,
        reader=ReplyReader(tokenizer, list(params.stop), texts).read,
    )
    seq = SequenceState(sid, request, mixture, stream, generator, prompt, request_personas=personas)
    if request.grammar is not None:
        seq.grammar = request.grammar.matcher()
    return seq


def request_personas(mixture: Mixture, rules: PersonaRules | None) -> tuple[RequestPersona, ...]:
    """The mixture's own personas as the runner reads them (ids; computed once per text)."""
    if not mixture.request_personas:
        return ()
    if rules is None:
        raise InvalidParameter(
            "personas",
            "this server runs no request personas: they need a persona family (one model "
            "under several system prompts) on a backend with room for them (docs/server.md)",
        )
    return tuple(rules.of(p) for p in mixture.request_personas)
