"""How the policies are run, behind one seam (``base.PolicyRunner``): rows in, per-model
next-token log-probs out, and everything else that runs a model (scoring, prompt
log-probs, soups). Backends: ``SeparateModelsRunner`` (K full models, a KV cache each,
each on its own device), ``AdapterRunner`` (one base, K LoRA adapters, one grouped
forward) and ``PersonaRunner`` (one model, K system prompts, one forward over every
persona's slots), ``LlamaCppRunner`` (GGUF families on llama.cpp: a sequence per
slot), ``DistributedRunner`` (members on several ranks, each rank running its own with
one of the others); ``factory.BACKENDS`` registers them, ``load_policy_set`` loads a family
by its backend and ``make_runner`` runs it."""

from .adapters import AdapterRunner
from .base import (
    Capabilities,
    DecodeBatch,
    PolicyRunner,
    Row,
    StepOutput,
    all_models,
    context_limit,
)
from .distributed import DistributedRunner
from .factory import (
    BACKENDS,
    backend_of,
    capabilities_of,
    kv_budget_of,
    load_policy_set,
    make_runner,
    open_runner,
    static_or_growing,
)
from .llama_cpp import LlamaCppRunner
from .personas import PersonaRunner, request_persona_rules
from .scoring import ScoreResult
from .separate import SeparateModelsRunner
from .soups import build_soup, soup_policy_set

__all__ = [
    "BACKENDS",
    "AdapterRunner",
    "DistributedRunner",
    "LlamaCppRunner",
    "PersonaRunner",
    "SeparateModelsRunner",
    "Capabilities",
    "DecodeBatch",
    "PolicyRunner",
    "Row",
    "ScoreResult",
    "StepOutput",
    "all_models",
    "backend_of",
    "build_soup",
    "capabilities_of",
    "context_limit",
    "kv_budget_of",
    "load_policy_set",
    "make_runner",
    "open_runner",
    "request_persona_rules",
    "soup_policy_set",
    "static_or_growing",
]
