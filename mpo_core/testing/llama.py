"""Test helpers for the llama.cpp backend: an independent forward through llama-cpp-python's
own high-level ``Llama`` (none of the runner's code), and a count of the sequences that go
through ``llama_decode``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..models.policies import PolicySet
from ..runners.base import all_models
from ..runners.llama_context import LlamaContext, default_threads, ggml_type


class LlamaDirect:
    """Each member's next-token log-probs after a whole sequence, computed from scratch by
    ``llama_cpp.Llama`` on the member's GGUF file (one sequence, a fresh KV cache)."""

    def __init__(self, policy_set: PolicySet, n_ctx: int = 512) -> None:
        from llama_cpp import Llama

        self.vocab_size = policy_set.vocab_size
        self.paths = [str(m.model.path) for m in all_models(policy_set)]  # type: ignore[attr-defined]
        self.models = {
            path: Llama(
                model_path=path,
                n_ctx=n_ctx,
                logits_all=True,
                flash_attn=False,  # as the runner's contexts (``LlamaContext``)
                type_k=ggml_type(policy_set.kv_dtype),
                type_v=ggml_type(policy_set.kv_dtype),
                n_threads=default_threads(),
                verbose=False,
            )
            for path in set(self.paths)
        }

    def close(self) -> None:
        """Free the models now: left to interpreter exit, llama-cpp-python's own finaliser
        runs after its bindings are gone and prints a TypeError."""
        for llm in self.models.values():
            llm.close()
        self.models.clear()

    def next_logprobs(self, model: int, tokens: Sequence[int]) -> torch.Tensor:
        """[V] float32: the log-softmax of the logits after ``tokens`` (already rendered)."""
        llm = self.models[self.paths[model]]
        llm.reset()
        llm.eval(list(tokens))
        logits = torch.from_numpy(llm.scores[len(tokens) - 1, : self.vocab_size].copy())
        return torch.log_softmax(logits.float(), dim=-1)


class LlamaRows:
    """Counts the sequences (the runner's "rows") each ``LlamaContext.decode`` runs, while
    open: one per (request, model) slot a step, as ``ForwardRows`` counts batch rows."""

    def __init__(self) -> None:
        self.rows = 0
        original = LlamaContext.decode
        self._original = original

        def counting(context: LlamaContext, pieces: Any) -> torch.Tensor:
            self.rows += len(pieces)
            return original(context, pieces)

        LlamaContext.decode = counting  # type: ignore[method-assign,assignment]

    def close(self) -> None:
        LlamaContext.decode = self._original  # type: ignore[method-assign]
