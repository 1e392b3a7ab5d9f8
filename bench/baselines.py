"""The two baselines the system is compared with, run by the same script.

- ``single``: one policy through ``transformers``' own ``generate()`` and its KV cache,
  the ``c`` prompts as one batch (every prompt has 32 tokens, so no padding).
- ``diy-mix``: the loop research code writes by hand (MOD, proxy-tuning): every policy
  keeps its own ``past_key_values``, their log-probs are mixed per token, and requests
  are served one after another.

Also ``policy_step_seconds``: one policy's bare decode-step time, the yardstick of the
engine's overhead target.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache, GenerationConfig

from mpo_core.models.policies import LoadedModel, PolicySet

from .common import RequestTimes, now


class _TimingStreamer:
    """``generate(streamer=...)`` calls ``put`` with the prompt, then once per new token."""

    def __init__(self, requests: list[RequestTimes]) -> None:
        self.requests = requests
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        stamp = now()
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        for req, token in zip(self.requests, value.reshape(len(self.requests)).tolist()):
            req.token_times.append(stamp)
            req.token_ids.append(int(token))

    def end(self) -> None:
        pass


@torch.inference_mode()
def run_single(
    policy_set: PolicySet, prompts: list[list[int]], new_tokens: int
) -> tuple[list[RequestTimes], float, float]:
    """Greedy ``generate()`` of the first policy over all prompts at once."""
    model: Any = policy_set.policies[0].model
    ids = torch.tensor(prompts, device=policy_set.device)  # [c, 32]
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,  # ignore EOS: always new_tokens tokens
        pad_token_id=policy_set.tokenizer.pad_token_id,
    )
    start = now()
    requests = [RequestTimes(arrival=start) for _ in prompts]
    model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        generation_config=config,
        streamer=_TimingStreamer(requests),
    )
    return requests, start, now()


def _forward(loaded: LoadedModel, ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """One forward with the model's own cache; last position's logits [1, V_model]."""
    kwargs: dict[str, Any] = {loaded.cache_kwarg: cache, "use_cache": True}
    return loaded.model(input_ids=ids, **kwargs).logits[:, -1]


def _mixed_next_token(
    policy_set: PolicySet, ids: torch.Tensor, caches: list[DynamicCache], weights: torch.Tensor
) -> int:
    """Run every policy on ``ids``, mix sum_k w_k log pi_k, renormalise, take the argmax."""
    vocab = policy_set.vocab_size
    logprobs = torch.stack(
        [
            torch.log_softmax(_forward(p, ids, c)[:, :vocab].float(), dim=-1)
            for p, c in zip(policy_set.policies, caches)
        ]
    )  # [K, 1, V]
    mixed = torch.log_softmax((weights[:, None, None] * logprobs).sum(dim=0), dim=-1)  # [1, V]
    return int(mixed.argmax(dim=-1))


@torch.inference_mode()
def diy_mix_one(
    policy_set: PolicySet, prompt: list[int], new_tokens: int, times: RequestTimes | None = None
) -> list[int]:
    """Greedy decoding of the uniform mixture for one request; ``times`` records each token."""
    device = policy_set.device
    k = len(policy_set.policies)
    weights = torch.full((k,), 1.0 / k, device=device)  # [K]
    caches = [DynamicCache() for _ in range(k)]
    ids = torch.tensor([prompt], device=device)  # [1, 32]
    generated: list[int] = []
    for _ in range(new_tokens):
        token = _mixed_next_token(policy_set, ids, caches, weights)
        generated.append(token)
        if times is not None:
            times.token_times.append(now())
            times.token_ids.append(token)
        ids = torch.tensor([[token]], device=device)  # [1, 1]
    return generated


def run_diy_mix(
    policy_set: PolicySet, prompts: list[list[int]], new_tokens: int
) -> tuple[list[RequestTimes], float, float]:
    """All requests arrive at once and are served one at a time."""
    start = now()
    requests = [RequestTimes(arrival=start) for _ in prompts]
    for prompt, times in zip(prompts, requests):
        diy_mix_one(policy_set, prompt, new_tokens, times)
    return requests, start, now()


@torch.inference_mode()
def policy_step_seconds(policy_set: PolicySet, prompt: list[int], new_tokens: int) -> list[float]:
    """Each policy's mean bare decode-step time (batch 1, its own cache, greedy)."""
    means = []
    for loaded in policy_set.policies:
        cache = DynamicCache()
        logits = _forward(loaded, torch.tensor([prompt], device=policy_set.device), cache)
        token = logits.argmax(dim=-1, keepdim=True)  # [1, 1]
        _sync(policy_set.device)
        start = now()
        for _ in range(new_tokens - 1):
            token = _forward(loaded, token, cache).argmax(dim=-1, keepdim=True)  # [1, 1]
        _sync(policy_set.device)
        means.append((now() - start) / max(1, new_tokens - 1))
    return means


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
