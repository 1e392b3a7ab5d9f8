"""The demo build pipeline: corpus, tokenizer, reference, samples, reward-weighted fine-tunes.

Imported only when a family must be built (``build.py`` finds cached ones without torch).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from . import corpus
from .recipe import REFERENCE_NAME, Recipe
from .scorers import SCORERS
from .tokenizer import encode_dialogues, encode_prompt, train_tokenizer
from .train import (
    effective_sample_size,
    make_model,
    sample_replies,
    score_replies,
    tilted_sample_probs,
    train_lm,
)

logger = logging.getLogger(__name__)

SAMPLE_BATCH_PROMPTS = 32  # prompts per generate() call (times samples_per_prompt rows)
# The adapter family's fine-tunes: LoRA on every linear layer, same steps and batches as
# the full fine-tunes; a LoRA update is rank-limited, so it takes a larger learning rate.
LORA_RANK = 16
LORA_ALPHA = 32
LORA_LR_SCALE = 3.0
BUILD_THREADS = 1  # fixed, so the weights do not depend on the machine's core count


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def build_family(
    out: Path,
    recipe: Recipe,
    variant: str,
    seed: int,
    progress: bool,
    recipe_version: str,
    adapters: bool = False,
) -> None:
    """Train the tokenizer, the reference and the three policies; save them under ``out``
    (the policies as full models, or with ``adapters`` as LoRA adapters of the reference)."""
    started = time.perf_counter()
    train_prompts = corpus.train_prompts()
    sample_calls = -(-len(train_prompts) // SAMPLE_BATCH_PROMPTS)
    total = recipe.ref_steps + sample_calls + len(SCORERS) * recipe.ft_steps
    with (
        _torch_threads(BUILD_THREADS),
        tqdm(total=total, desc=f"demo ({variant})", disable=not progress, unit="step") as bar,
    ):
        # 1. corpus and tokenizer
        rng = random.Random(seed)
        dialogues = corpus.sample_dialogues(recipe.dialogues, rng)
        tokenizer = train_tokenizer((t for pair in dialogues for t in pair), recipe.vocab_size)
        examples = encode_dialogues(tokenizer, dialogues)

        # 2. the reference: next-token loss on the replies
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        bar.set_description(f"demo ({variant}): reference")
        reference = make_model(tokenizer, recipe.shape)
        ref_loss = train_lm(
            reference,
            examples,
            steps=recipe.ref_steps,
            batch_size=recipe.ref_batch,
            lr=recipe.ref_lr,
            pad_id=tokenizer.pad_token_id,
            generator=generator,
            bar=bar,
        )
        logger.info("reference trained: loss %.3f", ref_loss)
        stamps = {"reference": time.perf_counter() - started}

        # 3. replies sampled from the reference, shared by the three fine-tunes
        bar.set_description(f"demo ({variant}): sampling")
        prompt_ids = [encode_prompt(tokenizer, p.text) for p in train_prompts]
        replies = sample_replies(
            reference,
            tokenizer,
            prompt_ids,
            per_prompt=recipe.samples_per_prompt,
            max_new_tokens=recipe.max_new_tokens,
            batch_prompts=SAMPLE_BATCH_PROMPTS,
            bar=bar,
        )
        eos = tokenizer.eos_token_id
        finished = torch.tensor([[bool(r) and r[-1] == eos for r in group] for group in replies])
        texts = [tokenizer.batch_decode(group, skip_special_tokens=True) for group in replies]
        pool = [
            (prompt + reply, len(prompt))
            for prompt, group in zip(prompt_ids, replies, strict=True)
            for reply in group
        ]

        stamps["sampling"] = time.perf_counter() - started - sum(stamps.values())
        # 4. one reward-weighted fine-tune per attribute
        diagnostics: dict[str, dict[str, float]] = {}
        for name, scorer in SCORERS.items():
            bar.set_description(f"demo ({variant}): {name}")
            rewards = score_replies(texts, scorer)  # [P, m]
            probs = tilted_sample_probs(rewards, finished, recipe.beta)  # [P * m]
            policy = _lora(reference) if adapters else copy.deepcopy(reference)
            loss = train_lm(
                policy,
                pool,
                steps=recipe.ft_steps,
                batch_size=recipe.ft_batch,
                lr=recipe.ft_lr * (LORA_LR_SCALE if adapters else 1.0),
                pad_id=tokenizer.pad_token_id,
                generator=generator,
                sample_probs=probs,
                bar=bar,
            )
            diagnostics[name] = {
                "reward_mean_reference": float(rewards[finished].mean()),
                "reward_mean_tilted": float((probs * rewards.flatten()).sum()),
                "effective_sample_size": effective_sample_size(probs),
                "final_loss": loss,
            }
            _save(policy, tokenizer, out / name)
        _save(reference, tokenizer, out / REFERENCE_NAME)
        stamps["fine_tunes"] = time.perf_counter() - started - sum(stamps.values())

    meta = {
        "recipe_version": recipe_version,
        "variant": variant,
        "adapters": {"rank": LORA_RANK, "alpha": LORA_ALPHA, "lr_scale": LORA_LR_SCALE}
        if adapters
        else None,
        "seed": seed,
        "recipe": dataclasses.asdict(recipe),
        "parameters": sum(p.numel() for p in reference.parameters()),
        "reference_loss": ref_loss,
        "finished_fraction": float(finished.float().mean()),
        "fine_tunes": diagnostics,
        "stage_seconds": {stage: round(seconds, 1) for stage, seconds in stamps.items()},
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    (out / "recipe.json").write_text(json.dumps(meta, indent=2) + "\n")
    logger.info("demo family (%s, seed %d) built in %.1f s", variant, seed, meta["build_seconds"])


def _lora(reference: PreTrainedModel) -> Any:
    """A trainable LoRA adapter (every linear layer) on a copy of the reference."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules="all-linear")
    return get_peft_model(copy.deepcopy(reference), config)


def _save(model: Any, tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # our own bar covers the build
    try:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
