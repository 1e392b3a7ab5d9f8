"""The backend contract (runners/base.py), one suite run over every backend: K separate
models, one base with K LoRA adapters, one model with K personas (and separate models
over an adapter family's views), and llama.cpp's two GGUF families (personas of one file,
K full files) when llama-cpp-python is installed. Adding a backend adds one entry to
``FAMILIES`` (and, for a backend that does not run transformers models, its own "direct"
forward in ``DIRECT`` and its own row count in ``COUNTERS``).

- each row's log-probs of each model it needs equal that model's own forward over the
  row's tokens (its persona's rendering of them), on the prefill step and the decode
  steps after it, whatever else shares the batch, joins mid-batch included;
- a verify of drafted tokens gives each position the model's own forward there, and a
  rollback to the kept drafts leaves the runner where plain steps would have;
- rows of ``logprobs`` follow ``[*running, *newcomers]`` and match each row run alone;
- a model whose coefficient for a row is 0 costs that row nothing: the rows that go
  through forwards in a step are exactly the (row, needed model) pairs (plus the filler
  rows a backend declares in ``pad_rows``);
- ``keep`` forgets every other row, and ``keep(set())`` empties the runner;
- scoring and prompt log-probs equal teacher forcing; the declared capabilities hold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from mpo_core.config import load_config
from mpo_core.decoding.mixing import Mixture
from mpo_core.models.kvcache import to_logprobs
from mpo_core.models.policies import PolicySet
from mpo_core.runners import (
    AdapterRunner,
    LlamaCppRunner,
    PersonaRunner,
    PolicyRunner,
    SeparateModelsRunner,
    all_models,
    capabilities_of,
    context_limit,
    load_policy_set,
    make_runner,
)
from mpo_core.runners.llama_context import llama_cpp_available
from mpo_core.testing.families import make_persona_family
from mpo_core.testing.gguf import make_gguf_family, make_gguf_persona_family
from mpo_core.testing.llama import LlamaDirect, LlamaRows
from mpo_core.testing.lora import LoraShape, make_adapter_family

# name -> (which family, how its runner is built: None = make_runner's choice)
FAMILIES: dict[str, tuple[str, type | None]] = {
    "separate": ("separate", None),
    "adapters": ("adapters", None),
    "personas": ("personas", None),
    "separate-over-views": ("adapters", SeparateModelsRunner),
    "llama.cpp-personas": ("gguf-personas", None),
    "llama.cpp-separate": ("gguf-separate", None),
}
EXPECTED = {
    "separate": SeparateModelsRunner,
    "adapters": AdapterRunner,
    "personas": PersonaRunner,
    "llama.cpp-personas": LlamaCppRunner,
    "llama.cpp-separate": LlamaCppRunner,
}
SHARED_FORWARD = {"adapters", "personas", "llama.cpp-personas"}
# llama.cpp's numerics depend on how a batch is composed (which tokens of which
# sequences share a llama_decode, and so which matrix kernels and KV layout run); the
# served rows and the independent computation differ by a few 1e-5, never 1e-3.
TOLERANCE = {"llama.cpp-personas": 1e-3, "llama.cpp-separate": 1e-3}
_DIRECT: dict[int, LlamaDirect] = {}  # id(policy set) -> its independent llama.cpp forward


@pytest.fixture(scope="module", autouse=True)
def _close_direct_models() -> Iterator[None]:
    yield
    for direct in _DIRECT.values():
        direct.close()
    _DIRECT.clear()


@pytest.fixture(scope="module")
def families(llama_family: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, PolicySet]:
    shapes = [LoraShape(r=4, alpha=8, targets="all")] * 3
    adapters = make_adapter_family(tmp_path_factory.mktemp("contract_lora"), shapes)
    personas = make_persona_family(tmp_path_factory.mktemp("contract_personas"), True)
    loaded = {
        "separate": load_policy_set(load_config(llama_family)),
        "adapters": load_policy_set(load_config(adapters.adapters_yaml)),
        "personas": load_policy_set(load_config(personas)),
    }
    if llama_cpp_available():
        gguf = tmp_path_factory.mktemp("contract_gguf")
        loaded["gguf-personas"] = load_policy_set(load_config(make_gguf_persona_family(gguf)))
        loaded["gguf-separate"] = load_policy_set(load_config(make_gguf_family(gguf)))
    return loaded


@pytest.fixture(params=list(FAMILIES))
def family(request: pytest.FixtureRequest, families: dict[str, PolicySet]) -> tuple[str, PolicySet]:
    name = request.param
    if FAMILIES[name][0] not in families:
        pytest.skip("llama-cpp-python is not installed (the `llama` extra)")
    return name, families[FAMILIES[name][0]]


def _close(got: torch.Tensor, want: torch.Tensor, kind: str) -> None:
    tolerance = TOLERANCE.get(kind, 1e-4)
    torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)


@dataclass
class FakeRow:
    sid: int
    token_ids: list[int]
    coefs: tuple[float, ...]
    seen: list[torch.Tensor] = field(default_factory=list)  # [M, V] per step


def _runner(ps: PolicySet, name: str = "") -> PolicyRunner:
    build = FAMILIES.get(name, ("", None))[1]
    if build is not None:
        return build(ps, 8)
    runner, _ = make_runner(ps, max_rows=8, max_context=ps.max_context)
    return runner


def _inputs(ps: PolicySet, model: int, tokens: Sequence[int]) -> list[int]:
    """What model ``model`` reads for ``tokens``: a persona its own rendering."""
    return ps.personas.render(model, list(tokens)) if ps.personas is not None else list(tokens)


def _direct(ps: PolicySet, model: int, tokens: Sequence[int]) -> torch.Tensor:
    """Model ``model``'s next-token log-probs after ``tokens``, without any cache: [V]
    (a GGUF member: through llama-cpp-python's own ``Llama``, not the runner's code)."""
    if ps.backend == LlamaCppRunner.kind:
        direct = _DIRECT.setdefault(id(ps), LlamaDirect(ps))
        return direct.next_logprobs(model, _inputs(ps, model, tokens))
    loaded = all_models(ps)[model]
    logits = loaded.model(torch.tensor([_inputs(ps, model, tokens)], device=ps.device)).logits
    return to_logprobs(logits[:, -1], ps.vocab_size)[0]


def _rows(ps: PolicySet) -> list[FakeRow]:
    names = ps.names
    mixtures = [
        ({names[0]: 1.0}, 1.0),  # one policy
        ({names[0]: 0.4, names[2]: 0.6}, 0.5),  # two policies and the reference
        ({names[1]: 1.0}, 0.0),  # the reference alone
        ({n: 1.0 for n in names}, 1.0),  # every policy
    ]
    rows = []
    for sid, (weights, strength) in enumerate(mixtures):
        coefs = Mixture.build(names, weights, strength, has_reference=True).coefficients
        prompt = ps.tokenizer.encode("Thank you so much" + " x" * (3 * sid))
        rows.append(FakeRow(sid, prompt, coefs))
    return rows


class ForwardRows:
    """Counts the batch rows that go through the family's model(s) in forwards."""

    def __init__(self, ps: PolicySet) -> None:
        modules = {}
        for loaded in all_models(ps):
            module = getattr(loaded.model, "model", loaded.model)  # an adapter view's base
            module = module if isinstance(module, torch.nn.Module) else loaded.model
            modules[id(module)] = module
        self.rows = 0
        self._handles = [
            m.register_forward_pre_hook(self._count, with_kwargs=True) for m in modules.values()
        ]

    def _count(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.rows += int(ids.shape[0])

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


@pytest.fixture()
def counter(family: tuple[str, PolicySet]) -> Iterator[ForwardRows | LlamaRows]:
    ps = family[1]
    counting = LlamaRows() if ps.backend == LlamaCppRunner.kind else ForwardRows(ps)
    yield counting
    counting.close()


def _needed(row: FakeRow) -> list[int]:
    return [m for m, c in enumerate(row.coefs) if c != 0]


def _decode_rows(runner: PolicyRunner, slots: int) -> int:
    """Rows a decode step of ``slots`` (row, model) pairs runs: padded where declared."""
    pad_rows: dict[int, int] = getattr(runner, "pad_rows", {})
    return pad_rows.get(slots, slots)


def _run(
    runner: PolicyRunner, schedule: list[tuple[list[FakeRow], list[FakeRow]]], on_step: Callable
) -> None:
    """Run (running, newcomers) steps; each row then appends a next token fixed by its
    sid and how many steps it has run."""
    for step, (running, newcomers) in enumerate(schedule):
        output = runner.step(running, newcomers)
        on_step(step, output)
        for i, row in enumerate([*running, *newcomers]):
            row.seen.append(output.logprobs[:, i].clone())  # [M, V]
            row.token_ids.append(7 + (row.sid + len(row.seen)) % 5)


def _alone(ps: PolicySet, template: FakeRow, steps: int) -> list[torch.Tensor]:
    row = FakeRow(template.sid, list(template.token_ids[: -len(template.seen)]), template.coefs)
    runner = _runner(ps)
    _run(runner, [([], [row])] + [([row], [])] * (steps - 1), lambda *_: None)
    return row.seen


def test_rows_follow_the_call_order_and_match_each_row_alone(
    family: tuple[str, PolicySet],
) -> None:
    kind, ps = family
    runner = _runner(ps, kind)
    a, b, c, d = _rows(ps)
    schedule = [([], [a, b]), ([a, b], [c]), ([a, b, c], [d]), ([c, a, d, b], [])]
    _run(runner, schedule, lambda *_: None)
    for row, first_step in ((a, 0), (b, 0), (c, 1), (d, 2)):
        want = _alone(ps, row, len(row.seen))
        assert len(row.seen) == 4 - first_step
        for got_m, want_m in zip(row.seen, want):
            needed = _needed(row)
            atol = TOLERANCE.get(kind, 1e-5)
            assert torch.allclose(got_m[needed], want_m[needed], atol=atol), (kind, row.sid)


def test_models_a_row_does_not_need_cost_it_nothing(
    family: tuple[str, PolicySet], counter: ForwardRows | LlamaRows
) -> None:
    kind, ps = family
    runner = _runner(ps, kind)
    rows = _rows(ps)
    per_step: list[int] = []

    def count(_step: int, _output: Any) -> None:
        per_step.append(counter.rows)
        counter.rows = 0

    _run(runner, [([], rows), (rows, [])], count)
    slots = sum(len(_needed(r)) for r in rows)
    assert slots < len(rows) * (len(ps.names) + 1)  # some coefficients are 0
    assert per_step[0] >= slots  # the prefill ran every needed pair (maybe in groups)
    assert per_step[1] == _decode_rows(runner, slots), kind  # one per (row, needed model)


def test_keep_forgets_the_other_rows(
    family: tuple[str, PolicySet], counter: ForwardRows | LlamaRows
) -> None:
    kind, ps = family
    runner = _runner(ps, kind)
    a, b, c, d = _rows(ps)
    _run(runner, [([], [a, b, c]), ([a, b, c], [])], lambda *_: None)
    runner.keep({b.sid})
    counter.rows = 0
    _run(runner, [([b], [])], lambda *_: None)
    decode = _decode_rows(runner, len(_needed(b)))
    fillers = decode - len(_needed(b))  # prefilled (one token each) before they decode
    assert counter.rows == decode + fillers, kind
    want = _alone(ps, b, len(b.seen))
    atol = TOLERANCE.get(kind, 1e-5)
    assert torch.allclose(b.seen[-1][_needed(b)], want[-1][_needed(b)], atol=atol)
    runner.keep(set())
    counter.rows = 0
    _run(runner, [([], [d]), ([d], [])], lambda *_: None)
    decode_rows = counter.rows
    assert decode_rows >= 2 * len(_needed(d))  # prefill + one decode, d only
    counter.rows = 0
    _run(runner, [([d], [])], lambda *_: None)
    assert counter.rows == _decode_rows(runner, len(_needed(d)))


def test_each_row_gets_its_models_own_forward(family: tuple[str, PolicySet]) -> None:
    kind, ps = family
    runner = _runner(ps, kind)
    a, b, c, _ = _rows(ps)

    def check(rows: list[FakeRow], logprobs: torch.Tensor) -> None:
        assert logprobs.shape == (len(all_models(ps)), len(rows), ps.vocab_size)
        for i, row in enumerate(rows):
            for m in _needed(row):  # entries of a model the row does not need: unspecified
                _close(logprobs[m, i], _direct(ps, m, row.token_ids), kind)

    check([a, b], runner.step([], [a, b]).logprobs)  # prefill
    a.token_ids.append(7)
    b.token_ids.append(9)
    check([a, b, c], runner.step([a, b], [c]).logprobs)  # decode + a join mid-batch
    runner.keep({c.sid})  # the first two finish
    c.token_ids.append(11)
    check([c], runner.step([c], []).logprobs)  # alone after the others left


def test_verify_then_rollback_equals_plain_steps(family: tuple[str, PolicySet]) -> None:
    kind, ps = family
    runner = _runner(ps, kind)
    a, b, c, d = _rows(ps)
    runner.step([], [a, b, c])
    for row in (a, b, c):
        row.token_ids.append(7)
    drafts = {a.sid: [3, 4, 5], b.sid: [6]}  # c drafts nothing; d joins
    output = runner.verify([a, b, c], drafts, [d])
    assert output.logprobs.shape == (len(all_models(ps)), 4, 4, ps.vocab_size)  # [M, B, G, V]
    for i, row in enumerate((a, b, c)):
        proposed = drafts.get(row.sid, [])
        for j in range(1 + len(proposed)):
            for m in _needed(row):
                want = _direct(ps, m, row.token_ids + proposed[:j])
                _close(output.logprobs[m, i, j], want, kind)
    for m in _needed(d):  # a newcomer has position 0 only
        _close(output.logprobs[m, 3, 0], _direct(ps, m, d.token_ids), kind)
    # a keeps two drafts (3 columns), b none (1), c its only column
    runner.rollback({a.sid: 3, b.sid: 1, c.sid: 1})
    a.token_ids += [3, 4]
    for row in (a, b, c, d):
        row.token_ids.append(8)
    after = runner.step([a, b, c, d], []).logprobs
    for i, row in enumerate((a, b, c, d)):
        for m in _needed(row):
            _close(after[m, i], _direct(ps, m, row.token_ids), kind)


def test_scoring_and_prompt_logprobs_are_teacher_forcing(family: tuple[str, PolicySet]) -> None:
    kind, ps = family
    runner = _runner(ps, kind)
    tok = ps.tokenizer
    prompt, completion = tok.encode("Say thanks."), tok.encode(" Thank you!")
    result = runner.score([prompt], [completion], chunk_tokens=4096)
    ids = prompt + completion
    k = len(ps.names)
    for m in range(k + 1):
        total = sum(_direct(ps, m, ids[:t])[ids[t]].item() for t in range(len(prompt), len(ids)))
        got = result.policy_logprobs[0, m] if m < k else result.reference_logprobs[0]  # type: ignore[index]
        assert got.item() == pytest.approx(total, abs=10 * TOLERANCE.get(kind, 1e-4)), (kind, m)
    positions = runner.prompt_positions(ids, list(range(k + 1)))
    for m, rows in positions.items():
        # a persona also predicts the first token (after its own opening)
        assert 0 < len(rows) <= len(ids)
        for r in range(len(rows)):  # row r predicts token len(ids) - len(rows) + r
            t = len(ids) - len(rows) + r
            if t > 0:
                _close(rows[r], _direct(ps, m, ids[:t]), kind)


def test_the_declared_capabilities_hold(family: tuple[str, PolicySet]) -> None:
    kind, ps = family
    runner = _runner(ps, kind)
    if FAMILIES[kind][1] is None:
        assert isinstance(runner, EXPECTED[kind])
        assert runner.capabilities == capabilities_of(ps)
    caps = runner.capabilities
    distinct = {id(m.model) for m in all_models(ps)}
    assert caps.shared_forward == (kind in SHARED_FORWARD)
    assert caps.shared_forward or len(distinct) == len(all_models(ps)) or kind.endswith("views")
    tok = ps.tokenizer
    prompts, replies = [tok.encode("Hello")], [tok.encode(" there")]
    scored = runner.score(prompts, replies, 4096)
    if caps.reference_alone:
        alone = runner.score_reference(prompts, replies, 4096)
        assert scored.reference_logprobs is not None
        _close(alone, scored.reference_logprobs, kind)
    else:
        with pytest.raises(NotImplementedError):
            runner.score_reference(prompts, replies, 4096)
    coefs = [[1.0 / len(ps.names)] * len(ps.names)]
    if caps.token_moments:
        with_moments, moments = runner.score_with_moments(prompts, replies, coefs)
        torch.testing.assert_close(
            with_moments.policy_logprobs.float(),
            scored.policy_logprobs.float(),
            atol=1e-4,
            rtol=1e-4,
        )
        assert moments.shape == (1, len(ps.names))
    else:
        with pytest.raises(NotImplementedError):
            runner.score_with_moments(prompts, replies, coefs)
    assert runner.describe()["backend"] == ps.backend


def test_make_runner_settles_the_context(families: dict[str, PolicySet]) -> None:
    runner, limit = make_runner(families["separate"], max_rows=4, max_context=100)
    assert limit == 100 and runner.max_context is None  # growing caches: no limit of their own

    class Capped:
        max_context: int | None = 48

    assert context_limit(Capped(), 100) == 48  # type: ignore[arg-type]
    assert context_limit(Capped(), 32) == 32  # type: ignore[arg-type]
