"""The MPO fit on the (small) demo family: the fitted mixture is the fairest one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import fit_demo
from mpo_core.config import load_config
from mpo_core.demo import build_demo, train_prompts
from mpo_core.engine.core import Engine, EngineLimits
from mpo_core.fitting.driver import FitOptions, run_fit
from mpo_core.runners import load_policy_set

NAMES = ("polite", "concise", "upbeat")


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def demo_engine(demo_home: Path):
    torch.set_num_threads(1)  # tiny models: one thread beats two on a shared 2-core box
    yaml_path = build_demo(home=demo_home, variant="small", progress=False)
    with Engine(load_policy_set(load_config(yaml_path)), EngineLimits(max_running=32)) as engine:
        yield engine


def test_fitted_weights_have_the_best_regularised_maxmin(demo_engine: Engine) -> None:
    prompts = [p.text for p in train_prompts()[:24]]
    options = FitOptions(samples_per_prompt=8, max_new_tokens=16, iterations=1500, seed=0)
    report = run_fit(demo_engine, prompts, options)
    rows = report.rows
    assert set(rows) == {"fitted", "uniform", "policy:polite", "policy:concise", "policy:upbeat"}
    fitted = rows["fitted"]["maxmin"]
    for name, row in rows.items():
        if name != "fitted":
            assert fitted >= row["maxmin"] - 1e-3, (name, fitted, row["maxmin"])
    # at the optimum, F equals the regularised MaxMin value (strong duality)
    assert report.objective == pytest.approx(fitted, abs=0.02)
    assert sum(report.weights.values()) == pytest.approx(1.0)


def test_fit_demo_script_writes_its_figures_as_json(demo_home: Path, tmp_path: Path) -> None:
    """bench/fit_demo.py (docs/fitting.md's tables) stores what it prints under --out."""
    out = tmp_path / "fit_demo.json"
    argv = ["--variant", "small", "--home", str(demo_home), "--n", "4", "--samples", "2"]
    argv += ["--iterations", "20", "--max-new-tokens", "4", "--out", str(out)]
    assert fit_demo.main(argv) == 0
    saved = json.loads(out.read_text())
    assert saved["meta"]["command"].startswith("python -m bench.fit_demo --variant small")
    assert saved["meta"]["args"]["iterations"] == 20
    report = saved["report"]
    assert sum(report["weights"].values()) == pytest.approx(1.0)
    assert set(report["rows"]) == {"fitted", "uniform", *(f"policy:{n}" for n in NAMES)}
    rows = {row["label"]: row for row in saved["evaluation"]["rows"]}
    assert set(rows) >= {"fitted", "uniform"}
    assert rows["fitted"]["weights"] == pytest.approx(report["weights"])
    for row in rows.values():
        assert set(row["rewards"]) == set(NAMES)
