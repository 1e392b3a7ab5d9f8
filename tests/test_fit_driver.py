"""The fit driver on the tiny Llama family: sample from the reference, score, fit, report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from mpo_core.config import load_config
from mpo_core.engine import Engine
from mpo_core.errors import InvalidParameter
from mpo_core.fit_driver import FitOptions, encode_prompt, format_report_table, run_fit
from mpo_core.fitting import FitCancelled
from mpo_core.policies import load_policy_set

PROMPTS = ["Could you help me?", "Write a short poem.", "Say thanks."]
SMALL = FitOptions(samples_per_prompt=3, max_new_tokens=4, iterations=60, seed=7)


def test_report_shapes_and_progress(engine: Engine) -> None:
    phases: list[tuple[str, float]] = []
    report = run_fit(engine, PROMPTS, SMALL, progress=lambda p, f: phases.append((p, f)))
    names = engine.policy_names
    assert list(report.weights) == names
    assert sum(report.weights.values()) == pytest.approx(1.0)
    assert min(report.weights.values()) >= 0
    assert set(report.rows) == {"fitted", "uniform", *(f"policy:{n}" for n in names)}
    for row in report.rows.values():
        assert list(row["rewards"]) == names
        assert row["min"] == pytest.approx(min(row["rewards"].values()))
        assert row["maxmin"] == pytest.approx(row["min"] - row["kl"])
        assert 1.0 <= row["ess_min"] <= row["ess"] <= SMALL.samples_per_prompt + 1e-9
    assert report.rows["fitted"]["objective"] == pytest.approx(report.objective)
    assert report.objective <= report.rows["uniform"]["objective"] + 1e-9
    assert report.rows["policy:helpful"]["weights"] == {
        "helpful": 1.0,
        "harmless": 0.0,
        "concise": 0.0,
    }
    assert report.num_prompts == 3 and report.samples_per_prompt == 3
    assert 1 <= report.mean_reply_tokens <= SMALL.max_new_tokens
    # every phase reports, in order, and ends at 1
    order = [p for i, (p, _) in enumerate(phases) if i == 0 or phases[i - 1][0] != p]
    assert order == ["sampling", "scoring", "optimising"]
    for phase in order:
        assert [f for p, f in phases if p == phase][-1] == pytest.approx(1.0)
    json.loads(json.dumps(report.to_dict()))  # JSON-serialisable
    table = format_report_table(report)
    for label in ["fitted", "uniform", "policy:concise", "E[R:harmless]", "maxmin", "ESS"]:
        assert label in table


def test_same_seed_same_fit(engine: Engine) -> None:
    first = run_fit(engine, PROMPTS[:2], SMALL)
    again = run_fit(engine, PROMPTS[:2], SMALL)
    other = run_fit(engine, PROMPTS[:2], FitOptions(**{**SMALL.__dict__, "seed": 8}))
    assert first.weights == again.weights
    assert first.rows == again.rows
    assert first.rows["uniform"] != other.rows["uniform"]  # other replies were sampled


def test_no_reference_is_rejected(no_reference_family: Path) -> None:
    engine = Engine(load_policy_set(load_config(no_reference_family)))
    with pytest.raises(InvalidParameter, match="reference") as caught:
        run_fit(engine, PROMPTS, SMALL)
    assert caught.value.param == "reference"


@pytest.mark.parametrize("phase", ["sampling", "scoring", "optimising"])
def test_cancel_in_each_phase(engine: Engine, phase: str) -> None:
    seen: list[str] = []

    def progress(name: str, fraction: float) -> None:
        seen.append(name)

    with pytest.raises(FitCancelled):
        run_fit(engine, PROMPTS, SMALL, progress=progress, should_cancel=lambda: phase in seen)
    later = {"sampling": ["scoring", "optimising"], "scoring": ["optimising"], "optimising": []}
    assert not set(seen) & set(later[phase])
    deadline = time.monotonic() + 10
    while engine.stats().running or engine.stats().waiting:  # cancelled replies are dropped
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("samples_per_prompt", 0),
        ("max_new_tokens", -1),
        ("iterations", 1.5),
        ("step_size", 0.0),
        ("step_size", float("inf")),
        ("batch_size", 0),
        ("seed", -3),
    ],
)
def test_bad_options_name_the_field(engine: Engine, field: str, value: object) -> None:
    options = FitOptions(**{**SMALL.__dict__, field: value})
    with pytest.raises(InvalidParameter) as caught:
        options.validate()
    assert caught.value.param == field
    with pytest.raises(InvalidParameter):
        run_fit(engine, PROMPTS, options)


@pytest.mark.parametrize("prompts", [[], ["ok", "  "], "just a string"])
def test_bad_prompts_are_rejected(engine: Engine, prompts: object) -> None:
    with pytest.raises(InvalidParameter) as caught:
        run_fit(engine, prompts, SMALL)  # type: ignore[arg-type]
    assert caught.value.param == "prompts"


def test_prompts_go_through_the_chat_template(engine: Engine) -> None:
    tokenizer = engine.tokenizer
    ids = encode_prompt(tokenizer, "Say thanks.")
    assert ids == tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say thanks."}], add_generation_prompt=True, return_dict=False
    )
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    template = tokenizer.chat_template
    try:
        tokenizer.chat_template = None
        assert encode_prompt(tokenizer, "Say thanks.") == tokenizer.encode("Say thanks.")
    finally:
        tokenizer.chat_template = template
