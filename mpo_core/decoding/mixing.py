"""Log-linear mixing of policies' next-token distributions (docs/architecture.md).

    log p(v) = s * sum_k w_k log pi_k(v) + (1 - s) log pi_ref(v) - log Z

With s = 1 this is the MPO / MOD policy prod_k pi_k^w_k. If every pi_k is the
KL-regularised optimum pi_ref exp(r_k / beta) / Z_k, the product is the optimum for the
reward sum_k w_k r_k, so the weights act as a per-request preference vector. The theory
is stated for whole sequences; normalising per token is the usual decoding-time
approximation.

Weights may be signed (guidance, contrastive decoding): ``(1 + g) log p(y | x, c) -
g log p(y | x)`` is the weights ``{c: 1 + g, plain: -g}``. A negative term rewards what a
model finds unlikely, including tokens no model finds likely, so a mixture with a negative
policy coefficient keeps only the tokens that the mixture of its positive terms finds
plausible (Li et al., ACL 2023, eq. 3; ``plausible_tokens``).

A request on a persona family may bring personas of its own (``Mixture.request_personas``): R
more models, numbered after the reference (``K + 1 + i``), whose terms are policy terms
like any other. Only a step with such a row has more than K + 1 models (``mix_step``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import InvalidParameter
from ..models.personas import RequestPersonaText, check_request_personas

# Strength extrapolates away from the reference past 1; far past it s * log p overflows
# float32 to -inf/NaN, so it is bounded (decoding-time realignment uses s in about [0, 2]).
MAX_STRENGTH = 100.0
# Weights are relative, so a bound costs nothing and keeps their sum finite.
MAX_WEIGHT = 1e9
# Each weight once normalised to sum 1 lies in [-MAX_TERM, MAX_TERM]: signed weights
# extrapolate, and a sum near 0 would otherwise make a coefficient without bound.
MAX_TERM = 10.0
# Li et al.'s alpha: with a negative term, tokens whose probability under the positive
# terms' mixture is below alpha times its most likely token's are excluded (0: off).
DEFAULT_PLAUSIBILITY = 0.1
WeightsInput = Mapping[str, float] | Sequence[float] | None


def check_weight(param: str, value: object) -> float:
    """One raw weight: a finite number in [-MAX_WEIGHT, MAX_WEIGHT] (``-0.0`` becomes 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameter(param, f"{param} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or not -MAX_WEIGHT <= number <= MAX_WEIGHT:
        raise InvalidParameter(
            param, f"{param} must be finite, between -{MAX_WEIGHT:g} and {MAX_WEIGHT:g}, "
            f"got {value!r}",
        )  # fmt: skip
    return number + 0.0


def check_weight_map(weights: object) -> dict[str, float]:
    """Raw ``{name: w}`` whose values obey every weight rule, whatever the names (stores)."""
    if not isinstance(weights, Mapping) or not weights:
        raise InvalidParameter("weights", f"weights must be a non-empty object, got {weights!r}")
    checked = {str(n): check_weight(f"weights.{n}", w) for n, w in weights.items()}
    _total(checked)
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
    _total({f"[{i}]": w for i, w in enumerate(checked)})
    return checked


def _total(raw: Mapping[str, float]) -> float:
    """The sum that normalises ``raw`` (keys: ``.name`` or ``[i]``, for the error): > 0,
    and no weight past MAX_TERM times it (each normalised weight within the bound)."""
    keys = {k: k if k.startswith("[") else f".{k}" for k in raw}
    total = math.fsum(raw.values())  # each |w| <= MAX_WEIGHT, so finite
    if total <= 0:
        raise InvalidParameter(
            "weights", f"weights must sum to more than 0 (they are normalised to sum 1), "
            f"got a sum of {total:g}",
        )  # fmt: skip
    for key, weight in raw.items():
        if abs(weight) > MAX_TERM * total:
            raise InvalidParameter(
                f"weights{keys[key]}",
                f"weights{keys[key]} is {weight / total:g} once the weights are normalised "
                f"to sum 1; each must lie between -{MAX_TERM:g} and {MAX_TERM:g}",
            )
    return total


def normalize_weights(weights: WeightsInput, names: Sequence[str]) -> list[float]:
    """Turn ``{name: w}`` or ``[w, ...]`` (policy order) into weights summing to 1.

    ``None`` or an empty mapping means uniform. Names missing from a mapping get 0.
    Weights may be negative (bounds: ``check_weight``, ``_total``).
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
        raw = list(check_weight_map({n: weights.get(n, 0.0) for n in names}).values())
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
    total = math.fsum(raw)  # > 0: checked
    return [w / total for w in raw]


def check_plausibility(alpha: object) -> float:
    """Li et al.'s alpha in [0, 1): 0 turns the plausibility constraint off, and 1 would
    keep only the positive terms' most likely token (a different decoder: greedy)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise InvalidParameter("plausibility", f"plausibility must be a number, got {alpha!r}")
    value = float(alpha) + 0.0
    if not math.isfinite(value) or not 0 <= value < 1:
        raise InvalidParameter("plausibility", f"plausibility must be >= 0 and < 1, got {alpha!r}")
    return value


@dataclass(frozen=True)
class Mixture:
    """What one request decodes from: weights summing to 1 (policy order), strength and
    the plausibility alpha that applies when a policy's coefficient is negative.

    Built only through :meth:`build`, which holds every rule; the
    engine, the server, the stores and the fit all take this object rather than loose
    fields. ``coefficients`` are the factors of each model's log-probs in ``log p``.
    """

    names: tuple[str, ...]  # the K policies, then the request's own personas
    weights: tuple[float, ...]  # [K + R] summing to 1, each in [-MAX_TERM, MAX_TERM]
    strength: float = 1.0
    plausibility: float = DEFAULT_PLAUSIBILITY  # alpha in [0, 1)
    request_personas: tuple[RequestPersonaText, ...] = ()  # [R] the request's own, in names' order

    @classmethod
    def build(
        cls,
        names: Sequence[str],
        weights: WeightsInput = None,
        strength: object = 1.0,
        *,
        has_reference: bool,
        plausibility: object = DEFAULT_PLAUSIBILITY,
        personas: object = None,
        persona_limit: int = 0,
        reserved: Sequence[str] = (),
    ) -> Mixture:
        """``names`` are the K policies; ``personas`` the request's own (at most
        ``persona_limit``, named unlike the policies and ``reserved``: the plain model),
        which the weights may name after the policies (a list: policies, then personas)."""
        extra = check_request_personas(personas, [*names, *reserved], persona_limit)
        every = (*names, *(p.name for p in extra))
        normalised = normalize_weights(weights, every)
        checked = check_strength(strength, has_reference)
        alpha = check_plausibility(plausibility)
        return cls(every, tuple(normalised), checked, alpha, extra)

    @property
    def policy_names(self) -> tuple[str, ...]:
        """The K configured policies (``names`` without the request's personas)."""
        return self.names[: len(self.names) - len(self.request_personas)]

    def check_fits(self, names: Sequence[str], has_reference: bool) -> None:
        """A mixture built elsewhere must be over these policies, in this order, and its
        strength must be possible here (s != 1 needs the reference)."""
        if self.policy_names != tuple(names):
            raise InvalidParameter(
                "weights",
                f"the mixture is over the policies {', '.join(self.policy_names)}, but this "
                f"policy set has {', '.join(names)}",
            )
        check_strength(self.strength, has_reference)

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.names, self.weights))

    @functools.cached_property  # read by every step for every row: computed once
    def coefficients(self) -> tuple[float, ...]:
        """[K + 1 + R]: ``s * w_k`` per policy, ``1 - s`` for the reference, then
        ``s * w_r`` per request persona (none without them: the fixed [K + 1])."""
        s, k = self.strength, len(self.names) - len(self.request_personas)
        terms = [s * w for w in self.weights]
        return (*terms[:k], 1.0 - s, *terms[k:])

    @property
    def alpha(self) -> float:
        """The plausibility alpha in force: the request's when a policy's (or a request
        persona's) coefficient ``s * w_k`` is negative, else 0. A negative reference
        coefficient (s > 1) alone is strength's extrapolation and stays unconstrained."""
        return self.plausibility if any(w < 0 for w in self.weights) and self.strength else 0.0

    @property
    def is_uniform(self) -> bool:
        return len(set(self.weights)) == 1


