"""Persona families: one tiny Llama and K prompts, against K separately prompted
transformers runs (the independent computation), on both kinds of chat template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mpo_core.config import load_config, parse_config
from mpo_core.decoding.sampling import SamplingParams
from mpo_core.engine.core import Engine, EngineLimits, GenerationRequest
from mpo_core.errors import ConfigError
from mpo_core.fitting.driver import FitOptions, run_fit
from mpo_core.models.kvcache import to_logprobs
from mpo_core.models.personas import build_persona_prompts
from mpo_core.models.policies import PolicySet
from mpo_core.models.static_cache import StaticBatch
from mpo_core.runners import PersonaRunner, build_soup, load_policy_set, make_runner
from mpo_core.testing.families import PERSONAS, make_persona_family, make_tokenizer

REQUESTS = ["Could you please help me write a short poem?", "Thank you", "Numbers like 0 1 2"]
MIXTURES: list[tuple[dict[str, float], float]] = [
    ({"cheerful": 1.0}, 1.0),  # one persona: one slot
    ({"brief": 1.0}, 0.0),  # the plain model alone
    ({"thanks": 1.0}, 1.0),  # the raw-prefix persona
    ({"cheerful": 0.3, "brief": 0.7}, 0.6),  # two personas and the plain model
    ({"cheerful": 1, "brief": 1, "thanks": 1}, 1.0),
    ({"brief": 0.5, "thanks": 0.5}, 1.5),  # extrapolation
]


@pytest.fixture(scope="module", params=[False, True], ids=["no-default-system", "default-system"])
def personas(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> PolicySet:
    folder = tmp_path_factory.mktemp("personas")
    return load_policy_set(load_config(make_persona_family(folder, default_system=request.param)))


def chat_ids(ps: PolicySet, messages: list[dict[str, str]]) -> list[int]:
    text = ps.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(ps.tokenizer.encode(text, add_special_tokens=False))


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def persona_prompt(ps: PolicySet, name: str, request: str) -> list[int]:
    """What the independent run feeds persona ``name``: the template with its system
    message, or the raw prefix's ids before the chat prompt."""
    if name == ps.reference_name:
        return chat_ids(ps, user(request))
    spec = PERSONAS[name]
    if "system" in spec:
        return chat_ids(ps, [{"role": "system", "content": spec["system"]}, *user(request)])
    prefix = ps.tokenizer.encode(spec["prefix"], add_special_tokens=False)
    return [*prefix, *chat_ids(ps, user(request))]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True, top_logprobs=3)


@torch.inference_mode()
def independent_greedy(
    ps: PolicySet, request: str, coefs: tuple[float, ...], steps: int
) -> tuple[list[int], list[float], list[dict[str, float]]]:
    """Greedy decoding of the mixture from K + 1 separately prompted full forwards."""
    model = ps.reference.model  # type: ignore[union-attr]
    names = [*ps.names, ps.reference_name]
    prompts = [persona_prompt(ps, name, request) for name in names]
    tokens: list[int] = []
    logprobs, per_model = [], []
    for _ in range(steps):
        mixed = torch.zeros(ps.vocab_size, dtype=torch.float64)
        rows = {}
        for name, prompt, coef in zip(names, prompts, coefs):
            if coef == 0:
                continue
            logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0, -1]
            row = to_logprobs(logits[None], ps.vocab_size)[0].double()  # [V]
            rows[name] = row
            mixed += coef * row
        mixed = mixed.log_softmax(-1)
        token = int(mixed.argmax())
        tokens.append(token)
        logprobs.append(float(mixed[token]))
        per_model.append({name: float(row[token]) for name, row in rows.items()})
    return tokens, logprobs, per_model


def test_each_persona_prompt_is_its_template_rendering(personas: PolicySet) -> None:
    prompts = personas.personas
    assert prompts is not None
    for request in REQUESTS:
        plain = chat_ids(personas, user(request))
        for m, name in enumerate(prompts.names):
            assert prompts.render(m, plain) == persona_prompt(personas, name, request), name
    # The user's own system message: the plain model keeps it, a persona goes before it.
    own = [{"role": "system", "content": "Numbers only."}, *user("Thank you")]
    ids = chat_ids(personas, own)
    assert prompts.render(prompts.models - 1, ids) == ids
    cheerful = chat_ids(personas, [{"role": "system", "content": PERSONAS["cheerful"]["system"]}])
    assert prompts.render(0, ids)[: len(prompts.prefix[0])] == prompts.prefix[0]
    assert prompts.render(0, ids)[len(prompts.prefix[0]) :] == ids
    assert cheerful[: len(prompts.prefix[0])] == prompts.prefix[0]


