"""Reward functions for evaluation: one per objective, described in a small YAML file.

::

    objectives:
      polite:  {builtin: demo.polite}                 # the demo family's scorers
      upbeat:  {builtin: vader.compound}              # VADER sentiment (text_rewards.py)
      helpful:                                        # a sequence-classification reward model
        model: OpenAssistant/reward-model-deberta-v3-large-v2   # hub id or local folder
        batch_size: 16
        max_length: 512
      brief:   {callable: "mypkg.rewards:brevity", policy: concise}

Every reward is called as ``reward(prompts, replies) -> list[float]`` (one float per
reply, larger is better). ``policy`` names the policy aligned with that objective (the
Pareto sweep varies it); it defaults to the policy of the objective's own name.
Relative model paths are resolved against the YAML file's folder.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import validation_problems
from ..errors import ConfigError, MPOError
from .text_rewards import TEXT_REWARDS

logger = logging.getLogger(__name__)

__all__ = [
    "BUILTINS",
    "Objective",
    "RewardError",
    "RewardFunction",
    "SequenceClassifierReward",
    "builtin_objectives",
    "load_rewards",
    "parse_rewards",
]


class RewardFunction(Protocol):
    def __call__(self, prompts: Sequence[str], replies: Sequence[str]) -> list[float]: ...


class RewardError(MPOError):
    """A reward function failed or returned something other than one float per reply."""


def _demo_builtin(name: str) -> RewardFunction:
    def reward(prompts: Sequence[str], replies: Sequence[str]) -> list[float]:
        from ..demo.scorers import SCORERS  # lazy: the demo package is not needed otherwise

        return [float(SCORERS[name](reply)) for reply in replies]

    return reward


# builtin name -> a factory of its reward function
BUILTINS: dict[str, Callable[[], RewardFunction]] = {
    **{f"demo.{name}": partial(_demo_builtin, name) for name in ("polite", "concise", "upbeat")},
    **TEXT_REWARDS,  # vader.compound, text.brevity, text.politeness (text_rewards.py)
}


class RewardSpec(BaseModel):
    """One objective's entry in the rewards YAML: exactly one of builtin, model, callable."""

    model_config = ConfigDict(extra="forbid")

    builtin: str | None = None  # a name in BUILTINS, e.g. "demo.polite"
    model: str | None = None  # AutoModelForSequenceClassification: hub id or local folder
    callable: str | None = None  # "package.module:function"
    policy: str | None = None  # the policy aligned with this objective
    revision: str | None = None  # hub revision of ``model``
    batch_size: int = Field(default=16, ge=1)
    max_length: int = Field(default=512, ge=8)
    label: int | None = None  # which logit is the reward; default: the only one


class RewardsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    objectives: dict[str, RewardSpec | None]


@dataclass
class Objective:
    """One objective: its name, its reward and the policy aligned with it (if known)."""

    name: str
    reward: RewardFunction
    source: str  # what the reward is, for reports: "builtin:demo.polite", "model:...", ...
    policy: str | None = None

    def score(self, prompts: Sequence[str], replies: Sequence[str]) -> list[float]:
        """Call the reward and check it returned one finite float per reply."""
        try:
            values = self.reward(list(prompts), list(replies))
        except Exception as exc:
            raise RewardError(f"reward of objective {self.name!r} failed: {exc!r}") from exc
        scores = list(values) if isinstance(values, (list, tuple)) else None
        if scores is None or len(scores) != len(replies):
            raise RewardError(
                f"reward of objective {self.name!r} must return a list of {len(replies)} "
                f"floats, got {type(values).__name__}"
                + (f" of length {len(scores)}" if scores is not None else "")
            )
        checked = []
        for i, value in enumerate(scores):
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            if not math.isfinite(number):
                raise RewardError(
                    f"reward of objective {self.name!r} gave {value!r} for reply {i}: "
                    "rewards must be finite numbers"
                )
            checked.append(number)
        return checked


