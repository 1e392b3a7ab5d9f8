"""Smoke test of bench/: a tiny run gives sane rows; diy-mix computes what the engine does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import run
from bench.baselines import diy_mix_one, policy_step_seconds
from bench.common import family_yaml, prompt_ids, prompt_texts
from bench.report import load, ratios, table
from mpo_core.config import load_config
from mpo_core.decoding.sampling import SamplingParams
from mpo_core.engine.core import Engine, GenerationRequest
from mpo_core.runners import load_policy_set

pytestmark = pytest.mark.slow  # runs the benchmark scripts end to end

NEW_TOKENS = 6


def test_tiny_run_rows(tmp_path: Path) -> None:
    out = tmp_path / "tiny.json"
    argv = ["--size", "tiny", "--k", "2", "--concurrency", "2", "--runs", "1"]
    argv += ["--modes", "single,diy-mix,engine", "--new-tokens", str(NEW_TOKENS)]
    argv += ["--threads", "1", "--models-dir", str(tmp_path / "models"), "--out", str(out)]
    assert run.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert sorted(r["mode"] for r in rows) == ["diy-mix", "engine", "single"]
    for row in rows:
        assert row["concurrency"] == 2 and row["requests"] == 2
        assert row["generated_tokens"] == 2 * NEW_TOKENS  # ignore_eos: every token counted
        assert row["tokens_per_s"] > 0 and row["itl_ms_p50"] > 0
        assert row["peak_rss_mb"] >= row["baseline_rss_mb"] > 0
    by_mode = {r["mode"]: r for r in rows}
    # same first request, same greedy mixture: the baseline and the engine agree
    assert by_mode["diy-mix"]["extra"]["first_tokens"] == by_mode["engine"]["extra"]["first_tokens"]
    assert "| tiny | engine | 2 | 2 |" in table(rows)
    assert "batching" not in ratios(rows)  # no c = 16 measured: no batching ratio invented


def test_diy_mix_matches_engine_greedy(tmp_path: Path) -> None:
    policy_set = load_policy_set(load_config(family_yaml("tiny", 2, tmp_path)))
    (prompt,) = prompt_ids(policy_set.tokenizer, prompt_texts(1))
    expected = diy_mix_one(policy_set, prompt, NEW_TOKENS)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    with Engine(policy_set) as engine:
        result = engine.generate(GenerationRequest(prompt_ids=prompt, sampling=params))
    assert result.token_ids == expected
    steps = policy_step_seconds(policy_set, prompt, NEW_TOKENS)
    assert len(steps) == 2 and all(s > 0 for s in steps)


def test_overhead_pairs_narrow_cache_label_and_memory_probe(tmp_path: Path, capsys) -> None:
    from bench import memory_probe

    out = tmp_path / "c1.json"
    argv = ["--size", "tiny", "--k", "2", "--concurrency", "1", "--runs", "1"]
    argv += ["--modes", "engine", "--new-tokens", str(NEW_TOKENS), "--overhead-pairs", "2"]
    argv += ["--kv-cache-dtype", "float16", "--threads", "1"]
    argv += ["--models-dir", str(tmp_path / "models"), "--out", str(out)]
    assert run.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["kv_cache_dtype"] == "float16"
    (row,) = data["rows"]
    pairs = row["extra"]["overhead_pairs"]
    assert len(pairs) == 2
    for pair in pairs:
        assert pair["tokens_per_s"] > 0 and pair["itl_ms_p50"] > 0
        assert len(pair["policy_step_s"]) == 2 and min(pair["policy_step_s"]) > 0
    # a narrow-cache run is reported under its own label, never pooled with float32 runs
    rows, _ = load([out])
    assert "(kv float16) | 1. overhead" in ratios(rows)

    assert (
        memory_probe.main(
            ["--size", "tiny", "--k", "2", "--concurrency", "2", "--new-tokens", "4"]
            + ["--kv-cache-dtype", "float16", "--models-dir", str(tmp_path / "models")]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "(peak - baseline) / params = " in printed
    assert "| prefill |" in printed or "| decode |" in printed


def test_gpu_graphs_smoke_on_cpu(tmp_path: Path) -> None:
    """bench/gpu_check.sh's script runs end to end (without graphs off a GPU) and the
    static path it measures agrees with the growing cache."""
    from bench import gpu_graphs

    out = tmp_path / "gpu.json"
    argv = ["--sizes", "tiny", "--vocab", "500", "--new-tokens", "4", "--single-steps", "2"]
    assert gpu_graphs.main([*argv, "--context", "128", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["sizes"]["tiny"]
    assert row["graphed_vs_eager_static_max_abs"] == 0.0
    assert row["compactions"] == 1
    assert row["greedy_token_agreement_c16"] == 1.0
    for mode in ("graphed", "eager"):
        for c in (1, 16):
            assert row[f"engine_{mode}_c{c}"]["tokens_per_s"] > 0
