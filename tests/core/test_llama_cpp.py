"""The llama.cpp backend (mpo_core/runners/llama_cpp.py) on tiny random GGUF files, against
an independent computation through llama-cpp-python's own ``Llama`` (testing/llama.py):
the served tokens and per-token log-probs of blends (personas of one file, K full files),
greedy replies with speculation on and off, each persona's opening run once, which backend
``backend:`` picks, and the one-line error without llama-cpp-python. The contract suite
(test_backends.py) runs the runner's own checks on the same two families.

Tolerance: the runner decodes many sequences in one ``llama_decode`` and the independent
run decodes one sequence alone; llama.cpp's numerics depend on how a batch is composed
(the kernels it picks, the KV cells' layout), so log-probs agree to about 1e-5 here, not
bit for bit, and are compared within 1e-3 (the issue's bound).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mpo_core.config import SpeculativeConfig, load_config, parse_config
from mpo_core.decoding.sampling import SamplingParams
from mpo_core.engine.core import Engine, EngineLimits, GenerationRequest
from mpo_core.errors import ConfigError
from mpo_core.models.policies import PolicySet
from mpo_core.runners import LlamaCppRunner, llama_context, load_policy_set, make_runner
from mpo_core.testing.gguf import make_gguf_family, make_gguf_persona_family, write_tiny_gguf
from mpo_core.testing.llama import LlamaDirect, LlamaRows

pytest.importorskip("llama_cpp", reason="the llama.cpp backend needs the `llama` extra")

TOLERANCE = 1e-3  # see the module's docstring
REQUESTS = ["Could you please help me write a short poem?", "Thank you", "Numbers like 0 1 2"]


@pytest.fixture(scope="module")
def gguf_personas(tmp_path_factory: pytest.TempPathFactory) -> PolicySet:
    return load_policy_set(load_config(make_gguf_persona_family(tmp_path_factory.mktemp("gp"))))


@pytest.fixture(scope="module")
def gguf_full(tmp_path_factory: pytest.TempPathFactory) -> PolicySet:
    return load_policy_set(load_config(make_gguf_family(tmp_path_factory.mktemp("gf"))))


def chat(ps: PolicySet, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    rendered = ps.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    return list(ps.tokenizer.encode(rendered, add_special_tokens=False))


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True, top_logprobs=3)


def independent_greedy(
    ps: PolicySet, direct: LlamaDirect, prompt: list[int], coefs: tuple[float, ...], steps: int
) -> tuple[list[int], list[float], list[dict[str, float]]]:
    """Greedy decoding of the blend from each member's own llama-cpp-python run."""
    names = [*ps.names, ps.reference_name]
    tokens: list[int] = []
    logprobs, per_model = [], []
    for _ in range(steps):
        mixed = torch.zeros(ps.vocab_size, dtype=torch.float64)
        rows = {}
        for m, (name, coef) in enumerate(zip(names, coefs)):
            if coef == 0:
                continue
            ids = prompt + tokens
            seen = ps.personas.render(m, ids) if ps.personas is not None else ids
            rows[name] = direct.next_logprobs(m, seen).double()  # [V]
            mixed += coef * rows[name]
        mixed = mixed.log_softmax(-1)
        token = int(mixed.argmax())
        tokens.append(token)
        logprobs.append(float(mixed[token]))
        per_model.append({str(n): float(r[token]) for n, r in rows.items()})
    return tokens, logprobs, per_model


def mixtures(ps: PolicySet) -> list[tuple[dict[str, float], float]]:
    a, b, c = ps.names
    return [
        ({a: 1.0}, 1.0),  # one member: one sequence
        ({b: 1.0}, 0.0),  # the reference alone
        ({a: 0.3, b: 0.7}, 0.6),  # two members and the reference
        ({a: 1, b: 1, c: 1}, 1.0),
        ({b: 0.5, c: 0.5}, 1.5),  # extrapolation
    ]


def _served(engine: Engine, ps: PolicySet, steps: int) -> list[list[Any]]:
    """Every mixture, each joining once the one before it has produced two tokens."""
    iterators, heads = [], []
    for i, (weights, strength) in enumerate(mixtures(ps)):
        ids = chat(ps, REQUESTS[i % len(REQUESTS)])
        stream = engine.submit(
            GenerationRequest(ids, greedy(steps), engine.mixture(weights, strength))
        )
        iterator = iter(stream)
        heads.append([next(iterator), next(iterator)])
        iterators.append(iterator)
    return [head + list(it) for head, it in zip(heads, iterators)]


