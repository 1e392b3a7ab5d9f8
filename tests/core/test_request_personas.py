"""Personas a request brings (issue 34.2): on a persona family a request persona with a
configured persona's prompt decodes exactly as that configured persona does (greedy tokens
equal, every log-prob within 1e-5), alone, mixed, signed and under strength, beside rows
without personas; its opening is computed once per distinct prompt; bad input names its
parameter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mpo_core.config import SpeculativeConfig, load_config, parse_config
from mpo_core.decoding.mixing import Mixture, mix_logprobs, mix_step
from mpo_core.decoding.sampling import SamplingParams
from mpo_core.engine.core import Engine, EngineLimits, GenerationRequest
from mpo_core.errors import InvalidParameter
from mpo_core.models.kv_budget import KVBudget
from mpo_core.models.policies import PolicySet
from mpo_core.runners import PersonaRunner, load_policy_set, make_runner
from mpo_core.testing.families import PERSONAS, make_persona_family, make_tiny_family
from mpo_core.testing.gguf import make_gguf_persona_family

BRIEF = PERSONAS["brief"]["system"]
THANKS = PERSONAS["thanks"]["prefix"]
# (the request's weights, strength, personas) and the configured mixture it must equal
PAIRS: list[tuple[dict[str, float], float, dict[str, Any], dict[str, float]]] = [
    ({"teacher": 1.0}, 1.0, {"teacher": BRIEF}, {"brief": 1.0}),
    ({"cheerful": 0.3, "teacher": 0.7}, 0.6, {"teacher": BRIEF}, {"cheerful": 0.3, "brief": 0.7}),
    ({"grateful": 1.0}, 1.0, {"grateful": {"prefix": THANKS}}, {"thanks": 1.0}),
    (
        {"teacher": 0.5, "grateful": 0.5},
        1.5,
        {"teacher": {"system": BRIEF}, "grateful": {"prefix": THANKS}},
        {"brief": 0.5, "thanks": 0.5},
    ),
    ({"cheerful": 1.5, "teacher": -0.5}, 1.0, {"teacher": BRIEF}, {"cheerful": 1.5, "brief": -0.5}),
]
TWINS = {"teacher": "brief", "grateful": "thanks"}
REQUESTS = ["Could you please help me write a short poem?", "Thank you"]


@pytest.fixture(scope="module", params=[False, True], ids=["no-default-system", "default-system"])
def personas(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> PolicySet:
    folder = tmp_path_factory.mktemp("request-personas")
    return load_policy_set(load_config(make_persona_family(folder, default_system=request.param)))


@pytest.fixture(scope="module")
def gguf_personas(tmp_path_factory: pytest.TempPathFactory) -> PolicySet:
    pytest.importorskip("llama_cpp", reason="the llama.cpp backend needs the `llama` extra")
    folder = tmp_path_factory.mktemp("request-personas-gguf")
    return load_policy_set(load_config(make_gguf_persona_family(folder)))


def chat_ids(ps: PolicySet, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    template = ps.tokenizer.apply_chat_template
    rendered = template(messages, tokenize=False, add_generation_prompt=True)
    return list(ps.tokenizer.encode(rendered, add_special_tokens=False))


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True, top_logprobs=2)


def _collect(engine: Engine, requests: list[GenerationRequest]) -> list[list[Any]]:
    """Submit every request, each once the one before it has produced a token (joins
    mid-batch), and read every stream to its end."""
    iterators, heads = [], []
    for request in requests:
        iterator = iter(engine.submit(request))
        heads.append([next(iterator)])
        iterators.append(iterator)
    return [head + list(it) for head, it in zip(heads, iterators)]


def test_request_persona_equals_configured_persona(personas: PolicySet) -> None:
    """Each pair decodes in one engine, the request's rows beside the configured rows:
    the same tokens, the mixture's log-probs and the twin persona's within 1e-5."""
    _assert_pairs_agree(personas, 1e-5)


def test_request_persona_on_llama_cpp_equals_configured(gguf_personas: PolicySet) -> None:
    """The same on the llama.cpp backend (one context: the request's personas are more
    sequences, each opening run once); llama.cpp's numerics depend on how a batch is
    composed, so log-probs agree within test_llama_cpp.py's 1e-3."""
    _assert_pairs_agree(gguf_personas, 1e-3)
    with Engine(gguf_personas) as engine:
        own = {"pirate": "Talk like a pirate."}
        mixture = engine.mixture({"pirate": 1.0}, personas=own)
        ids = chat_ids(gguf_personas, REQUESTS[0])
        first = engine.generate(GenerationRequest(ids, greedy(3), mixture))
        again = engine.generate(GenerationRequest(ids, greedy(3), mixture))
        stats = engine.own_personas.cache_stats()
        echoed = engine.prompt_logprobs(ids, mixture).result(timeout=60)
    assert first.token_ids == again.token_ids
    assert stats is not None and stats["opening_misses"] == 1 and stats["opening_hits"] >= 1
    assert any(lp is not None for lp in echoed.logprobs)


