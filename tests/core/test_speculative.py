"""Speculative decoding of the mixture: greedy replies identical to speculation off (both
draft kinds, both runners, growing and static caches, joins, leaves, stops, a cancel),
sampled tokens distributed exactly as the mixture's (a chi-square test that a wrong
acceptance rule fails), the adaptive gamma and the batch-size cut-off."""

from __future__ import annotations

import dataclasses
import itertools
import shutil
from typing import Any

import pytest
import torch
from scipy.stats import chi2

from mpo_core.config import SpeculativeConfig, load_config
from mpo_core.decoding import acceptance as speculative
from mpo_core.decoding.acceptance import AdaptiveGamma, Draft, accept_drafts
from mpo_core.decoding.drafts import lookup
from mpo_core.decoding.mixing import Mixture, mix_logprobs
from mpo_core.decoding.sampling import SamplingParams
from mpo_core.decoding.speculator import Speculator, first_layers
from mpo_core.engine.core import Engine, EngineLimits, GenerationRequest
from mpo_core.models.kvcache import to_logprobs
from mpo_core.models.policies import PolicySet
from mpo_core.models.static_cache import StaticBatch
from mpo_core.runners import AdapterRunner, PersonaRunner, SeparateModelsRunner, load_policy_set
from mpo_core.runners.personas import FILLER, PAD_ROWS
from mpo_core.testing.families import make_persona_family
from mpo_core.testing.lora import LoraShape, make_adapter_family

LOOP = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the"
PROMPTS = [LOOP, "Thank you so much, that was very kind of you.", "hi", "Numbers like 0 1 2 3"]


# -- the rule ----------------------------------------------------------------------------


def test_lookup_proposes_what_followed_the_latest_match():
    assert lookup([1, 2, 3, 9, 1, 2, 3, 7, 1, 2], 3) == [3, 7, 1]  # suffix [1, 2], latest match
    assert lookup([5, 6, 7, 5], 2) == [6, 7]
    assert lookup([1, 2, 3], 4) == []  # no earlier occurrence of any suffix
    assert lookup([1, 2, 1], 0) == []


def test_greedy_keeps_exactly_the_argmax_run():
    probs = torch.nn.functional.one_hot(torch.tensor([4, 2, 7, 1]), 8).float()  # [4, 8]
    gen = torch.Generator().manual_seed(0)
    assert accept_drafts(probs, Draft([4, 2, 7]), True, gen) == [4, 2, 7, 1]  # + the bonus
    assert accept_drafts(probs, Draft([4, 3, 7]), True, gen) == [4, 2]  # the correction
    assert accept_drafts(probs[:1], Draft([]), True, gen) == [4]


def test_a_draft_outside_the_support_is_always_rejected():
    probs = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        out = accept_drafts(probs, Draft([2]), False, gen)
        assert len(out) == 1 and out[0] in (0, 1)


def test_adaptive_gamma_follows_the_acceptance_rate():
    gamma = AdaptiveGamma(max_draft=4)
    start = gamma.gamma
    for _ in range(10):
        gamma.update(gamma.gamma, gamma.gamma)  # everything accepted
    assert gamma.gamma == 4 > start
    for _ in range(12):
        gamma.update(max(1, gamma.gamma), 0)  # everything rejected
    assert gamma.gamma == 0  # stops drafting
    for _ in range(gamma.probe_every):
        gamma.update(0, 0)
    assert gamma.gamma == 1  # a probe after idle steps
    gamma.update(1, 0)
    assert gamma.gamma == 0  # a rejected probe: idle again for probe_every steps
    for _ in range(gamma.probe_every):
        gamma.update(0, 0)
    gamma.update(1, 1)
    assert gamma.gamma >= 1  # an accepted probe brings the request back
    assert AdaptiveGamma(max_draft=0).gamma == 0


@dataclasses.dataclass
class _Stream:
    drafted_tokens: int = 0
    accepted_tokens: int = 0


@dataclasses.dataclass
class _Seq:
    sid: int
    token_ids: list[int]
    generated: list[int]
    sampling: SamplingParams
    request: GenerationRequest
    stream: _Stream = dataclasses.field(default_factory=_Stream)
    coefs: tuple[float, ...] = (0.5, 0.5, 0.0)
    grammar: object = None  # a row with a grammar steps plainly


