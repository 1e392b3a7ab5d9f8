"""Chunked prefill (``EngineLimits.prefill_chunk_tokens``, ``runner.prefill_chunk``).

- for every backend, on growing and static caches: greedy replies, their log-probs and
  each policy's log-probs with prompts prefilled in chunks equal those of whole prefills;
- a short request decodes to its end while a long prompt is still being prefilled;
- a request cancelled mid-prefill ends ``cancelled`` and its partial caches are freed;
- the scheduler's plan: short prompts join first, the oldest long one always advances.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from mpo_core.config import load_config
from mpo_core.decoding.sampling import SamplingParams
from mpo_core.engine.core import Engine, EngineLimits, GenerationRequest
from mpo_core.engine.scheduler import Scheduler
from mpo_core.models.kv_budget import KVBudget
from mpo_core.models.policies import PolicySet
from mpo_core.runners import Row, SeparateModelsRunner, all_models, load_policy_set
from mpo_core.runners.llama_context import LlamaContext, llama_cpp_available
from mpo_core.testing.families import make_persona_family
from mpo_core.testing.gguf import make_gguf_family, make_gguf_persona_family
from mpo_core.testing.lora import LoraShape, make_adapter_family

# name -> (family, cache): every backend, each transformers one on both kinds of cache
CASES = [
    ("separate", "growing"),
    ("separate", "static"),
    ("adapters", "growing"),
    ("adapters", "static"),
    ("personas", "growing"),
    ("personas", "static"),
    ("separate-over-views", "growing"),
    ("gguf-personas", "llama.cpp"),
    ("gguf-separate", "llama.cpp"),
]
CHUNK = 7  # prompt tokens per step: the long prompt takes many steps


@pytest.fixture(scope="module")
def families(llama_family: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, PolicySet]:
    shapes = [LoraShape(r=4, alpha=8, targets="all")] * 3
    adapters = make_adapter_family(tmp_path_factory.mktemp("chunk_lora"), shapes)
    personas = make_persona_family(tmp_path_factory.mktemp("chunk_personas"), True)
    loaded = {
        "separate": load_policy_set(load_config(llama_family)),
        "adapters": load_policy_set(load_config(adapters.adapters_yaml)),
        "personas": load_policy_set(load_config(personas)),
    }
    if llama_cpp_available():
        gguf = tmp_path_factory.mktemp("chunk_gguf")
        loaded["gguf-personas"] = load_policy_set(load_config(make_gguf_persona_family(gguf)))
        loaded["gguf-separate"] = load_policy_set(load_config(make_gguf_family(gguf)))
    return loaded


def _family(families: dict[str, PolicySet], name: str, cache: str) -> PolicySet:
    key = "adapters" if name == "separate-over-views" else name
    if key not in families:
        pytest.skip("llama-cpp-python is not installed (the `llama` extra)")
    ps = families[key]
    if cache == "static":
        update = {"static_cache": "on", "max_cache_len": 160}
        ps = dataclasses.replace(ps, config=ps.config.model_copy(update=update))
    return ps


def _engine(ps: PolicySet, name: str, chunk: int) -> Engine:
    limits = EngineLimits(max_running=4, prefill_chunk_tokens=chunk)
    runner = SeparateModelsRunner(ps, limits.max_running) if name.endswith("views") else None
    return Engine(ps, limits, runner=runner)


def _requests(engine: Engine) -> list[GenerationRequest]:
    """A long prompt first, then short ones, under mixtures that need one model, several
    and the reference, the reference alone, every policy."""
    names, tok = engine.policy_names, engine.tokenizer
    mixtures = [
        engine.mixture({names[0]: 1.0}),
        engine.mixture({names[0]: 0.4, names[2]: 0.6}, strength=0.5),
        engine.mixture(strength=0.0),
        engine.mixture(),
    ]
    texts = [
        "Could you please help me write a short poem about the sea?" * 4,
        "Thank you so much",
        "hi",
        "The quick brown fox jumps over the lazy dog.",
    ]
    greedy = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    return [
        GenerationRequest(tok.encode(text), greedy, mixture)
        for text, mixture in zip(texts, mixtures)
    ]


class ChunkLog:
    """Wraps a runner's ``prefill_chunk`` and ``verify``: what ran, step by step."""

    def __init__(self, engine: Engine) -> None:
        runner: Any = engine.runner
        self.steps: list[tuple[str, list[int]]] = []  # ("chunk", ends) / ("join", sids)
        self.ran = threading.Event()  # a chunk ran
        self.hold = threading.Event()  # set: chunks go on (the first one waits for it)
        self.hold.set()
        chunk, verify = runner.prefill_chunk, runner.verify

        def prefill_chunk(rows: Sequence[Row], ends: Sequence[int]) -> None:
            chunk(rows, ends)
            self.steps.append(("chunk", [row.sid for row in rows]))
            self.ran.set()
            self.hold.wait()

        def logged_verify(running: Sequence[Row], drafts: Any, newcomers: Sequence[Row]) -> Any:
            self.steps.append(("decode", [row.sid for row in running]))
            self.steps.append(("join", [row.sid for row in newcomers]))
            return verify(running, drafts, newcomers)

        runner.prefill_chunk, runner.verify = prefill_chunk, logged_verify

    def first(self, kind: str, sid: int) -> int:
        return next(i for i, (k, sids) in enumerate(self.steps) if k == kind and sid in sids)

    def last(self, kind: str, sid: int) -> int:
        return max(i for i, (k, sids) in enumerate(self.steps) if k == kind and sid in sids)


