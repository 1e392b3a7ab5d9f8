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


def family_dir(home: str | Path | None, variant: str, seed: int, adapters: bool = False) -> Path:
    """Where the family for (recipe, variant, seed, kind) lives; it may not exist yet."""
    recipe = _recipe(variant)
    digest = hashlib.sha256(
        json.dumps(dataclasses.asdict(recipe), sort_keys=True).encode()
    ).hexdigest()[:8]
    kind = "-lora" if adapters else ""
    return demo_home(home) / "demo" / f"v{RECIPE_VERSION}-{variant}{kind}-seed{seed}-{digest}"


def build_demo(
    home: str | Path | None = None,
    variant: str = "full",
    seed: int = 0,
    progress: bool = True,
    adapters: bool = False,
) -> Path:
    """Return the demo's policy-set YAML, building the family first if it is not cached.

    ``variant`` is ``"full"`` (the served demo, about a minute or two on two CPU cores) or
    ``"small"`` (fixture-sized, a few seconds). Deterministic for a seed. ``adapters``
    builds the same family as LoRA adapters of the reference (an adapter family,
    docs/adapters.md) instead of three full fine-tunes.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidParameter("seed", f"seed must be a non-negative integer, got {seed!r}")
    target = family_dir(home, variant, seed, adapters)
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
            _build_family(staging, RECIPES[variant], variant, seed, progress, adapters)
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


def _build_family(
    out: Path, recipe: Recipe, variant: str, seed: int, progress: bool, adapters: bool
) -> None:
    from .pipeline import build_family  # torch and transformers: only when building

    build_family(out, recipe, variant, seed, progress, RECIPE_VERSION, adapters=adapters)
    _write_config(out, adapters)


def _write_config(out: Path, adapters: bool = False) -> None:
    config: dict[str, object] = {"served_name": SERVED_NAME}
    if adapters:  # the reference is the adapters' base
        config["base"] = {"name": REFERENCE_NAME, "model": REFERENCE_NAME}
        config["policies"] = [{"name": name, "adapter": name} for name in SCORERS]
    else:
        config["reference"] = {"name": REFERENCE_NAME, "model": REFERENCE_NAME}
        config["policies"] = [{"name": name, "model": name} for name in SCORERS]
    config.update(device="auto", dtype="auto")
    (out / CONFIG_NAME).write_text(
        "# The embedded demo family (mpo_core.demo); paths are relative to this file.\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
