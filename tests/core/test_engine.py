"""Engine tests on tiny random models loaded from disk (GPT-2 and Llama shapes)."""

import threading

import pytest
import torch

from mpo_core.config import load_config
from mpo_core.decoding.mixing import Mixture
from mpo_core.decoding.sampling import SamplingParams
from mpo_core.engine.core import Engine, EngineLimits, GenerationRequest
from mpo_core.errors import EngineNotRunning, InvalidParameter, Overloaded
from mpo_core.runners import load_policy_set

PROMPT = "Could you please help me write a short poem?"


def greedy(n, **kw):
    return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True, **kw)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_one_hot_greedy_matches_transformers_generate(policy_sets, arch):
    ps = policy_sets[arch]
    ids = ps.tokenizer.encode(PROMPT)
    with Engine(ps) as engine:
        for k, name in enumerate(ps.names):
            result = engine.generate(
                GenerationRequest(ids, greedy(12), engine.mixture({name: 1.0}))
            )
            expected = hf_greedy(ps, ps.policies[k].model, ids, 12)
            assert result.token_ids == expected, name
            # only the chosen policy ran, and it reports its own log-prob
            assert result.events[0].policy_logprobs[name] is not None
            assert all(v is None for n, v in result.events[0].policy_logprobs.items() if n != name)


def hf_greedy(ps, model, ids, n):
    """transformers' own greedy decoding, with the padding rows past the vocabulary banned."""
    rows = model.get_output_embeddings().weight.shape[0]
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=ps.tokenizer.pad_token_id,
        suppress_tokens=list(range(ps.vocab_size, rows)),
    )
    return out[0, len(ids) :].tolist()