def test_one_batch_over_one_copy_of_the_weights(personas: PolicySet) -> None:
    models = {id(p.model) for p in [*personas.policies, personas.reference]}
    assert len(models) == 1  # no weight copy
    runner, _ = make_runner(personas, max_rows=4, max_context=personas.max_context)
    assert isinstance(runner, PersonaRunner)


def test_one_hot_greedy_equals_prompted_generate(personas: PolicySet) -> None:
    """Each persona alone (and the plain model, strength 0) decodes what transformers'
    generate decodes from that persona's prompt."""
    model = personas.reference.model  # type: ignore[union-attr]
    with Engine(personas) as engine:
        for name in [*personas.names, personas.reference_name]:
            for request in REQUESTS[:2]:
                ids = persona_prompt(personas, name, request)
                expected = model.generate(
                    input_ids=torch.tensor([ids]),
                    max_new_tokens=10,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=personas.tokenizer.pad_token_id,
                    suppress_tokens=list(range(personas.vocab_size, model.config.vocab_size)),
                )[0, len(ids) :].tolist()
                mixture = (
                    engine.mixture(None, 0.0)
                    if name == personas.reference_name
                    else engine.mixture({name: 1.0})
                )
                plain = chat_ids(personas, user(request))
                got = engine.generate(GenerationRequest(plain, greedy(10), mixture))
                assert got.token_ids == expected, (name, request)


def _submit_all(engine: Engine, ps: PolicySet, steps: int) -> list[list[Any]]:
    """Every mixture, each joining once the one before it has produced two tokens."""
    iterators, heads = [], []
    for i, (weights, strength) in enumerate(MIXTURES):
        ids = chat_ids(ps, user(REQUESTS[i % len(REQUESTS)]))
        stream = engine.submit(
            GenerationRequest(ids, greedy(steps), engine.mixture(weights, strength))
        )
        iterator = iter(stream)
        heads.append([next(iterator), next(iterator)])
        iterators.append(iterator)
    return [head + list(it) for head, it in zip(heads, iterators)]


def _assert_matches_independent(
    ps: PolicySet, engine: Engine, got: list[list[Any]], steps: int
) -> None:
    for i, events in enumerate(got):
        weights, strength = MIXTURES[i]
        coefs = engine.mixture(weights, strength).coefficients
        tokens, logprobs, per_model = independent_greedy(
            ps, REQUESTS[i % len(REQUESTS)], coefs, steps
        )
        assert [e.token_id for e in events] == tokens, MIXTURES[i]
        for event, logprob, models in zip(events, logprobs, per_model):
            assert event.logprob == pytest.approx(logprob, abs=1e-5)
            for name, value in models.items():
                if name in event.policy_logprobs:
                    assert event.policy_logprobs[name] == pytest.approx(value, abs=1e-5)
        for name, value in events[0].policy_logprobs.items():  # coefficient 0: not run
            assert (value is None) == (name not in per_model[0])


def test_mixtures_equal_independently_prompted_runs_with_joins(personas: PolicySet) -> None:
    """Mixing and strength over personas joining a running batch: tokens equal, every
    per-token log-prob (the mixture's and each persona's) within 1e-5."""
    with Engine(personas, EngineLimits(max_running=8)) as engine:
        got = _submit_all(engine, personas, steps=8)
        runner = engine.runner
    _assert_matches_independent(personas, engine, got, steps=8)
    assert isinstance(runner, PersonaRunner) and runner.prefixes is not None
    # Each opening's KV was computed once, however many requests used it.
    openings = {tuple(o) for o in runner.prompts.cached if o}
    assert runner.prefixes.computed == len(openings)


def test_static_cache_prefills_whole_prompts_and_agrees(personas: PolicySet) -> None:
    raw = personas.config.model_dump()
    raw["static_cache"] = "on"
    static = load_policy_set(parse_config(raw))
    with Engine(static, EngineLimits(max_running=8)) as engine:
        runner = engine.runner
        assert isinstance(runner, PersonaRunner) and isinstance(runner.batch, StaticBatch)
        assert runner.prefixes is None  # no reuse: the static batch prefills itself
        assert runner.max_context == runner.batch.max_len - static.personas.longest_extra  # type: ignore[union-attr]
        got = _submit_all(engine, static, steps=6)
    _assert_matches_independent(static, engine, got, steps=6)


