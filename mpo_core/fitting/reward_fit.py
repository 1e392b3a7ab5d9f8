"""MaxMin weight fitting on reward functions (docs/fitting.md, "Fitting to reward models").

The mixtures the engine decodes are, at the sequence level,

    pi_theta(y|x) ∝ pi_ref(y|x) exp(theta . R(x, y)),  theta = s lam,  R_k = log pi_k - log pi_ref,

with ``lam`` on the simplex and ``s`` the strength. Given J reward functions ``r_j``, the fit
maximises the MaxMin-RLHF objective over that family,

    J(lam, s) = min_j V_j(theta) - beta * KL(pi_theta || pi_ref),
    V_j(theta) = E_x E_{y ~ pi_theta} u_j(x, y),
    u_j(x, y)  = P_{y' ~ pi_ref(.|x)}[r_j(x, y) > r_j(x, y')] + 1/2 P[r_j(x, y) = r_j(x, y')],

so ``V_j`` is the win rate against the reference on objective j: scale-free (any increasing
transform of ``r_j`` leaves it unchanged), bounded in [0, 1], 1/2 for the reference itself, and
the quantity ``mpo eval`` reports. ``u_j`` is estimated per prompt from scored reference replies.

Every expectation is a self-normalised importance estimate over a pool of scored samples, each
drawn from a known proposal ``q`` (the reference, or a mixture decoded by the engine, whose
per-token normalisation makes ``q`` differ from ``pi_theta`` even at the same ``theta``):

    log w_in ∝ log pi_ref(y_in) + theta . R_in - log q(y_in),   softmax over the n samples of x_i.

For such a weighted expectation ``dE_w[f]/dtheta_m = Cov_w(f, R_m)``; the same holds for the
estimate of the KL, ``KL = E_w[theta . R] - log Z`` with ``dKL/dtheta_m = Cov_w(theta . R, R_m)``.
The fit ascends a soft minimum of the ``V_j`` (exact minimum in the report) by mirror ascent on
``lam`` and projected ascent on ``s``, with backtracking, and refuses steps whose effective sample
size falls under a floor: far from the proposals the estimates are not to be trusted, and the
driver (``mpo_core/fitting/reward_driver.py``) resamples there instead.

Pure tensor math in float64; no model is called here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import InvalidParameter

logger = logging.getLogger(__name__)

SOFTMIN_TEMPERATURE = 0.01  # on the win-rate scale: objectives 0.05 apart weigh e^5 to 1
MIN_STEP = 1e-6  # backtracking gives up below this mirror-step size
MIN_WEIGHT = 1e-9  # lam is floored here so that the mirror step can bring a policy back


@dataclass
class ScoredPool:
    """Scored samples of N prompts, n per prompt, each with the log-density of its proposal."""

    log_ratios: torch.Tensor  # [N, n, K] R_k = log pi_k(y|x) - log pi_ref(y|x)
    reference_logprobs: torch.Tensor  # [N, n] log pi_ref(y|x)
    proposal_logprobs: torch.Tensor  # [N, n] log q(y|x) of the distribution that drew y
    utilities: torch.Tensor  # [N, n, J] u_j(x, y): win probability against reference replies
    # The decoded (per-token) target, when given (mpo_core/runners/moments.py): M(y), the sum
    # over the reply's positions of E_{q_r}[log pi_k - log pi_ref], and theta_r = s lam of
    # the mixture q_r that drew y. None: the sequence-level target pi_theta.
    token_moments: torch.Tensor | None = None  # [N, n, K]
    proposal_coefficients: torch.Tensor | None = None  # [N, n, K]
    # The first this many samples of each prompt were drawn from pi_ref itself (the replies
    # the utilities count against): the reference is estimated on them alone (``estimate``).
    from_reference: int = 0

    def __post_init__(self) -> None:
        self.log_ratios = torch.as_tensor(self.log_ratios, dtype=torch.float64)
        self.reference_logprobs = torch.as_tensor(self.reference_logprobs, dtype=torch.float64)
        self.proposal_logprobs = torch.as_tensor(self.proposal_logprobs, dtype=torch.float64)
        self.utilities = torch.as_tensor(self.utilities, dtype=torch.float64)
        n, m, k = self.log_ratios.shape
        shapes = (self.reference_logprobs.shape, self.proposal_logprobs.shape)
        if any(tuple(s) != (n, m) for s in shapes) or self.utilities.shape[:2] != (n, m):
            raise InvalidParameter("samples", "the pool's tensors disagree on [N, n]")
        names = ["log_ratios", "reference_logprobs", "proposal_logprobs", "utilities"]
        if (self.token_moments is None) != (self.proposal_coefficients is None):
            raise InvalidParameter("samples", "token_moments needs proposal_coefficients")
        if self.token_moments is not None and self.proposal_coefficients is not None:
            self.token_moments = torch.as_tensor(self.token_moments, dtype=torch.float64)
            self.proposal_coefficients = torch.as_tensor(
                self.proposal_coefficients, dtype=torch.float64
            )
            for tensor in (self.token_moments, self.proposal_coefficients):
                if tuple(tensor.shape) != (n, m, k):
                    raise InvalidParameter("samples", "the pool's tensors disagree on [N, n, K]")
            names += ["token_moments", "proposal_coefficients"]
        for name in names:
            if not bool(torch.isfinite(getattr(self, name)).all()):
                raise InvalidParameter("samples", f"the pool's {name} has non-finite values")
        if not 0 <= self.from_reference <= m:
            raise InvalidParameter("samples", f"from_reference must be in [0, {m}]")

    @property
    def per_token(self) -> bool:
        """Whether the target is the decoded mixture (first order) rather than ``pi_theta``."""
        return self.token_moments is not None

    @property
    def features(self) -> torch.Tensor:
        """``d log target / d theta`` per sample: ``R``, or ``R - M`` for the decoded target."""
        if self.token_moments is None:
            return self.log_ratios  # [N, n, K]
        return self.log_ratios - self.token_moments  # [N, n, K]

    @property
    def samples_per_prompt(self) -> int:
        return int(self.log_ratios.shape[1])

    def extend(self, other: ScoredPool) -> ScoredPool:
        """The pool with ``other``'s samples appended per prompt (same prompts, same order)."""

        def cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
            if a is None or b is None:
                if (a is None) != (b is None):
                    raise InvalidParameter("samples", "pools with and without token moments")
                return None
            return torch.cat([a, b], dim=1)

        def both(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.cat([a, b], dim=1)

        leading = self.from_reference  # the reference's draws stay the leading ones
        if leading == self.samples_per_prompt:
            leading += other.from_reference
        return ScoredPool(
            both(self.log_ratios, other.log_ratios),
            both(self.reference_logprobs, other.reference_logprobs),
            both(self.proposal_logprobs, other.proposal_logprobs),
            both(self.utilities, other.utilities),
            token_moments=cat(self.token_moments, other.token_moments),
            proposal_coefficients=cat(self.proposal_coefficients, other.proposal_coefficients),
            from_reference=leading,
        )


def win_utilities(rewards: torch.Tensor, reference_rewards: torch.Tensor) -> torch.Tensor:
    """``u[i, n, j]``: the share of prompt i's reference replies that sample n beats on j.

    ``rewards`` is ``[N, n, J]``, ``reference_rewards`` ``[N, m, J]`` (the rewards of m reference
    replies per prompt); a tie counts one half, as in ``mpo eval``'s win rates.
    """
    r = torch.as_tensor(rewards, dtype=torch.float64).unsqueeze(2)  # [N, n, 1, J]
    ref = torch.as_tensor(reference_rewards, dtype=torch.float64).unsqueeze(1)  # [N, 1, m, J]
    wins = (r > ref).double() + 0.5 * (r == ref).double()  # [N, n, m, J]
    return wins.mean(dim=2)  # [N, n, J]


@dataclass
class MixtureEstimate:
    """Self-normalised estimates for one (weights, strength) on a pool."""

    weights: list[float]  # [K] lam
    strength: float  # s
    win_rates: list[float]  # [J] V_j
    worst: float  # min_j V_j
    kl: float  # KL(pi_theta || pi_ref), averaged over prompts
    objective: float  # worst - beta * KL
    ess_mean: float  # mean over prompts of 1 / sum_n w_in^2
    ess_fraction: float  # ess_mean / n

    def to_dict(self, names: list[str], objectives: list[str]) -> dict[str, object]:
        return {
            "weights": dict(zip(names, self.weights)),
            "strength": self.strength,
            "win_rates": dict(zip(objectives, self.win_rates)),
            "worst": self.worst,
            "kl": self.kl,
            "objective": self.objective,
            "ess": self.ess_mean,
            "ess_fraction": self.ess_fraction,
        }


@dataclass
class _Point:
    """Everything the ascent needs at one theta."""

    lam: torch.Tensor  # [K]
    strength: float
    log_w: torch.Tensor  # [N, n] per-prompt log importance weights (normalised)
    values: torch.Tensor  # [J] V_j
    kl: float
    ess_fraction: float
    soft: float  # softmin_j V_j - beta KL: what the ascent maximises


def _log_target_ratio(pool: ScoredPool, theta: torch.Tensor) -> torch.Tensor:
    """``log target(y) - log q(y)`` per sample, up to a per-prompt constant: ``[N, n]``.

    Sequence level: ``log pi_ref + theta . R - log q`` (unnormalised). Decoded target: the first
    order ``(theta - theta_r) . (R - M)`` of ``log q_theta - log q_theta_r`` (token_moments.py).
    """
    if pool.proposal_coefficients is None:
        return pool.reference_logprobs + pool.log_ratios @ theta - pool.proposal_logprobs
    delta = theta - pool.proposal_coefficients  # [N, n, K]
    return (pool.features * delta).sum(dim=-1)  # [N, n]


def log_importance(pool: ScoredPool, theta: torch.Tensor) -> torch.Tensor:
    """``log w[i, n]``: self-normalised log importance weights of the target over ``q``."""
    return torch.log_softmax(_log_target_ratio(pool, theta), dim=1)  # [N, n]


def _log_target_over_reference(pool: ScoredPool, theta: torch.Tensor) -> torch.Tensor:
    """``log target(y) - log pi_ref(y)`` per sample (sequence level: before ``- log Z``)."""
    if pool.proposal_coefficients is None:
        return pool.log_ratios @ theta  # [N, n]: theta . R
    shift = pool.proposal_logprobs - pool.reference_logprobs  # [N, n]: log q_r - log pi_ref
    return shift + _log_target_ratio(pool, theta)  # [N, n]


def _kl(pool: ScoredPool, theta: torch.Tensor, log_w: torch.Tensor) -> torch.Tensor:
    """``KL(target || pi_ref)`` per prompt ``[N]``.

    Sequence level: ``E_w[theta . R] - log Z`` with ``Z = E_q[pi_ref exp(theta . R) / q]``;
    decoded target (normalised per token already): ``E_w[log q_theta - log pi_ref]``.
    """
    excess = _log_target_over_reference(pool, theta)  # [N, n]
    kl = (log_w.exp() * excess).sum(dim=1)  # [N]
    if pool.proposal_coefficients is None:
        log_ratio = _log_target_ratio(pool, theta)  # [N, n]
        kl = kl - (torch.logsumexp(log_ratio, dim=1) - math.log(log_ratio.shape[1]))
    return kl


def _softmin(values: torch.Tensor, temperature: float) -> tuple[float, torch.Tensor]:
    """``-t log sum_j exp(-V_j / t)`` (below min V by at most t ln J) and its weights."""
    logits = -values / temperature  # [J]
    value = -temperature * float(torch.logsumexp(logits, dim=0))
    return value, torch.softmax(logits, dim=0)  # [J] weights of each objective in the gradient


def _point(
    pool: ScoredPool, lam: torch.Tensor, strength: float, kl_coef: float, temperature: float
) -> _Point:
    theta = strength * lam  # [K]
    log_w = log_importance(pool, theta)  # [N, n]
    w = log_w.exp()  # [N, n]
    values = torch.einsum("in,inj->j", w, pool.utilities) / w.shape[0]  # [J]
    kl = float(_kl(pool, theta, log_w).mean())
    ess = 1.0 / (w * w).sum(dim=1)  # [N]
    soft, _ = _softmin(values, temperature)
    ess_fraction = float(ess.mean()) / w.shape[1]
    return _Point(lam, strength, log_w, values, kl, ess_fraction, soft - kl_coef * kl)


def _covariance(w: torch.Tensor, f: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
    """``mean_i Cov_w(f_i, R_i)``: f ``[N, n, J]`` and ratios ``[N, n, K]`` give ``[J, K]``."""
    mean_f = torch.einsum("in,inj->ij", w, f)  # [N, J]
    mean_r = torch.einsum("in,ink->ik", w, ratios)  # [N, K]
    joint = torch.einsum("in,inj,ink->ijk", w, f, ratios)  # [N, J, K]
    return (joint - mean_f.unsqueeze(2) * mean_r.unsqueeze(1)).mean(dim=0)  # [J, K]


def gradient(
    pool: ScoredPool,
    weights: torch.Tensor,
    strength: float,
    kl_coef: float,
    temperature: float = SOFTMIN_TEMPERATURE,
) -> tuple[torch.Tensor, float]:
    """Gradient of ``softmin_j V_j - beta KL`` in ``lam`` (``[K]``) and in ``s``."""
    lam = torch.as_tensor(weights, dtype=torch.float64)
    point = _point(pool, lam, strength, kl_coef, temperature)
    return _gradient(pool, point, kl_coef, temperature)


def _gradient(
    pool: ScoredPool, point: _Point, kl_coef: float, temperature: float
) -> tuple[torch.Tensor, float]:
    w = point.log_w.exp()  # [N, n]
    theta = point.strength * point.lam  # [K]
    features = pool.features  # [N, n, K]: d log w / d theta (up to the normaliser)
    dv = _covariance(w, pool.utilities, features)  # [J, K]: dV_j / dtheta_k
    excess = _log_target_over_reference(pool, theta).unsqueeze(2)  # [N, n, 1]
    dkl = _covariance(w, excess, features)[0]  # [K]: dKL / dtheta_k
    if pool.per_token:  # the log-density itself moves with theta: d excess / d theta = F
        dkl = dkl + torch.einsum("in,ink->k", w, features) / w.shape[0]
    _, mix = _softmin(point.values, temperature)  # [J]
    d_theta = mix @ dv - kl_coef * dkl  # [K]
    return point.strength * d_theta, float(point.lam @ d_theta)  # theta = s lam: chain rule


def estimate(
    pool: ScoredPool, weights: torch.Tensor | list[float], strength: float, kl_coef: float
) -> MixtureEstimate:
    """Win rates, KL, MaxMin value and ESS of the mixture ``(weights, strength)`` on ``pool``.

    At strength 0 the mixture is ``pi_ref`` itself: its KL is 0 in closed form, and its win
    rates are the plain mean over the pool's reference draws, the replies the utilities count
    against, so each is exactly 1/2 (every pair is counted both ways, a tie as 1/2 + 1/2).
    """
    lam = torch.as_tensor(weights, dtype=torch.float64)
    lam = lam / lam.sum()
    if float(strength) == 0.0 and pool.from_reference > 0:
        return _reference_estimate(pool, lam, kl_coef)
    point = _point(pool, lam, float(strength), kl_coef, SOFTMIN_TEMPERATURE)
    if float(strength) == 0.0:
        point.kl = 0.0  # the target is pi_ref: no importance estimate needed
    worst = float(point.values.min())
    return MixtureEstimate(
        weights=lam.tolist(),
        strength=float(strength),
        win_rates=point.values.tolist(),
        worst=worst,
        kl=point.kl,
        objective=worst - kl_coef * point.kl,
        ess_mean=point.ess_fraction * pool.samples_per_prompt,
        ess_fraction=point.ess_fraction,
    )


def _reference_estimate(pool: ScoredPool, lam: torch.Tensor, kl_coef: float) -> MixtureEstimate:
    """``pi_ref`` on its own draws: plain Monte Carlo, weights 1/m, no importance weighting."""
    drawn = pool.utilities[:, : pool.from_reference]  # [N, m, J]
    values = drawn.mean(dim=(0, 1))  # [J]
    worst = float(values.min())
    return MixtureEstimate(
        weights=lam.tolist(),
        strength=0.0,
        win_rates=values.tolist(),
        worst=worst,
        kl=0.0,
        objective=worst,
        ess_mean=float(pool.from_reference),
        ess_fraction=pool.from_reference / pool.samples_per_prompt,
    )


@dataclass
class RewardFitOptions:
    """The inner optimiser's knobs; ``validate`` names the first bad field."""

    kl_coef: float = 0.02  # beta: win-rate points given up per nat of KL
    fit_strength: bool = False  # also move s (needs a reference at decode time when s != 1)
    strength_bounds: tuple[float, float] = (0.0, 2.0)
    min_ess_fraction: float = 0.2  # trust region: a step may not take the ESS under n * this
    iterations: int = 200  # accepted-or-rejected ascent steps per call
    tolerance: float = 1e-5  # stop when a step gains less than this in the objective
    temperature: float = SOFTMIN_TEMPERATURE

    def validate(self) -> RewardFitOptions:
        low, high = self.strength_bounds
        checks = {
            "kl_coef": math.isfinite(self.kl_coef) and self.kl_coef >= 0,
            "strength_bounds": 0 <= low <= high and math.isfinite(high),
            "min_ess_fraction": 0 <= self.min_ess_fraction < 1,
            "iterations": isinstance(self.iterations, int) and self.iterations >= 1,
            "tolerance": self.tolerance >= 0,
            "temperature": self.temperature > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise InvalidParameter(name, f"{name} is out of range: {getattr(self, name)!r}")
        return self


@dataclass
class RewardFitResult:
    weights: torch.Tensor  # [K] on the simplex
    strength: float
    start: MixtureEstimate
    end: MixtureEstimate
    steps: int  # accepted steps
    stopped: str  # "converged", "trust_region", "iterations"
    trace: list[float] = field(default_factory=list)  # the objective after each accepted step
    # Which point is returned: "iterate" (the ascent's), or a candidate that the final check
    # estimated better ("uniform", "vertex:<k>", "reference"); ``note`` says why, or names a
    # better candidate that was kept out for its low ESS. Empty when the iterate was best.
    chosen: str = "iterate"
    note: str = ""


def fit_reward_weights(
    pool: ScoredPool,
    start_weights: torch.Tensor | list[float],
    start_strength: float = 1.0,
    options: RewardFitOptions | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> RewardFitResult:
    """Maximise ``min_j V_j - beta KL`` on ``pool`` from ``(start_weights, start_strength)``.

    Mirror ascent on the simplex (``lam <- lam * exp(eta g_lam)``, renormalised) and projected
    ascent on ``s`` within ``strength_bounds``, both with one step size that grows by 1.5 after an
    accepted step and halves after a rejected one. A step is rejected when it does not raise the
    (soft) objective or when it takes the ESS fraction under ``min_ess_fraction`` (or under the
    start's, if that is already lower). ``on_step(t, iterations)`` may raise to cancel.
    """
    opts = (options or RewardFitOptions()).validate()
    lam = torch.as_tensor(start_weights, dtype=torch.float64).clamp_min(MIN_WEIGHT)  # [K]
    lam = lam / lam.sum()
    low, high = opts.strength_bounds
    strength = min(max(float(start_strength), low), high) if opts.fit_strength else start_strength
    point = _point(pool, lam, strength, opts.kl_coef, opts.temperature)
    start = estimate(pool, lam, strength, opts.kl_coef)
    ess_floor = min(opts.min_ess_fraction, point.ess_fraction)
    eta, steps, stopped, trace = None, 0, "iterations", []
    for t in range(opts.iterations):
        g_lam, g_s = _gradient(pool, point, opts.kl_coef, opts.temperature)
        scale = max(float(g_lam.abs().max()), abs(g_s) if opts.fit_strength else 0.0)
        if scale < 1e-12:
            stopped = "converged"
            break
        if eta is None:
            eta = 0.5 / scale  # the first step moves log lam by at most 0.5
        candidate = _step(pool, point, g_lam, g_s, eta, opts)
        trusted = candidate.ess_fraction >= ess_floor
        if trusted and candidate.soft > point.soft:
            gain = candidate.soft - point.soft
            point, steps = candidate, steps + 1
            trace.append(point.soft)
            eta *= 1.5
            if gain < opts.tolerance:
                stopped = "converged"
                break
        else:
            eta /= 2.0
            if eta * scale < MIN_STEP:
                stopped = "converged" if trusted else "trust_region"
                break
        if on_step is not None:
            on_step(t + 1, opts.iterations)
    iterate = estimate(pool, point.lam, point.strength, opts.kl_coef)
    chosen, end, lam, note = _best_point(pool, iterate, point.lam, point.strength, ess_floor, opts)
    return RewardFitResult(lam, end.strength, start, end, steps, stopped, trace, chosen, note)


def _candidates(
    k: int, strength: float, opts: RewardFitOptions
) -> dict[str, tuple[torch.Tensor, float]]:
    """The points the iterate must beat: uniform, each pure policy and, when the strength is
    fitted down to 0, the reference; at strength 1 (clamped) when fitted, else the fixed one."""
    low, high = opts.strength_bounds
    s = min(max(1.0, low), high) if opts.fit_strength else float(strength)
    out = {"uniform": (torch.full((k,), 1.0 / k, dtype=torch.float64), s)}
    for i in range(k):
        vertex = torch.zeros(k, dtype=torch.float64)
        vertex[i] = 1.0
        out[f"vertex:{i}"] = (vertex, s)
    if opts.fit_strength and low == 0.0:
        out["reference"] = (out["uniform"][0], 0.0)
    return out


def _best_point(
    pool: ScoredPool,
    iterate: MixtureEstimate,
    lam: torch.Tensor,
    strength: float,
    ess_floor: float,
    opts: RewardFitOptions,
) -> tuple[str, MixtureEstimate, torch.Tensor, str]:
    """The best of the iterate and the candidates by the report's own objective estimate
    (``min_j V_j - beta KL``): the ascent follows a soft minimum and stops at a local optimum
    or at the trust region, so a simple point can score higher. A candidate whose ESS is under
    the ascent's floor is not trusted (its estimate is noise), but the note names it."""
    best_name, best, best_lam = "iterate", iterate, lam
    skipped = []
    for name, (weights, s) in _candidates(int(lam.numel()), strength, opts).items():
        candidate = estimate(pool, weights, s, opts.kl_coef)
        exact = name == "reference" and pool.from_reference > 0  # not importance weighted
        if not exact and candidate.ess_fraction < ess_floor:
            skipped.append((name, candidate))
        elif candidate.objective > best.objective + 1e-12:
            best_name, best, best_lam = name, candidate, weights
    notes = []
    if best_name != "iterate":
        notes.append(
            f"returned {best_name}: its estimated objective {best.objective:.4f} is above the "
            f"ascent's point's {iterate.objective:.4f}"
        )
    notes += [
        f"{name} estimates {c.objective:.4f} on an ESS fraction of {c.ess_fraction:.3f} "
        f"(under {ess_floor:.3f}): not trusted, not taken"
        for name, c in skipped
        if c.objective > best.objective + 1e-12
    ]
    return best_name, best, best_lam, "; ".join(notes)


def _step(
    pool: ScoredPool,
    point: _Point,
    g_lam: torch.Tensor,
    g_s: float,
    eta: float,
    opts: RewardFitOptions,
) -> _Point:
    log_lam = torch.log_softmax(point.lam.log() + eta * g_lam, dim=0)  # [K]: mirror ascent
    lam = log_lam.exp().clamp_min(MIN_WEIGHT)  # [K]
    lam = lam / lam.sum()
    strength = point.strength
    if opts.fit_strength:
        low, high = opts.strength_bounds
        strength = min(max(strength + eta * g_s, low), high)
    return _point(pool, lam, strength, opts.kl_coef, opts.temperature)