def _assert_pairs_agree(personas: PolicySet, tolerance: float) -> None:
    steps = 8
    with Engine(personas, EngineLimits(max_running=16)) as engine:
        requests = []
        for i, (weights, strength, own, configured) in enumerate(PAIRS):
            ids = chat_ids(personas, REQUESTS[i % len(REQUESTS)])
            brought = engine.mixture(weights, strength, personas=own)
            twin = engine.mixture(configured, strength)
            requests += [
                GenerationRequest(ids, greedy(steps), brought),
                GenerationRequest(ids, greedy(steps), twin),
            ]
        got = _collect(engine, requests)
    for i in range(len(PAIRS)):
        mine, theirs = got[2 * i], got[2 * i + 1]
        assert [e.token_id for e in mine] == [e.token_id for e in theirs], PAIRS[i]
        assert len(mine) == steps
        for a, b in zip(mine, theirs):
            assert a.logprob == pytest.approx(b.logprob, abs=tolerance)
            brought = PAIRS[i][2]
            replaced = {TWINS[n] for n in brought}  # the configured twins: not run here
            for name, value in a.policy_logprobs.items():
                if name in replaced:
                    continue
                twin_value = b.policy_logprobs[TWINS.get(name, name)]
                if value is None:
                    assert twin_value is None, name
                else:
                    assert twin_value == pytest.approx(value, abs=tolerance), name
        assert set(PAIRS[i][2]) <= set(mine[0].policy_logprobs)  # each persona reported


def test_request_persona_prompt_logprobs_equal_configured(personas: PolicySet) -> None:
    ids = chat_ids(personas, REQUESTS[0])
    with Engine(personas) as engine:
        for weights, strength, own, configured in PAIRS:
            brought = engine.prompt_logprobs(
                ids, engine.mixture(weights, strength, personas=own)
            ).result(timeout=60)
            twin = engine.prompt_logprobs(ids, engine.mixture(configured, strength)).result(60)
            assert [lp is None for lp in brought.logprobs] == [lp is None for lp in twin.logprobs]
            for a, b in zip(brought.logprobs, twin.logprobs):
                if a is not None and b is not None:
                    assert a == pytest.approx(b, abs=1e-5)


def test_opening_computed_once_per_distinct_prompt(personas: PolicySet) -> None:
    """A persona's opening runs once and is reused by later requests (cache hits); its
    prompt rule is computed once per distinct text."""
    ids = chat_ids(personas, REQUESTS[1])
    with Engine(personas) as engine:
        runner = engine.runner
        assert isinstance(runner, PersonaRunner) and runner.prefixes is not None
        before = runner.prefixes.stats()
        computed = runner.prefixes.computed
        mixture = engine.mixture({"pirate": 1.0}, personas={"pirate": "Talk like a pirate."})
        first = engine.generate(GenerationRequest(ids, greedy(4), mixture))
        again = engine.generate(GenerationRequest(ids, greedy(4), mixture))
        after = runner.prefixes.stats()
        rules = engine.own_personas.rules
        described = runner.describe()["request_persona_openings"]
    assert first.token_ids == again.token_ids
    assert after["misses"] - before["misses"] == 1
    assert after["hits"] - before["hits"] == 1
    assert runner.prefixes.computed == computed + 1
    assert described == after
    assert rules is not None and rules.misses >= 1 and rules.hits >= 1


