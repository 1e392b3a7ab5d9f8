"""Log-linear mixing of policies' next-token distributions (docs/architecture.md).

    log p(v) = s * sum_k w_k log pi_k(v) + (1 - s) log pi_ref(v) - log Z

With s = 1 this is the MPO / MOD policy prod_k pi_k^w_k. If every pi_k is the
KL-regularised optimum pi_ref exp(r_k / beta) / Z_k, the product is the optimum for the
reward sum_k w_k r_k, so the weights act as a per-request preference vector. The theory
is stated for whole sequences; normalising per token is the usual decoding-time
approximation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import InvalidParameter

# Strength extrapolates away from the reference past 1; far past it s * log p overflows
# float32 to -inf/NaN, so it is bounded (decoding-time realignment uses s in about [0, 2]).
MAX_STRENGTH = 100.0
# Weights are relative, so a bound costs nothing and keeps their sum finite.
MAX_WEIGHT = 1e9
WeightsInput = Mapping[str, float] | Sequence[float] | None


def check_weight(param: str, value: object) -> float:
    """One raw weight: a finite number in [0, MAX_WEIGHT] (``-0.0`` becomes ``0.0``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameter(param, f"{param} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or not 0 <= number <= MAX_WEIGHT:
        raise InvalidParameter(
            param, f"{param} must be finite, >= 0 and <= {MAX_WEIGHT:g}, got {value!r}"
        )
    return number + 0.0


def check_weight_map(weights: object) -> dict[str, float]:
    """Raw ``{name: w}`` whose values obey every weight rule, whatever the names (stores)."""
    if not isinstance(weights, Mapping) or not weights:
        raise InvalidParameter("weights", f"weights must be a non-empty object, got {weights!r}")
    checked = {str(n): check_weight(f"weights.{n}", w) for n, w in weights.items()}
    _total(list(checked.values()))
    return checked


def check_strength(strength: object, has_reference: bool = True) -> float:
    """Validate s in [0, MAX_STRENGTH]; s != 1 needs the reference policy."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        raise InvalidParameter("strength", f"strength must be a number, got {strength!r}")
    value = float(strength) + 0.0
    if not math.isfinite(value) or not 0 <= value <= MAX_STRENGTH:
        raise InvalidParameter(
            "strength", f"strength must be between 0 and {MAX_STRENGTH:g}, got {strength!r}"
        )
    if value != 1.0 and not has_reference:
        raise InvalidParameter(
            "strength",
            f"strength {value:g} needs a reference model, and this policy set has none; "
            "use strength 1 or add a reference to the policy-set config",
        )
    return value


def check_weight_list(weights: object) -> list[float]:
    """Raw ``[w, ...]`` whose values obey every weight rule, whatever their count (the wire)."""
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or not weights:
        raise InvalidParameter("weights", f"weights must be a non-empty list, got {weights!r}")
    checked = [check_weight(f"weights[{i}]", w) for i, w in enumerate(weights)]
    _total(checked)
    return checked


def _total(raw: list[float]) -> float:
    total = math.fsum(raw)  # each <= MAX_WEIGHT, so finite
    if total <= 0:
        raise InvalidParameter("weights", "weights must not all be zero")
    return total


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
        raw = [check_weight(f"weights.{n}", weights.get(n, 0.0)) for n in names]
    elif isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise InvalidParameter("weights", f"weights must be an object or a list, got {weights!r}")
    else:
        if len(weights) != len(names):
            raise InvalidParameter(
                "weights",
                f"weights has {len(weights)} entries but there are {len(names)} policies "
                f"({', '.join(names)})",
            )
        raw = check_weight_list(weights)
    total = _total(raw)
    return [w / total for w in raw]


@dataclass(frozen=True)
class Mixture:
    """What one request decodes from: weights on the simplex (policy order) and strength.

    Built only through :meth:`build`, which holds every rule; the
    engine, the server, the stores and the fit all take this object rather than loose
    fields. ``coefficients`` are the factors of each model's log-probs in ``log p``.
    """

    names: tuple[str, ...]
    weights: tuple[float, ...]  # [K] >= 0, summing to 1
    strength: float = 1.0

    @classmethod
    def build(
        cls,
        names: Sequence[str],
        weights: WeightsInput = None,
        strength: object = 1.0,
        *,
        has_reference: bool,
    ) -> Mixture:
        normalised = normalize_weights(weights, names)
        return cls(tuple(names), tuple(normalised), check_strength(strength, has_reference))

    def check_fits(self, names: Sequence[str], has_reference: bool) -> None:
        """A mixture built elsewhere must be over these policies, in this order, and its
        strength must be possible here (s != 1 needs the reference)."""
        if self.names != tuple(names):
            raise InvalidParameter(
                "weights",
                f"the mixture is over the policies {', '.join(self.names)}, but this policy "
                f"set has {', '.join(names)}",
            )
        check_strength(self.strength, has_reference)

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.names, self.weights))

    @functools.cached_property  # read by every step for every row: computed once
    def coefficients(self) -> tuple[float, ...]:
        """[K + 1]: ``s * w_k`` per policy, then ``1 - s`` for the reference."""
        return (*(self.strength * w for w in self.weights), 1.0 - self.strength)

    @property
    def is_uniform(self) -> bool:
        return len(set(self.weights)) == 1


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


def mix_rows(logprobs: torch.Tensor, coefs: torch.Tensor, has_reference: bool) -> torch.Tensor:
    """Each row's mixture of its models' log-probs in the runners' layout: [M, N, V] with
    the reference last when there is one, coefficients [N, K + 1] -> [N, V]."""
    k = coefs.shape[1] - 1
    return mix_logprobs(
        logprobs[:k],
        coefs[:, :k],
        logprobs[k] if has_reference else None,
        coefs[:, k] if has_reference else None,
    )  # [N, V]