def _first_step_logprobs(model, ids):
    logits = model(torch.tensor([ids])).logits[0, -1]
    return logits.float().log_softmax(-1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_half_half_first_step_matches_independent_mixture(policy_sets, arch):
    ps = policy_sets[arch]
    ids = ps.tokenizer.encode(PROMPT)
    v = ps.vocab_size
    a = _first_step_logprobs(ps.policies[0].model, ids)[:v].log_softmax(-1)
    b = _first_step_logprobs(ps.policies[1].model, ids)[:v].log_softmax(-1)
    expected = torch.log_softmax(0.5 * a + 0.5 * b, dim=-1)
    weights = {ps.names[0]: 0.5, ps.names[1]: 0.5}
    with Engine(ps) as engine:
        first = engine.generate(
            GenerationRequest(ids, greedy(1, top_logprobs=20), engine.mixture(weights))
        ).events[0]
    top_ids = [i for i, _ in first.top_logprobs]
    top_values = torch.tensor([lp for _, lp in first.top_logprobs])
    torch.testing.assert_close(top_values, expected[top_ids], atol=1e-5, rtol=0)
    assert top_ids == expected.topk(20).indices.tolist()
    assert first.token_id == int(expected.argmax())
    assert first.logprob == pytest.approx(expected.max().item(), abs=1e-5)
    assert first.policy_logprobs[ps.names[0]] == pytest.approx(a[first.token_id].item(), abs=1e-5)
    assert first.policy_logprobs[ps.names[1]] == pytest.approx(b[first.token_id].item(), abs=1e-5)


def test_strength_zero_decodes_the_reference_and_two_extrapolates(llama_set):
    ps = llama_set
    ids = ps.tokenizer.encode(PROMPT)
    with Engine(ps) as engine:
        ref_only = engine.generate(GenerationRequest(ids, greedy(10), engine.mixture(strength=0.0)))
        expected = hf_greedy(ps, ps.reference.model, ids, 10)
        assert ref_only.token_ids == expected
        assert all(v is None for v in ref_only.events[0].policy_logprobs.values())
        event = engine.generate(
            GenerationRequest(
                ids, greedy(1, top_logprobs=5), engine.mixture({"helpful": 1}, strength=2.0)
            )
        ).events[0]
    pol = _first_step_logprobs(ps.policies[0].model, ids)[: ps.vocab_size].log_softmax(-1)
    ref = _first_step_logprobs(ps.reference.model, ids)[: ps.vocab_size].log_softmax(-1)
    expected = torch.log_softmax(2 * pol - ref, dim=-1)
    assert event.token_id == int(expected.argmax())
    assert event.logprob == pytest.approx(expected.max().item(), abs=1e-5)


def _collect(stream, tokens):
    tokens.extend(e.token_id for e in stream if e.finish_reason != "cancelled")


def test_seeded_request_is_the_same_alone_and_in_a_changing_batch(llama_set):
    tok = llama_set.tokenizer
    target = GenerationRequest(
        tok.encode("Thank you so much for the help"),
        SamplingParams(
            max_new_tokens=24,
            temperature=0.9,
            top_p=0.95,
            seed=1234,
            ignore_eos=True,
            top_logprobs=3,
        ),
        Mixture.build(
            llama_set.names, {"helpful": 0.2, "harmless": 0.5, "concise": 0.3}, has_reference=True
        ),
    )
    with Engine(llama_set, EngineLimits(max_running=16)) as engine:
        alone = engine.generate(target)
        others = []
        # seven other requests, each joining a few steps after the previous one, with
        # their own weights, strengths, lengths and sampling parameters
        for i in range(7):
            params = SamplingParams(
                max_new_tokens=8 + 5 * i,
                temperature=0.3 * i,
                top_k=i * 3,
                seed=i,
                repetition_penalty=1.0 + 0.1 * i,
                ignore_eos=True,
            )
            stream = engine.submit(
                GenerationRequest(
                    tok.encode("x" * (i + 1) + " hello"),
                    params,
                    engine.mixture([1 + i, 1, 0.5], strength=1.0 - 0.1 * i),
                )
            )
            others.append(stream)
            if i == 3:
                mixed_stream = engine.submit(target)
            for _ in range(2):  # let the batch advance before the next one joins
                next(iter(stream))
        batch_events = list(mixed_stream)
        for stream in others:
            list(stream)
    assert [e.token_id for e in batch_events] == alone.token_ids
    for got, want in zip(batch_events, alone.events):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
        for (gi, gv), (wi, wv) in zip(got.top_logprobs, want.top_logprobs):
            assert gi == wi and gv == pytest.approx(wv, abs=1e-4)
    assert alone.seed == 1234


def test_different_seeds_give_different_samples(llama_set):
    tok = llama_set.tokenizer

    def sample(seed):
        params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=seed, ignore_eos=True)
        return engine.generate(GenerationRequest(tok.encode(PROMPT), params)).token_ids

    with Engine(llama_set) as engine:
        samples = [sample(seed) for seed in range(4)]
        assert sample(2) == samples[2]
    assert len({tuple(s) for s in samples}) == 4  # 320 tokens, 12 draws: no chance collision


class StepGate:
    """An EngineObserver that holds the engine thread at the end of step ``at`` (1-based).

    ``reached`` is set when the engine gets there; it goes on when ``release`` is set or
    ``release_when()`` turns true (checked under the engine's condition, which ``stop`` and
    ``cancel`` notify). Tests use it to act between two steps, whatever the device's speed.
    """

    def __init__(self, at):
        self.at = at
        self.steps = 0
        self.reached = threading.Event()
        self.release = threading.Event()
        self.release_when = None
        self.engine = None
        self._counted = threading.Condition()

    def on_step(self, batch_size, forward_seconds):
        with self._counted:
            self.steps += 1
            self._counted.notify_all()
        if self.steps != self.at:
            return
        self.reached.set()
        if self.release_when is None:
            assert self.release.wait(timeout=60), "the test never released the engine"
        else:
            with self.engine._lock:
                assert self.engine._lock.wait_for(self.release_when, timeout=60)

    def wait_steps(self, n):
        with self._counted:
            assert self._counted.wait_for(lambda: self.steps >= n, timeout=60)


