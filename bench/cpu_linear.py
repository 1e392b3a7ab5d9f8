"""Decode steps and prefills of a real model, torch's default linear kernels against oneDNN.

    python -m bench.cpu_linear --threads 2 --out bench/results/cpu_linear.json

The real demo's model (SmolLM2-135M-Instruct, ``mpo_core.demo.real``), float32 on CPU, in
plain transformers: one copy on torch's default kernels (MKL's GEMM), one whose linear
layers run through oneDNN on the dense weights (``mpo_core.cpu_linear``, what the engine
does on CPU for full and adapter families), and one on weights packed into oneDNN's own
layout (``onednn-packed``, ``pack_onednn_linears``: what the engine does for a persona
family's one model). For each
row count, a 64-token prefill and then one decode step, the two copies interleaved,
``--repeats`` times; medians in milliseconds. The step of ``r`` rows over the 1-row step
is what a persona or adapter family pays for running its ``r`` slots in one forward.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from .common import scratch, set_threads

logger = logging.getLogger("bench.cpu_linear")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,3,4,8")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    parser.add_argument("--out", type=Path, default=scratch("cpu_linear.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    set_threads(args.threads)

    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from mpo_core.demo.real import build_real_demo
    from mpo_core.models.cpu_linear import (
        onednn_linear_available,
        pack_onednn_linears,
        use_onednn_linears,
    )
    from mpo_core.models.sources import gguf_checkpoint, is_gguf

    if not onednn_linear_available():
        raise SystemExit("this torch build has no working oneDNN linear")
    import yaml

    source = yaml.safe_load(build_real_demo().read_text())["reference"]["model"]
    if is_gguf(source):  # the dequantised copy the engine loads too
        source = str(gguf_checkpoint(source, "bench model"))
    logger.info("loading three copies of %s (torch, onednn, onednn-packed)", source)
    models = {
        kind: AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        for kind in ("torch", "onednn", "onednn-packed")
    }
    use_onednn_linears(models["onednn"])
    pack_onednn_linears(models["onednn-packed"])
    rows = [int(r) for r in args.rows.split(",")]
    times: dict[tuple[str, str, int], list[float]] = {}
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for done in range(args.repeats + 1):  # the first pass warms up and is dropped
            logger.info(
                "pass %d of %d%s: rows %s, each a 64-token prefill and one step per copy",
                done + 1,
                args.repeats + 1,
                " (warm-up, dropped)" if done == 0 else "",
                args.rows,
            )
            for r in rows:
                prompt = torch.randint(0, 1000, (r, 64), generator=generator)
                step = torch.randint(0, 1000, (r, 1), generator=generator)
                for kind, model in models.items():
                    cache = DynamicCache()
                    started = time.perf_counter()
                    model(input_ids=prompt, past_key_values=cache, use_cache=True)
                    middle = time.perf_counter()
                    model(input_ids=step, past_key_values=cache, use_cache=True)
                    ended = time.perf_counter()
                    times.setdefault((kind, "prefill", r), []).append(middle - started)
                    times.setdefault((kind, "step", r), []).append(ended - middle)
    ms = {key: 1000 * statistics.median(values[1:]) for key, values in times.items()}
    result: dict[str, Any] = {
        "command": "python -m bench.cpu_linear " + " ".join(sys.argv[1:] if argv is None else argv),
        "median_ms": {
            kind: {
                f"{phase}_{r}_rows": ms[(kind, phase, r)]
                for phase in ("prefill", "step")
                for r in rows
            }
            for kind in models
        },
        "over_torch_time": {
            kind: {
                f"{phase}_{r}_rows": ms[(kind, phase, r)] / ms[("torch", phase, r)]
                for phase in ("prefill", "step")
                for r in rows
            }
            for kind in ("onednn", "onednn-packed")
        },
        "step_over_1_row": {
            kind: {f"{r}_rows": ms[(kind, "step", r)] / ms[(kind, "step", rows[0])] for r in rows}
            for kind in models
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    logger.info("wrote %s", args.out)
    sys.stdout.write(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
