"""Static KV caches (and CUDA graphs where there is a GPU) against the growing cache."""

import dataclasses
import logging

import pytest
import torch

from mpo_core.config import load_config
from mpo_core.decoding.sampling import SamplingParams
from mpo_core.engine.core import Engine, EngineLimits, GenerationRequest
from mpo_core.errors import InvalidParameter
from mpo_core.models.kvcache import GrowingBatch, KVStorage
from mpo_core.models.static_cache import StaticBatch, buckets_for, static_unsupported
from mpo_core.runners import SeparateModelsRunner, load_policy_set, make_runner
from mpo_core.testing.families import make_tiny_family


def _prompt(length: int, offset: int) -> list[int]:
    return [(offset + 7 * i) % 200 + 10 for i in range(length)]


def _script(batch) -> list[tuple[int, torch.Tensor]]:
    """Joins at several lengths (one longer than the used columns: a shift right), leaves
    that open holes (rows move), and enough steps to reach the end of a 40-column cache
    (compaction). Returns every row's log-probs at every step, keyed by row id."""
    out: list[tuple[int, torch.Tensor]] = []
    tokens_of: dict[int, list[int]] = {}

    def join(rows: dict[int, list[int]]) -> None:
        lp = batch.prefill(list(rows), list(rows.values()))
        for i, (rid, prompt) in enumerate(rows.items()):
            tokens_of[rid] = list(prompt)
            out.append((rid, lp[i].clone()))

    def steps(count: int) -> None:
        for _ in range(count):
            ids = list(batch.row_ids)
            new = [(tokens_of[r][-1] * 7 + len(tokens_of[r])) % 200 + 10 for r in ids]
            positions = [len(tokens_of[r]) for r in ids]
            lp = batch.decode(torch.tensor(new), torch.tensor(positions))
            for row, rid in enumerate(ids):
                tokens_of[rid].append(new[row])
                out.append((rid, lp[row].clone()))

    join({0: _prompt(20, 0), 1: _prompt(3, 1)})
    steps(2)
    join({3: _prompt(26, 3)})  # longer than the 22 columns in use
    steps(3)
    join({2: _prompt(12, 2)})
    steps(3)
    batch.keep({1, 2})  # rows 0 and 3 leave; row 2 moves into slot 0
    steps(20)  # the column reaches 40: the window moves back
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_static_cache_equals_the_growing_cache(arch, policy_sets):
    ps = policy_sets[arch]
    model = ps.policies[0]
    growing = GrowingBatch(model, ps.vocab_size, ps.device, KVStorage(None))
    static = StaticBatch(model, ps.vocab_size, ps.device, slots=4, max_len=40)
    expected, got = _script(growing), _script(static)
    assert static.compactions == 1
    assert growing.row_ids == [1, 2]
    assert static.row_ids == [2, 1]  # row 2 moved into the hole row 0 left
    assert len(got) == len(expected) == 4 + 2 * 2 + 3 * 3 + 3 * 4 + 20 * 2
    _assert_same_per_row(got, expected)


def _assert_same_per_row(got, expected, atol=1e-5):
    def by_row(pairs):
        rows: dict[int, list[torch.Tensor]] = {}
        for rid, lp in pairs:
            rows.setdefault(rid, []).append(lp)
        return rows

    got_rows, expected_rows = by_row(got), by_row(expected)
    assert got_rows.keys() == expected_rows.keys()
    for rid, want in expected_rows.items():
        assert len(got_rows[rid]) == len(want)
        for a, b in zip(got_rows[rid], want):
            torch.testing.assert_close(a, b, atol=atol, rtol=0)


def test_buckets():
    assert buckets_for(1) == [1]
    assert buckets_for(16) == [1, 2, 4, 8, 16]
    assert buckets_for(12) == [1, 2, 4, 8, 12]


def _with(ps, **config):
    return dataclasses.replace(ps, config=ps.config.model_copy(update=config))


def _requests(engine, tok):
    prompts = ["Thank you so much", "hi", "Could you please help me write a short poem?"]
    mixes = [
        engine.mixture({"helpful": 1}),
        engine.mixture([0.2, 0.5, 0.3]),
        engine.mixture([1, 1, 0], strength=0.5),
        engine.mixture(strength=0.0),
    ]
    return [
        GenerationRequest(
            tok.encode(prompts[i % 3]),
            SamplingParams(max_new_tokens=8 + 3 * i, temperature=0, ignore_eos=True),
            mixes[i % 4],
        )
        for i in range(8)
    ]


