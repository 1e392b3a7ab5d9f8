"""The runner contract (runners/base.py), checked the same way on every backend: K
separate models, one base with K LoRA adapters, one model with K personas.

- rows of ``logprobs`` follow ``[*running, *newcomers]``, and each row gets what it
  gets when it runs alone (batching and joins change nothing);
- a model whose coefficient for a row is 0 costs that row nothing: the rows that go
  through forwards in a step are exactly the (row, needed model) pairs (plus the filler
  rows a backend declares in ``pad_rows``, row counts it pads to a faster shape);
- ``keep`` forgets every other row: the kept ones go on as before, the others cost
  nothing from then on, and ``keep(set())`` empties the runner.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from mpo_core.config import load_config
from mpo_core.decoding.mixing import Mixture
from mpo_core.models.policies import PolicySet, load_policy_set
from mpo_core.runners import (
    AdapterRunner,
    PersonaRunner,
    PolicyRunner,
    SeparateModelsRunner,
    all_models,
    make_runner,
)
from mpo_core.testing.families import make_persona_family
from mpo_core.testing.lora import LoraShape, make_adapter_family

BACKENDS = {
    "separate": SeparateModelsRunner,
    "adapters": AdapterRunner,
    "personas": PersonaRunner,
}


@pytest.fixture(scope="module", params=list(BACKENDS))
def family(
    request: pytest.FixtureRequest, llama_family: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, PolicySet]:
    kind = request.param
    if kind == "separate":
        path = llama_family
    elif kind == "adapters":
        shapes = [LoraShape(r=4, alpha=8, targets="all")] * 3
        path = make_adapter_family(tmp_path_factory.mktemp("contract_lora"), shapes).adapters_yaml
    else:
        path = make_persona_family(tmp_path_factory.mktemp("contract_personas"), True)
    return kind, load_policy_set(load_config(path))


@dataclass
class FakeRow:
    sid: int
    token_ids: list[int]
    coefs: tuple[float, ...]
    seen: list[torch.Tensor] = field(default_factory=list)  # [M, V] per step


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
def counter(family: tuple[str, PolicySet]) -> Iterator[ForwardRows]:
    counting = ForwardRows(family[1])
    yield counting
    counting.close()


def _runner(ps: PolicySet) -> PolicyRunner:
    runner, _ = make_runner(ps, max_rows=8, max_context=ps.max_context)
    return runner


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
    runner = _runner(ps)
    assert isinstance(runner, BACKENDS[kind])
    a, b, c, d = _rows(ps)
    schedule = [([], [a, b]), ([a, b], [c]), ([a, b, c], [d]), ([c, a, d, b], [])]
    _run(runner, schedule, lambda *_: None)
    for row, first_step in ((a, 0), (b, 0), (c, 1), (d, 2)):
        want = _alone(ps, row, len(row.seen))
        assert len(row.seen) == 4 - first_step
        for got_m, want_m in zip(row.seen, want):
            needed = _needed(row)
            assert torch.allclose(got_m[needed], want_m[needed], atol=1e-5), (kind, row.sid)


def test_models_a_row_does_not_need_cost_it_nothing(
    family: tuple[str, PolicySet], counter: ForwardRows
) -> None:
    kind, ps = family
    runner = _runner(ps)
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


def test_keep_forgets_the_other_rows(family: tuple[str, PolicySet], counter: ForwardRows) -> None:
    kind, ps = family
    runner = _runner(ps)
    a, b, c, d = _rows(ps)
    _run(runner, [([], [a, b, c]), ([a, b, c], [])], lambda *_: None)
    runner.keep({b.sid})
    counter.rows = 0
    _run(runner, [([b], [])], lambda *_: None)
    decode = _decode_rows(runner, len(_needed(b)))
    fillers = decode - len(_needed(b))  # prefilled (one token each) before they decode
    assert counter.rows == decode + fillers, kind
    want = _alone(ps, b, len(b.seen))
    assert torch.allclose(b.seen[-1][_needed(b)], want[-1][_needed(b)], atol=1e-5)
    runner.keep(set())
    counter.rows = 0
    _run(runner, [([], [d]), ([d], [])], lambda *_: None)
    decode_rows = counter.rows
    assert decode_rows >= 2 * len(_needed(d))  # prefill + one decode, d only
    counter.rows = 0
    _run(runner, [([d], [])], lambda *_: None)
    assert counter.rows == _decode_rows(runner, len(_needed(d)))