class SequenceClassifierReward:
    """A Hugging Face sequence-classification reward model, batched, on one device.

    The (prompt, reply) pair goes through the reward tokenizer's chat template as a user
    and an assistant turn when it has one, else as a text pair. The reward is the logit
    ``label`` (the only one when the head has one output).
    """

    def __init__(
        self,
        source: str,
        device: torch.device | str = "cpu",
        revision: str | None = None,
        batch_size: int = 16,
        max_length: int = 512,
        label: int | None = None,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                source, revision=revision
            )
        except (OSError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"cannot load reward model {source!r}: {exc}") from None
        self.device = torch.device(device)
        self.model.to(self.device).eval().requires_grad_(False)  # type: ignore[arg-type]
        labels = int(self.model.config.num_labels)
        if label is None and labels != 1:
            raise ConfigError(
                f"reward model {source!r} has {labels} outputs: say which is the reward "
                "with `label:` in the rewards file"
            )
        self.label = 0 if label is None else label
        if not 0 <= self.label < labels:
            raise ConfigError(f"reward model {source!r}: label {label} is not in [0, {labels})")
        if self.tokenizer.pad_token is None:  # batching pads; decoder RMs often have no pad
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size
        self.max_length = max_length

    def _encode(self, prompts: Sequence[str], replies: Sequence[str]) -> Any:
        common = dict(
            padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        if getattr(self.tokenizer, "chat_template", None):
            texts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                    tokenize=False,
                )
                for p, r in zip(prompts, replies)
            ]
            return self.tokenizer(texts, add_special_tokens=False, **common)
        return self.tokenizer(list(prompts), list(replies), **common)

    @torch.inference_mode()
    def __call__(self, prompts: Sequence[str], replies: Sequence[str]) -> list[float]:
        rewards: list[float] = []
        for start in range(0, len(replies), self.batch_size):
            end = start + self.batch_size
            batch = self._encode(prompts[start:end], replies[start:end]).to(self.device)
            logits = self.model(**batch).logits  # [B, labels]
            rewards += logits[:, self.label].float().cpu().tolist()
        return rewards


def _load_callable(target: str, objective: str) -> RewardFunction:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"objective {objective!r}: callable {target!r} must look like 'package.module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"objective {objective!r}: cannot import {module_name!r}: {exc}"
        ) from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise ConfigError(f"objective {objective!r}: {module_name!r} has no function {attr!r}")
    return function  # type: ignore[no-any-return]


def _model_source(model: str, base_dir: Path | None, objective: str) -> str:
    """A local folder (resolved against the YAML's folder) or a hub id (``name``/``org/name``)."""
    path = Path(model).expanduser()
    if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        return str((base_dir / path).resolve())
    if path.exists():
        return str(path)
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1
    if looks_local:
        raise ConfigError(f"objective {objective!r}: reward model path {model!r} does not exist")
    return model


def _build(
    name: str, spec: RewardSpec | None, device: torch.device | str, base_dir: Path | None
) -> Objective:
    given = (
        [] if spec is None else [k for k in ("builtin", "model", "callable") if getattr(spec, k)]
    )
    if len(given) != 1:
        what = "has no reward" if not given else f"has several rewards ({', '.join(given)})"
        raise ConfigError(
            f"objective {name!r} {what}: give exactly one of builtin, model or callable"
        )
    assert spec is not None  # given is not empty
    if spec.builtin is not None:
        if spec.builtin not in BUILTINS:
            raise ConfigError(
                f"objective {name!r}: unknown builtin {spec.builtin!r}; "
                f"builtins are {', '.join(sorted(BUILTINS))}"
            )
        return Objective(name, BUILTINS[spec.builtin](), f"builtin:{spec.builtin}", spec.policy)
    if spec.callable is not None:
        function = _load_callable(spec.callable, name)
        return Objective(name, function, f"callable:{spec.callable}", spec.policy)
    assert spec.model is not None
    source = _model_source(spec.model, base_dir, name)
    logger.info("loading reward model %r for objective %r on %s", source, name, device)
    try:
        reward = SequenceClassifierReward(
            source, device, spec.revision, spec.batch_size, spec.max_length, spec.label
        )
    except ConfigError as exc:
        raise ConfigError(f"objective {name!r}: {exc}") from None
    return Objective(name, reward, f"model:{spec.model}", spec.policy)


def parse_rewards(
    data: object, device: torch.device | str = "cpu", base_dir: Path | None = None
) -> dict[str, Objective]:
    """Objectives from a parsed rewards YAML (``{"objectives": {name: spec}}``)."""
    try:
        parsed = RewardsFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid rewards file: {validation_problems(exc)}") from None
    if not parsed.objectives:
        raise ConfigError("invalid rewards file: `objectives` is empty")
    return {name: _build(name, spec, device, base_dir) for name, spec in parsed.objectives.items()}


def load_rewards(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Objective]:
    """Read a rewards YAML file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"rewards file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"rewards file {str(path)!r} is not valid YAML: {exc}") from None
    return parse_rewards(data, device, base_dir=path.parent)


def builtin_objectives(
    names: Sequence[str] = ("polite", "concise", "upbeat"),
) -> dict[str, Objective]:
    """The demo family's scorers as objectives, each aligned with the policy of its name."""
    return {
        name: Objective(name, BUILTINS[f"demo.{name}"](), f"builtin:demo.{name}", name)
        for name in names
    }


def align_policies(objectives: Mapping[str, Objective], policy_names: Sequence[str]) -> None:
    """Fill each objective's ``policy`` (default: the policy of its name) and check it exists."""
    for objective in objectives.values():
        if objective.policy is None and objective.name in policy_names:
            objective.policy = objective.name
        if objective.policy is not None and objective.policy not in policy_names:
            raise ConfigError(
                f"objective {objective.name!r}: policy {objective.policy!r} is not in the "
                f"policy set ({', '.join(policy_names)})"
            )