def mix_logprobs(
    policy_logprobs: torch.Tensor,  # [K, B, V]
    policy_coef: torch.Tensor,  # [B, K]  s * w_k
    reference_logprobs: torch.Tensor | None = None,  # [B, V]
    reference_coef: torch.Tensor | None = None,  # [B]  1 - s
    alpha: torch.Tensor | None = None,  # [B] plausibility in force (0: none); None: all 0
) -> torch.Tensor:
    """Normalised log-probabilities of the mixture, [B, V].

    A zero coefficient contributes nothing even where that model's log-probs are -inf or
    were never computed (the engine does not run a model whose coefficient is zero).
    Rows with ``alpha > 0`` keep only their plausible tokens (``plausible_tokens``).
    """
    coef = policy_coef.t().unsqueeze(-1)  # [K, B, 1]
    terms = torch.where(coef == 0, 0.0, coef * policy_logprobs)  # [K, B, V]
    scores = terms.sum(dim=0)  # [B, V]
    if reference_logprobs is not None and reference_coef is not None:
        ref_coef = reference_coef.unsqueeze(-1)  # [B, 1]
        scores = scores + torch.where(ref_coef == 0, 0.0, ref_coef * reference_logprobs)
    if alpha is not None:  # callers pass None when no row is constrained: no device sync
        keep = plausible_tokens(
            policy_logprobs, policy_coef, reference_logprobs, reference_coef, alpha
        )  # [B, V]
        scores = scores.masked_fill(~keep, float("-inf"))  # a negative term's +inf too
    return torch.log_softmax(scores, dim=-1)  # [B, V]