@pytest.mark.parametrize("which", ["personas", "full"])
def test_served_blends_equal_an_independent_llama_cpp_run(
    which: str, gguf_personas: PolicySet, gguf_full: PolicySet, request: pytest.FixtureRequest
) -> None:
    ps = gguf_personas if which == "personas" else gguf_full
    steps = 8
    with Engine(ps, EngineLimits(max_running=8), speculative=SpeculativeConfig(method="off")) as e:
        assert isinstance(e.runner, LlamaCppRunner)
        got = _served(e, ps, steps)
        coefs = [e.mixture(w, s).coefficients for w, s in mixtures(ps)]
    direct = LlamaDirect(ps)
    request.addfinalizer(direct.close)  # now, not at interpreter exit
    for i, events in enumerate(got):
        prompt = chat(ps, REQUESTS[i % len(REQUESTS)])
        tokens, logprobs, per_model = independent_greedy(ps, direct, prompt, coefs[i], steps)
        assert [e.token_id for e in events] == tokens, mixtures(ps)[i]
        for event, logprob, models in zip(events, logprobs, per_model):
            assert event.logprob == pytest.approx(logprob, abs=TOLERANCE)
            for name, value in models.items():
                if name in event.policy_logprobs:  # the policies' (not the reference's)
                    assert event.policy_logprobs[name] == pytest.approx(value, abs=TOLERANCE)
        for name, value in events[0].policy_logprobs.items():  # coefficient 0: not run
            assert (value is None) == (name not in per_model[0])


@pytest.mark.parametrize("which", ["personas", "full"])
def test_speculation_on_and_off_give_the_same_greedy_replies(
    which: str, gguf_personas: PolicySet, gguf_full: PolicySet
) -> None:
    ps = gguf_personas if which == "personas" else gguf_full
    # a repetitive prompt, so n-gram drafts are proposed and some accepted
    prompt = chat(ps, "one two three one two three one two three one two")
    replies: dict[str, list[list[int]]] = {}
    accepted = 0
    for method in ("off", "ngram"):
        settings = SpeculativeConfig(method=method, max_draft_tokens=4, max_batch_size=8)
        with Engine(ps, EngineLimits(max_running=8), speculative=settings) as engine:
            streams = [
                engine.submit(GenerationRequest(prompt, greedy(24), engine.mixture(w, s)))
                for w, s in mixtures(ps)
            ]
            replies[method] = [[event.token_id for event in stream] for stream in streams]
            if method == "ngram":
                assert engine.speculator is not None
                accepted = engine.speculator.accepted
    assert replies["ngram"] == replies["off"]
    assert accepted > 0  # drafts were verified and some kept: rollback ran


def test_each_persona_opening_is_run_once(gguf_personas: PolicySet) -> None:
    """A newcomer's sequence starts as a copy of its persona's opening: only the rest of
    its prompt is decoded."""
    ps = gguf_personas
    assert ps.personas is not None
    runner, _ = make_runner(ps, max_rows=4, max_context=ps.max_context)
    assert isinstance(runner, LlamaCppRunner)
    prompt = chat(ps, REQUESTS[0])
    pieces: list[tuple[int, list[int], int, int]] = []
    original = llama_context.LlamaContext.decode

    def record(context: Any, part: Any) -> torch.Tensor:
        pieces.extend(part)
        return original(context, part)

    llama_context.LlamaContext.decode = record  # type: ignore[method-assign,assignment]
    try:
        coefs = (0.25, 0.25, 0.25, 0.25)

        class Row:
            def __init__(self, sid: int) -> None:
                self.sid, self.token_ids, self.coefs = sid, list(prompt), coefs

        runner.step([], [Row(0), Row(1)])
    finally:
        llama_context.LlamaContext.decode = original  # type: ignore[method-assign]
    assert len(pieces) == 2 * ps.personas.models  # one sequence per (request, member)
    for (_seq, tokens, first, _out), m in zip(pieces, [*range(4), *range(4)]):
        rendered = ps.personas.render(m, prompt)
        opening = ps.personas.cached[m]
        assert first == len(opening) and tokens == rendered[len(opening) :], m
    runner.keep(set())
    assert all(len(free) == ctx.n_seq - 4 for free, ctx in zip(runner._free, runner.contexts))