def test_rows_without_personas_keep_the_fixed_width(personas: PolicySet) -> None:
    """A step whose rows bring no persona returns [K + 1, B, V]; one that does, K + 1 + R."""
    with Engine(personas) as engine:
        plain = engine.mixture({"brief": 1.0})
        brought = engine.mixture(
            {"teacher": 1.0, "grateful": 1.0},
            personas={"teacher": BRIEF, "grateful": {"prefix": THANKS}},
        )
    k1 = len(personas.names) + 1
    assert len(plain.coefficients) == k1
    assert len(brought.coefficients) == k1 + 2
    runner = PersonaRunner(personas, max_rows=2)
    ids = chat_ids(personas, REQUESTS[1])

    class Row:
        def __init__(self, sid: int, mixture: Mixture, personas: tuple[Any, ...]) -> None:
            self.sid, self.token_ids, self.mixture = sid, list(ids), mixture
            self.coefs, self.request_personas = mixture.coefficients, personas

    assert runner.step([], [Row(0, plain, ())]).logprobs.shape[0] == k1
    rules = Engine(personas).own_personas.rules
    assert rules is not None
    own = tuple(rules.of(p) for p in brought.request_personas)
    assert runner.step([Row(0, plain, ())], [Row(1, brought, own)]).logprobs.shape[0] == k1 + 2


def test_mix_step_with_personas_equals_the_formula() -> None:
    """Rows of one step with 0, 1 and 2 personas: each mixed from its own coefficients."""
    torch.manual_seed(0)
    names = ["a", "b"]
    logprobs = torch.randn(5, 3, 1, 7).log_softmax(-1)  # [M = K + 1 + 2, B, G, V]
    mixtures = [
        Mixture.build(names, {"a": 1, "b": 1}, 0.5, has_reference=True),
        Mixture.build(
            names, {"a": 1, "p": 2}, 1.0, has_reference=True, personas={"p": "x"}, persona_limit=4
        ),
        Mixture.build(
            names,
            {"b": 1, "p": 1, "q": -0.5},
            0.8,
            has_reference=True,
            personas={"p": "x", "q": {"prefix": "y"}},
            persona_limit=4,
            plausibility=0.0,
        ),
    ]
    mixed = mix_step(logprobs, mixtures, has_reference=True)  # [B, 1, V]
    for b, mixture in enumerate(mixtures):
        coefs = mixture.coefficients
        scores = sum(c * logprobs[m, b, 0] for m, c in enumerate(coefs) if c != 0)
        assert torch.allclose(mixed[b, 0], torch.log_softmax(scores, -1), atol=1e-6)
    # The plausibility constraint counts a persona's negative term.
    signed = Mixture.build(
        names, {"a": 1, "p": -0.5}, 1.0, has_reference=True, personas={"p": "x"}, persona_limit=1
    )
    assert signed.alpha == signed.plausibility > 0
    coef = torch.tensor([signed.coefficients[:2] + signed.coefficients[3:]])  # [1, 3]
    policies = logprobs[[0, 1, 3], :1, 0]  # [3, 1, V]
    expected = mix_logprobs(policies, coef, alpha=torch.tensor([signed.plausibility]))
    got = mix_step(logprobs[:4, :1], [signed], has_reference=True)[:, 0]
    assert torch.allclose(got, expected, atol=1e-6)


def test_kv_budget_counts_a_persona_slot() -> None:
    budget = KVBudget(10**9, [100, 100, 100], [[0, 1, 2]], growing=True)
    plain = budget.worst_case([((1.0, 0.0, 0.0), 10)])
    one_more = budget.worst_case([((1.0, 0.0, 0.0, 0.5), 10)])
    assert one_more == 2 * plain
    separate = KVBudget(10**9, [100, 100, 100], [[0], [1], [2]], growing=True)
    assert separate.worst_case([((1.0, 0.0, 0.0), 10)]) > 0


