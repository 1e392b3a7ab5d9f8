"""The demo family's recipes: model size, corpus size, training and alignment settings.

Plain data with no heavy imports, so that finding a cached family stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

# The reference model's folder and policy name inside a built family.
REFERENCE_NAME = "base"


@dataclass(frozen=True)
class ModelShape:
    """Size of the demo LMs (all four share it: the engine needs one vocabulary)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_positions: int = 256


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the family's weights, besides the seed."""

    shape: ModelShape
    vocab_size: int  # BPE vocabulary, special tokens included
    dialogues: int  # reference training corpus size
    ref_steps: int
    ref_batch: int
    ref_lr: float
    samples_per_prompt: int  # m replies per training prompt, drawn from the reference
    max_new_tokens: int  # sampling limit; replies cut there get weight 0
    beta: float  # KL strength: fine-tune targets pi_ref * exp(r / beta)
    ft_steps: int
    ft_batch: int
    ft_lr: float


RECIPES: dict[str, Recipe] = {
    "full": Recipe(
        shape=ModelShape(hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4),
        vocab_size=1280,
        dialogues=20_000,
        ref_steps=600,
        ref_batch=8,
        ref_lr=5e-3,
        samples_per_prompt=6,
        max_new_tokens=48,
        beta=0.2,
        ft_steps=40,
        ft_batch=16,
        ft_lr=1e-3,
    ),
    # fixture-sized: the same pipeline in seconds, for tests; its text is not fluent
    "small": Recipe(
        shape=ModelShape(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2),
        vocab_size=400,
        dialogues=2_000,
        ref_steps=40,
        ref_batch=8,
        ref_lr=3e-3,
        samples_per_prompt=2,
        max_new_tokens=24,
        beta=0.2,
        ft_steps=5,
        ft_batch=8,
        ft_lr=1e-3,
    ),
}
