"""Build (or find) the demo family on disk: tokenizer, reference ``base`` and three policies.

Layout under ``$MPO_HOME`` (default ``~/.cache/mpo``)::

    demo/<RECIPE_VERSION>-<variant>-seed<seed>-<recipe hash>/
        policy_set.yaml     served_name mpo, reference base, policies polite/concise/upbeat
        recipe.json         the recipe, seed, timings and training diagnostics
        base/ polite/ concise/ upbeat/   each: save_pretrained model + tokenizer

A family is built in a temporary sibling folder and renamed into place in one step,
under an ``fcntl`` lock per family, so concurrent builders (test workers, server
replicas) wait for one build and never see a half-written family.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from ..errors import InvalidParameter
from .recipe import RECIPES, REFERENCE_NAME, Recipe
from .scorers import SCORERS

logger = logging.getLogger(__name__)

# Bump when the corpus, scorers or training change in a way the recipe fields don't show.
RECIPE_VERSION = "1"
CONFIG_NAME = "policy_set.yaml"
SERVED_NAME = "mpo"


def demo_home(home: str | Path | None = None) -> Path:
    """``home``, else ``$MPO_HOME``, else ``~/.cache/mpo``."""
    if home is None:
        home = os.environ.get("MPO_HOME") or Path.home() / ".cache" / "mpo"
    return Path(home).expanduser()


def family_dir(home: str | Path | None, variant: str, seed: int) -> Path:
    """Where the family for (recipe, variant, seed) lives; it may not exist yet."""
    recipe = _recipe(variant)
    digest = hashlib.sha256(
        json.dumps(dataclasses.asdict(recipe), sort_keys=True).encode()
    ).hexdigest()[:8]
    return demo_home(home) / "demo" / f"v{RECIPE_VERSION}-{variant}-seed{seed}-{digest}"


def build_demo(
    home: str | Path | None = None,
    variant: str = "full",
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Return the demo's policy-set YAML, building the family first if it is not cached.

    ``variant`` is ``"full"`` (the served demo, about a minute or two on two CPU cores) or
    ``"small"`` (fixture-sized, a few seconds). Deterministic for a seed.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidParameter("seed", f"seed must be a non-negative integer, got {seed!r}")
    target = family_dir(home, variant, seed)
    config_path = target / CONFIG_NAME
    if config_path.is_file():  # the rename below makes a present YAML a complete family
        return config_path
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{target.name}.lock"):
        if config_path.is_file():  # another process built it while we waited
            logger.info("demo family found at %s (built by another process)", target)
            return config_path
        for stale in target.parent.glob(f".tmp-{target.name}-*"):  # a crashed build's
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
        try:
            _build_family(staging, RECIPES[variant], variant, seed, progress)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    logger.info("demo family built at %s", target)
    return config_path


def _recipe(variant: str) -> Recipe:
    if variant not in RECIPES:
        raise InvalidParameter(
            "variant", f"unknown demo variant {variant!r}; choose one of {sorted(RECIPES)}"
        )
    return RECIPES[variant]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _build_family(out: Path, recipe: Recipe, variant: str, seed: int, progress: bool) -> None:
    from .pipeline import build_family  # torch and transformers: only when building

    build_family(out, recipe, variant, seed, progress, RECIPE_VERSION)
    _write_config(out)


def _write_config(out: Path) -> None:
    config = {
        "served_name": SERVED_NAME,
        "reference": {"name": REFERENCE_NAME, "model": REFERENCE_NAME},
        "policies": [{"name": name, "model": name} for name in SCORERS],
        "device": "auto",
        "dtype": "auto",
    }
    (out / CONFIG_NAME).write_text(
        "# The embedded demo family (mpo_core.demo); paths are relative to this file.\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