def test_cancel_takes_effect_at_the_next_step_and_frees_the_slot(llama_set):
    tok = llama_set.tokenizer
    gate = StepGate(at=3)
    limits = EngineLimits(max_running=1, max_queued=4)
    with Engine(llama_set, limits, observer=gate) as engine:
        stream = engine.submit(GenerationRequest(tok.encode(PROMPT), greedy(200)))
        assert gate.reached.wait(timeout=60)  # three steps done, the fourth not begun
        stream.cancel()
        produced = engine.stats().generated_tokens
        gate.release.set()
        events = list(stream)
        assert events[-1].finish_reason == "cancelled"
        assert [e.index for e in events[:-1]] == [0, 1, 2]  # no token after the cancel
        assert engine.stats().generated_tokens == produced == 3
        # the single slot is free again: a new request runs to completion
        follow = engine.generate(GenerationRequest(tok.encode("hi"), greedy(3)))
        assert len(follow.token_ids) == 3 and follow.finish_reason == "length"
        gate.wait_steps(6)  # the observer is called after the step retired finished rows
        assert engine.stats().running == 0
        assert gate.steps == 6  # the cancelled request cost no step after the cancel


def test_cancel_while_queued(llama_set):
    tok = llama_set.tokenizer
    with Engine(llama_set, EngineLimits(max_running=1, max_queued=4)) as engine:
        first = engine.submit(GenerationRequest(tok.encode(PROMPT), greedy(60)))
        queued = engine.submit(GenerationRequest(tok.encode(PROMPT), greedy(60)))
        queued.cancel()
        events = list(queued)
        assert [e.finish_reason for e in events] == ["cancelled"]
        first.cancel()
        list(first)


def test_overload_raises_at_once(llama_set):
    """Overloaded is raised while the queue cannot move (the engine is held between steps)."""
    tok = llama_set.tokenizer
    gate = StepGate(at=1)
    with Engine(llama_set, EngineLimits(max_running=1, max_queued=1), observer=gate) as engine:
        running = engine.submit(GenerationRequest(tok.encode(PROMPT), greedy(100)))
        assert gate.reached.wait(timeout=60)  # it holds the only slot now
        queued = engine.submit(GenerationRequest(tok.encode(PROMPT), greedy(5)))
        with pytest.raises(Overloaded):
            engine.submit(GenerationRequest(tok.encode(PROMPT), greedy(5)))
        assert engine.stats().running == 1 and engine.stats().waiting == 1
        running.cancel()
        gate.release.set()
        list(running)
        assert len(list(queued)) == 5


def hold_prefill(engine):
    """Hold the engine inside its next runner step, where the sequences it just admitted
    are neither waiting nor running: (entered, release) events."""
    entered, release = threading.Event(), threading.Event()
    step = engine.runner.verify  # the engine's one step call (no drafts: a plain step)

    def held(running, drafts, newcomers):
        entered.set()
        assert release.wait(timeout=60), "the test never released the engine"
        return step(running, drafts, newcomers)

    engine.runner.verify = held
    return entered, release


def test_the_queue_holds_exactly_max_running_plus_max_queued(llama_set):
    """The admission race: sequences being admitted (prefilled) once freed their slots
    twice, so the queue took one more per admitted sequence than its limit."""
    tok = llama_set.tokenizer
    engine = Engine(llama_set, EngineLimits(max_running=2, max_queued=4))
    entered, release = hold_prefill(engine)
    with engine:
        streams = [engine.submit(GenerationRequest(tok.encode(PROMPT), greedy(3)))]
        assert entered.wait(timeout=60)  # the engine admitted it and holds its prefill
        refused = 0
        for _ in range(31):
            try:
                streams.append(engine.submit(GenerationRequest(tok.encode(PROMPT), greedy(3))))
            except Overloaded:
                refused += 1
        assert (len(streams), refused) == (6, 26)
        assert engine.stats().running + engine.stats().waiting == 6
        release.set()
        assert all(len(list(stream)) == 3 for stream in streams)