@pytest.mark.parametrize(
    "given, param",
    [
        ({f"p{i}": "x" for i in range(5)}, "personas"),  # more than the limit (4)
        ({"brief": "x"}, "personas.brief"),  # a configured persona's name
        ({"base": "x"}, "personas.base"),  # the plain model's name
        ({"bad name": "x"}, "personas"),  # the name rule
        ({"t": {"system": "a", "prefix": "b"}}, "personas.t"),  # both texts
        ({"t": {"voice": "a"}}, "personas.t"),
        ({"t": ""}, "personas.t.system"),
        ({"t": {"prefix": 3}}, "personas.t.prefix"),
        (["teacher"], "personas"),
    ],
)
def test_bad_personas_name_the_parameter(personas: PolicySet, given: Any, param: str) -> None:
    with Engine(personas) as engine, pytest.raises(InvalidParameter) as caught:
        engine.mixture({"brief": 1.0}, personas=given)
    assert caught.value.param == param


def test_limit_is_a_setting_and_weights_name_personas(personas: PolicySet) -> None:
    with Engine(personas, EngineLimits(max_request_personas=1)) as engine:
        with pytest.raises(InvalidParameter) as caught:
            engine.mixture(None, personas={"a": "x", "b": "y"})
        assert caught.value.param == "personas"
        with pytest.raises(InvalidParameter) as unknown:
            engine.mixture({"teacher": 1.0}, personas={"other": "x"})
        assert unknown.value.param == "weights.teacher"
        uniform = engine.mixture(None, personas={"a": "x"})
    assert uniform.names[-1] == "a" and len(set(uniform.weights)) == 1


def test_a_family_without_personas_refuses_them(tmp_path: Path) -> None:
    family = load_policy_set(load_config(make_tiny_family(tmp_path)))
    with Engine(family) as engine:
        assert engine.own_personas.rules is None
        with pytest.raises(InvalidParameter) as caught:
            engine.mixture(None, personas={"teacher": "x"})
        assert caught.value.param == "personas"
        # A mixture built elsewhere with personas is refused when it is submitted.
        names = engine.policy_names
        foreign = Mixture.build(
            names, None, 1.0, has_reference=True, personas={"t": "x"}, persona_limit=4
        )
        with pytest.raises(InvalidParameter) as submitted:
            engine.submit(GenerationRequest([1, 2, 3], greedy(2), foreign))
        assert submitted.value.param == "personas"


def test_a_long_opening_takes_its_excess_from_the_context(personas: PolicySet) -> None:
    """The context limit leaves room for the family's longest opening; a request persona's
    longer one takes the rest from the request's prompt + new tokens."""
    long_text = " ".join(["Answer every question as a patient, kind teacher would."] * 3)
    with Engine(personas) as engine:
        mixture = engine.mixture({"teacher": 1.0}, personas={"teacher": long_text})
        beyond = engine.own_personas.opening_tokens(mixture)
        assert engine.own_personas.rules is not None
        opening = engine.own_personas.rules.of(mixture.request_personas[0]).prefix
        assert beyond == len(opening) - engine.own_personas.rules.room > 0
        assert engine.own_personas.opening_tokens(engine.mixture({"brief": 1.0})) == 0
        ids = chat_ids(personas, REQUESTS[1])
        room = engine.max_context - len(ids)
        with pytest.raises(InvalidParameter) as caught:
            engine.submit(GenerationRequest(ids, greedy(room), mixture))
        assert caught.value.param == "max_new_tokens"
        done = engine.generate(GenerationRequest(ids, greedy(2), mixture))
    assert len(done.token_ids) == 2


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_request_personas_agree_with_speculation_on_and_off(
    personas: PolicySet, method: str
) -> None:
    """Drafts verified over a request persona's slots (G > 1 columns, rolled back) give
    the greedy reply of plain steps."""
    ids = chat_ids(personas, "Numbers like 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9")
    replies: dict[str, list[list[int]]] = {}
    drafted = 0
    for name, settings in (
        ("off", SpeculativeConfig(method="off")),
        ("on", SpeculativeConfig(method=method, max_draft_tokens=4)),  # type: ignore[arg-type]
    ):
        with Engine(personas, speculative=settings) as engine:
            replies[name] = []
            for weights, strength, own, _ in PAIRS:
                mixture = engine.mixture(weights, strength, personas=own)
                stream = engine.submit(GenerationRequest(ids, greedy(12), mixture))
                replies[name].append([e.token_id for e in stream])
                drafted += stream.drafted_tokens if name == "on" else 0
    assert replies["on"] == replies["off"]
    assert drafted > 0  # the verify path ran