def plausible_tokens(
    policy_logprobs: torch.Tensor,  # [K, B, V]
    policy_coef: torch.Tensor,  # [B, K]
    reference_logprobs: torch.Tensor | None,  # [B, V]
    reference_coef: torch.Tensor | None,  # [B]
    alpha: torch.Tensor,  # [B] in [0, 1)
) -> torch.Tensor:
    """[B, V] bool: Li et al.'s V_head (ACL 2023, eq. 3) for each row,
    ``{v : q(v) >= alpha * max_u q(u)}``, where q is the mixture of the row's positive
    terms alone, their coefficients renormalised to sum 1. Coefficients sum to 1, so a
    row has a positive one; alpha 0 keeps every token."""
    positive = policy_coef.clamp(min=0)  # [B, K]
    total = positive.sum(dim=-1)  # [B]
    ref_positive = None
    if reference_logprobs is not None and reference_coef is not None:
        ref_positive = reference_coef.clamp(min=0)  # [B]
        total = total + ref_positive
    total = total.clamp(min=torch.finfo(total.dtype).tiny)  # [B]
    head = mix_logprobs(
        policy_logprobs,
        positive / total.unsqueeze(-1),
        reference_logprobs,
        None if ref_positive is None else ref_positive / total,
    )  # [B, V]  log q
    floor = head.max(dim=-1, keepdim=True).values + torch.log(alpha).unsqueeze(-1)  # [B, 1]
    return head >= floor  # [B, V]; log 0 = -inf keeps all


def mix_rows(
    logprobs: torch.Tensor,  # [M, N, V], the reference last when there is one
    coefs: torch.Tensor,  # [N, K + 1]
    has_reference: bool,
    alpha: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:
    """Each row's mixture of its models' log-probs in the runners' layout -> [N, V]."""
    k = coefs.shape[1] - 1
    return mix_logprobs(
        logprobs[:k],
        coefs[:, :k],
        logprobs[k] if has_reference else None,
        coefs[:, k] if has_reference else None,
        alpha,
    )  # [N, V]


def mix_step(
    logprobs: torch.Tensor,  # [M, B, G, V] a step's log-probs per model, row, position
    mixtures: Sequence[Mixture],  # [B] each row's
    has_reference: bool,
) -> torch.Tensor:
    """A decoding step's mixed log-probs, [B, G, V]: each row under its own mixture."""
    models, rows, width, vocab = logprobs.shape
    device = logprobs.device
    alphas = [m.alpha for m in mixtures]
    alpha = torch.tensor(alphas, device=device) if any(alphas) else None  # [B]
    if any(m.request_personas for m in mixtures):  # M = K + 1 + R: the reference is one more term
        padded = [(*c, *[0.0] * (models - len(c))) for c in (m.coefficients for m in mixtures)]
        every = torch.tensor(padded, device=device).repeat_interleave(width, 0)  # [B * G, M]
        return mix_logprobs(
            logprobs.reshape(models, rows * width, vocab),
            every,
            alpha=None if alpha is None else alpha.repeat_interleave(width, 0),
        ).view(rows, width, vocab)  # [B, G, V]
    coefs = torch.tensor([m.coefficients for m in mixtures], device=device)  # [B, K + 1]
    return mix_rows(
        logprobs.reshape(models, rows * width, vocab),
        coefs.repeat_interleave(width, 0),  # [B * G, K + 1]
        has_reference,
        None if alpha is None else alpha.repeat_interleave(width, 0),  # [B * G]
    ).view(rows, width, vocab)  # [B, G, V]