def test_engine_on_static_caches_matches_the_growing_cache(llama_set):
    """Joins, leaves and compaction inside the engine, every mixture kind: same greedy
    tokens and log-probs (mixture and per policy) as the growing cache."""
    tok = llama_set.tokenizer
    static_set = _with(llama_set, static_cache="on", max_cache_len=64)
    results = {}
    for name, ps in (("growing", llama_set), ("static", static_set)):
        with Engine(ps, EngineLimits(max_running=3)) as engine:
            streams = [engine.submit(r) for r in _requests(engine, tok)]
            results[name] = [list(s) for s in streams]
            if name == "static":
                assert isinstance(engine.runner, SeparateModelsRunner)
                batches = engine.runner.batches
                assert all(isinstance(b, StaticBatch) for b in batches)
                assert sum(b.compactions for b in batches) > 0
    for got, expected in zip(results["static"], results["growing"]):
        assert [e.token_id for e in got] == [e.token_id for e in expected]
        for a, b in zip(got, expected):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
            for name, value in b.policy_logprobs.items():
                if value is None:
                    assert a.policy_logprobs[name] is None
                else:
                    assert a.policy_logprobs[name] == pytest.approx(value, abs=1e-5)


def test_static_cache_caps_the_context(llama_set):
    static_set = _with(llama_set, static_cache="on", max_cache_len=32)
    with Engine(static_set) as engine:
        assert engine.max_context == 32
        with pytest.raises(InvalidParameter, match="context limit of 32") as err:
            engine.submit(GenerationRequest(list(range(10, 30)), SamplingParams(max_new_tokens=13)))
        assert err.value.param == "max_new_tokens"
        done = engine.generate(GenerationRequest(list(range(10, 30)), SamplingParams(12)))
        assert len(done.token_ids) == 12


def test_unsupported_model_falls_back_with_a_warning(tmp_path, caplog):
    ps = load_policy_set(load_config(make_tiny_family(tmp_path, num_policies=2)))
    ps.policies[1].model.config.sliding_window = 8  # a window shorter than the cache
    assert "sliding-window" in (static_unsupported(ps.policies[1], 64) or "")
    assert static_unsupported(ps.policies[0], 64) is None
    with caplog.at_level(logging.WARNING, logger="mpo_core.runners.factory"):
        runner, context = make_runner(_with(ps, static_cache="on", max_cache_len=64), 4, 256)
    assert context == 64  # the static cache's columns cap the 256 asked for
    assert isinstance(runner, SeparateModelsRunner)
    kinds = [type(b) for b in runner.batches]
    assert kinds == [StaticBatch, GrowingBatch, StaticBatch]
    assert "'harmless' decodes eagerly" in caplog.text and "sliding-window" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_equal_the_eager_static_step(llama_family):
    ps = load_policy_set(load_config(llama_family).model_copy(update={"device": "cuda"}))
    model = ps.policies[0]
    graphed = StaticBatch(model, ps.vocab_size, ps.device, slots=4, max_len=40, graphs=True)
    eager = StaticBatch(model, ps.vocab_size, ps.device, slots=4, max_len=40)
    assert sorted(graphed.graphs) == [1, 2, 4]
    _assert_same_per_row(_script(graphed), _script(eager))
    tok = ps.tokenizer
    results = []
    for graphs in (False, True):
        cfg = _with(ps, static_cache="on", cuda_graphs=graphs, max_cache_len=64)
        with Engine(cfg, EngineLimits(max_running=3)) as engine:
            assert all(bool(b.graphs) == graphs for b in engine.runner.batches)
            results.append([list(engine.submit(r)) for r in _requests(engine, tok)])
    for got, expected in zip(*results):
        assert [e.token_id for e in got] == [e.token_id for e in expected]


def test_adapter_family_on_a_static_cache_matches_the_growing_cache(tmp_path):
    """The grouped-LoRA backend on one static batch (a slot per request and model it
    needs): same greedy tokens and log-probs as on the growing cache, with joins."""
    from mpo_core.runners import AdapterRunner
    from mpo_core.testing.lora import LoraShape, make_adapter_family

    shapes = [LoraShape(r=4, targets="attention"), LoraShape(r=2, targets="all")]
    paths = make_adapter_family(tmp_path, shapes, merged=False)
    growing = load_policy_set(load_config(paths.adapters_yaml))
    static = _with(growing, static_cache="on", max_cache_len=64)
    prompts = ["Thank you so much", "hi", "Could you please help me write a short poem?"]
    results = []
    for ps in (growing, static):
        with Engine(ps, EngineLimits(max_running=3)) as engine:
            assert isinstance(engine.runner, AdapterRunner)
            assert isinstance(engine.runner.batch, StaticBatch) == (ps is static)
            mixes = [
                engine.mixture([1, 0]),
                engine.mixture([0.3, 0.7], strength=0.6),
                engine.mixture(strength=0.0),
            ]
            streams = [
                engine.submit(
                    GenerationRequest(
                        ps.tokenizer.encode(prompts[i % 3]),
                        SamplingParams(max_new_tokens=6 + 4 * i, temperature=0, ignore_eos=True),
                        mixes[i % 3],
                    )
                )
                for i in range(6)
            ]
            results.append([list(s) for s in streams])
            if ps is static:
                assert engine.runner.batch.slots == 3 * 3  # max_running x (K + 1)
    for got, expected in zip(results[1], results[0]):
        assert [e.token_id for e in got] == [e.token_id for e in expected]
        for a, b in zip(got, expected):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
