"""The runner is the backend: outside ``mpo_core/runners/`` no module imports a backend's
class or reads the family's kind to decide how to run it (docs/architecture.md, "Adding a
backend"). Read from the source, so a new branch anywhere fails here."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BACKEND_CLASSES = {"SeparateModelsRunner", "AdapterRunner", "PersonaRunner", "LlamaCppRunner"}
BACKEND_MODULES = {"separate", "adapters", "personas", "llama_cpp"}  # under mpo_core/runners/
# What says which kind a family is: the policy set's family fields and the config's.
KIND_ATTRIBUTES = {
    "adapters",
    "personas",
    "persona_host",
    "is_adapter_family",
    "is_persona_family",
}
# Where those attributes are defined (the value objects themselves), not read to decide.
DEFINING = {
    "mpo_core/config.py",
    "mpo_core/models/policies.py",
    "mpo_core/models/adapters.py",
    "mpo_core/models/personas.py",
    # the request field ``personas`` (a request's or a stored profile's own)
    "server/protocol/common.py",
    "server/protocol/admin.py",
}


def modules() -> list[Path]:
    files = [*(ROOT / "mpo_core").rglob("*.py"), *(ROOT / "server").rglob("*.py")]
    return [f for f in files if "runners" not in f.relative_to(ROOT).parts]


def offences(path: Path, rel: str | None = None) -> list[str]:
    rel = rel or path.relative_to(ROOT).as_posix()
    found = []
    for node in ast.walk(ast.parse(path.read_text(), rel)):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            parts = module.split(".")
            if "runners" in parts and parts[-1] in BACKEND_MODULES:
                found.append(f"{rel}:{node.lineno} imports the backend module {module}")
            for alias in node.names:
                if alias.name in BACKEND_CLASSES:
                    found.append(f"{rel}:{node.lineno} imports the backend class {alias.name}")
        elif isinstance(node, ast.Name) and node.id in BACKEND_CLASSES:
            found.append(f"{rel}:{node.lineno} names the backend class {node.id}")
        elif (
            isinstance(node, ast.Attribute)
            and node.attr in KIND_ATTRIBUTES
            and rel not in DEFINING
            # argparse flags that happen to share a name (``mpo demo build --adapters``)
            and not (isinstance(node.value, ast.Name) and node.value.id == "args")
        ):
            found.append(f"{rel}:{node.lineno} reads the family's kind (.{node.attr})")
    return found


def test_no_module_outside_the_runners_branches_on_the_backend() -> None:
    checked = modules()
    assert len(checked) > 50  # the walk found the packages
    problems = [line for path in checked for line in offences(path)]
    assert problems == []


def test_the_check_catches_a_branch(tmp_path: Path) -> None:
    """The rule is not vacuous: the shapes it must refuse are refused."""
    sample = tmp_path / "probe.py"
    sample.write_text(
        "from .runners.personas import PersonaRunner\n"
        "def f(ps, engine):\n"
        "    if ps.adapters is not None or isinstance(engine.runner, PersonaRunner):\n"
        "        return 1\n"
    )
    found = offences(sample, "mpo_core/probe.py")
    assert len(found) == 4, found