class _Everything:
    def propose(self, rows, gammas):
        return [Draft([7] * g) for g in gammas]

    def keep(self, sids):
        pass


def test_batch_size_cut_off_and_the_limits_of_a_draft():
    spec = Speculator(SpeculativeConfig(method="ngram", max_batch_size=2), _Everything())
    params = SamplingParams(max_new_tokens=10)

    def seq(sid, n_tokens=5, generated=1, opt_in=True):
        request = GenerationRequest([1] * 4, dataclasses.replace(params, speculative=opt_in))
        return _Seq(sid, [1] * n_tokens, [1] * generated, request.sampling, request)

    two = [seq(0), seq(1)]
    assert all(g > 0 for g in spec.gammas(two, 100))
    assert spec.gammas([*two, seq(2)], 100) == [0, 0, 0]  # above the cut-off: off
    assert spec.drafts([*two, seq(2)], 100) == {}
    assert spec.gammas([seq(0, opt_in=False), seq(1)], 100)[0] == 0  # the request opted out
    assert spec.gammas([seq(0, generated=9)], 100) == [0]  # the last token is sampled
    assert spec.gammas([seq(0, generated=8)], 100) == [1]
    assert spec.gammas([seq(0, n_tokens=99), seq(1)], 100) == [1, 1]  # the longest row's room
    big_draft = Speculator(SpeculativeConfig(method="draft"), _Everything(), min_models=2)
    one_hot = dataclasses.replace(seq(0), coefs=(1.0, 0.0, 0.0))
    assert big_draft.gammas([one_hot, seq(1)], 100) == [0, 1]  # one model: drafting costs more


# -- greedy identity in the engine ---------------------------------------------------------


def _greedy(n: int, **kw: Any) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True, **kw)


def _run(ps: PolicySet, settings: SpeculativeConfig, stops: dict[str, Any]) -> dict[str, Any]:
    """Seven requests through three slots (joins and leaves), one with a stop string, one
    with a stop token, then a cancel mid-reply; every reply's events."""
    tok = ps.tokenizer
    out: dict[str, Any] = {}
    with Engine(ps, EngineLimits(max_running=3), speculative=settings) as engine:
        names = engine.policy_names
        # Two models at least (a draft as big as a policy is not used for a one-hot row);
        # mostly the draft model (a policy, or the base), so that long runs are kept.
        mixes = [
            engine.mixture({names[0]: 0.97, names[1]: 0.03}),
            engine.mixture(strength=0.6) if engine.has_reference else engine.mixture(),
            engine.mixture(strength=0.03) if engine.has_reference else engine.mixture(),
        ]
        streams = []
        for i in range(7):
            params = _greedy(8 + 5 * (i % 3))
            if i == 4:
                params = _greedy(30, stop=[stops["text"]] if stops else [])
            if i == 5:
                params = _greedy(30, stop_token_ids=[stops["token"]] if stops else [])
            prompt = tok.encode(PROMPTS[i % len(PROMPTS)])
            streams.append(engine.submit(GenerationRequest(prompt, params, mixes[i % 3])))
        out["replies"] = [[(e.token_id, e.text, e.finish_reason) for e in s] for s in streams]
        # prompt (55 tokens) + 45 = the 100 columns of the static cache: drafts near the cap
        long = engine.submit(GenerationRequest(tok.encode(LOOP), _greedy(45), mixes[0]))
        got = []
        for event in long:
            if event.index == 10:
                long.cancel()
            got.append(event)
        out["cancelled"] = got
        whole = GenerationRequest(tok.encode(LOOP), _greedy(45), mixes[0])
        out["uncancelled"] = engine.generate(whole).token_ids
        out["after"] = engine.generate(GenerationRequest(tok.encode("hi"), _greedy(5))).token_ids
        out["drafted"] = sum(s.drafted_tokens for s in [*streams, long])
        out["accepted"] = sum(s.accepted_tokens for s in [*streams, long])
        out["runner"] = engine.runner
    return out