@torch.inference_mode()
def test_score_teacher_forces_each_persona_prompt(personas: PolicySet) -> None:
    model = personas.reference.model  # type: ignore[union-attr]
    prompts = [chat_ids(personas, user(r)) for r in REQUESTS]
    completions = [[40, 41, 42], [7], [100, 3, 9, 12]]
    runner, _ = make_runner(personas, max_rows=4, max_context=personas.max_context)
    result = runner.score(prompts, completions, chunk_tokens=64)
    names = [*personas.names, personas.reference_name]
    for i, (request, completion) in enumerate(zip(REQUESTS, completions)):
        for m, name in enumerate(names):
            prompt = persona_prompt(personas, name, request)
            logits = model(input_ids=torch.tensor([prompt + completion])).logits[0]
            lp = to_logprobs(logits, personas.vocab_size)  # [L, V]
            want = sum(float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(completion))
            got = (
                result.policy_logprobs[i, m]
                if m < len(personas.names)
                else result.reference_logprobs[i]
            )  # type: ignore[index]
            assert float(got) == pytest.approx(want, abs=1e-4), (name, i)


def test_fit_on_personas_uses_the_persona_scores(personas: PolicySet) -> None:
    options = FitOptions(samples_per_prompt=3, max_new_tokens=4, iterations=60, seed=7)
    with Engine(personas) as engine:
        result = run_fit(engine, REQUESTS, options)
    assert set(result.weights) == set(personas.names)
    assert result.weights != {n: 1 / 3 for n in personas.names}  # the prompts' effect moved it


def test_the_soup_of_a_persona_family_is_the_model_itself(personas: PolicySet) -> None:
    assert build_soup(personas, [0.2, 0.3, 0.5]) is personas.reference.model  # type: ignore[union-attr]


# -- config --------------------------------------------------------------------------


def _yaml(folder: Path, data: dict[str, Any]) -> Path:
    path = folder / "family.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("policies", "message"),
    [
        ([{"name": "a", "persona": "base"}], "exactly one of `system:`"),
        ([{"name": "a", "persona": "base", "system": "x", "prefix": "y"}], "exactly one of"),
        ([{"name": "a", "persona": "other", "system": "x"}], "every persona names it"),
        (
            [{"name": "a", "persona": "base", "system": "x"}, {"name": "b", "model": "base"}],
            "not personas",
        ),
    ],
)
def test_persona_config_errors(policies: list[dict[str, Any]], message: str) -> None:
    data = {"reference": {"name": "base", "model": "base"}, "policies": policies}
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_persona_without_its_model_is_an_error() -> None:
    with pytest.raises(ConfigError, match="needs the model it conditions"):
        parse_config({"policies": [{"name": "a", "persona": "base", "system": "x"}]})


def test_system_persona_needs_a_chat_template() -> None:
    tokenizer = make_tokenizer()
    tokenizer.chat_template = None
    specs = parse_config(
        {
            "reference": {"name": "base", "model": "base"},
            "policies": [{"name": "a", "persona": "base", "system": "Be kind."}],
        }
    ).persona_policies
    with pytest.raises(ConfigError, match="persona 'a'.*needs a tokenizer with a chat template"):
        build_persona_prompts(tokenizer, specs, "base")
    # A template whose system block is not an opening the rest follows is refused too.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
        "{% endif %}{% endfor %}{% for m in messages %}{% if m['role'] == 'system' %}"
        "<|system|>{{ m['content'] }}{% endif %}{% endfor %}<|assistant|>"
    )
    with pytest.raises(ConfigError, match="does not render the system message as an opening"):
        build_persona_prompts(tokenizer, specs, "base")


