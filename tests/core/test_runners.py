"""The runner seam (``mpo_core/runners``): rows in, per-model next-token log-probs out.

The contract, run over every backend: for each row, the log-probs of each model it needs
equal that model's own forward over the row's tokens, on the prefill step and on the
decode steps after it, whatever else shares the batch; ``keep`` forgets rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
import torch

from mpo_core.config import load_config
from mpo_core.models.kvcache import to_logprobs
from mpo_core.models.policies import PolicySet, load_policy_set
from mpo_core.runners import (
    AdapterRunner,
    PolicyRunner,
    SeparateModelsRunner,
    all_models,
    context_limit,
    make_runner,
)
from mpo_core.testing.lora import LoraShape, make_adapter_family


@dataclass
class FakeRow:
    sid: int
    token_ids: list[int]
    coefs: Sequence[float]
    generated: list[int] = field(default_factory=list)


@pytest.fixture(scope="module")
def adapter_set(tmp_path_factory: pytest.TempPathFactory) -> PolicySet:
    shapes = [LoraShape(r=4, alpha=8, targets="attention"), LoraShape(r=2, alpha=4)]
    paths = make_adapter_family(tmp_path_factory.mktemp("runner_lora"), shapes, merged=False)
    return load_policy_set(load_config(paths.adapters_yaml))


Backend = Callable[[PolicySet], PolicyRunner]
BACKENDS: dict[str, tuple[str, Backend]] = {
    "separate": ("llama_set", SeparateModelsRunner),
    "adapters": ("adapter_set", AdapterRunner),
    "separate-over-views": ("adapter_set", SeparateModelsRunner),
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> tuple[PolicySet, PolicyRunner]:
    fixture, build = BACKENDS[request.param]
    policy_set: PolicySet = request.getfixturevalue(fixture)
    return policy_set, build(policy_set)


def _direct(policy_set: PolicySet, model: int, token_ids: list[int]) -> torch.Tensor:
    """Model ``model``'s next-token log-probs after ``token_ids``, without any cache."""
    loaded = all_models(policy_set)[model]
    logits = loaded.model(torch.tensor([token_ids], device=policy_set.device)).logits
    return to_logprobs(logits[:, -1], policy_set.vocab_size)[0]  # [V]


def _check(policy_set: PolicySet, rows: list[FakeRow], logprobs: torch.Tensor) -> None:
    assert logprobs.shape == (len(all_models(policy_set)), len(rows), policy_set.vocab_size)
    for b, row in enumerate(rows):
        for m, coef in enumerate(row.coefs):
            if coef != 0:  # entries of a model the row does not need are unspecified
                want = _direct(policy_set, m, row.token_ids)
                torch.testing.assert_close(logprobs[m, b], want, atol=1e-4, rtol=1e-4)


def test_every_backend_gives_each_row_its_models_log_probs(
    backend: tuple[PolicySet, PolicyRunner],
) -> None:
    policy_set, runner = backend
    k = len(policy_set.names)
    tok = policy_set.tokenizer
    one_hot = [1.0] + [0.0] * (k - 1) + [0.0]  # the first policy alone, s = 1
    blend = [0.3] + [0.7 / (k - 1)] * (k - 1) + [0.0]  # every policy, no reference
    with_ref = [0.5 * c for c in blend[:k]] + [0.5]  # s = 0.5: the reference too
    first = [FakeRow(0, tok.encode("Could you help me?"), one_hot),
             FakeRow(1, tok.encode("Thanks"), blend)]  # fmt: skip
    _check(policy_set, first, runner.step([], first).logprobs)  # prefill
    for row, token in zip(first, (7, 9)):
        row.token_ids.append(token)
    late = FakeRow(2, tok.encode("Numbers like 0 1 2"), with_ref)
    _check(policy_set, [*first, late], runner.step(first, [late]).logprobs)  # decode + join
    runner.keep({2})  # the first two finish
    late.token_ids.append(11)
    _check(policy_set, [late], runner.step([late], []).logprobs)  # alone after the others left


def test_make_runner_picks_the_backend_and_settles_the_context(
    llama_set: PolicySet, adapter_set: PolicySet
) -> None:
    runner, limit = make_runner(llama_set, max_rows=4, max_context=100)
    assert isinstance(runner, SeparateModelsRunner) and limit == 100
    assert runner.max_context is None  # growing caches: no limit of their own
    adapters, limit = make_runner(adapter_set, max_rows=4, max_context=64)
    assert isinstance(adapters, AdapterRunner) and limit == 64


def test_every_backend_scores_like_teacher_forcing(backend: tuple[PolicySet, PolicyRunner]) -> None:
    policy_set, runner = backend
    tok = policy_set.tokenizer
    prompt, completion = tok.encode("Say thanks."), tok.encode(" Thank you!")
    result = runner.score([prompt], [completion], chunk_tokens=4096)
    ids = prompt + completion
    for m, loaded in enumerate(all_models(policy_set)):
        total = sum(
            _direct(policy_set, m, ids[:t])[ids[t]].item() for t in range(len(prompt), len(ids))
        )
        got = (
            result.policy_logprobs[0, m]
            if m < len(policy_set.names)
            else result.reference_logprobs[0]  # type: ignore[index]
        )
        assert got.item() == pytest.approx(total, abs=1e-3), loaded.name


def test_runner_limits_cap_the_engine_context() -> None:
    class Capped:
        max_context: int | None = 48

    class Unbounded:
        max_context: int | None = None

    assert context_limit(Capped(), 100) == 48  # type: ignore[arg-type]
    assert context_limit(Capped(), 32) == 32  # type: ignore[arg-type]
    assert context_limit(Unbounded(), 100) == 100  # type: ignore[arg-type]
