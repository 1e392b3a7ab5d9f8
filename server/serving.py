"""From validated requests to engine streams; shared by the TGI and OpenAI routes.

The routes parse and shape; this module decides: which weights (model name, profile,
explicit weights, default profile), how many tokens fit the context, which sampling
parameters, and how a sequence is submitted, timed and cancelled when its client leaves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mpo_core.decoding.grammar import Grammar
from mpo_core.decoding.mixing import DEFAULT_PLAUSIBILITY, Mixture
from mpo_core.decoding.prompt_logprobs import PromptLogprobs
from mpo_core.decoding.sampling import SamplingParams
from mpo_core.engine.core import Engine, GenerationRequest
from mpo_core.engine.streams import RequestStream, TokenEvent
from mpo_core.errors import EngineNotRunning, InvalidParameter, UnknownProfile
from mpo_core.models.token_bytes import TokenPieces
from mpo_core.rules import check_context, check_token_ids

from .errors import APIError
from .metrics import Metrics
from .protocol.common import MixingFields, MixingInfo, check_unicode
from .settings import Settings
from .store import (
    ProfileStore,
    ProfileVersion,
    ServedProfiles,
    StoreUnavailable,
    UnreadableProfile,
)

logger = logging.getLogger(__name__)

Receive = Callable[[], Awaitable[Mapping[str, Any]]]


class ClientGone(Exception):
    """The client disconnected before its response was complete."""


@dataclass(frozen=True)
class ResolvedMixture:
    """The core ``Mixture`` a request decodes from, and the stored profile it came from."""

    mixture: Mixture
    profile: str | None  # the stored profile used, or None (explicit or uniform weights)

    @property
    def weights(self) -> dict[str, float]:
        return self.mixture.as_dict()

    @property
    def strength(self) -> float:
        return self.mixture.strength

    @property
    def label(self) -> str:
        """For the requests_by_profile metric: profile name, "custom" or "uniform"."""
        if self.profile is not None:
            return self.profile
        return "uniform" if self.mixture.is_uniform else "custom"

    def info(self) -> MixingInfo:
        """What the response reports: normalised weights, strength and profile."""
        return MixingInfo(
            weights=self.weights,
            strength=self.strength,
            plausibility=self.mixture.alpha,
            profile=self.profile,
        )

    def headers(self) -> dict[str, str]:
        """The weights actually used, echoed in response headers."""
        pairs = ",".join(f"{name}={w:.6g}" for name, w in self.weights.items())
        headers = {"X-MPO-Weights": pairs, "X-MPO-Strength": f"{self.strength:.6g}"}
        if self.profile is not None:
            headers["X-MPO-Profile"] = self.profile
        return headers


@dataclass
class Choice:
    """One finished sequence: its events and what the client sees of them."""

    events: list[TokenEvent]
    seed: int
    drafted_tokens: int = 0  # speculative decoding: drafted for this reply
    accepted_tokens: int = 0  # of those, kept

    @property
    def text(self) -> str:
        return "".join(ev.text for ev in self.events)

    @property
    def finish_reason(self) -> str:
        reason = self.events[-1].finish_reason if self.events else None
        return reason or "length"


class Serving:
    """Everything routes need to run a generation; one per app."""

    def __init__(
        self,
        engine: Engine,
        store: ProfileStore,
        settings: Settings,
        metrics: Metrics,
        profiles: ServedProfiles,
    ) -> None:
        self.engine = engine
        self.store = store
        self.profiles = profiles  # what requests read profiles through (off the loop)
        self._ignored_defaults: set[tuple[str, int]] = set()  # warned about once each
        self.settings = settings
        self.metrics = metrics
        self.tokenizer = engine.tokenizer

    @property
    def speculating(self) -> bool:
        """Whether the engine decodes speculatively (replies then report their counts)."""
        return getattr(self.engine, "speculator", None) is not None

    # -- names ---------------------------------------------------------------------
    @property
    def served_name(self) -> str:
        return str(self.engine.policy_set.served_name)

    def profile_from_model(self, model: str | None) -> str | None:
        """``<served>`` -> None (default profile), ``<served>:<profile>`` -> profile; else 404."""
        if model is None or model == self.served_name:
            return None
        prefix = f"{self.served_name}:"
        if model.startswith(prefix) and len(model) > len(prefix):
            return model[len(prefix) :]
        raise APIError(
            404,
            f"model {model!r} does not exist; use {self.served_name!r} or "
            f"'{self.served_name}:<profile>' (see GET /v1/models)",
            param="model",
            code="model_not_found",
        )

    # -- one adapter ---------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        """What ``adapter_id`` (TGI, LoRAX) and an OpenAI ``model`` may name: each policy
        and the reference."""
        reference = self.engine.policy_set.reference_name
        return [*self.engine.policy_names, *([reference] if reference else [])]

    def adapter_from_model(self, model: str | None) -> str | None:
        """``<served>/<policy>`` or a bare ``<policy>`` (vLLM's LoRA naming) -> the policy;
        None for the served name and its profiles. ``<served>/<unknown>`` is a 404."""
        if model is None or model == self.served_name:
            return None
        prefix = f"{self.served_name}/"
        if model.startswith(prefix):
            return self.check_adapter(model[len(prefix) :], "model")
        return model if model in self.adapter_names() else None

    def check_adapter(self, name: str, param: str) -> str:
        if name not in self.adapter_names():
            raise APIError(
                404,
                f"adapter {name!r} does not exist; the adapters are {self.adapter_names()} "
                "(see GET /v1/models)",
                param=param,
                code="adapter_not_found",
            )
        return name

    def adapter_mixing(self, name: str, param: str, fields: MixingFields) -> ResolvedMixture:
        """One model alone: a policy with weight 1 (strength 1), or the reference (0)."""
        self.check_adapter(name, param)
        for field in ("weights", "profile", "strength", "plausibility", "personas"):
            if getattr(fields, field) is not None:
                raise InvalidParameter(
                    field, f"{param} selects one model alone; it cannot be combined with {field}"
                )
        if name in self.engine.policy_names:
            return ResolvedMixture(self.engine.mixture({name: 1.0}, 1.0), None)
        return ResolvedMixture(self.engine.mixture(None, 0.0), None)  # the reference alone

    # -- mixing --------------------------------------------------------------------
    async def resolve_mixing(
        self, fields: MixingFields, model_profile: str | None = None
    ) -> ResolvedMixture:
        """Explicit weights, else the named profile, else the default profile, else uniform;
        the request's strength and plausibility over the profile's; the request's own
        personas beside the policies (a profile's weights give them 0).

        Profiles are read off the event loop, and from this replica's cache while the store
        is down (``ServedProfiles``): UnknownProfile (404) or StoreUnavailable (503)."""
        weights, profile, strength = fields.weights, fields.profile, fields.strength
        alpha = _or(fields.plausibility, DEFAULT_PLAUSIBILITY)
        personas = fields.persona_map()
        if profile is not None and model_profile is not None and profile != model_profile:
            raise InvalidParameter(
                "profile",
                f"profile {profile!r} conflicts with the profile {model_profile!r} named by model",
            )
        profile = profile or model_profile
        if weights is not None and profile is not None:
            raise InvalidParameter("weights", "give either weights or a profile, not both")
        if weights is not None:
            mixture = self._build(weights, _or(strength, 1.0), alpha, None, personas)
            return ResolvedMixture(mixture, None)
        if profile is not None:
            found = await self.profiles.resolve(profile)
            assert found is not None  # a named profile resolves or raises
            stored = found[1]
            s = _or(strength, stored.strength)
            both = _with_profile_personas(stored, personas)
            mixture = self._build(stored.weights, s, alpha, profile, both)
            return ResolvedMixture(mixture, profile)
        default = await self._default_profile()
        if default is not None:
            try:
                s = _or(strength, default.strength)
                both = _with_profile_personas(default, personas)
                mixture = self.engine.mixture(default.weights, s, alpha, both)
                return ResolvedMixture(mixture, default.name)
            except InvalidParameter as exc:
                own = exc.param in ("strength", "plausibility") or _names_personas(exc.param)
                if own and getattr(fields, str(exc.param)) is not None:
                    raise  # the request's own strength or alpha
                self.warn_default(default, f"it does not fit the loaded policies: {exc}")
        return ResolvedMixture(self._build(None, _or(strength, 1.0), alpha, None, personas), None)

    async def _default_profile(self) -> ProfileVersion | None:
        try:
            found = await self.profiles.resolve(None)
        except UnreadableProfile as exc:  # an older version stored it: serve uniform weights
            logger.warning("ignoring the default profile: %s", exc)
            return None
        except UnknownProfile:  # deleted by another process between the two reads
            return None
        return None if found is None else found[1]

    def warn_default(self, default: ProfileVersion, why: str) -> None:
        """A stored default that requests cannot use: named in a warning (once per version),
        and requests that name no profile get uniform weights instead of an error."""
        key = (default.name, default.version)
        if key not in self._ignored_defaults:
            self._ignored_defaults.add(key)
            logger.warning(
                "ignoring the default profile %r (version %d): %s; requests that name no "
                "profile get uniform weights until the default is changed",
                default.name, default.version, why,
            )  # fmt: skip

    def check_default(self) -> None:
        """At start-up: read the default profile (so this replica can answer it from its
        cache in an outage) and warn when it does not fit the loaded policies."""
        try:
            found = self.profiles.read(None)
        except UnknownProfile as exc:
            logger.warning("ignoring the default profile: %s", exc)
            return
        except StoreUnavailable as exc:
            logger.warning("the default profile cannot be read yet: %s", exc)
            return
        if found is None:
            return
        try:
            stored = found[1]
            self.engine.mixture(
                stored.weights, stored.strength, personas=stored.request_personas or None
            )
        except InvalidParameter as exc:
            self.warn_default(found[1], f"it does not fit the loaded policies: {exc}")

    def _build(
        self,
        raw: Any,
        strength: float,
        alpha: float,
        profile: str | None,
        personas: dict[str, Any] | None = None,
    ) -> Mixture:
        try:
            return self.engine.mixture(raw, strength, alpha, personas)
        except InvalidParameter as exc:
            own = exc.param in ("strength", "plausibility") or _names_personas(exc.param)
            if profile is None or own:
                raise
            raise InvalidParameter(
                "profile", f"stored profile {profile!r} does not fit the loaded policies: {exc}"
            ) from None

    # -- tokens --------------------------------------------------------------------
    def encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; text that is not valid Unicode is a 400 naming ``param``."""
        check_unicode(text, param)
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def check_token_ids(self, ids: Sequence[int], param: str) -> list[int]:
        return check_token_ids(ids, int(self.engine.policy_set.vocab_size), param)

    def token_text(self, token_id: int) -> str:
        return self.engine.events.token_text(token_id)

    def token_bytes(self, token_id: int) -> list[int]:
        return list(self.engine.events.bytes_of(token_id))

    def is_special(self, token_id: int) -> bool:
        return self.engine.events.is_special(token_id)

    def budget(
        self,
        prompt_tokens: int,
        max_new_tokens: int | None,
        param: str,
        prompt_param: str,
        mixings: Sequence[ResolvedMixture | None] = (),
    ) -> int:
        """The number of new tokens to allow, or a 400 naming the context limit. A request
        persona's opening longer than the family's takes the rest from the context: the
        prompt counts as that much longer (``EnginePersonas.opening_tokens``)."""
        limit = int(self.engine.max_context)
        own = self.engine.own_personas
        openings = [own.opening_tokens(m.mixture) for m in mixings if m is not None]
        prompt_tokens += max(openings, default=0)
        room = check_context(prompt_tokens, max_new_tokens, limit, param, prompt_param)
        if max_new_tokens is None:
            return min(self.settings.default_max_tokens, room)
        return max_new_tokens

    def check_top_logprobs(self, value: int, param: str) -> int:
        limit = min(self.settings.max_top_logprobs, self.engine.limits.max_top_logprobs)
        if value > limit:
            raise InvalidParameter(param, f"{param} must be at most {limit}, got {value}")
        return value

    def check_capacity(self, sequences: int, param: str) -> None:
        """A request needing more sequences than running + queued slots can never run: 400
        (a 429 would tell the client to retry what can never succeed)."""
        limits = self.engine.limits
        capacity = limits.max_running + limits.max_queued
        if sequences > capacity:
            raise InvalidParameter(
                param,
                f"this request needs {sequences} sequences (prompts x n), more than the "
                f"server ever holds at once: {capacity} (max_running {limits.max_running} + "
                f"max_queued {limits.max_queued})",
            )

    def check_n(self, n: int) -> int:
        if n > self.settings.max_n:
            raise InvalidParameter("n", f"n must be at most {self.settings.max_n}, got {n}")
        return n

    async def prompt_logprobs(
        self, prompt_ids: list[int], mixing: ResolvedMixture, top_n: int = 0
    ) -> PromptLogprobs:
        """Each prompt token's log-prob under the mixture (the engine thread computes it)."""
        future = self.engine.prompt_logprobs(prompt_ids, mixing.mixture, top_n)
        return await asyncio.wrap_future(future)

    def prompt_pieces(self, prompt_ids: list[int]) -> list[str]:
        """Each prompt token's text, such that they join to the prompt (``TokenPieces``)."""
        pieces = TokenPieces()
        out = []
        for i, token in enumerate(prompt_ids):
            final = i == len(prompt_ids) - 1
            if self.engine.events.is_special(token):
                out.append(self.engine.events.token_text(token))
            else:
                out.append(pieces.push(self.engine.events.bytes_of(token), final=final))
        return out

    # -- running -------------------------------------------------------------------
    def submit(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams,
        mixing: ResolvedMixture,
        grammar: Grammar | None = None,
    ) -> RequestStream:
        """Hand one sequence to the engine (call on the event loop's thread)."""
        request = GenerationRequest(
            prompt_ids=prompt_ids,
            sampling=sampling,
            mixture=mixing.mixture,
            grammar=grammar,
        )
        stream = self.engine.submit(request)  # InvalidParameter / Overloaded / EngineNotRunning
        self.metrics.prompt_tokens.inc(stream.prompt_tokens)
        return stream

    def submit_many(
        self,
        prompts: list[list[int]],
        samplings: list[SamplingParams],
        mixing: ResolvedMixture | Sequence[ResolvedMixture],
        grammar: Grammar | None = None,
    ) -> list[RequestStream]:
        """Submit several sequences (under one mixture, or each under its own: a fan-out);
        if one is refused, cancel those already admitted. Each sequence of a grammar
        request gets its own matcher."""
        mixings = [mixing] * len(prompts) if isinstance(mixing, ResolvedMixture) else mixing
        streams: list[RequestStream] = []
        try:
            for prompt_ids, sampling, mixed in zip(prompts, samplings, mixings, strict=True):
                streams.append(self.submit(prompt_ids, sampling, mixed, grammar))
        except BaseException:
            for stream in streams:
                stream.cancel()
            raise
        for label in dict.fromkeys(m.label for m in mixings):  # once per request and label
            self.metrics.requests_by_profile.labels(profile=label).inc()
        return streams

    async def events(self, stream: RequestStream) -> AsyncIterator[TokenEvent]:
        """The stream's events, timed into the latency histograms; cancels if abandoned."""
        start = last = time.perf_counter()
        count = 0
        try:
            async for event in stream:
                now = time.perf_counter()
                if event.finish_reason == "cancelled":  # we never read after cancelling
                    raise EngineNotRunning("the request was cancelled: the server is shutting down")
                if count == 0:
                    self.metrics.ttft.observe(now - start)
                else:
                    self.metrics.itl.observe(now - last)
                last = now
                count += 1
                yield event
            self.metrics.e2e.observe(time.perf_counter() - start)
        finally:
            self.metrics.generation_tokens.inc(count)
            self.metrics.drafted_tokens.inc(stream.drafted_tokens)
            self.metrics.accepted_tokens.inc(stream.accepted_tokens)
            if not stream.finished:
                stream.cancel()

    async def collect(self, streams: list[RequestStream], receive: Receive) -> list[Choice]:
        """Run sequences to the end (non-streaming); a client disconnect cancels them all."""

        async def run(stream: RequestStream) -> Choice:
            events = [ev async for ev in self.events(stream)]
            return Choice(events, stream.seed, stream.drafted_tokens, stream.accepted_tokens)

        work: asyncio.Future[list[Choice]] = asyncio.gather(*(run(s) for s in streams))
        watcher: asyncio.Future[None] = asyncio.ensure_future(wait_for_disconnect(receive))
        both: set[asyncio.Future[Any]] = {work, watcher}
        try:
            done, _ = await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
            if work not in done:
                raise ClientGone()
            return list(work.result())
        finally:
            watcher.cancel()
            if not work.done():
                work.cancel()
                for stream in streams:
                    stream.cancel()
                await asyncio.gather(work, return_exceptions=True)


def _with_profile_personas(
    stored: ProfileVersion, personas: dict[str, Any] | None
) -> dict[str, Any] | None:
    """A profile's own personas, then the request's (a request persona with a profile
    persona's name takes its place)."""
    if not stored.request_personas:
        return personas
    return {**stored.request_personas, **(personas or {})}


def _names_personas(param: str | None) -> bool:
    """The error is about the request's own personas (not a stored profile's weights)."""
    return param is not None and (param == "personas" or param.startswith("personas."))


def _or(value: float | None, fallback: float) -> float:
    return fallback if value is None else value


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client goes away (the body has been read by then)."""
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return


async def merge(
    iterators: list[AsyncIterator[TokenEvent]],
) -> AsyncIterator[tuple[int, TokenEvent]]:
    """Interleave several event streams as their events arrive: (choice index, event)."""
    if len(iterators) == 1:
        try:
            async for event in iterators[0]:
                yield 0, event
        finally:
            await _aclose(iterators[0])
        return
    queue: asyncio.Queue[tuple[int, TokenEvent | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, iterator: AsyncIterator[TokenEvent]) -> None:
        try:
            async for event in iterator:
                await queue.put((index, event))
            await queue.put((index, None))
        except Exception as exc:  # surfaced to the consumer below
            await queue.put((index, exc))

    tasks = [asyncio.ensure_future(pump(i, it)) for i, it in enumerate(iterators)]
    open_count = len(tasks)
    try:
        while open_count:
            index, item = await queue.get()
            if item is None:
                open_count -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for iterator in iterators:
            await _aclose(iterator)


async def _aclose(iterator: AsyncIterator[TokenEvent]) -> None:
    """Close an abandoned event generator now (its ``finally`` cancels the sequence)."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()