def test_every_decode_runs_on_one_thread_and_torch_on_one(
    gguf_personas: PolicySet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two OpenMP teams on the cores (llama.cpp makes one per thread that decodes, torch one
    per thread that runs a parallel op) slowed decoding up to twice (llama_context's
    docstring): the runner puts torch on one thread, and every llama_decode runs on the
    decoder thread whichever thread asks (here: the openings from this thread at load, a
    step from this thread and one from another)."""
    ps = gguf_personas
    torch.set_num_threads(2)  # conftest restores the count after the test
    llama = llama_context.import_llama()
    real, threads = llama.llama_decode, []

    def spy(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(llama, "llama_decode", spy)
    runner, _ = make_runner(ps, max_rows=4, max_context=ps.max_context)
    assert torch.get_num_threads() == 1
    prompt = chat(ps, REQUESTS[1])

    class Row:
        def __init__(self, sid: int) -> None:
            self.sid, self.token_ids, self.coefs = sid, list(prompt), (0.25, 0.25, 0.25, 0.25)

    runner.step([], [Row(0)])
    other = threading.Thread(target=runner.step, args=([], [Row(1)]), name="not-the-decoder")
    other.start()
    other.join()
    runner.keep(set())
    assert len(threads) >= 3  # the openings, then the two steps
    assert set(threads) == {threads[0]} and threads[0].startswith("llama-decode"), threads


def test_keep_frees_sequences_for_reuse(gguf_full: PolicySet) -> None:
    counter = LlamaRows()
    try:
        runner, _ = make_runner(gguf_full, max_rows=2, max_context=gguf_full.max_context)
        prompt = chat(gguf_full, REQUESTS[1])

        class Row:
            def __init__(self, sid: int) -> None:
                self.sid, self.token_ids, self.coefs = sid, list(prompt), (0.5, 0.5, 0.0, 0.0)

        for sid in range(10):  # many more requests than sequences, one after another
            runner.step([], [Row(sid)])
            runner.keep(set())
    finally:
        counter.close()
    assert counter.rows == 10 * 2  # two members a request, nothing else ran
    assert isinstance(runner, LlamaCppRunner) and not runner._slots


def _yaml(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "policies.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_backend_auto_transformers_and_llama_cpp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MPO_HOME", str(tmp_path / "home"))
    write_tiny_gguf(tmp_path / "a.gguf", seed=1, full_vocab=True)
    family = {"policies": [{"name": "a", "model": "a.gguf"}]}
    auto = load_policy_set(load_config(_yaml(tmp_path, family)))
    assert auto.backend == LlamaCppRunner.kind
    hf = load_policy_set(load_config(_yaml(tmp_path, {**family, "backend": "transformers"})))
    assert hf.backend == "separate"
    torch.manual_seed(0)
    (tmp_path / "folder").mkdir()
    mixed = {"policies": [*family["policies"], {"name": "b", "model": str(tmp_path / "folder")}]}
    with pytest.raises(ConfigError, match=r"backend llama.cpp cannot run this family: 'b' is not"):
        load_policy_set(parse_config({**mixed, "backend": "llama.cpp"}, tmp_path))


def test_without_llama_cpp_python_one_line_names_the_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_tiny_gguf(tmp_path / "a.gguf", seed=1, full_vocab=True)
    monkeypatch.setattr(llama_context, "_llama", None)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now fails
    config = parse_config(
        {"backend": "llama.cpp", "policies": [{"name": "a", "model": str(tmp_path / "a.gguf")}]}
    )
    with pytest.raises(ConfigError) as caught:
        load_policy_set(config)
    message = str(caught.value)
    assert "\n" not in message and 'pip install -e ".[llama]"' in message
    auto = parse_config({"policies": [{"name": "a", "model": str(tmp_path / "a.gguf")}]})
    assert not LlamaCppRunner.claims(auto)  # auto: transformers runs it


def test_more_rows_than_a_context_holds_caps_max_running(gguf_personas: PolicySet) -> None:
    """``mpo fit`` asks for 64 running requests; a persona context holds a sequence per
    (request, member) and llama.cpp at most 256 of them: the runner says how many rows it
    runs and the engine admits that many, instead of failing at start-up."""
    members = len(gguf_personas.policies) + 1
    with Engine(gguf_personas, EngineLimits(max_running=64)) as engine:
        assert engine.limits.max_running == (256 - members - 1) // members
        prompt = chat(gguf_personas, "Thank you")
        reply = engine.generate(GenerationRequest(prompt, greedy(4), engine.mixture(None, 0.5)))
        assert len(reply.token_ids) == 4
    with Engine(gguf_personas, EngineLimits(max_running=8)) as engine:
        assert engine.limits.max_running == 8  # within the limit: unchanged
