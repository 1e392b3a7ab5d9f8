"""Where a persona decode step's time goes, timed from inside the engine.

    python -m bench.persona_step --threads 2 --new-tokens 32   # writes bench/out/persona_step.json

The real demo's persona family (``mpo_core.demo.real``: SmolLM2-135M-Instruct, three
personas), speculation off, one request with the family's default mixture and
``--new-tokens`` greedy tokens (EOS ignored), after a short warm-up request. It wraps the
runner's ``step``, its batch's ``decode`` and the model forward inside it, and prints the
median milliseconds of each over the decode steps (the prefill step left out) and the
share of the step spent in the forward. What is outside the forward is the runner's and
the batch's own work (inputs, masks, log-softmax, scatter into the output).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .common import scratch, set_threads


def _timed(owner: Any, name: str, into: list[float]) -> None:
    inner: Callable[..., Any] = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - started)

    setattr(owner, name, wrapper)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    parser.add_argument("--out", type=Path, default=scratch("persona_step.json"))
    args = parser.parse_args(argv)
    set_threads(args.threads)

    from mpo_core.config import load_config
    from mpo_core.decoding.sampling import SamplingParams
    from mpo_core.demo.real import build_real_demo
    from mpo_core.engine.core import Engine, EngineLimits, GenerationRequest
    from mpo_core.runners import load_policy_set

    raw = yaml.safe_load(build_real_demo().read_text())
    # the transformers persona step (auto would take llama.cpp for the GGUF file, if installed)
    raw.update(device="cpu", dtype="float32", speculative={"method": "off"}, backend="transformers")
    path = Path(tempfile.mkdtemp()) / "personas.yaml"
    path.write_text(yaml.safe_dump(raw))
    policy_set = load_policy_set(load_config(path))
    prompt = policy_set.tokenizer.encode("Tell me how to cook rice well, in a few steps.")

    def greedy(n: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)

    times: dict[str, list[float]] = {"step": [], "decode": [], "forward": []}
    with Engine(policy_set, EngineLimits(max_running=4)) as engine:
        runner: Any = engine.runner
        mixture = engine.mixture()
        engine.generate(GenerationRequest(prompt, greedy(4), mixture))  # warm up
        _timed(runner, "verify", times["step"])  # the engine's step: a verify with no drafts
        _timed(runner.batch, "decode", times["decode"])
        _timed(runner.batch, "_forward", times["forward"])
        engine.generate(GenerationRequest(prompt, greedy(args.new_tokens), mixture))
    medians = {k: 1000 * statistics.median(v[1:]) for k, v in times.items()}  # decode steps
    result = {
        "command": "python -m bench.persona_step "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "slots": sum(c != 0 for c in mixture.coefficients),
        "median_ms": medians,
        "forward_share_of_step": medians["forward"] / medians["step"],
    }
    sys.stdout.write(json.dumps(result, indent=1) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
