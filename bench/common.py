"""What every benchmark mode shares: model sizes, the workload, timing records, memory.

A measurement is one mode (``single``, ``diy-mix``, ``engine``, ``http``), one K and one
concurrency ``c``: ``c`` requests arrive together at ``t0``, each with its own 32-token
prompt, and each generates exactly ``new_tokens`` tokens greedily (EOS ignored).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml

# name -> make_tiny_family size arguments. The tiny tokenizer has 320 tokens, so the
# embeddings are small and "100m" / "1b" count almost only transformer blocks.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden=64, layers=2, heads=4, intermediate=256, max_positions=256),
    "100m": dict(hidden=768, layers=12, heads=12, intermediate=3072, max_positions=256),
    "1b": dict(hidden=2048, layers=16, heads=16, intermediate=8192, max_positions=256),
}
MAX_K = 4
# Where a benchmark writes unless --out names a path: a scratch folder git ignores, so that
# trying a documented command never changes the committed evidence under bench/results/.
SCRATCH = Path(__file__).resolve().parent / "out"
REPO = Path(__file__).resolve().parents[1]


def scratch(name: str) -> Path:
    """The default ``--out`` of a benchmark: ``bench/out/<name>``."""
    return SCRATCH / name


PROMPT_TOKENS = 32
_SENTENCES = [
    "Could you please help me write a short poem about the sea?",
    "The quick brown fox jumps over the lazy dog.",
    "Sure! Here is a short answer, kept brief and friendly.",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 and symbols like ! ? , . : ; - work too.",
    "I am sorry, I cannot do that, but I can suggest something else.",
    "Thank you so much, that was very kind of you.",
]


def family_yaml(size: str, k: int, root: Path) -> Path:
    """Build random policies of ``size`` under ``root`` once; return a YAML of the first k.

    MAX_K policies are built so every K reuses them; "1b" builds only the K asked for, in
    bfloat16 (it exists for the GPU check, and four float32 copies would be 17 GB).
    """
    from mpo_core.testing.families import make_tiny_family

    folder = root / size
    config_path = folder / "policies.yaml"
    built = len(yaml.safe_load(config_path.read_text())["policies"]) if config_path.exists() else 0
    if built < k:
        count = k if size == "1b" else max(k, MAX_K)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16 if size == "1b" else torch.float32)
        try:
            make_tiny_family(
                folder, arch="llama", num_policies=count, with_reference=False, **SIZES[size]
            )
        finally:
            torch.set_default_dtype(default)
    config = yaml.safe_load(config_path.read_text())
    config["policies"] = config["policies"][:k]
    path = folder / f"policies_k{k}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def prompt_texts(count: int) -> list[str]:
    """``count`` distinct prompts, each long enough to encode to more than 32 tokens."""
    texts = []
    for i in range(count):
        rotated = _SENTENCES[i % len(_SENTENCES) :] + _SENTENCES[: i % len(_SENTENCES)]
        texts.append(f"Request {i}: " + " ".join(rotated))
    return texts


def prompt_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """The last 32 tokens of each text: what the server keeps with ``truncate: 32``."""
    ids = [list(tokenizer.encode(t, add_special_tokens=True))[-PROMPT_TOKENS:] for t in texts]
    assert all(len(p) == PROMPT_TOKENS for p in ids), "a benchmark prompt is too short"
    return ids


@dataclass
class RequestTimes:
    """Arrival and per-token times of one request (seconds, perf_counter)."""

    arrival: float
    token_times: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Row:
    """One measurement: a mode, K and concurrency, in one run."""

    size: str
    mode: str
    k: int
    concurrency: int
    run: int
    requests: int
    generated_tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_ms_p50: float
    itl_ms_p50: float
    itl_ms_p99: float
    peak_rss_mb: float
    baseline_rss_mb: float
    param_mb: float
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON values: NaN (not measured) becomes None."""
        return {
            k: None if isinstance(v, float) and math.isnan(v) else v
            for k, v in asdict(self).items()
        }


