"""Training for the demo family: the reference LM and its reward-weighted fine-tunes.

Plain torch on the CPU: a causal LM in transformers' Llama architecture, an AdamW loop
with a linear warm-up and cosine decay, and HF ``generate`` for sampling.

The aligned policies follow RLHF's closed form. The KL-regularised optimum for a
reward ``r`` is ``pi_r(y|x) = pi_ref(y|x) * exp(r(y) / beta) / Z(x)``. Drawing ``m``
replies ``y_1..y_m ~ pi_ref(.|x)`` per prompt and giving each the self-normalised
weight ``w_j = exp(r_j / beta) / sum_i exp(r_i / beta)`` turns the samples into an
empirical estimate of ``pi_r(.|x)``; maximum likelihood on the weighted samples
(reward-weighted regression) moves the reference towards it. We draw each minibatch
from the weights (importance resampling) rather than multiplying losses by them: the
same gradient in expectation, without spending compute on samples of weight ~0.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .recipe import ModelShape

logger = logging.getLogger(__name__)

IGNORE = -100  # label of tokens that carry no loss


def make_model(tokenizer: PreTrainedTokenizerFast, shape: ModelShape) -> LlamaForCausalLM:
    """A freshly initialised Llama whose special tokens match ``tokenizer``."""
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=True,
        **special,
    )
    model = LlamaForCausalLM(config)
    for key, value in special.items():
        setattr(model.generation_config, key, value)
    return model


def _collate(
    examples: Sequence[tuple[list[int], int]], pad_id: int, loss_on_prompt: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad ``(ids, reply_start)`` examples into ids, attention mask and labels."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # [B, S]
    attention = torch.zeros((len(examples), width), dtype=torch.long)  # [B, S]
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)  # [B, S]
    for row, (ids, reply_start) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        first = 1 if loss_on_prompt else reply_start  # the first token has no context
        labels[row, first : len(ids)] = torch.tensor(ids[first:])
    return input_ids, attention, labels


def _lr_at(step: int, steps: int, peak: float) -> float:
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_lm(
    model: LlamaForCausalLM,
    examples: Sequence[tuple[list[int], int]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    pad_id: int,
    generator: torch.Generator,
    sample_probs: torch.Tensor | None = None,
    loss_on_prompt: bool = False,
    bar: tqdm | None = None,
) -> float:
    """AdamW on next-token loss; minibatches drawn from ``sample_probs`` (uniform if None).

    Returns the mean loss of the last tenth of the steps.
    """
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    probs = sample_probs if sample_probs is not None else torch.ones(len(examples))
    tail: list[float] = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        rows = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
        input_ids, attention, labels = _collate(
            [examples[i] for i in rows.tolist()], pad_id, loss_on_prompt
        )
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= steps - max(1, steps // 10):
            tail.append(loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return sum(tail) / len(tail)


@torch.no_grad()
def sample_replies(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    prompt_ids: Sequence[list[int]],
    *,
    per_prompt: int,
    max_new_tokens: int,
    batch_prompts: int,
    bar: tqdm | None = None,
) -> list[list[list[int]]]:
    """``per_prompt`` replies to each prompt at temperature 1: ``[prompt][sample] -> ids``.

    A reply's ids end with eos when the model finished it; ids after eos are dropped.
    Randomness comes from torch's global generator (seeded by the caller).
    """
    model.eval()
    eos = tokenizer.eos_token_id
    replies: list[list[list[int]]] = []
    for start in range(0, len(prompt_ids), batch_prompts):
        chunk = prompt_ids[start : start + batch_prompts]
        batch = tokenizer.pad({"input_ids": list(chunk)}, padding=True, return_tensors="pt")
        out = model.generate(
            **batch,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=per_prompt,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos,
        )  # [len(chunk) * per_prompt, S + new]
        new = out[:, batch["input_ids"].shape[1] :].tolist()
        for i in range(len(chunk)):
            group = []
            for ids in new[i * per_prompt : (i + 1) * per_prompt]:
                group.append(ids[: ids.index(eos) + 1] if eos in ids else ids)
            replies.append(group)
        if bar is not None:
            bar.update(1)
    return replies


def tilted_sample_probs(rewards: torch.Tensor, finished: torch.Tensor, beta: float) -> torch.Tensor:
    """Sampling probabilities over all replies that estimate ``pi_ref * exp(r / beta)``.

    ``rewards`` and ``finished`` are ``[P, m]`` (P prompts, m replies each). Within a
    prompt, weights are ``softmax(r / beta)`` over its finished replies (an unfinished
    one, cut at the token limit, gets weight 0); every prompt gets equal total mass.
    """
    logits = (rewards / beta).masked_fill(~finished, float("-inf"))  # [P, m]
    has_any = finished.any(dim=1, keepdim=True)  # [P, 1]
    weights = torch.where(has_any, torch.softmax(logits, dim=1), torch.zeros_like(logits))
    weights = torch.nan_to_num(weights, nan=0.0)
    return (weights / weights.sum()).flatten()  # [P * m]


def effective_sample_size(weights: torch.Tensor) -> float:
    """Kish's ESS of normalised weights: how many equally weighted samples they are worth."""
    return float(weights.sum() ** 2 / (weights**2).sum())


def score_replies(texts: Sequence[Sequence[str]], scorer: Callable[[str], float]) -> torch.Tensor:
    """``[P, m]`` rewards of the decoded replies."""
    return torch.tensor([[scorer(text) for text in group] for group in texts])
