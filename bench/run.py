"""Run the benchmark matrix: every mode, K and concurrency, each run in fresh processes.

    python -m bench.run --size tiny --k 1,2,3,4 --concurrency 1,4,16 --runs 3 \
        --out bench/results/tiny.json

One worker process per (run, K, mode) measures all concurrencies (``bench.worker``);
``single`` does not depend on K and runs once per run, with K = 1. Within a run the
modes of one K run back to back, so each ratio compares figures taken minutes apart at
most. Then ``python -m bench.report`` turns the JSON into the table, ratios and plot.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .common import scratch
from .systems import REPO

logger = logging.getLogger("bench.run")
MODES = ("single", "diy-mix", "engine", "http")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "100m", "1b"])
    parser.add_argument("--k", default="1,2,3,4", help="numbers of policies, comma-separated")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--kv-cache-dtype", default="auto", help="the policy set's kv_cache_dtype (auto = --dtype)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    parser.add_argument(
        "--diy-requests", type=int, default=0, help="cap on the requests diy-mix serves"
    )
    parser.add_argument(
        "--overhead-pairs",
        type=int,
        default=3,
        help="extra alternated (engine c=1, bare step time) pairs per run, for target 1",
    )
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/mpo-bench-models"))
    parser.add_argument("--out", type=Path, default=scratch("results.json"))
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per worker")
    return parser.parse_args(argv)


def worker_command(args: argparse.Namespace, mode: str, k: int, run: int) -> list[str]:
    command = [sys.executable, "-m", "bench.worker", "--size", args.size, "--mode", mode]
    command += ["--k", str(k), "--concurrency", args.concurrency, "--run", str(run)]
    command += ["--new-tokens", str(args.new_tokens), "--device", args.device]
    command += ["--dtype", args.dtype, "--kv-cache-dtype", args.kv_cache_dtype]
    command += ["--threads", str(args.threads)]
    command += ["--models-dir", str(args.models_dir), "--diy-requests", str(args.diy_requests)]
    command += ["--overhead-pairs", str(args.overhead_pairs)]
    return command


def run_worker(command: list[str], timeout: float) -> list[dict[str, Any]]:
    done = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    rows: list[dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    return rows


def plan(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """(mode, K, run) in the order they run: run-major, so every run sees every config."""
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode {unknown[0]!r}; modes are {', '.join(MODES)}")
    ks = [int(k) for k in args.k.split(",")]
    jobs = []
    for run in range(args.runs):
        if "single" in modes:
            jobs.append(("single", 1, run))
        jobs += [(m, k, run) for k in ks for m in modes if m != "single"]
    return jobs


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cpus": __import__("os").cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    jobs = plan(args)
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "size": args.size,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "device": args.device,
        "dtype": args.dtype,
        "kv_cache_dtype": args.kv_cache_dtype,
        "diy_requests": args.diy_requests,
        "overhead_pairs": args.overhead_pairs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for i, (mode, k, run) in enumerate(jobs, 1):
        t = time.monotonic()
        new = run_worker(worker_command(args, mode, k, run), args.timeout)
        rows += new
        summary = ", ".join(f"c={r['concurrency']}: {r['tokens_per_s']:.1f} tok/s" for r in new)
        logger.info(
            "[%d/%d] %s K=%d run %d (%.0f s): %s",
            i,
            len(jobs),
            mode,
            k,
            run,
            time.monotonic() - t,
            summary,
        )
        # written after every worker, so an interrupted matrix keeps what it measured
        meta.update(elapsed_s=time.monotonic() - started, complete=i == len(jobs))
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    logger.info("wrote %s (%d rows, %.0f s)", args.out, len(rows), time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
