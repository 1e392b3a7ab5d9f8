"""The fit driver on the tiny Llama family: sample from the reference, score, fit, report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from mpo_core.config import load_config
from mpo_core.engine.core import Engine, EngineLimits
from mpo_core.errors import InvalidParameter
from mpo_core.fitting.driver import FitOptions, encode_prompt, format_report_table, run_fit
from mpo_core.fitting.mirror_descent import FitCancelled
from mpo_core.models.policies import PolicySet
from mpo_core.runners import load_policy_set
from mpo_core.testing.families import make_tiny_family

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


# -- a family whose MaxMin optimum is known ------------------------------------------------
#
# Two policies: `same` is the reference itself (R_same = 0 everywhere) and `mirror` is the
# reference with its output rows swapped in pairs by an involution sigma of the vocabulary,
# so that pi_mirror(v|x) = pi_ref(sigma v|x). With one-token replies,
#     F(lam) = mean_x log sum_v pi_ref(v|x)^(1 - lam) pi_ref(sigma v|x)^lam      (lam on mirror)
# and substituting v -> sigma v shows F(lam) = F(1 - lam): F is convex and symmetric about
# 1/2, so the MaxMin weights are exactly (1/2, 1/2). Under pi_ref the implicit reward of
# `mirror` has mean -KL(pi_ref || pi_mirror) < 0, which the test computes exactly.
# A fit that flips the sign of R puts all weight on `same` (F then grows from lam = 0); one
# that samples from the uniform mixture sqrt(pi_ref pi_mirror), which sigma leaves unchanged,
# sees E[R_mirror] = 0 and also puts its weight on `same`.
MIRROR_PROMPTS = [*PROMPTS, "Numbers 1 2 3", "The quick brown fox.", "Sorry!", "Hello?", "Be kind."]
MIRROR_FIT = FitOptions(samples_per_prompt=128, max_new_tokens=1, iterations=500, seed=0)


def _pair_swap(rows: int, vocab_size: int) -> torch.Tensor:
    """An involution of [0, rows): swaps 2i and 2i + 1 below the (even part of the) vocabulary."""
    sigma = torch.arange(rows)
    even = vocab_size - vocab_size % 2
    sigma[:even] = torch.arange(even).view(-1, 2).flip(1).flatten()
    return sigma


@pytest.fixture(scope="module")
def mirror_family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("mirror")
    path = make_tiny_family(folder, num_policies=1)  # we keep only its reference `base`
    tokenizer = AutoTokenizer.from_pretrained(folder / "base")
    model = AutoModelForCausalLM.from_pretrained(folder / "base")
    model.save_pretrained(folder / "same")
    tokenizer.save_pretrained(folder / "same")
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        head.copy_(head[_pair_swap(head.shape[0], len(tokenizer))])
    model.save_pretrained(folder / "mirror")
    tokenizer.save_pretrained(folder / "mirror")
    raw = yaml.safe_load(path.read_text())
    raw["policies"] = [{"name": "same", "model": "same"}, {"name": "mirror", "model": "mirror"}]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def mirror_set(mirror_family: Path) -> PolicySet:
    return load_policy_set(load_config(mirror_family))


@pytest.fixture(scope="module")
def mirror_report(mirror_set: PolicySet):
    with Engine(mirror_set, EngineLimits(max_running=64, max_queued=256)) as engine:
        return run_fit(engine, MIRROR_PROMPTS, MIRROR_FIT)


@torch.no_grad()
def _exact_mirror_reward_under_reference(policy_set: PolicySet) -> float:
    """E_{x, y ~ pi_ref}[log pi_mirror(y|x) - log pi_ref(y|x)] over the one-token replies."""
    assert policy_set.reference is not None
    vocab = policy_set.vocab_size
    sigma = _pair_swap(vocab, vocab)
    means = []
    for prompt in MIRROR_PROMPTS:
        ids = torch.tensor([encode_prompt(policy_set.tokenizer, prompt)])
        logits = policy_set.reference.model(ids).logits[0, -1, :vocab]  # [V]
        ref = logits.double().log_softmax(-1)  # [V]
        means.append(float((ref.exp() * (ref[sigma] - ref)).sum()))
    return sum(means) / len(means)


def test_fit_lands_on_the_known_maxmin_weights(mirror_report) -> None:
    # 1/2 exactly for the population; on 8 x 128 samples seeds 0-7 gave 0.42-0.56, while a
    # flipped R or replies sampled from the mixture give under 0.02
    assert mirror_report.weights["mirror"] == pytest.approx(0.5, abs=0.15)
    assert mirror_report.weights["same"] == pytest.approx(0.5, abs=0.15)


def test_implicit_rewards_are_log_ratios_on_reference_samples(
    mirror_set: PolicySet, mirror_report
) -> None:
    """The one-hot `same` row weighs the replies uniformly: its rewards are plain means of R."""
    under_reference = mirror_report.rows["policy:same"]["rewards"]
    assert under_reference["same"] == 0.0  # the reference's own implicit reward
    exact = _exact_mirror_reward_under_reference(mirror_set)
    assert exact < -0.5  # -KL(pi_ref || pi_mirror): the family is far from symmetric per reply
    # a mean of 1024 replies' R_mirror: within 0.35 of the exact value by a wide margin; a
    # flipped R gives about +1.3 here, replies from the mixture about 0
    assert under_reference["mirror"] == pytest.approx(exact, abs=0.35)