def _assert_identical(ps: PolicySet, settings: SpeculativeConfig) -> dict[str, Any]:
    plain = _run(ps, SpeculativeConfig(method="off"), {})
    # Requests 4 and 5 without their stops: pick a stop string and a stop token in them.
    text = "".join(t for _, t, _ in plain["replies"][4])
    stops = {"text": text[len(text) // 2 : len(text) // 2 + 3], "token": plain["replies"][5][6][0]}
    plain = _run(ps, SpeculativeConfig(method="off"), stops)
    spec = _run(ps, settings, stops)
    assert plain["drafted"] == 0
    assert spec["replies"] == plain["replies"]
    assert plain["replies"][4][-1][2] == plain["replies"][5][-1][2] == "stop_sequence"
    assert len(plain["replies"][5]) <= 7  # the stop token cut the reply
    # The cancelled reply is a prefix of the plain one, and ends as cancelled.
    cancelled = spec["cancelled"]
    assert cancelled[-1].finish_reason == "cancelled"
    tokens = [e.token_id for e in cancelled[:-1]]
    assert 11 <= len(tokens) < 45 and tokens == plain["uncancelled"][: len(tokens)]
    assert spec["uncancelled"] == plain["uncancelled"]
    assert spec["after"] == plain["after"] and len(spec["after"]) == 5  # the slot was freed
    assert spec["accepted"] > 0 and spec["drafted"] >= spec["accepted"]
    return spec


SETTINGS = {
    "ngram": SpeculativeConfig(method="ngram"),
    "draft": SpeculativeConfig(method="draft", draft_model="helpful"),
}


@pytest.mark.parametrize("method", ["ngram", "draft"])
@pytest.mark.parametrize("static", [False, True])
def test_greedy_identity_separate_models(llama_set, method, static):
    ps = llama_set
    if static:
        config = ps.config.model_copy(update={"static_cache": "on", "max_cache_len": 100})
        ps = dataclasses.replace(ps, config=config)
    spec = _assert_identical(ps, SETTINGS[method])
    runner = spec["runner"]
    assert isinstance(runner, SeparateModelsRunner)
    assert isinstance(runner.batches[0], StaticBatch) == static


@pytest.fixture(scope="module")
def adapter_set(tmp_path_factory: pytest.TempPathFactory) -> PolicySet:
    shapes = [LoraShape(r=4, targets="attention"), LoraShape(r=2, targets="all")]
    paths = make_adapter_family(tmp_path_factory.mktemp("spec_lora"), shapes, merged=False)
    return load_policy_set(load_config(paths.adapters_yaml))


@pytest.mark.parametrize("method", ["ngram", "draft"])
@pytest.mark.parametrize("static", [False, True])
def test_greedy_identity_adapter_family(adapter_set, method, static):
    ps = adapter_set
    if static:
        config = ps.config.model_copy(update={"static_cache": "on", "max_cache_len": 100})
        ps = dataclasses.replace(ps, config=config)
    # The bare base drafts; the strength-0.03 requests decode mostly the base.
    settings = SpeculativeConfig(method=method, draft_model="base" if method == "draft" else None)
    spec = _assert_identical(ps, settings)
    assert isinstance(spec["runner"], AdapterRunner)
    assert isinstance(spec["runner"].batch, StaticBatch) == static


@pytest.fixture(scope="module")
def persona_set(tmp_path_factory: pytest.TempPathFactory) -> PolicySet:
    return load_policy_set(load_config(make_persona_family(tmp_path_factory.mktemp("spec_p"))))


@pytest.mark.parametrize("method", ["ngram", "draft"])
@pytest.mark.parametrize("static", [False, True])
def test_greedy_identity_persona_family(persona_set, method, static):
    """Every slot verifies its drafts at its persona's shifted positions."""
    ps = persona_set
    if static:
        cap = 100 + ps.personas.longest_extra  # the long request's 100 tokens, each persona
        config = ps.config.model_copy(update={"static_cache": "on", "max_cache_len": cap})
        ps = dataclasses.replace(ps, config=config)
    # The family's one model, cut to its first layer, drafts (the default draft, the whole
    # model, would cost a step per token: the persona family falls back to ngram).
    settings = SpeculativeConfig(method=method, draft_layers=1 if method == "draft" else None)
    spec = _assert_identical(ps, settings)
    assert isinstance(spec["runner"], PersonaRunner)
    assert isinstance(spec["runner"].batch, StaticBatch) == static


def test_the_persona_filler_slot_stays_through_verify(persona_set):
    """Three persona slots (strength 1), padding set, decode padded to four rows: once added, the
    filler row goes through every verify and is prefilled once, and the reply equals
    the plain one."""

    def run(settings: SpeculativeConfig) -> tuple[list[int], int, list[bool], int]:
        with Engine(persona_set, EngineLimits(max_running=2), speculative=settings) as engine:
            runner = engine.runner
            assert isinstance(runner, PersonaRunner) and runner.pad_rows == {}
            runner.pad_rows = dict(PAD_ROWS)  # padding is off by default
            fillers, at_verify = [], []
            prefill, verify = runner.batch.prefill, runner.verify

            def counting(row_ids, prompts, *parts):  # parts: chunked prefills' caches
                fillers.extend(r for r in row_ids if r == FILLER)
                return prefill(row_ids, prompts, *parts)

            def watching(running, drafts, newcomers):
                at_verify.append(FILLER in runner.batch.row_ids)
                return verify(running, drafts, newcomers)

            runner.batch.prefill, runner.verify = counting, watching
            mixture = engine.mixture(strength=1.0)
            assert sum(c != 0 for c in mixture.coefficients) == 3
            ids = persona_set.tokenizer.encode(LOOP)
            stream = engine.submit(GenerationRequest(ids, _greedy(30), mixture))
            tokens = [e.token_id for e in stream]
        return tokens, len(fillers), at_verify, stream.accepted_tokens

    plain, _, _, _ = run(SpeculativeConfig(method="off"))
    # The plain model drafts: close to a mixture of its personas, so runs get accepted.
    drafting = SpeculativeConfig(method="draft", draft_model=persona_set.reference_name)
    spec, fillers, at_verify, accepted = run(drafting)
    assert spec == plain and len(plain) == 30
    assert accepted > 0
    # Verifies before the first plain step run unpadded; once a plain step has added
    # the filler, every verify after it keeps it.
    first = at_verify.index(True)
    assert all(at_verify[first:]) and fillers == 1


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_first_layers_share_the_weights_and_leave_the_model_whole(arch, policy_sets):
    import copy

    ps = policy_sets[arch]
    loaded = ps.policies[0]
    ids = torch.tensor([ps.tokenizer.encode(LOOP)])
    whole = loaded.model(input_ids=ids).logits
    short = first_layers(loaded, 1)
    expected = copy.deepcopy(loaded.model)
    blocks = expected.model.layers if arch == "llama" else expected.transformer.h
    del blocks[1:]
    expected.config.num_hidden_layers = 1
    with torch.inference_mode():
        got = short.model(input_ids=ids).logits
        want = expected(input_ids=ids).logits
        assert torch.allclose(got, want, atol=1e-5)
        assert not torch.allclose(got, whole, atol=1e-2)  # one layer is not two
        assert torch.allclose(loaded.model(input_ids=ids).logits, whole)  # untouched
    assert loaded.model.config.num_hidden_layers == 2
    assert short.model.lm_head.weight is loaded.model.lm_head.weight  # nothing copied


def test_greedy_identity_with_a_one_layer_draft(llama_set):
    settings = SpeculativeConfig(method="draft", draft_model="helpful", draft_layers=1)
    _assert_identical(llama_set, settings)


def test_per_token_logprobs_are_the_mixtures(llama_set):
    """With speculation on, each event's logprob and policy_logprobs are those of the
    mixture at that token, as with it off (to float noise: one forward of G tokens)."""
    tok = llama_set.tokenizer
    events = {}
    for method in ("off", "ngram"):
        with Engine(llama_set, speculative=SpeculativeConfig(method=method)) as engine:
            mix = engine.mixture([0.5, 0.3, 0.2], strength=0.7)
            request = GenerationRequest(tok.encode(LOOP), _greedy(40), mix)
            events[method] = engine.generate(request).events
    assert [e.token_id for e in events["ngram"]] == [e.token_id for e in events["off"]]
    for a, b in zip(events["ngram"], events["off"]):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        for name, value in b.policy_logprobs.items():
            assert a.policy_logprobs[name] == pytest.approx(value, abs=1e-4)


def test_default_draft_falls_back_to_ngram_where_it_cannot_pay(
    adapter_set, persona_set, no_reference_family
):
    from mpo_core.decoding.drafts import ModelDrafter, NgramDrafter
    from mpo_core.decoding.speculator import make_speculator
    from mpo_core.runners import capabilities_of

    families = (adapter_set, persona_set, load_policy_set(load_config(no_reference_family)))
    for ps in families:
        shared = capabilities_of(ps).shared_forward
        speculator = make_speculator(ps, SpeculativeConfig(method="draft"), shared_forward=shared)
        assert speculator is not None and isinstance(speculator.drafter, NgramDrafter)
    explicit = make_speculator(
        adapter_set, SpeculativeConfig(method="draft", draft_model="base"), shared_forward=True
    )
    assert explicit is not None and isinstance(explicit.drafter, ModelDrafter)
    layers = make_speculator(
        persona_set, SpeculativeConfig(method="draft", draft_layers=1), shared_forward=True
    )
    assert layers is not None and isinstance(layers.drafter, ModelDrafter)
    assert make_speculator(adapter_set, SpeculativeConfig(method="off")) is None


def test_a_request_can_opt_out(llama_set):
    tok = llama_set.tokenizer
    with Engine(llama_set, speculative=SpeculativeConfig(method="ngram")) as engine:
        request = GenerationRequest(tok.encode(LOOP), _greedy(30, speculative=False))
        stream = engine.submit(request)
        list(stream)
        on = engine.submit(GenerationRequest(tok.encode(LOOP), _greedy(30)))
        list(on)
    assert stream.drafted_tokens == 0
    assert on.drafted_tokens > 0


# -- the distribution ----------------------------------------------------------------------

TOP_K = 3  # every position has 3 outcomes: 27 sequences of 3 tokens
SAMPLES = 2000


@torch.inference_mode()
def _step_probs(ps: PolicySet, mixture: Mixture, ids: list[int]) -> torch.Tensor:
    """The mixture after ``ids`` at temperature 1 and top-k 3, from cache-free forwards [V]."""
    models = [*ps.policies, ps.reference]
    coefs = torch.tensor([mixture.coefficients])  # [1, K + 1]
    k = len(ps.policies)
    lps = torch.stack(
        [
            to_logprobs(m.model(input_ids=torch.tensor([ids])).logits[:, -1], ps.vocab_size)
            for m in models
        ]
    )  # [K + 1, 1, V]
    mixed = mix_logprobs(lps[:k], coefs[:, :k], lps[k], coefs[:, k])[0]  # [V]
    top = mixed.topk(TOP_K)
    probs = torch.zeros_like(mixed)
    probs[top.indices] = top.values.softmax(dim=-1)
    return probs


def _exact(ps: PolicySet, prompt: list[int], mixture: Mixture, steps: int) -> dict[tuple, float]:
    """The probability of every sequence of ``steps`` tokens, by enumeration."""
    out: dict[tuple, float] = {(): 1.0}
    for _ in range(steps):
        nxt = {}
        for seq, p in out.items():
            probs = _step_probs(ps, mixture, prompt + list(seq))
            for token in probs.nonzero().flatten().tolist():
                nxt[(*seq, token)] = p * float(probs[token])
        out = nxt
    return out


def _lookup_friendly(ps: PolicySet, mixture: Mixture, text: str) -> list[int]:
    """A prompt in which prompt lookup drafts after each possible first token: pairs
    (first token, its likeliest successor) are prepended until every first token occurs
    (so drafts are sometimes kept, sometimes not)."""
    prompt = ps.tokenizer.encode(text)
    for _ in range(30):
        pairs = []
        for first in _step_probs(ps, mixture, prompt).nonzero().flatten().tolist():
            if not lookup([*prompt, first], 1):
                pairs += [first, int(_step_probs(ps, mixture, [*prompt, first]).argmax())]
        if not pairs:
            return prompt
        prompt = pairs + prompt
    raise AssertionError("no lookup-friendly prompt found")


def _chi_square(counts: dict[tuple, int], exact: dict[tuple, float], n: int) -> tuple[float, int]:
    """Pearson's statistic, cells with fewer than 5 expected pooled; and its dof."""
    stat, pooled_obs, pooled_exp, cells = 0.0, 0, 0.0, 0
    for seq, p in exact.items():
        if p * n < 5:
            pooled_obs += counts.get(seq, 0)
            pooled_exp += p * n
            continue
        stat += (counts.get(seq, 0) - p * n) ** 2 / (p * n)
        cells += 1
    outside = n - sum(counts.get(seq, 0) for seq in exact)  # sequences the mixture cannot make
    pooled_obs += outside
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        cells += 1
    elif outside:
        stat = float("inf")
    return stat, cells - 1


def _sample(ps: PolicySet, settings: SpeculativeConfig, prompt: list[int], mixture: Mixture):
    counts: dict[tuple, int] = {}
    params = [
        SamplingParams(max_new_tokens=3, temperature=1.0, top_k=TOP_K, seed=s, ignore_eos=True)
        for s in range(SAMPLES)
    ]
    limits = EngineLimits(max_running=64, max_queued=SAMPLES)
    with Engine(ps, limits, speculative=settings) as engine:
        streams = [engine.submit(GenerationRequest(prompt, p, mixture)) for p in params]
        for stream in streams:
            seq = tuple(e.token_id for e in stream)
            counts[seq] = counts.get(seq, 0) + 1
        drafted = sum(s.drafted_tokens for s in streams)
        accepted = sum(s.accepted_tokens for s in streams)
    return counts, drafted, accepted


def _always_accept(probs, draft, greedy, generator):
    """A wrong rule: keep every draft, then draw the bonus."""
    bonus = int(torch.multinomial(probs[len(draft.tokens)], 1, generator=generator))
    return [*draft.tokens, bonus]


class _HalvedUniforms:
    """``torch`` for the acceptance module, except that ``rand`` draws from U(0, 1/2): its
    test ``u * q < p`` becomes ``u * q < 2p``, a rule that keeps drafts too often (the
    correction and the bonus are untouched)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def rand(*args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.rand(*args, **kwargs) / 2


@pytest.fixture(scope="module")
def exact_three(llama_set):
    ps = llama_set
    mixture = Mixture.build(ps.names, [0.6, 0.3, 0.1], 0.7, has_reference=True)
    prompt = _lookup_friendly(ps, mixture, "kept brief, kept brief and friendly, kept brief")
    return prompt, mixture, _exact(ps, prompt, mixture, 3)


FAR_SCALE = 0.05  # the far draft's logits: the reference's, times this (near uniform)


@pytest.fixture(scope="module")
def far_draft(llama_family, tmp_path_factory):
    """A draft model far from the mixture on the mixture's own tokens: the reference with
    its final norm scaled by FAR_SCALE, so its logits are too (the same ranking, a nearly
    uniform distribution over its three likeliest). Its q is often above p, where a rule
    that keeps drafts too often shows."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("far_draft") / "far"
    shutil.copytree(llama_family.parent / "base", folder)
    weights = load_file(folder / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * FAR_SCALE
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return str(folder)


DRAFTS = {
    "off": SpeculativeConfig(method="off"),
    "ngram": SpeculativeConfig(method="ngram", max_draft_tokens=2, max_batch_size=64),
    # the reference drafts (its top 3 mostly outside the strength-0.7 mixture's)
    "draft": SpeculativeConfig(
        method="draft", draft_model="base", max_draft_tokens=2, max_batch_size=64
    ),
    # a draft model far from the mixture (the far_draft fixture's path)
    "far-draft": None,
}


@pytest.fixture(scope="module")
def exact_near_reference(llama_set, exact_three):
    """The same prompt and weights at strength 0.2: a mixture whose three likeliest tokens
    are mostly the reference's, so that the far draft proposes them, with a q unlike p."""
    prompt, _, _ = exact_three
    mixture = Mixture.build(llama_set.names, [0.6, 0.3, 0.1], 0.2, has_reference=True)
    return prompt, mixture, _exact(llama_set, prompt, mixture, 3)


@pytest.mark.parametrize("kind", list(DRAFTS))
def test_sampled_tokens_follow_the_exact_mixture(
    llama_set, exact_three, exact_near_reference, far_draft, kind, monkeypatch
):
    """2000 seeded replies of 3 tokens at temperature 1, top-k 3 (27 possible sequences):
    the counts match the enumerated mixture (chi-square, p > 0.001). With a wrong rule the
    same test fails: one that keeps every draft, for every draft kind, and one that keeps
    a draft when ``u * q < 2p``, for every kind where the two rules can differ: n-gram
    drafts (q = 1) and the far draft model. The far draft decodes a mixture near the
    reference: its proposals are the mixture's likely tokens, at the wrong probabilities.
    (The unscaled reference drafting the strength-0.7 mixture proposes tokens outside the
    mixture's top 3 nearly always, p = 0: both rules reject those alike and keep the rest
    alike, so no count could tell them apart there.)"""
    ps = llama_set
    prompt, mixture, exact = exact_near_reference if kind == "far-draft" else exact_three
    settings = DRAFTS[kind] or SpeculativeConfig(
        method="draft", draft_model=far_draft, max_draft_tokens=2, max_batch_size=64
    )
    assert sum(exact.values()) == pytest.approx(1.0, abs=1e-5)
    counts, drafted, accepted = _sample(ps, settings, prompt, mixture)
    stat, dof = _chi_square(counts, exact, SAMPLES)
    assert stat < chi2.ppf(0.999, dof), (stat, dof)
    if kind == "off":
        return
    assert drafted > SAMPLES // 2 and 0 < accepted < drafted  # the rule really ran
    wrong_rules = [("accept_drafts", _always_accept)]
    if kind != "draft":
        wrong_rules.append(("torch", _HalvedUniforms()))
    for attribute, wrong in wrong_rules:
        with monkeypatch.context() as patch:
            patch.setattr(speculative, attribute, wrong)
            counts, _, _ = _sample(ps, settings, prompt, mixture)
        stat, dof = _chi_square(counts, exact, SAMPLES)
        assert stat > chi2.ppf(0.999, dof), (attribute, stat, dof)


def test_a_seed_reproduces_the_reply_with_speculation(llama_set):
    tok = llama_set.tokenizer
    settings = SpeculativeConfig(method="draft", draft_model="base")
    params = SamplingParams(max_new_tokens=20, temperature=1.0, seed=7, ignore_eos=True)
    replies = []
    with Engine(llama_set, speculative=settings) as engine:
        for _ in range(2):
            request = GenerationRequest(tok.encode(LOOP), dataclasses.replace(params))
            replies.append(engine.generate(request).token_ids)
    assert replies[0] == replies[1] and len(replies[0]) == 20


def test_enumeration_is_a_real_check():
    """The chi-square helper rejects counts off by a third on one cell."""
    exact = {seq: 1 / 9 for seq in itertools.product(range(3), repeat=2)}
    fair = {seq: 100 for seq in exact}
    stat, dof = _chi_square(fair, exact, 900)
    assert stat == pytest.approx(0.0) and dof == 8
    skewed = dict(fair)
    skewed[(0, 0)], skewed[(1, 1)] = 150, 50
    assert _chi_square(skewed, exact, 900)[0] > chi2.ppf(0.999, 8)


def test_grammar_rows_take_plain_steps_while_the_others_speculate(llama_set):
    """A grammar masks one position per step: steps holding a grammar row do not
    speculate, so its replies still validate, and the plain rows keep their greedy text."""
    import json

    import jsonschema

    from mpo_core.decoding.grammar import GrammarSpec

    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["n"],
        "additionalProperties": False,
    }
    tok = llama_set.tokenizer
    greedy = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    prompt = tok.encode(LOOP)
    with Engine(llama_set, EngineLimits(max_running=4), speculative=SETTINGS["ngram"]) as engine:
        first = engine.submit(GenerationRequest(prompt, greedy, engine.mixture()))
        alone = [e.token_id for e in first]
        assert first.drafted_tokens > 0  # alone, this prompt speculates
        grammar = engine.compile_grammar(GrammarSpec("json_schema", json.dumps(schema)))
        constrained = [
            engine.submit(
                GenerationRequest(
                    tok.encode("JSON please"),
                    SamplingParams(max_new_tokens=60, temperature=1.0, seed=seed),
                    engine.mixture(),
                    grammar=grammar,
                )
            )
            for seed in range(3)
        ]
        plain = engine.submit(GenerationRequest(prompt, greedy, engine.mixture()))
        replies = ["".join(e.text for e in stream) for stream in constrained]
        together = list(plain)
    for reply in replies:
        jsonschema.validate(json.loads(reply), schema)
    assert all(stream.drafted_tokens == 0 for stream in constrained)
    assert [e.token_id for e in together] == alone