def test_cancel_all_ends_admitted_waiting_and_running_sequences(llama_set):
    tok = llama_set.tokenizer
    engine = Engine(llama_set, EngineLimits(max_running=1, max_queued=2))
    entered, release = hold_prefill(engine)
    with engine:
        streams = [engine.submit(GenerationRequest(tok.encode(PROMPT), greedy(50)))]
        assert entered.wait(timeout=60)
        streams.append(engine.submit(GenerationRequest(tok.encode(PROMPT), greedy(50))))
        assert engine.cancel_all() == 2  # the one being admitted and the one waiting
        release.set()
        for stream in streams:
            events = list(stream)
            assert events[-1].finish_reason == "cancelled" and len(events) < 50
        assert engine.is_alive  # it goes on serving
        after = engine.generate(GenerationRequest(tok.encode(PROMPT), greedy(2)))
        assert len(after.token_ids) == 2


def test_input_errors_name_the_parameter(llama_set, no_reference_family):
    tok = llama_set.tokenizer
    with Engine(llama_set) as engine:
        cases = [
            (
                GenerationRequest(tok.encode(PROMPT), greedy(300)),
                "max_new_tokens",
                "context limit of 256",
            ),
            (GenerationRequest([], greedy(3)), "prompt", "empty"),
            (GenerationRequest([99999], greedy(3)), "prompt", "outside"),
            (GenerationRequest([5], SamplingParams(top_p=0)), "top_p", "top_p"),
        ]
        for request, param, fragment in cases:
            with pytest.raises(InvalidParameter, match=fragment) as err:
                engine.submit(request)
            assert err.value.param == param
        for kwargs, param, fragment in [
            ({"weights": {"nope": 1}}, "weights.nope", "unknown policy"),
            ({"strength": -1}, "strength", "between 0 and 100"),
        ]:
            with pytest.raises(InvalidParameter, match=fragment) as err:
                engine.mixture(**kwargs)
            assert err.value.param == param
    noref = load_policy_set(load_config(no_reference_family))
    with Engine(noref) as engine:
        with pytest.raises(InvalidParameter, match="needs a reference"):
            engine.mixture(strength=0.5)
        # a mixture built for another policy set is checked again at submit
        foreign = Mixture.build(noref.names, None, 0.5, has_reference=True)
        with pytest.raises(InvalidParameter, match="needs a reference"):
            engine.submit(GenerationRequest([5], greedy(3), foreign))


def test_stop_strings_and_stop_tokens(llama_set):
    tok = llama_set.tokenizer
    ids = tok.encode(PROMPT)
    with Engine(llama_set) as engine:
        full = engine.generate(GenerationRequest(ids, greedy(20)))
        assert len(full.text) > 6
        stop = full.text[3:6]
        cut = engine.generate(GenerationRequest(ids, greedy(20, stop=[stop])))
        assert cut.finish_reason == "stop_sequence"
        assert cut.text == full.text[: full.text.find(stop)]
        stop_id = full.token_ids[4]
        by_id = engine.generate(GenerationRequest(ids, greedy(20, stop_token_ids=[stop_id])))
        assert by_id.finish_reason == "stop_sequence"
        assert by_id.token_ids == full.token_ids[: full.token_ids.index(stop_id) + 1]


def test_eos_finishes_unless_ignored(llama_set, monkeypatch):
    tok = llama_set.tokenizer
    ids = tok.encode(PROMPT)
    with Engine(llama_set) as engine:
        full = engine.generate(GenerationRequest(ids, greedy(10)))
        # pretend the third greedy token is EOS
        monkeypatch.setattr(llama_set, "eos_token_ids", [full.token_ids[2]])
        stopped = engine.generate(
            GenerationRequest(ids, SamplingParams(max_new_tokens=10, temperature=0))
        )
        assert stopped.finish_reason == "eos_token"
        assert stopped.token_ids == full.token_ids[: full.token_ids.index(full.token_ids[2]) + 1]
        ignored = engine.generate(GenerationRequest(ids, greedy(10)))
        assert ignored.token_ids == full.token_ids and ignored.finish_reason == "length"