def test_a_persona_family_can_be_given_with_base(tmp_path: Path) -> None:
    path = make_persona_family(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["base"] = data.pop("reference")
    ps = load_policy_set(load_config(_yaml(tmp_path, data)))
    assert ps.personas is not None and ps.reference_name == "base"


def test_the_kv_budget_counts_one_batch_of_slots(personas: PolicySet) -> None:
    from mpo_core.models.kv_budget import kv_budget_for
    from mpo_core.runners import capabilities_of

    shared = capabilities_of(personas).shared_forward
    budget = kv_budget_for(personas, 1 << 30, 0.5, growing=True, shared_forward=shared)
    assert shared and budget.groups == [[0, 1, 2, 3]]  # one padded batch over the shared model


def test_mpo_eval_on_a_persona_family(tmp_path: Path) -> None:
    """`mpo eval` decodes every persona, and the soup row is the plain model: it decodes
    what the reference row decodes (the same seeds) and has no KL to it."""
    import json

    from server.cli import main

    family = make_persona_family(tmp_path / "family", default_system=True)
    (tmp_path / "prompts.txt").write_text("Hello there\nWhy?\n")
    rewards = (
        "objectives:\n  cheerful: {builtin: vader.compound}\n  brief: {builtin: text.brevity}\n"
    )
    (tmp_path / "rewards.yaml").write_text(rewards)
    argv = ["eval", "--config", str(family), "--prompts", str(tmp_path / "prompts.txt")]
    argv += ["--rewards", str(tmp_path / "rewards.yaml"), "--rows", "single,soup,reference"]
    argv += ["--samples", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "out")]
    argv += ["--threads", "1", "--bootstrap", "20", "--pareto", "none"]
    assert main(argv) == 0
    rows = {r["label"]: r for r in json.loads((tmp_path / "out" / "eval.json").read_text())["rows"]}
    assert set(rows) == {
        "policy:cheerful",
        "policy:brief",
        "policy:thanks",
        "soup@uniform",
        "reference",
    }
    assert rows["soup@uniform"]["examples"] == rows["reference"]["examples"]
    assert abs(rows["soup@uniform"]["kl"]["mean"]) < 1e-4
    assert rows["policy:cheerful"]["kl"]["mean"] > 0.01  # the prompt moved the model


def test_a_three_slot_decode_runs_with_one_filler_row(personas: PolicySet) -> None:
    """With padding set, three slots decode as four rows (bench/personas.py times it); the
    filler leaves when the slots change, and the rows' results do not move."""
    from mpo_core.runners.personas import FILLER, PAD_ROWS

    runner, _ = make_runner(personas, max_rows=4, max_context=personas.max_context)
    assert isinstance(runner, PersonaRunner) and runner.pad_rows == {}  # off by default
    runner.pad_rows = dict(PAD_ROWS)

    class Row:
        def __init__(self, sid: int, coefs: tuple[float, ...]) -> None:
            self.sid, self.coefs = sid, coefs
            self.token_ids = chat_ids(personas, user(REQUESTS[sid]))

    three = Row(0, (0.3, 0.3, 0.0, 0.4))  # two personas and the plain model
    runner.step([], [three])
    three.token_ids.append(9)
    padded = runner.step([three], []).logprobs[:, 0]  # [M, V]
    assert runner.batch.row_ids.count(FILLER) == 1 and len(runner.batch) == 4
    alone, _ = make_runner(personas, max_rows=4, max_context=personas.max_context)
    assert isinstance(alone, PersonaRunner)
    alone.pad_rows = {}
    alone.step([], [Row(0, three.coefs)])
    want = alone.step([three], []).logprobs[:, 0]
    for m in (0, 1, 3):
        assert torch.allclose(padded[m], want[m], atol=1e-5)
    one = Row(1, (1.0, 0.0, 0.0, 0.0))
    runner.step([three], [one])
    runner.step([three, one], [])  # four slots: no filler
    assert FILLER not in runner.batch.row_ids and len(runner.batch) == 4
    runner.keep(set())
    assert len(runner.batch) == 0


def test_a_packed_persona_family_mixes_as_the_plain_weights_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``cpu_linear: onednn`` a persona family's one model runs on weights packed for
    oneDNN (``mpo_core.cpu_linear``): its mixtures equal the independent runs of the same weights
    left dense, tokens and log-probs."""
    from mpo_core.models import cpu_linear

    if not cpu_linear.onednn_linear_available():
        pytest.skip("this torch build has no oneDNN linear")
    monkeypatch.setattr(cpu_linear, "MIN_WEIGHT_ELEMENTS", 1)  # the tiny model's layers too
    path = make_persona_family(tmp_path)
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "cpu_linear": "onednn"}))
    packed = load_policy_set(load_config(path))
    assert cpu_linear.packed_layers(packed.reference.model) > 0
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "cpu_linear": "torch"}))
    plain = load_policy_set(load_config(path))
    assert not cpu_linear.uses_onednn(plain.reference.model)
    with Engine(packed, EngineLimits(max_running=8)) as engine:
        got = _submit_all(engine, packed, steps=8)
    _assert_matches_independent(plain, engine, got, steps=8)