class Widest:
    """The most tokens one row ran in one forward (one piece of a llama_decode)."""

    def __init__(self, ps: PolicySet) -> None:
        self.tokens = 0
        self._undo: list[Any] = []
        if ps.backend == "llama.cpp":
            original = LlamaContext.decode

            def decode(context: LlamaContext, pieces: Any) -> Any:
                self.tokens = max([self.tokens, *(len(piece[1]) for piece in pieces)])
                return original(context, pieces)

            LlamaContext.decode = decode  # type: ignore[method-assign,assignment]
            self._undo.append(lambda: setattr(LlamaContext, "decode", original))
            return
        modules = {}
        for loaded in all_models(ps):
            module = getattr(loaded.model, "model", loaded.model)  # an adapter view's base
            module = module if isinstance(module, torch.nn.Module) else loaded.model
            modules[id(module)] = module
        for module in modules.values():
            handle = module.register_forward_pre_hook(self._count, with_kwargs=True)
            self._undo.append(handle.remove)

    def _count(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        self.tokens = max(self.tokens, int(ids.shape[1]))

    def close(self) -> None:
        for undo in self._undo:
            undo()


@pytest.mark.parametrize(("name", "cache"), CASES)
def test_chunked_prefill_equals_whole_prefills(
    families: dict[str, PolicySet], name: str, cache: str
) -> None:
    ps = _family(families, name, cache)
    results, widest = {}, {}
    for chunk in (0, CHUNK):
        with _engine(ps, name, chunk) as engine:
            log, width = ChunkLog(engine), Widest(ps)
            requests = _requests(engine)
            if cache == "llama.cpp":  # one at a time (below)
                results[chunk] = [list(engine.submit(request)) for request in requests]
            else:
                streams = [engine.submit(request) for request in requests]
                results[chunk] = [list(stream) for stream in streams]
            width.close()
            widest[chunk] = width.tokens
        # chunking off: every prompt whole; on: the long prompt in chunks of CHUNK
        assert any(kind == "chunk" for kind, _ in log.steps) == (chunk > 0), name
    # Each piece ran only its own tokens (a persona's first piece: after its opening).
    extra = ps.personas.longest_extra if ps.personas is not None else 0
    assert widest[0] >= len(requests[0].prompt_ids) > CHUNK + extra
    assert widest[CHUNK] <= CHUNK + extra, (name, cache)
    # llama.cpp runs the requests one at a time: its logits move (by up to 1.3e-2 on the
    # tiny GGUF, measured) when other sequences' cells lie between a sequence's, chunked
    # or not, which flips greedy near-ties of a random model; alone, chunked equals whole.
    tolerance = 1e-4  # float32 sums over chunks and whole prompts differ by ~1e-5
    for got, want in zip(results[CHUNK], results[0]):
        assert [e.token_id for e in got] == [e.token_id for e in want], (name, cache)
        for a, b in zip(got, want):
            assert a.logprob == pytest.approx(b.logprob, abs=tolerance)
            for policy, value in b.policy_logprobs.items():
                other = a.policy_logprobs[policy]
                assert (other is None) == (value is None)
                if value is not None:
                    assert other == pytest.approx(value, abs=tolerance), (name, policy)


def test_a_short_request_finishes_while_a_long_prompt_prefills(
    families: dict[str, PolicySet],
) -> None:
    ps = families["personas"]
    tok = ps.tokenizer
    with _engine(ps, "personas", 8) as engine:
        log = ChunkLog(engine)
        log.hold.clear()
        long_prompt = tok.encode("The quick brown fox jumps over the lazy dog." * 6)
        assert len(long_prompt) > 10 * 8  # many steps' budget
        greedy = SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True)
        long = engine.submit(GenerationRequest(long_prompt, greedy))
        log.ran.wait()  # the long prompt's first chunk ran; the engine waits on ``hold``
        short_params = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)
        short = engine.submit(GenerationRequest(tok.encode("hi"), short_params))
        log.hold.set()
        short_events = list(short)
        long_events = list(long)
    assert len(short_events) == 5 and len(long_events) == 1
    long_sid, short_sid = 0, 1
    # The short request joined and decoded its 5 tokens (1 at its join, 4 steps more)
    # before the long prompt's last chunk joined the batch, chunks running in between.
    assert log.last("decode", short_sid) < log.first("join", long_sid)
    between = log.steps[log.first("join", short_sid) : log.last("decode", short_sid)]
    assert ("chunk", [long_sid]) in between


