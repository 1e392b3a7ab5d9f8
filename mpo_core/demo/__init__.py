"""The embedded demo family: a tiny reference LM and three aligned policies, built locally.

``build_demo()`` trains everything on the CPU from a generated corpus (no download) and
caches it under ``$MPO_HOME``; ``SCORERS`` are the attributes' rewards. See docs/demo.md.
"""

from .build import RECIPE_VERSION, RECIPES, build_demo, family_dir
from .corpus import heldout_prompts, train_prompts
from .real import build_real_demo, find_real_model
from .scorers import SCORERS

__all__ = [
    "RECIPES",
    "RECIPE_VERSION",
    "SCORERS",
    "build_demo",
    "build_real_demo",
    "family_dir",
    "find_real_model",
    "heldout_prompts",
    "train_prompts",
]
