"""Log-linear mixing of policies' next-token distributions (DESIGN.md §2.1).

    log p(v) = s * sum_k w_k log pi_k(v) + (1 - s) log pi_ref(v) - log Z

With s = 1 this is the MPO / MOD policy prod_k pi_k^w_k. If every pi_k is the
KL-regularised optimum pi_ref exp(r_k / beta) / Z_k, the product is the optimum for the
reward sum_k w_k r_k, so the weights act as a per-request preference vector. The theory
is stated for whole sequences; normalising per token is the usual decoding-time
approximation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from .errors import InvalidParameter

MAX_STRENGTH = 100.0  # far past any useful extrapolation; keeps s * log p finite
WeightsInput = Mapping[str, float] | Sequence[float] | None


def _check_value(param: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameter(param, f"{param} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise InvalidParameter(param, f"{param} must be finite, got {value!r}")
    if number < 0:
        raise InvalidParameter(param, f"{param} must be >= 0, got {value!r}")
    return number


def normalize_weights(weights: WeightsInput, names: Sequence[str]) -> list[float]:
    """Turn ``{name: w}`` or ``[w, ...]`` (policy order) into weights summing to 1.

    ``None`` or an empty mapping means uniform. Names missing from a mapping get 0.
    """
    if weights is None or (isinstance(weights, Mapping) and not weights):
        return [1.0 / len(names)] * len(names)
    if isinstance(weights, Mapping):
        unknown = [n for n in weights if n not in names]
        if unknown:
            raise InvalidParameter(
                f"weights.{unknown[0]}",
                f"unknown policy {unknown[0]!r} in weights; policies are {', '.join(names)}",
            )
        raw = [_check_value(f"weights.{n}", weights.get(n, 0.0)) for n in names]
    elif isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise InvalidParameter("weights", f"weights must be an object or a list, got {weights!r}")
    else:
        if len(weights) != len(names):
            raise InvalidParameter(
                "weights",
                f"weights has {len(weights)} entries but there are {len(names)} policies "
                f"({', '.join(names)})",
            )
        raw = [_check_value(f"weights[{i}]", w) for i, w in enumerate(weights)]
    try:
        total = math.fsum(raw)
    except OverflowError:
        total = math.inf
    if not math.isfinite(total):
        raise InvalidParameter("weights", "weights are too large: their sum is not finite")
    if total <= 0:
        raise InvalidParameter("weights", "weights must not all be zero")
    return [w / total for w in raw]


def check_strength(strength: object, has_reference: bool) -> float:
    """Validate s; s != 1 needs the reference policy."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        raise InvalidParameter("strength", f"strength must be a number, got {strength!r}")
    value = float(strength)
    if not math.isfinite(value) or not 0 <= value <= MAX_STRENGTH:
        raise InvalidParameter(
            "strength", f"strength must be between 0 and {MAX_STRENGTH}, got {strength!r}"
        )
    if value != 1.0 and not has_reference:
        raise InvalidParameter(
            "strength",
            f"strength {value} needs a reference model, and this policy set has none; "
            "use strength 1 or add `reference:` to the policy-set config",
        )
    return value


def to_logprobs(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Float32 log-softmax over the shared vocabulary (padding rows dropped)."""
    return torch.log_softmax(logits[..., :vocab_size].float(), dim=-1)  # [..., V]


def mix_logprobs(
    policy_logprobs: torch.Tensor,  # [K, B, V]
    policy_coef: torch.Tensor,  # [B, K]  s * w_k
    reference_logprobs: torch.Tensor | None = None,  # [B, V]
    reference_coef: torch.Tensor | None = None,  # [B]  1 - s
) -> torch.Tensor:
    """Normalised log-probabilities of the mixture, [B, V].

    A zero coefficient contributes nothing even where that model's log-probs are -inf or
    were never computed (the engine does not run a model whose coefficient is zero).
    """
    coef = policy_coef.t().unsqueeze(-1)  # [K, B, 1]
    terms = torch.where(coef == 0, 0.0, coef * policy_logprobs)  # [K, B, V]
    scores = terms.sum(dim=0)  # [B, V]
    if reference_logprobs is not None and reference_coef is not None:
        ref_coef = reference_coef.unsqueeze(-1)  # [B, 1]
        scores = scores + torch.where(ref_coef == 0, 0.0, ref_coef * reference_logprobs)
    return torch.log_softmax(scores, dim=-1)  # [B, V]