def test_async_iteration_and_observer(llama_set):
    import asyncio

    steps = []

    class Observer:
        def on_step(self, batch_size, forward_seconds):
            steps.append((batch_size, sorted(forward_seconds)))

    tok = llama_set.tokenizer
    with Engine(llama_set, observer=Observer()) as engine:

        async def run():
            stream = engine.submit(
                GenerationRequest(tok.encode(PROMPT), greedy(5), engine.mixture([1, 1, 0]))
            )
            return [e async for e in stream]

        events = asyncio.run(run())
    assert [e.index for e in events] == [0, 1, 2, 3, 4]
    assert events[-1].finish_reason == "length"
    assert steps and all(names == ["harmless", "helpful"] for _, names in steps)


def test_stopped_engine_refuses_and_stop_cancels_running(llama_set):
    tok = llama_set.tokenizer
    gate = StepGate(at=1)  # holds the request until stop() has cancelled it: it cannot finish
    engine = Engine(llama_set, observer=gate).start()
    submitted = []
    gate.engine, gate.release_when = engine, lambda: bool(submitted) and submitted[0].cancelled
    stream = engine.submit(GenerationRequest(tok.encode(PROMPT), greedy(200)))
    submitted.append(stream)
    assert gate.reached.wait(timeout=60)
    stopper = threading.Thread(target=engine.stop, kwargs={"timeout": 0.2})
    stopper.start()
    events = list(stream)
    stopper.join()
    assert [e.index for e in events] == [0, 1]  # one token, then the cancellation
    assert events[-1].finish_reason == "cancelled"
    assert not engine.is_alive
    with pytest.raises(EngineNotRunning):
        engine.submit(GenerationRequest(tok.encode(PROMPT), greedy(2)))


def test_stop_string_spanning_two_tokens(llama_set):
    tok = llama_set.tokenizer
    ids = tok.encode(PROMPT)
    with Engine(llama_set) as engine:
        full = engine.generate(GenerationRequest(ids, greedy(20)))
        # find a token boundary inside the text and take two characters across it
        boundary = len(tok.decode(full.token_ids[:3], skip_special_tokens=True))
        assert 0 < boundary < len(full.text) - 1
        stop = full.text[boundary - 1 : boundary + 1]
        cut = engine.generate(GenerationRequest(ids, greedy(20, stop=[stop])))
    assert cut.finish_reason == "stop_sequence"
    assert cut.text == full.text[: full.text.find(stop)]
    assert stop not in cut.text


def test_extreme_parameters_do_not_break_the_engine(llama_set):
    tok = llama_set.tokenizer
    with Engine(llama_set, EngineLimits(max_running=2, max_queued=0)) as engine:
        # max_queued=0 still admits a request when a slot is free
        huge_k = SamplingParams(max_new_tokens=3, top_k=2**70, seed=0, ignore_eos=True)
        assert len(engine.generate(GenerationRequest(tok.encode(PROMPT), huge_k)).token_ids) == 3
        with pytest.raises(InvalidParameter, match="between 0 and 100") as err:
            engine.mixture(strength=1e308)
        assert err.value.param == "strength"
        with pytest.raises(InvalidParameter, match=r"must be finite, between -1e\+09 and 1e\+09"):
            engine.mixture([1e308, 1e308, 1])
        far = engine.generate(GenerationRequest([5], greedy(2), engine.mixture(strength=100.0)))
        assert len(far.token_ids) == 2


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(llama_set, monkeypatch):
    from mpo_core.errors import GenerationFailed
    from mpo_core.models.kvcache import GrowingBatch

    tok = llama_set.tokenizer
    original = GrowingBatch.decode
    calls = {"n": 0}

    def flaky(self, tokens, positions):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated device error")
        return original(self, tokens, positions)

    with Engine(llama_set) as engine:
        monkeypatch.setattr(GrowingBatch, "decode", flaky)
        stream = engine.submit(
            GenerationRequest(tok.encode(PROMPT), greedy(10), engine.mixture([1, 0, 0]))
        )
        with pytest.raises(GenerationFailed, match="simulated device error"):
            list(stream)
        assert engine.is_alive
        after = engine.generate(GenerationRequest(tok.encode(PROMPT), greedy(4)))
        assert len(after.token_ids) == 4