def test_a_request_cancelled_while_prefilling_frees_its_rows(
    families: dict[str, PolicySet],
) -> None:
    ps = families["separate"]
    tok = ps.tokenizer
    with _engine(ps, "separate", 8) as engine:
        log = ChunkLog(engine)
        log.hold.clear()
        params = SamplingParams(max_new_tokens=4, temperature=0)
        stream = engine.submit(GenerationRequest(tok.encode("Thank you so much" * 20), params))
        log.ran.wait()
        runner: Any = engine.runner
        assert any(len(parts) for parts in runner.parts)  # its first chunk's caches
        stream.cancel()
        log.hold.set()
        events = list(stream)
        assert events[-1].finish_reason == "cancelled"
        assert engine.wait_until_idle(timeout=30)
        assert not any(len(parts) for parts in runner.parts)


def _seq(sid: int, prompt: int, prefilled: int = 0) -> Any:
    return SimpleNamespace(sid=sid, token_ids=[0] * prompt, prefilled=prefilled)


def test_the_plan_lets_short_prompts_join_and_the_oldest_long_one_advance() -> None:
    budget = KVBudget(10**9, [1], [[0]], True)  # plan() reads no budget: any will do
    scheduler = Scheduler(EngineLimits(prefill_chunk_tokens=100), budget)
    long, other, short, near = _seq(0, 1000, 300), _seq(1, 90), _seq(2, 40), _seq(3, 130)
    scheduler.admitted = [long, other, short, near]
    plan = scheduler.plan()
    # prompts within the budget join whole (a burst of short ones is not throttled); the
    # oldest long one takes a quarter, the nearest of the others the other 75
    assert plan.newcomers == [other, short]
    assert plan.chunks == [(long, 300 + 25), (near, 75)]
    long.prefilled, near.prefilled, scheduler.admitted = 325, 75, [long, near]
    plan = scheduler.plan()  # near's last 55 fit: it joins; the oldest takes the budget
    assert plan.newcomers == [near] and plan.chunks == [(long, 325 + 100)]
    long.prefilled, scheduler.admitted = 950, [long]
    assert scheduler.plan().newcomers == [long]  # its last 50 fit: it joins
    tiny = Scheduler(EngineLimits(prefill_chunk_tokens=3), budget)
    first, second = _seq(0, 10), _seq(1, 10)
    tiny.admitted = [first, second]
    assert tiny.plan().chunks == [(first, 1), (second, 2)]  # the oldest still advances
    off = Scheduler(EngineLimits(prefill_chunk_tokens=0), budget)
    off.admitted = [long, short]
    assert off.plan().newcomers == [long, short] and not off.plan().chunks