def test_llama_cpp_runs_request_personas_only_where_their_sequences_fit(
    gguf_personas: PolicySet,
) -> None:
    """A context holds at most 256 sequences: with 40 rows of K + 1 = 4 slots, 4 more a
    row do not fit, and the runner says it runs no request personas (a 400 naming
    personas) rather than fail a step; with 16 rows they fit."""
    few = make_runner(gguf_personas, max_rows=16, max_context=64, request_personas=4)[0]
    many = make_runner(gguf_personas, max_rows=40, max_context=64, request_personas=4)[0]
    assert few.capabilities.request_personas
    assert not many.capabilities.request_personas
    engine = Engine(gguf_personas, EngineLimits(max_running=40))
    with engine, pytest.raises(InvalidParameter) as caught:
        engine.mixture(None, personas={"teacher": BRIEF})
    assert caught.value.param == "personas"


def test_request_personas_prefilled_in_chunks_equal_whole_prefills(personas: PolicySet) -> None:
    """A request persona's slot prefilled over several steps (chunks of 4 prompt tokens)
    decodes what a whole prefill decodes."""
    _assert_chunks_agree(personas, 1e-5)


def test_request_personas_prefilled_in_chunks_on_llama_cpp(gguf_personas: PolicySet) -> None:
    _assert_chunks_agree(gguf_personas, 1e-3)


def _assert_chunks_agree(ps: PolicySet, tolerance: float) -> None:
    weights, strength, own, _ = PAIRS[1]
    ids = chat_ids(ps, REQUESTS[0])
    got, chunked = {}, []
    for chunk in (0, 4):
        with Engine(ps, EngineLimits(max_running=4, prefill_chunk_tokens=chunk)) as engine:
            runner: Any = engine.runner
            original = runner.prefill_chunk

            def spy(rows: Any, ends: Any, original: Any = original) -> None:
                chunked.extend(ends)
                original(rows, ends)

            runner.prefill_chunk = spy
            mixture = engine.mixture(weights, strength, personas=own)
            got[chunk] = list(engine.submit(GenerationRequest(ids, greedy(6), mixture)))
    assert chunked  # the chunked run did prefill in parts
    assert [e.token_id for e in got[4]] == [e.token_id for e in got[0]]
    for a, b in zip(got[4], got[0]):
        assert a.logprob == pytest.approx(b.logprob, abs=tolerance)
        assert a.policy_logprobs["teacher"] == pytest.approx(
            b.policy_logprobs["teacher"], abs=tolerance
        )


def test_static_caches_run_no_request_personas(personas: PolicySet) -> None:
    """A static batch has a slot per (row, model of the family) and no more: the runner
    runs no request personas there, and a request bringing them gets the 400."""
    raw = personas.config.model_dump()
    raw["static_cache"] = "on"
    static = load_policy_set(parse_config(raw))
    engine = Engine(static, EngineLimits(max_running=2))
    assert not engine.runner.capabilities.request_personas
    with engine, pytest.raises(InvalidParameter) as caught:
        engine.mixture({"teacher": 1.0}, personas={"teacher": BRIEF})
    assert caught.value.param == "personas"