def summarize(
    requests: list[RequestTimes], start: float, end: float, **fields: Any
) -> dict[str, Any]:
    """Tokens/s over the whole wall time; TTFT from arrival; inter-token gaps pooled."""
    tokens = sum(len(r.token_times) for r in requests)
    ttft = [r.token_times[0] - r.arrival for r in requests if r.token_times]
    gaps = [b - a for r in requests for a, b in zip(r.token_times, r.token_times[1:])]
    wall = end - start
    return dict(
        requests=len(requests),
        generated_tokens=tokens,
        wall_s=wall,
        tokens_per_s=tokens / wall if wall > 0 else float("nan"),
        ttft_ms_p50=1000 * statistics.median(ttft) if ttft else float("nan"),
        itl_ms_p50=1000 * percentile(gaps, 50),
        itl_ms_p99=1000 * percentile(gaps, 99),
        **fields,
    )


def now() -> float:
    return time.perf_counter()


# -- memory ----------------------------------------------------------------------------
def _status_kb(pid: int | str, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1])
    return float("nan")


def rss_mb(pid: int | str = "self") -> float:
    """Current resident set size."""
    return _status_kb(pid, "VmRSS") / 1024


def peak_rss_mb(pid: int | str = "self") -> float:
    """Peak resident set size since the process started or since ``reset_peak_rss``."""
    return _status_kb(pid, "VmHWM") / 1024


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so each measurement gets its own peak."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def param_mb(models: list[Any]) -> float:
    total = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    return total / 2**20


def set_threads(threads: int) -> None:
    """Pin torch's intra-op threads (the machine is shared; 0 keeps torch's default)."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


class Workloads(Protocol):
    """A benchmark's systems, loaded once: ``run(system, c, new_tokens)`` times one
    workload and returns its summary fields; ``stop()`` frees them."""

    def run(self, system: str, c: int, new_tokens: int) -> dict[str, Any]: ...

    def stop(self) -> None: ...


def rotating_rounds(
    systems: Workloads,
    names: tuple[str, ...],
    concurrencies: list[int],
    rounds: int,
    new_tokens: int,
    log: logging.Logger,
    first_round: int = 0,
) -> list[dict[str, Any]]:
    """Every system at every concurrency, ``rounds`` times (numbered from ``first_round``),
    the systems' order rotating each round (so no system always runs first); after a short
    warm-up of each. One row per (round, concurrency, system). Stops the systems."""
    rows = []
    try:
        for system in names:
            systems.run(system, 1, 4)  # warm up
        for round_index in range(first_round, first_round + rounds):
            shift = round_index % len(names)
            order = names[shift:] + names[:shift]
            for c in concurrencies:
                for system in order:
                    fields = systems.run(system, c, new_tokens)
                    fields.update(system=system, concurrency=c, round=round_index)
                    rows.append(fields)
                    log.info(
                        "round %d c=%d %s: %.1f tok/s",
                        round_index, c, system, fields["tokens_per_s"],
                    )  # fmt: skip
    finally:
        systems.stop()
    return rows


def memory_rows(
    systems: Workloads, system: str, concurrencies: list[int], new_tokens: int, baseline: float
) -> list[dict[str, Any]]:
    """One system alone in this process: its peak RSS at each concurrency, whole and above
    ``baseline`` (the RSS before the system loaded). Stops the systems."""
    rows = []
    try:
        systems.run(system, 1, 4)
        for c in concurrencies:
            reset_peak_rss()
            fields = systems.run(system, c, new_tokens)
            fields.update(system=system, concurrency=c, baseline_rss_mb=baseline)
            fields.update(peak_rss_mb=peak_rss_mb())
            fields.update(peak_above_baseline_mb=peak_rss_mb() - baseline)
            rows.append(fields)
    finally:
        systems.stop()
    return rows


def worker_rows(
    module: str,
    args: argparse.Namespace,
    worker: str,
    log: logging.Logger,
    extra: Sequence[str] = (),
) -> Any:
    """Run ``python -m <module> --worker <worker>`` in a fresh process from the repository
    root, with the run's workload arguments (``--concurrency``, ``--new-tokens``,
    ``--threads``, ``--models-dir``, ``--rounds``) and the module's own ``extra`` ones; the
    JSON it prints last."""
    command = [sys.executable, "-m", module, "--worker", worker, *extra]
    command += ["--concurrency", args.concurrency, "--new-tokens", str(args.new_tokens)]
    command += ["--threads", str(args.threads), "--models-dir", str(args.models_dir)]
    command += ["--rounds", str(args.rounds)]
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{worker} failed:\n{done.stderr[-4000:]}")
    log.info("%s (%.0f s)", worker, time.monotonic() - started)
    return json.loads(done.stdout.strip().splitlines()[-1])
