"""`mpo eval`: report arithmetic, shared seeds, soups, rewards and the errors users meet."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, LlamaConfig

from mpo_core.engine.core import Engine, EngineLimits
from mpo_core.errors import ConfigError, InvalidParameter
from mpo_core.evaluation import (
    EvalOptions,
    RowParser,
    bootstrap_mean,
    run_evaluation,
    split_specs,
    sweep_rows,
    win_rate,
    win_scores,
    worst_gap,
)
from mpo_core.fitting.rewards import Objective, load_rewards, parse_rewards
from mpo_core.models.policies import PolicySet
from mpo_core.runners import build_soup, soup_policy_set
from mpo_core.testing.families import make_tokenizer
from server.cli import main


def words(prompts: list[str], replies: list[str]) -> list[float]:
    return [float(len(r.split())) for r in replies]


def first_byte(prompts: list[str], replies: list[str]) -> list[float]:
    return [float(ord(r[0])) if r else 0.0 for r in replies]


OBJECTIVES = {
    "helpful": Objective("helpful", words, "callable:words", "helpful"),
    "harmless": Objective("harmless", first_byte, "callable:first_byte", "harmless"),
}


@pytest.fixture(scope="module")
def eval_engine(llama_set: PolicySet):
    with Engine(llama_set, EngineLimits(max_running=64, max_queued=4096)) as engine:
        yield engine


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama sequence classifier (one output) with a chat-template tokenizer."""
    folder = tmp_path_factory.mktemp("reward_model")
    tokenizer = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def reward_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An importable module with a reward callable; returns its ``module:function``."""
    (tmp_path / "eval_test_rewards.py").write_text(
        "def shout(prompts, replies):\n    return [float(r.count('!')) for r in replies]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "eval_test_rewards", raising=False)
    return "eval_test_rewards:shout"


# -- arithmetic ---------------------------------------------------------------------------
def test_win_scores_count_ties_half() -> None:
    row = np.array([[1.0, 0.0, 2.0], [5.0, 5.0, -1.0]])
    base = np.array([[0.0, 0.0, 3.0], [4.0, 6.0, -1.0]])
    assert win_scores(row, base).tolist() == [[1.0, 0.5, 0.0], [1.0, 0.0, 0.5]]
    assert win_rate(row, base).mean == pytest.approx(0.5)
    assert win_rate(row, row).as_dict() == {"mean": 0.5, "low": 0.5, "high": 0.5}


def test_bootstrap_interval_contains_the_mean_and_is_seeded() -> None:
    values = np.random.default_rng(1).normal(size=(30, 4))
    estimate = bootstrap_mean(values, resamples=500, seed=3)
    assert estimate.mean == pytest.approx(values.mean())
    assert estimate.low < estimate.mean < estimate.high
    assert bootstrap_mean(values, resamples=500, seed=3) == estimate
    # the interval of a mean over 30 prompts of unit variance: about +-1.96 * sqrt(1/120)
    assert 0.2 < estimate.high - estimate.low < 0.6
    one_prompt = bootstrap_mean(values[:1], resamples=500)
    assert one_prompt.low == one_prompt.high == one_prompt.mean


def test_worst_gap_takes_each_rows_worst_objective_per_draw() -> None:
    rng = np.random.default_rng(2)
    # row A: 0.8 on objective 0, 0.6 on objective 1 -> worst 0.6; row B: 0.7 / 0.3 -> worst 0.3
    a = np.stack([rng.random((40, 4)) < 0.8, rng.random((40, 4)) < 0.6]).astype(float)
    b = np.stack([rng.random((40, 4)) < 0.7, rng.random((40, 4)) < 0.3]).astype(float)
    gap = worst_gap(a, b, resamples=400, seed=1)
    expected = a.mean(axis=(1, 2)).min() - b.mean(axis=(1, 2)).min()
    assert gap.mean == pytest.approx(expected)
    assert 0.15 < gap.low < gap.mean < gap.high < 0.45
    assert worst_gap(a, a).as_dict() == {"mean": 0.0, "low": 0.0, "high": 0.0}
    assert worst_gap(a, b, resamples=400, seed=1) == gap


# -- rows ---------------------------------------------------------------------------------
def test_row_specs_parse_weights_profiles_and_soups() -> None:
    names = ["helpful", "harmless", "concise"]
    stored = {"best": ({"helpful": 3.0, "concise": 1.0}, 0.5)}
    parser = RowParser(names, True, profiles=lambda name: stored[name])
    specs = split_specs(["weights:helpful=1,harmless=3@0.5,uniform", "fitted:best,soup,single"])
    assert specs == ["weights:helpful=1,harmless=3@0.5", "uniform", "fitted:best", "soup", "single"]
    rows = {r.label: r for r in parser.parse(specs)}
    assert rows["weights:helpful=1,harmless=3@0.5"].weights == (0.25, 0.75, 0.0)
    assert rows["weights:helpful=1,harmless=3@0.5"].strength == 0.5
    assert rows["fitted:best"].weights == (0.75, 0.0, 0.25)
    assert rows["fitted:best"].strength == 0.5  # the stored strength
    assert rows["soup@fitted:best"].kind == "soup"
    assert rows["soup@fitted:best"].weights == (0.75, 0.0, 0.25)
    by_rewards = RowParser(names, True, reward_fitted=({"harmless": 1.0, "concise": 3.0}, 1.5))
    (row,) = by_rewards.parse(["fitted:rewards"])
    assert (row.label, row.weights, row.strength) == ("fitted:rewards", (0.0, 0.25, 0.75), 1.5)
    assert [label for label in rows if label.startswith("policy:")] == [
        "policy:helpful",
        "policy:harmless",
        "policy:concise",
    ]
    sweep = sweep_rows(names, "helpful", "concise", 3)
    assert [r.weights for r in sweep if r.kind == "mixture"] == [
        (1.0, 0.0, 0.0),
        (0.5, 0.0, 0.5),
        (0.0, 0.0, 1.0),
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("bogus", "unknown row"),
        ("policy:nobody", "unknown policy 'nobody'"),
        ("weights:helpful=x", "is not a number"),
        ("weights:nobody=1", "unknown policy 'nobody'"),
        ("weights:helpful=0,harmless=0", "must sum to more than 0"),
        ("soup:helpful=1@0.5", "takes no strength"),
        ("fitted", "no fit in this run"),
        ("fitted:rewards", "no reward fit in this run"),
        ("profile:best", "need a profile store"),
    ],
)
def test_bad_row_specs_name_the_problem(spec: str, message: str) -> None:
    parser = RowParser(["helpful", "harmless"], True)
    with pytest.raises(InvalidParameter, match=message) as info:
        parser.parse(split_specs([spec]))
    assert info.value.param in ("rows", "weights")


def test_reference_row_needs_a_reference() -> None:
    with pytest.raises(InvalidParameter, match="no reference model"):
        RowParser(["a", "b"], has_reference=False).parse(["reference"])


# -- soups --------------------------------------------------------------------------------
def test_soup_parameters_are_the_weighted_average(llama_set: PolicySet) -> None:
    weights = [0.2, 0.3, 0.5]
    soup = build_soup(llama_set, weights)
    params = [dict(m.named_parameters()) for m in llama_set.models]
    for name, value in soup.named_parameters():
        expected = sum(w * p[name] for w, p in zip(weights, params))
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
    assert not torch.equal(dict(soup.named_parameters())[name], params[0][name])
    alone = build_soup(llama_set, [0.0, 1.0, 0.0])  # a one-hot soup is that policy exactly
    for name, value in alone.named_parameters():
        assert torch.equal(value, params[1][name])
    served = soup_policy_set(llama_set, {"soup0": weights})
    assert served.names == ["soup0"] and served.reference is None
    assert served.vocab_size == llama_set.vocab_size


# -- rewards ------------------------------------------------------------------------------
def test_reward_model_and_callable_from_yaml(
    tmp_path: Path, reward_model_dir: Path, reward_module: str
) -> None:
    path = tmp_path / "rewards.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "objectives": {
                    "helpful": {"model": str(reward_model_dir), "batch_size": 2},
                    "excited": {"callable": reward_module, "policy": "harmless"},
                }
            }
        )
    )
    objectives = load_rewards(path)
    prompts = ["Hi", "Could you help me?", "Thanks"]
    replies = ["Sure!", "Of course, here is a longer answer!!", ""]
    batched = objectives["helpful"].score(prompts, replies)  # 2 batches, padded
    alone = [objectives["helpful"].score([p], [r])[0] for p, r in zip(prompts, replies)]
    assert batched == pytest.approx(alone, abs=1e-5)
    assert len(set(batched)) == 3  # the model sees the text: different replies, rewards
    assert objectives["excited"].score(prompts, replies) == [1.0, 2.0, 0.0]
    assert objectives["excited"].policy == "harmless"


def test_reward_errors_name_the_objective(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"objective 'helpful'.*nope/rm.*does not exist"):
        parse_rewards({"objectives": {"helpful": {"model": "./nope/rm"}}}, base_dir=tmp_path)
    for empty in (None, {}, {"policy": "helpful"}):
        with pytest.raises(ConfigError, match="objective 'polite' has no reward"):
            parse_rewards({"objectives": {"polite": empty}})
    with pytest.raises(ConfigError, match="several rewards"):
        parse_rewards({"objectives": {"polite": {"builtin": "demo.polite", "callable": "a:b"}}})
    with pytest.raises(ConfigError, match="unknown builtin"):
        parse_rewards({"objectives": {"polite": {"builtin": "demo.rude"}}})
    with pytest.raises(ConfigError, match="cannot import"):
        parse_rewards({"objectives": {"polite": {"callable": "no_such_module_x:f"}}})
    with pytest.raises(ConfigError, match="does not exist"):
        load_rewards(tmp_path / "missing.yaml")


# -- end to end ---------------------------------------------------------------------------
class BatchSizes:
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_step(self, batch_size: int, forward_seconds: dict[str, float]) -> None:
        self.sizes.append(batch_size)


def _report(engine: Engine, seed: int, rows_spec: str = "uniform,single") -> dict:
    rows = RowParser(engine.policy_names, True).parse(split_specs([rows_spec]))
    options = EvalOptions(samples=2, max_new_tokens=6, seed=seed, bootstrap=200)
    report = run_evaluation(
        engine, ["Hello there", "How are you?", "Tell me"], OBJECTIVES, rows, options
    )
    data = report.to_dict()
    data.pop("seconds")
    return data


def _without_kl(report: dict) -> dict:
    """The report less its KL estimates, whose last bits depend on how requests were batched."""
    rows = [{k: v for k, v in r.items() if k != "kl"} for r in report["rows"]]
    return {**report, "rows": rows}


def test_same_seeds_give_the_same_report(eval_engine: Engine) -> None:
    first = _report(eval_engine, seed=5)
    again = _report(eval_engine, seed=5)
    assert _without_kl(again) == _without_kl(first)  # replies, rewards, intervals, win rates
    for a, b in zip(again["rows"], first["rows"]):
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-4)
    assert _report(eval_engine, seed=6)["rows"] != first["rows"]
    rows = {r["label"]: r for r in first["rows"]}
    assert list(rows) == [
        "uniform",
        "policy:helpful",
        "policy:harmless",
        "policy:concise",
        "reference",  # added as the default baseline
    ]
    reference = rows["reference"]
    assert reference["win_rates"]["helpful"] == {"mean": 0.5, "low": 0.5, "high": 0.5}
    assert reference["kl"]["mean"] == pytest.approx(0.0, abs=1e-4)  # log p_ref - log p_ref
    for row in rows.values():
        # the `helpful` reward counts words: its mean is the mean reply length in words
        assert row["rewards"]["helpful"]["mean"] == pytest.approx(row["reply_words"])
        worst = min(row["win_rates"].items(), key=lambda item: item[1]["mean"])
        assert row["worst_win_rate"] == {"objective": worst[0], "mean": worst[1]["mean"]}
    assert len(first["seeds"]["per_prompt_and_sample"]) == 3


def test_compare_pairs_every_row_with_another(eval_engine: Engine) -> None:
    rows = RowParser(eval_engine.policy_names, True).parse(["uniform", "single"])
    options = EvalOptions(samples=2, max_new_tokens=6, seed=5, bootstrap=200, compare=("uniform",))
    report = run_evaluation(eval_engine, ["Hello there", "How are you?", "Tell me"], OBJECTIVES,
                            rows, options)  # fmt: skip
    uniform = report.row("uniform")
    assert uniform.paired["uniform"]["helpful"].as_dict() == {"mean": 0.5, "low": 0.5, "high": 0.5}
    assert uniform.worst_gap["uniform"].mean == 0.0
    single = report.row("policy:helpful")
    worst = min(e.mean for e in single.win_rates.values()) - min(
        e.mean for e in uniform.win_rates.values()
    )
    assert single.worst_gap["uniform"].mean == pytest.approx(worst)
    with pytest.raises(InvalidParameter) as bad:
        run_evaluation(eval_engine, ["Hi"], OBJECTIVES, rows, EvalOptions(compare=("nope",)))
    assert bad.value.param == "compare"


def test_rows_are_decoded_together_with_soups(llama_set: PolicySet) -> None:
    observer = BatchSizes()
    limits = EngineLimits(max_running=64, max_queued=4096)
    with Engine(llama_set, limits, observer=observer) as engine:
        rows = RowParser(engine.policy_names, True).parse(["uniform", "single", "soup"])
        options = EvalOptions(samples=2, max_new_tokens=4, pareto=("helpful", "harmless"))
        options.pareto_points = 3
        report = run_evaluation(engine, ["Hi", "Hello"], OBJECTIVES, rows, options)
    # 5 mixture rows x 4 replies: one row alone never fills a batch of more than 4
    assert max(observer.sizes) > 4
    assert [r.row.label for r in report.rows] == [
        "uniform",
        "policy:helpful",
        "policy:harmless",
        "policy:concise",
        "soup@uniform",
        "reference",
    ]
    assert [r.row.kind for r in report.pareto] == ["mixture", "soup"] * 3
    # the sweep's first point is the helpful policy alone: it shares that row's replies
    single = report.row("policy:helpful")
    assert report.pareto[0].rewards == single.rewards
    assert report.pareto[0].kl == single.kl


def test_bad_baseline_and_pareto_fail_before_decoding(eval_engine: Engine) -> None:
    rows = RowParser(eval_engine.policy_names, True).parse(["uniform"])
    cases = [
        (EvalOptions(baseline="policy:helpful"), "baseline", "not one of the rows"),
        (EvalOptions(pareto=("helpful", "funny")), "pareto", "unknown objective 'funny'"),
        (EvalOptions(samples=0), "samples", "integer >= 1"),
    ]
    for options, param, message in cases:
        with pytest.raises(InvalidParameter, match=message) as info:
            run_evaluation(eval_engine, ["Hi"], OBJECTIVES, rows, options)
        assert info.value.param == param
    no_policy = {**OBJECTIVES, "helpful": Objective("helpful", words, "callable:words")}
    with pytest.raises(InvalidParameter, match="no aligned policy"):
        options = EvalOptions(pareto=("helpful", "harmless"))
        run_evaluation(eval_engine, ["Hi"], no_policy, rows, options)
    assert eval_engine.stats().running == 0


def test_family_without_reference_has_no_win_rates_or_kl(no_reference_family: Path) -> None:
    from mpo_core.config import load_config
    from mpo_core.evaluation import markdown
    from mpo_core.runners import load_policy_set

    with Engine(load_policy_set(load_config(no_reference_family))) as engine:
        rows = RowParser(engine.policy_names, False).parse(["uniform", "single"])
        options = EvalOptions(samples=1, max_new_tokens=3, bootstrap=10)
        report = run_evaluation(engine, ["Hi"], OBJECTIVES, rows, options)
    assert report.baseline is None
    assert [r.row.label for r in report.rows] == ["uniform", "policy:helpful", "policy:harmless"]
    assert all(r.kl is None and r.win_rates == {} and r.worst_win is None for r in report.rows)
    table = markdown(report)
    assert "win vs" not in table and "KL" not in table and "| `uniform` |" in table


def test_cli_writes_json_markdown_and_plots(
    tmp_path: Path, llama_family: Path, reward_module: str
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hello there"}) + "\n\n" + '{"prompt": "Why?"}\n')
    rewards = tmp_path / "rewards.yaml"
    rewards.write_text(
        yaml.safe_dump(
            {
                "objectives": {
                    "helpful": {"callable": reward_module},
                    "harmless": {"callable": reward_module},
                }
            }
        )
    )
    out = tmp_path / "out"
    argv = ["eval", "--config", str(llama_family), "--prompts", str(prompts)]
    argv += ["--rewards", str(rewards), "--rows", "uniform,policy:helpful,soup:helpful=1,concise=1"]
    argv += ["--samples", "2", "--max-new-tokens", "4", "--out", str(out), "--threads", "1"]
    argv += ["--pareto", "helpful,harmless", "--pareto-points", "2", "--bootstrap", "50"]
    assert main(argv) == 0
    data = json.loads((out / "eval.json").read_text())
    assert [r["label"] for r in data["rows"]] == [
        "uniform",
        "policy:helpful",
        "soup@helpful=1,concise=1",
        "reference",
    ]
    assert data["prompts"] == ["Hello there", "Why?"]
    assert data["meta"]["versions"]["torch"] == torch.__version__
    assert "| `soup@helpful=1,concise=1` |" in (out / "eval.md").read_text()
    for png in ("eval.png", "eval_pareto.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_cli_reads_profile_rows_from_the_store(
    tmp_path: Path, llama_family: Path, reward_module: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from mpo_core.config import load_config
    from server.settings import Settings
    from server.store import open_store

    url = f"sqlite:///{tmp_path / 'profiles.db'}"
    config = load_config(llama_family)  # profiles belong to a family: the one eval reads
    store = open_store(
        url, Settings().family(config.served_name, [p.name for p in config.policies])
    )
    store.put("balanced", {"helpful": 1.0, "concise": 3.0}, strength=0.5)
    store.close()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello\n")
    rewards = tmp_path / "rewards.yaml"
    rewards.write_text(f"objectives:\n  helpful: {{callable: '{reward_module}'}}\n")
    argv = ["eval", "--config", str(llama_family), "--prompts", str(prompts)]
    argv += ["--rewards", str(rewards), "--store-url", url, "--samples", "1"]
    argv += ["--max-new-tokens", "2", "--out", str(tmp_path / "out"), "--bootstrap", "10"]
    assert main([*argv, "--rows", "profile:balanced"]) == 0
    rows = json.loads((tmp_path / "out" / "eval.json").read_text())["rows"]
    assert rows[0]["label"] == "profile:balanced"
    assert rows[0]["weights"] == {"helpful": 0.25, "harmless": 0.0, "concise": 0.75}
    assert rows[0]["strength"] == 0.5
    assert main([*argv, "--rows", "profile:missing"]) == 2
    assert "profile 'missing' does not exist" in capsys.readouterr().err


def test_cli_missing_reward_model_is_a_readable_error(
    tmp_path: Path, llama_family: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello\n")
    rewards = tmp_path / "rewards.yaml"
    rewards.write_text("objectives:\n  helpful: {model: ./no/such/model}\n")
    argv = ["eval", "--config", str(llama_family), "--prompts", str(prompts)]
    argv += ["--rewards", str(rewards), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "reward model path './no/such/model' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_demo_shortcut_fits_and_compares_every_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--demo`` on the small demo variant: scorers, held-out prompts, a fit, soup, Pareto."""
    monkeypatch.setenv("MPO_HOME", str(tmp_path / "home"))
    out = tmp_path / "out"
    argv = ["eval", "--demo", "--demo-variant", "small", "--samples", "1", "--threads", "1"]
    argv += ["--max-new-tokens", "6", "--fit-samples", "2", "--fit-max-new-tokens", "6"]
    argv += ["--fit-iterations", "50", "--pareto-points", "3", "--bootstrap", "50"]
    argv += ["--fit-rounds", "1", "--fit-reference-samples", "2"]
    argv += ["--out", str(out), "--name", "demo"]
    assert main(argv) == 0
    data = json.loads((out / "demo.json").read_text())
    labels = [r["label"] for r in data["rows"]]
    assert labels == [
        "fitted",
        "fitted:rewards",
        "uniform",
        "policy:polite",
        "policy:concise",
        "policy:upbeat",
        "soup@fitted",
        "reference",
    ]
    fitted = data["meta"]["fitted_weights"]
    assert sum(fitted.values()) == pytest.approx(1.0)
    assert data["rows"][0]["weights"] == pytest.approx(fitted)
    assert data["rows"][6]["weights"] == pytest.approx(fitted)
    reward_fit = data["meta"]["reward_fit"]
    assert data["rows"][1]["weights"] == pytest.approx(reward_fit["weights"])
    assert set(reward_fit["objectives"]) == {"polite", "concise", "upbeat"}
    assert data["options"]["compare"] == ["uniform"]
    assert set(data["rows"][1]["paired"]["uniform"]) == {"polite", "concise", "upbeat"}
    assert set(data["objectives"]) == {"polite", "concise", "upbeat"}
    assert len(data["prompts"]) == 24  # the held-out prompts
    assert data["pareto"]["objectives"] == ["polite", "concise"]
    assert len(data["pareto"]["rows"]) == 6
