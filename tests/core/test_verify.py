"""Multi-token verification in the runner seam: ``verify`` runs each row's newest token
and its drafts in one forward, ``rollback`` drops what the row rejects. Every position's
log-probs must equal a plain forward over that prefix, after rollbacks, joins and leaves."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest
import torch

from mpo_core.config import load_config
from mpo_core.models.kvcache import GrowingBatch, KVStorage, to_logprobs
from mpo_core.models.policies import PolicySet
from mpo_core.models.static_cache import StaticBatch
from mpo_core.runners import AdapterRunner, SeparateModelsRunner, load_policy_set, make_runner
from mpo_core.testing.lora import LoraShape, make_adapter_family


def _prompt(length: int, offset: int) -> list[int]:
    return [(offset + 7 * i) % 200 + 10 for i in range(length)]


@torch.inference_mode()
def _full(model: Any, ids: list[int], vocab: int) -> torch.Tensor:
    """Next-token log-probs after ``ids`` from one cache-free forward [V]."""
    return to_logprobs(model(input_ids=torch.tensor([ids])).logits[0, -1], vocab)


def _drive(batch: Any, rng: random.Random, check: Any) -> int:
    """Joins, leaves, plain decodes and verifies of random widths with random rollbacks;
    ``check(rid, prefix, logprobs)`` is called for every position produced. Returns how
    many positions were checked."""
    tokens_of: dict[int, list[int]] = {}
    checked = 0

    def join(rows: dict[int, list[int]]) -> None:
        nonlocal checked
        lp = batch.prefill(list(rows), list(rows.values()))
        for i, (rid, prompt) in enumerate(rows.items()):
            tokens_of[rid] = list(prompt)
            check(rid, prompt, lp[i])
            checked += 1
        for rid in rows:  # the newest token: not in the cache yet
            tokens_of[rid].append(rng.randrange(10, 200))

    def verify_step() -> None:
        nonlocal checked
        ids = list(batch.row_ids)
        drafts = {r: [rng.randrange(10, 200) for _ in range(rng.randrange(0, 4))] for r in ids}
        width = 1 + max(len(d) for d in drafts.values())
        tokens, positions = [], []
        for r in ids:
            row = [tokens_of[r][-1], *drafts[r]]
            pad = width - len(row)
            tokens.append(row + [row[-1]] * pad)
            first = len(tokens_of[r]) - 1
            positions.append([first + j for j in range(len(row))] + [first + len(row) - 1] * pad)
        lp = batch.verify(torch.tensor(tokens), torch.tensor(positions))  # [B, G, V]
        kept = []
        for i, r in enumerate(ids):
            for j in range(1 + len(drafts[r])):
                check(r, tokens_of[r] + drafts[r][:j], lp[i, j])
                checked += 1
            kept.append(1 + rng.randrange(0, 1 + len(drafts[r])))
        batch.rollback(kept)
        for i, r in enumerate(ids):
            tokens_of[r] += drafts[r][: kept[i] - 1] + [rng.randrange(10, 200)]

    def decode_step() -> None:
        nonlocal checked
        ids = list(batch.row_ids)
        lp = batch.decode(
            torch.tensor([tokens_of[r][-1] for r in ids]),
            torch.tensor([len(tokens_of[r]) - 1 for r in ids]),
        )
        for i, r in enumerate(ids):
            check(r, tokens_of[r], lp[i])
            checked += 1
            tokens_of[r].append(rng.randrange(10, 200))

    join({0: _prompt(9, 0), 1: _prompt(3, 1)})
    for _ in range(3):
        verify_step()
    decode_step()
    join({2: _prompt(14, 2)})
    for _ in range(4):
        verify_step()
    batch.keep({1, 2})
    verify_step()
    join({3: _prompt(2, 3)})
    for _ in range(14):  # a 56-column static cache compacts (squeezing dead columns)
        verify_step()
    decode_step()
    return checked


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["growing", "static"])
def test_every_verified_position_equals_a_plain_forward(arch, kind, policy_sets):
    ps: PolicySet = policy_sets[arch]
    model = ps.policies[0]
    if kind == "growing":
        batch: Any = GrowingBatch(model, ps.vocab_size, ps.device, KVStorage(None))
    else:
        batch = StaticBatch(model, ps.vocab_size, ps.device, slots=4, max_len=56)
    worst = [0.0]

    def check(rid: int, prefix: list[int], lp: torch.Tensor) -> None:
        worst[0] = max(
            worst[0], float((lp - _full(model.model, prefix, ps.vocab_size)).abs().max())
        )

    assert _drive(batch, random.Random(arch + kind), check) > 60
    assert worst[0] < 1e-5
    if kind == "static":
        assert batch.compactions >= 1
        assert int(batch.mask[: len(batch)].sum(dim=1).max()) < batch.column + 1


def test_rollback_crops_columns_no_row_keeps(llama_set):
    ps = llama_set
    batch = GrowingBatch(ps.policies[0], ps.vocab_size, ps.device, KVStorage(None))
    batch.prefill([0, 1], [_prompt(5, 0), _prompt(5, 1)])
    batch.verify(torch.tensor([[11, 12, 13, 14]] * 2), torch.tensor([[5, 6, 7, 8]] * 2))
    batch.rollback([2, 1])
    assert batch.mask.shape[1] == 5 + 2  # the two columns neither row kept are gone
    assert batch.mask[:, -2:].tolist() == [[1, 1], [1, 0]]  # row 1's second one is a hole
    assert batch.cache is not None and batch.cache.get_seq_length() == 7


@dataclasses.dataclass
class _Row:
    sid: int
    token_ids: list[int]
    coefs: tuple[float, ...]


def _drive_runner(runner: Any, ps: PolicySet, reference: Any) -> int:
    """A runner's ``verify``/``rollback`` with joins and a leave; every position of every
    model a row needs is compared with ``reference(m, prefix)``."""
    rng = random.Random(1)
    k = len(ps.names)
    one_hot = (1.0, *([0.0] * (k - 1)), 0.0)
    blend = (*([0.6 / k] * k), 0.4)
    running: list[_Row] = []
    checked = 0
    worst = 0.0

    def step(newcomers: list[_Row]) -> None:
        nonlocal checked, worst
        drafts = {r.sid: [rng.randrange(10, 200) for _ in range(rng.randrange(4))] for r in running}
        out = runner.verify(running, drafts, newcomers).logprobs  # [M, B, G, V]
        rows = [*running, *newcomers]
        for b, row in enumerate(rows):
            draft = drafts.get(row.sid, [])
            for m, coef in enumerate(row.coefs):
                if coef == 0:
                    continue
                for j in range(1 + len(draft)):
                    want = reference(m, row.token_ids + draft[:j])
                    worst = max(worst, float((out[m, b, j] - want).abs().max()))
                    checked += 1
        kept = {r.sid: 1 + rng.randrange(1 + len(drafts[r.sid])) for r in running}
        runner.rollback(kept)
        for row in running:
            row.token_ids += drafts[row.sid][: kept[row.sid] - 1]
        for row in rows:
            row.token_ids.append(rng.randrange(10, 200))
        running.extend(newcomers)

    step([_Row(0, _prompt(6, 0), one_hot), _Row(1, _prompt(3, 1), blend)])
    step([])
    step([_Row(2, _prompt(9, 2), blend)])
    step([])
    running.pop(0)
    runner.keep({r.sid for r in running})
    step([])
    step([])
    assert worst < 1e-5
    return checked


def test_separate_runner_verify(llama_set):
    ps = llama_set
    models = [*ps.policies, ps.reference]

    def reference(m: int, prefix: list[int]) -> torch.Tensor:
        return _full(models[m].model, prefix, ps.vocab_size)

    assert _drive_runner(SeparateModelsRunner(ps), ps, reference) > 40


@pytest.fixture(scope="module")
def adapter_family(tmp_path_factory: pytest.TempPathFactory) -> PolicySet:
    shapes = [LoraShape(r=4, targets="attention"), LoraShape(r=2, targets="all")]
    paths = make_adapter_family(tmp_path_factory.mktemp("verify_lora"), shapes, merged=False)
    return load_policy_set(load_config(paths.adapters_yaml))


@pytest.mark.parametrize("static", [False, True])
def test_adapter_runner_verify_in_one_grouped_forward(adapter_family, static):
    ps = adapter_family
    if static:
        config = ps.config.model_copy(update={"static_cache": "on", "max_cache_len": 64})
        runner, _ = make_runner(dataclasses.replace(ps, config=config), 4, 64)
        assert isinstance(runner.batch, StaticBatch)
    else:
        runner = AdapterRunner(ps, max_rows=4)
    assert isinstance(runner, AdapterRunner)
    calls = []
    verify = runner.batch.verify

    def counted(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        calls.append(tokens.shape[0])
        return verify(tokens, positions)

    runner.batch.verify = counted  # type: ignore[method-assign]

    def reference(m: int, prefix: list[int]) -> torch.Tensor:
        runner._set_index([m])  # one row running model m (the base is m = K)
        return _full(runner.shared.model, prefix, ps.vocab_size)

    assert _drive_runner(runner, ps, reference) > 40
    # One grouped forward per step that has running rows, over every slot: the
    # one-hot row holds 1 slot, a blended row K + 1 = 3.
    assert calls == [1 + 3, 1 + 3, 1 + 3 + 3, 3 + 3, 3 + 3]


def test_growing_cache_squeezes_holes_exactly(llama_set):
    """Rows that take turns rejecting leave holes in the longest row: once they add up
    the cache gathers each row's live columns, and the log-probs do not move."""
    ps = llama_set
    model = ps.policies[0]
    batch = GrowingBatch(model, ps.vocab_size, ps.device, KVStorage(None))
    tokens_of = {0: _prompt(4, 0), 1: _prompt(7, 1)}
    batch.prefill([0, 1], [list(t) for t in tokens_of.values()])
    for r in tokens_of:
        tokens_of[r].append(20 + r)
    widths = []
    for step in range(40):
        drafts = {r: [(step * 13 + r * 5 + j) % 190 + 10 for j in range(3)] for r in (0, 1)}
        tokens = [[tokens_of[r][-1], *drafts[r]] for r in (0, 1)]
        positions = [[len(tokens_of[r]) - 1 + j for j in range(4)] for r in (0, 1)]
        lp = batch.verify(torch.tensor(tokens), torch.tensor(positions))
        for i, r in enumerate((0, 1)):
            for j in range(4):
                want = _full(model.model, tokens_of[r] + drafts[r][:j], ps.vocab_size)
                assert float((lp[i, j] - want).abs().max()) < 1e-5
        kept = [4, 1] if step % 2 else [1, 4]
        batch.rollback(kept)
        widths.append(batch.mask.shape[1])
        for i, r in enumerate((0, 1)):
            tokens_of[r] += drafts[r][: kept[i] - 1] + [(step + r) % 190 + 10]
    assert any(b < a for a, b in zip(widths, widths[1:]))  # a squeeze happened
    assert widths[-1] < len(tokens_of[0]) + 32 + 8
