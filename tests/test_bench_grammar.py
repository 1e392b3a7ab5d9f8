"""Smoke test of bench/grammar.py on a tiny family: the report has its figures."""

from __future__ import annotations

import json
from pathlib import Path

from bench import grammar


def test_grammar_bench_reports_mask_cost(llama_family: Path, tmp_path: Path) -> None:
    out = tmp_path / "grammar.json"
    argv = ["--config", str(llama_family), "--concurrency", "2", "--rounds", "1"]
    argv += ["--max-new-tokens", "80", "--out", str(out)]
    assert grammar.main(argv) == 0
    result = json.loads(out.read_text())
    engine = result["engine"]
    assert engine["concurrency"] == 2 and engine["mask_ms_per_step"] > 0
    assert 0 < engine["mask_share_of_step"] < 1
    assert engine["grammar_step_ms"] > 0 and engine["plain_step_ms"] > 0
    fills = result["libraries"]
    assert all(v["mask_fill_ms_per_step_median"] > 0 for v in fills.values())
    assert any(name.startswith("llguidance") for name in fills)
