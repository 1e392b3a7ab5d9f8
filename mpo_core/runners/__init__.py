"""How the policies are run, behind one seam (``base.PolicyRunner``): rows in, per-model
next-token log-probs out. Backends: ``SeparateModelsRunner`` (K full models, a KV cache
each), ``AdapterRunner`` (one base, K LoRA adapters, one grouped forward) and
``PersonaRunner`` (one model, K system prompts, one forward over every persona's slots);
``make_runner`` picks one for a policy set."""

from .adapters import AdapterRunner
from .base import (
    DecodeBatch,
    PolicyRunner,
    Row,
    ScoresWithPolicySet,
    SpeculativeRunner,
    StepOutput,
    all_models,
    context_limit,
)
from .factory import make_runner, static_or_growing
from .personas import PersonaRunner
from .separate import SeparateModelsRunner

__all__ = [
    "AdapterRunner",
    "DecodeBatch",
    "PersonaRunner",
    "PolicyRunner",
    "Row",
    "ScoresWithPolicySet",
    "SeparateModelsRunner",
    "SpeculativeRunner",
    "StepOutput",
    "all_models",
    "context_limit",
    "make_runner",
    "static_or_growing",
]
