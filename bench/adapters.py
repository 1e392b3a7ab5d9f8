"""The adapter backend against its baselines, ratios from one run (docs/adapters.md).

    python -m bench.adapters --size 100m --k 3 --rank 16 --concurrency 1,4 --runs 2 \
        --out bench/results/adapters_100m.json

A workload is ``c`` requests arriving together, 32-token prompts, ``--new-tokens``
greedy tokens each (EOS ignored), uniform weights over the K policies at strength 1.
Four systems serve it, each in a fresh process (so that its peak RSS is its own), in
alternation, ``--runs`` times:

- ``adapters``: the base with K rank-r LoRA adapters on every linear layer (grouped
  backend): c requests, K rows each;
- ``base-rows``: the base model alone, K x c requests of one row each: the same rows
  per step without the adapters, so ``adapters / base-rows`` is the adapter overhead (a);
- ``full``: the same adapters merged into K full models (K-separate-models backend),
  c requests: ``full / adapters`` is the saving (b);
- ``base``: the base alone, c requests: ``adapters / base`` is the cost of mixing (c).

Step time is the median inter-token latency. Peak RSS is reported above the process's
RSS after imports (before loading), and divided by the parameter bytes the system holds
(on a GPU the RSS figures say nothing about device memory).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from .common import (
    SIZES,
    peak_rss_mb,
    prompt_ids,
    prompt_texts,
    reset_peak_rss,
    rss_mb,
    set_threads,
    summarize,
)
from .systems import REPO

logger = logging.getLogger("bench.adapters")
SYSTEMS = ("adapters", "base-rows", "full", "base")


def build(size: str, k: int, rank: int, root: Path) -> Path:
    """The base, K adapters and their merged copies under ``root`` (built once; "1b" in
    bfloat16, as bench.common builds it)."""
    import torch

    from mpo_core.testing_lora import LoraShape, make_adapter_family

    folder = root / f"{size}_k{k}_r{rank}"
    if not (folder / "merged.yaml").exists():
        shapes = [LoraShape(r=rank, alpha=2 * rank, targets="all") for _ in range(k)]
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16 if size == "1b" else torch.float32)
        try:
            make_adapter_family(folder, shapes, lora_std=0.02, **SIZES[size])
        finally:
            torch.set_default_dtype(default)
    base = {"served_name": "base", "policies": [{"name": "base", "model": "base"}]}
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    return folder


def _config(path: Path, device: str, dtype: str) -> Any:
    from mpo_core.config import parse_config

    raw = yaml.safe_load(path.read_text())
    raw.update(device=device, dtype=dtype)
    return parse_config(raw, base_dir=path.parent)


def _engine_rows(engine: Any, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    from . import systems

    return summarize(*systems.run_engine(engine, prompts, new_tokens))


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One system in this process: load, warm up, then each concurrency."""
    set_threads(args.threads)
    import torch  # noqa: F401  (the baseline RSS includes torch, transformers and mpo_core)

    from mpo_core.engine import Engine, EngineLimits
    from mpo_core.policies import load_policy_set

    from .common import param_mb

    folder = args.models_dir / f"{args.size}_k{args.k}_r{args.rank}"
    yaml_name = {"adapters": "adapters", "full": "merged"}.get(args.system, "base")
    baseline = rss_mb()
    policy_set = load_policy_set(_config(folder / f"{yaml_name}.yaml", args.device, args.dtype))
    if policy_set.adapters is not None:
        params = param_mb([policy_set.adapters.model])
        buffers = policy_set.adapters.model.buffers()  # the stacked LoRA factors
        params += sum(b.numel() * b.element_size() for b in buffers) / 2**20
    else:
        params = param_mb([*policy_set.models])
        if policy_set.reference is not None:
            params += param_mb([policy_set.reference.model])
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    per_request = args.k if args.system == "base-rows" else 1
    texts = prompt_texts(max(concurrencies) * per_request)
    prompts = prompt_ids(policy_set.tokenizer, texts)
    rows = []
    limits = EngineLimits(max_running=max(concurrencies) * per_request)
    with Engine(policy_set, limits) as engine:
        _engine_rows(engine, prompts[:1], 4)  # warm up
        for c in concurrencies:
            reset_peak_rss()
            fields = _engine_rows(engine, prompts[: c * per_request], args.new_tokens)
            fields.update(
                system=args.system,
                concurrency=c,
                peak_above_baseline_mb=peak_rss_mb() - baseline,
                param_mb=params if args.system != "adapters" else None,
                params_and_adapters_mb=params,
            )
            rows.append(fields)
    return {"rows": rows}


def run(args: argparse.Namespace) -> dict[str, Any]:
    build(args.size, args.k, args.rank, args.models_dir)
    results: list[dict[str, Any]] = []
    for run_index in range(args.runs):
        for system in SYSTEMS:
            command = [sys.executable, "-m", "bench.adapters", "--worker", system]
            command += ["--size", args.size, "--k", str(args.k), "--rank", str(args.rank)]
            command += ["--concurrency", args.concurrency, "--new-tokens", str(args.new_tokens)]
            command += ["--threads", str(args.threads), "--models-dir", str(args.models_dir)]
            command += ["--device", args.device, "--dtype", args.dtype]
            started = time.monotonic()
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{system} failed:\n{done.stderr[-4000:]}")
            rows = json.loads(done.stdout.strip().splitlines()[-1])["rows"]
            for row in rows:
                row["run"] = run_index
            results += rows
            logger.info("run %d %s (%.0f s)", run_index, system, time.monotonic() - started)
    return {"rows": results, "ratios": ratios(results)}


def ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per concurrency: the medians over runs of each system's step time, their ratios,
    and the memory figures."""
    out: dict[str, dict[str, float]] = {}
    for c in sorted({r["concurrency"] for r in rows}):

        def median(system: str, key: str, c: int = c) -> float:
            values = [r[key] for r in rows if r["system"] == system and r["concurrency"] == c]
            return statistics.median(values)

        itl = {s: median(s, "itl_ms_p50") for s in SYSTEMS}
        adapters_peak = median("adapters", "peak_above_baseline_mb")
        out[f"c={c}"] = {
            **{f"itl_ms_{s}": itl[s] for s in SYSTEMS},
            "a_overhead_adapters_over_base_rows": itl["adapters"] / itl["base-rows"],
            "b_saving_full_over_adapters": itl["full"] / itl["adapters"],
            "c_mixing_adapters_over_base": itl["adapters"] / itl["base"],
            "adapters_peak_above_baseline_mb": adapters_peak,
            "adapters_params_mb": median("adapters", "params_and_adapters_mb"),
            "adapters_peak_over_params": adapters_peak
            / median("adapters", "params_and_adapters_mb"),
            "full_peak_above_baseline_mb": median("full", "peak_above_baseline_mb"),
            "base_peak_above_baseline_mb": median("base", "peak_above_baseline_mb"),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="100m", choices=sorted(SIZES))
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/mpo-bench-adapters"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/adapters.json"))
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    if args.worker:
        args.system = args.worker
        print(json.dumps(worker(args)))
        return 0
    result = run(args)
    result["meta"] = {
        "command": "python -m bench.adapters "
        + " ".join(argv if argv is not None else sys.argv[1:])
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["ratios"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
