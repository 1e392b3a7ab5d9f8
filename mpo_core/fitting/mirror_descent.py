"""MaxMin weight fitting by batch stochastic mirror descent (docs/fitting.md): pure tensor math.

The input is the tensor of implicit rewards
``R[i, j, k] = log pi_k(y_ij|x_i) - log pi_ref(y_ij|x_i)`` for ``m`` responses
``y_ij ~ pi_ref(.|x_i)`` to each of ``N`` prompts. The weights minimise

    F(lam) = mean_i log mean_j exp(sum_k lam_k R[i, j, k])

over the simplex. ``F`` is convex (a mean of log-sum-exps of linear maps). Its gradient is the
expected implicit reward of each objective under the self-normalised importance weights
``w_ij = softmax_j(lam . R_ij)``, i.e. under the mixture ``pi_lam ∝ pi_ref exp(lam . R)``.

Everything runs in float64 on the tensors' device; no model is called here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import InvalidParameter, MPOError

logger = logging.getLogger(__name__)

# Default step size, eta = c / sqrt(T) (the paper's schedule) with
#     c = sqrt(2 ln K) / G,  G = max over lam in {uniform, e_1..e_K} of (max_k g_k - min_k g_k) / 2,
# the textbook constant of entropic mirror descent (regret <= G sqrt(2 T ln K)) for gradients with
# ||g - shift||_inf <= G; the update ignores a shift of every g_k by one constant. G is measured
# on the full-batch gradient at the centre and the corners of the simplex rather than bounded by
# the spread of R, which is far looser (it is set by the single most extreme reply): with that
# bound the mean iterate moved so slowly that 2000 steps left it 0.1-0.25 (L1) from the optimum.
# The factor 4 on top (c = 4 sqrt(2 ln K) / G) is empirical: the mean iterate includes the early
# transient, and on the synthetic cases of tests/core/test_fitting.py a factor 1 left optima on a
# face of the simplex 0.02-0.05 (L1) away after 3000 steps, where 4 stays under 0.02.
_STEP_SCALE = 4.0


class FitCancelled(MPOError):
    """A fit was cancelled by its caller (raised from a progress or cancel callback)."""


@dataclass
class FitHistory:
    """Per-step trace of the optimiser: the iterate used at each step and its batch F."""

    weights: torch.Tensor  # [T, K] iterate lam_t at which step t's gradient was taken
    batch_objective: torch.Tensor  # [T] F(lam_t) on that step's batch of prompts

    def __len__(self) -> int:
        return int(self.batch_objective.shape[0])


@dataclass
class FitResult:
    """Output of :func:`fit_weights`."""

    weights: torch.Tensor  # [K] on the simplex: the average of the iterates
    objective: float  # F(weights) over all N prompts
    step_size: float  # the eta actually used
    history: FitHistory


@dataclass
class WeightEvaluation:
    """Self-normalised importance estimates for one weight vector, on the samples of ``R``."""

    objective: float  # F(lam)
    rewards: list[float]  # [K] E_{pi_lam}[R_k], averaged over prompts
    min_reward: float  # min_k of rewards
    kl: float  # KL(pi_lam || pi_ref), averaged over prompts
    maxmin: float  # min_k E[R_k] - KL: the regularised MaxMin value
    ess_mean: float  # mean over prompts of 1 / sum_j w_ij^2, in samples (1..m)
    ess_min: float  # smallest per-prompt effective sample size
    samples_per_prompt: int  # m, so that ess / m is the fraction kept


def check_log_ratios(log_ratios: torch.Tensor) -> torch.Tensor:
    """Validate ``R`` (``[N, m, K]``, finite, non-empty) and return it as float64."""
    if not isinstance(log_ratios, torch.Tensor):
        log_ratios = torch.as_tensor(log_ratios)
    if log_ratios.dim() != 3:
        raise InvalidParameter(
            "log_ratios", f"log_ratios must have shape [N, m, K], got {tuple(log_ratios.shape)}"
        )
    if log_ratios.numel() == 0:
        raise InvalidParameter(
            "log_ratios",
            f"log_ratios is empty (shape {tuple(log_ratios.shape)}): need at least one prompt, "
            "one response and one policy",
        )
    ratios = log_ratios.to(torch.float64)
    bad = int((~torch.isfinite(ratios)).sum())
    if bad:
        raise InvalidParameter(
            "log_ratios",
            f"log_ratios has {bad} non-finite values (NaN or inf); a policy or the reference "
            "gave a sampled response zero probability or the scores are corrupt",
        )
    return ratios


def check_weights(weights: torch.Tensor | list[float], num_policies: int) -> torch.Tensor:
    """Validate a weight vector of length K (finite, >= 0, not all 0) and normalise it."""
    lam = torch.as_tensor(weights, dtype=torch.float64).flatten()  # [K]
    if lam.numel() != num_policies:
        raise InvalidParameter(
            "weights",
            f"weights has {lam.numel()} entries, expected one per policy ({num_policies})",
        )
    if not bool(torch.isfinite(lam).all()) or bool((lam < 0).any()) or float(lam.sum()) <= 0:
        raise InvalidParameter(
            "weights", f"weights must be finite, >= 0 and not all 0, got {lam.tolist()}"
        )
    return lam / lam.sum()


def _scores(ratios: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    return ratios @ lam.to(ratios.device)  # [N, m]: lam . R_ij


def _objective(scores: torch.Tensor) -> torch.Tensor:
    m = scores.shape[1]
    return (torch.logsumexp(scores, dim=1) - math.log(m)).mean()  # []: F


def objective(log_ratios: torch.Tensor, weights: torch.Tensor | list[float]) -> float:
    """``F(lam) = mean_i log mean_j exp(lam . R_ij)`` over all prompts."""
    ratios = check_log_ratios(log_ratios)
    lam = check_weights(weights, ratios.shape[2])
    return float(_objective(_scores(ratios, lam)))


def _gradient(ratios: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    importance = torch.softmax(scores, dim=1)  # [N, m]: w_ij
    return torch.einsum("nm,nmk->k", importance, ratios) / ratios.shape[0]  # [K]


def _default_step_size(ratios: torch.Tensor, iterations: int) -> float:
    num_policies = ratios.shape[2]
    if num_policies == 1:
        return 0.0  # a single policy: nothing to optimise
    corners = torch.eye(num_policies, dtype=torch.float64, device=ratios.device)  # [K, K]
    centre = torch.full_like(corners[0], 1.0 / num_policies)  # [K]
    spreads = [_gradient(ratios, _scores(ratios, lam)) for lam in (centre, *corners)]
    half_range = max(float(g.max() - g.min()) for g in spreads) / 2.0
    if half_range == 0.0:
        return 0.0  # every objective agrees on every reply: F is flat
    c = _STEP_SCALE * math.sqrt(2.0 * math.log(num_policies)) / half_range
    return c / math.sqrt(iterations)


def _check_fit_options(iterations: int, step_size: float | None, batch_size: int | None) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise InvalidParameter(
            "iterations", f"iterations must be an integer >= 1, got {iterations!r}"
        )
    if step_size is not None and not (math.isfinite(step_size) and step_size > 0):
        raise InvalidParameter("step_size", f"step_size must be finite and > 0, got {step_size!r}")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise InvalidParameter(
            "batch_size", f"batch_size must be an integer >= 1, got {batch_size!r}"
        )


def fit_weights(
    log_ratios: torch.Tensor,
    *,
    iterations: int,
    step_size: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    on_step: Callable[[int, int], None] | None = None,
) -> FitResult:
    """Minimise ``F`` over the simplex by batch stochastic mirror descent; return the mean iterate.

    Each step draws ``batch_size`` prompts without replacement (all ``N`` when None or larger
    than ``N``), takes ``g_k = mean_i sum_j w_ij R_ijk`` and updates
    ``lam <- lam * exp(-eta g)`` renormalised, in log space. ``step_size`` is ``eta``; by default
    ``c / sqrt(iterations)`` with ``c`` from the gradient's range (see ``_STEP_SCALE``).
    ``on_step(t, iterations)`` is called after every step; it may raise (e.g. FitCancelled).
    """
    ratios = check_log_ratios(log_ratios)  # [N, m, K]
    _check_fit_options(iterations, step_size, batch_size)
    num_prompts, _, num_policies = ratios.shape
    eta = _default_step_size(ratios, iterations) if step_size is None else float(step_size)
    full_batch = batch_size is None or batch_size >= num_prompts
    generator = torch.Generator().manual_seed(seed)

    log_lam = torch.full((num_policies,), -math.log(num_policies), dtype=torch.float64)  # [K]
    log_lam = log_lam.to(ratios.device)
    trace = torch.empty(iterations, num_policies, dtype=torch.float64)  # [T, K]
    batch_values = torch.empty(iterations, dtype=torch.float64)  # [T]
    for t in range(iterations):
        if full_batch:
            batch = ratios  # [N, m, K]
        else:
            rows = torch.randperm(num_prompts, generator=generator)[:batch_size]  # [b]
            batch = ratios[rows.to(ratios.device)]  # [b, m, K]
        lam = log_lam.exp()  # [K]
        scores = _scores(batch, lam)  # [b, m]
        grad = _gradient(batch, scores)  # [K]: g_k = mean_i sum_j w_ij R_ijk
        trace[t] = lam.cpu()
        batch_values[t] = _objective(scores).cpu()
        log_lam = torch.log_softmax(log_lam - eta * grad, dim=0)  # [K]: mirror step
        if on_step is not None:
            on_step(t + 1, iterations)

    mean_lam = trace.mean(dim=0)  # [K]: the paper's output, the average iterate
    mean_lam = mean_lam / mean_lam.sum()
    value = float(_objective(_scores(ratios, mean_lam)))
    return FitResult(mean_lam, value, eta, FitHistory(trace, batch_values))


def evaluate_weights(
    log_ratios: torch.Tensor, weights: torch.Tensor | list[float]
) -> WeightEvaluation:
    """For the mixture ``pi_lam ∝ pi_ref exp(lam . R)``, the report docs/fitting.md describes.

    All numbers are self-normalised importance estimates on the same reference samples:
    ``E[R_k] = mean_i sum_j w_ij R_ijk`` and ``KL = mean_i sum_j w_ij log(m w_ij)``, which is
    ``E_w[lam . R] - F(lam)`` per prompt. The ESS of a prompt is ``1 / sum_j w_ij^2``.
    """
    ratios = check_log_ratios(log_ratios)  # [N, m, K]
    num_prompts, m, num_policies = ratios.shape
    lam = check_weights(weights, num_policies)  # [K]
    scores = _scores(ratios, lam)  # [N, m]
    log_w = torch.log_softmax(scores, dim=1)  # [N, m]
    w = log_w.exp()  # [N, m]
    rewards = torch.einsum("nm,nmk->k", w, ratios) / num_prompts  # [K]
    kl = ((w * (log_w + math.log(m))).sum(dim=1)).mean()  # []
    ess = 1.0 / (w * w).sum(dim=1)  # [N]
    min_reward = float(rewards.min())
    return WeightEvaluation(
        objective=float(_objective(scores)),
        rewards=rewards.tolist(),
        min_reward=min_reward,
        kl=float(kl),
        maxmin=min_reward - float(kl),
        ess_mean=float(ess.mean()),
        ess_min=float(ess.min()),
        samples_per_prompt=m,
    )
