"""Reward-based MaxMin fitting (mpo_core/fitting/reward_fit.py) on finite synthetic reply spaces.

Each prompt has a small set of possible replies, so every quantity has an exact value:
``pi_theta`` over the set, the win probability of each reply against the reference, the win
rates and the KL. A pool holding every reply once, with a uniform proposal, makes the
self-normalised estimates exact; pools sampled from a proposal check the density ratio.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mpo_core.errors import InvalidParameter
from mpo_core.fitting.reward_fit import (
    RewardFitOptions,
    ScoredPool,
    _point,
    estimate,
    fit_reward_weights,
    gradient,
    win_utilities,
)

KL_COEF = 0.02


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Space:
    """N prompts x Y replies: reference log-probs, implicit rewards of K policies, J rewards."""

    def __init__(self, n: int, y: int, noise: list[float], seed: int, flip: int | None = None):
        gen = torch.Generator().manual_seed(seed)
        k = len(noise)
        self.ref = torch.log_softmax(torch.randn(n, y, generator=gen, dtype=torch.float64), 1)
        features = torch.randn(n, y, k, generator=gen, dtype=torch.float64)  # [N, Y, K]
        # pi_k ∝ pi_ref exp(f_k): R_k = f_k - log E_ref exp(f_k)
        log_z = torch.logsumexp(self.ref.unsqueeze(2) + features, dim=1, keepdim=True)  # [N,1,K]
        self.ratios = features - log_z  # [N, Y, K]
        # objective j rewards what policy j moves towards, blurred by noise[j]
        blur = torch.randn(n, y, k, generator=gen, dtype=torch.float64) * torch.tensor(noise)
        self.rewards = features + blur  # [N, Y, J]
        if flip is not None:
            self.rewards[:, :, flip] *= -1

    def utilities(self) -> torch.Tensor:
        """Exact ``u[i, y, j] = P_ref[r_j(y) > r_j(y')] + 1/2 P_ref[=]``."""
        r = self.rewards.unsqueeze(2)  # [N, Y, 1, J]
        other = self.rewards.unsqueeze(1)  # [N, 1, Y, J]
        wins = (r > other).double() + 0.5 * (r == other).double()  # [N, Y, Y, J]
        return torch.einsum("nyzj,nz->nyj", wins, self.ref.exp())

    def full_pool(self) -> ScoredPool:
        """Every reply once with a uniform proposal: the estimates are the exact values."""
        n, y, _ = self.ratios.shape
        uniform = torch.full((n, y), -math.log(y), dtype=torch.float64)
        return ScoredPool(self.ratios, self.ref, uniform, self.utilities())

    def exact(self, lam: torch.Tensor, strength: float = 1.0) -> tuple[torch.Tensor, float]:
        """Exact win rates ``[J]`` and KL of ``pi_theta``."""
        scores = self.ratios @ (strength * lam)  # [N, Y]
        log_p = torch.log_softmax(self.ref + scores, dim=1)  # [N, Y]
        p = log_p.exp()
        values = torch.einsum("ny,nyj->j", p, self.utilities()) / p.shape[0]
        kl = float((p * (log_p - self.ref)).sum(dim=1).mean())
        return values, kl

    def sample_pool(self, log_q: torch.Tensor, draws: int, seed: int) -> ScoredPool:
        """``draws`` replies per prompt from ``q`` (``[N, Y]`` log-probs), with their scores."""
        gen = torch.Generator().manual_seed(seed)
        picks = torch.multinomial(log_q.exp(), draws, replacement=True, generator=gen)  # [N, d]
        rows = torch.arange(picks.shape[0]).unsqueeze(1)
        return ScoredPool(
            self.ratios[rows, picks],
            self.ref[rows, picks],
            log_q[rows, picks],
            self.utilities()[rows, picks],
        )


def grid_optimum(space: Space, step: float = 0.02) -> tuple[torch.Tensor, float]:
    """The best ``min_j V_j - beta KL`` over a grid of the 3-simplex, from exact values."""
    best, best_lam = -math.inf, None
    ticks = round(1 / step)
    for a, b in itertools.product(range(ticks + 1), repeat=2):
        if a + b > ticks:
            continue
        lam = torch.tensor([a, b, ticks - a - b], dtype=torch.float64) / ticks
        values, kl = space.exact(lam)
        value = float(values.min()) - KL_COEF * kl
        if value > best:
            best, best_lam = value, lam
    assert best_lam is not None
    return best_lam, best


BOTTLENECK = [0.3, 0.3, 2.5]  # objective 3's reward only loosely follows policy 3


def test_reference_wins_half_against_itself() -> None:
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 4, (5, 7, 2), generator=gen).double()  # ties on purpose
    u = win_utilities(rewards, rewards)  # [5, 7, 2]
    assert torch.allclose(u.mean(dim=1), torch.full((5, 2), 0.5, dtype=torch.float64))
    assert u.min() >= 1 / 14 - 1e-12 and u.max() <= 1 - 1 / 14 + 1e-12  # self ties count half


def test_full_pool_estimates_are_exact() -> None:
    space = Space(4, 9, BOTTLENECK, seed=1)
    lam = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    got = estimate(space.full_pool(), lam, 1.3, KL_COEF)
    values, kl = space.exact(lam, 1.3)
    assert got.win_rates == pytest.approx(values.tolist(), abs=1e-12)
    assert got.kl == pytest.approx(kl, abs=1e-12)


def test_importance_weights_use_the_proposal_density() -> None:
    """Samples from a mixture q (not pi_ref): the estimate needs log q, not log pi_ref."""
    space = Space(3, 6, BOTTLENECK, seed=2)
    proposal = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    log_q = torch.log_softmax(space.ref + 1.5 * space.ratios @ proposal, dim=1)  # [N, Y]
    pool = space.sample_pool(log_q, draws=20_000, seed=3)
    target = torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64)
    values, kl = space.exact(target)
    got = estimate(pool, target, 1.0, KL_COEF)
    assert got.win_rates == pytest.approx(values.tolist(), abs=0.01)
    assert got.kl == pytest.approx(kl, abs=0.02)
    # the same samples treated as if drawn from pi_ref miss by far more
    wrong = ScoredPool(pool.log_ratios, pool.reference_logprobs, pool.reference_logprobs,
                       pool.utilities)  # fmt: skip
    missed = estimate(wrong, target, 1.0, KL_COEF)
    assert max(abs(a - b) for a, b in zip(missed.win_rates, values.tolist())) > 0.03


def test_gradient_matches_finite_differences() -> None:
    space = Space(3, 8, BOTTLENECK, seed=4)
    pool = space.full_pool()
    lam = torch.tensor([0.25, 0.35, 0.4], dtype=torch.float64)
    temperature = 0.05  # smooth enough for central differences

    def soft(lam: torch.Tensor, strength: float) -> float:
        return _point(pool, lam, strength, KL_COEF, temperature).soft

    g_lam, g_s = gradient(pool, lam, 1.2, KL_COEF, temperature)
    h = 1e-6
    for k in range(3):
        bump = torch.zeros(3, dtype=torch.float64)
        bump[k] = h
        numeric = (soft(lam + bump, 1.2) - soft(lam - bump, 1.2)) / (2 * h)
        assert float(g_lam[k]) == pytest.approx(numeric, rel=1e-5, abs=1e-8)
    numeric_s = (soft(lam, 1.2 + h) - soft(lam, 1.2 - h)) / (2 * h)
    assert g_s == pytest.approx(numeric_s, rel=1e-5, abs=1e-8)


def test_fit_finds_the_bottleneck_optimum() -> None:
    space = Space(6, 12, BOTTLENECK, seed=5)
    expected, expected_value = grid_optimum(space)
    assert int(expected.argmax()) == 2  # the construction: objective 3 is the bottleneck
    options = RewardFitOptions(kl_coef=KL_COEF, iterations=500, min_ess_fraction=0.0)
    result = fit_reward_weights(space.full_pool(), [1 / 3] * 3, 1.0, options)
    values, kl = space.exact(result.weights)
    assert float(values.min()) - KL_COEF * kl >= expected_value - 2e-3
    assert float((result.weights - expected).abs().sum()) < 0.06
    assert result.end.objective > result.start.objective + 0.01  # uniform is not the optimum


def test_flipping_a_reward_moves_the_weights_away() -> None:
    options = RewardFitOptions(kl_coef=KL_COEF, iterations=500, min_ess_fraction=0.0)
    plain = fit_reward_weights(Space(6, 12, BOTTLENECK, 5).full_pool(), [1 / 3] * 3, 1.0, options)
    flipped_space = Space(6, 12, BOTTLENECK, 5, flip=2)
    flipped = fit_reward_weights(flipped_space.full_pool(), [1 / 3] * 3, 1.0, options)
    assert float(flipped.weights[2]) < float(plain.weights[2]) - 0.3
    assert float(flipped.weights[2]) < 1 / 3  # now policy 3 hurts objective 3: less than uniform


def test_fitting_the_strength() -> None:
    """With every reward aligned with every policy, more strength wins more until the KL bites."""
    space = Space(4, 10, [0.2, 0.2, 0.2], seed=6)
    options = RewardFitOptions(kl_coef=0.0, fit_strength=True, strength_bounds=(0.0, 1.5),
                               iterations=400, min_ess_fraction=0.0)  # fmt: skip
    result = fit_reward_weights(space.full_pool(), [1 / 3] * 3, 0.2, options)
    assert result.strength > 1.0
    fixed = fit_reward_weights(
        space.full_pool(), [1 / 3] * 3, 0.2, RewardFitOptions(kl_coef=0.0, min_ess_fraction=0.0)
    )
    assert fixed.strength == 0.2  # not fitted: left where it started


def test_trust_region_keeps_the_effective_sample_size() -> None:
    space = Space(5, 40, BOTTLENECK, seed=7)
    pool = space.sample_pool(space.ref, draws=16, seed=8)  # 16 reference replies per prompt
    options = RewardFitOptions(kl_coef=0.0, fit_strength=True, strength_bounds=(0.0, 6.0),
                               min_ess_fraction=0.5, iterations=300)  # fmt: skip
    result = fit_reward_weights(pool, [1 / 3] * 3, 0.1, options)
    assert result.start.ess_fraction > 0.5
    assert result.end.ess_fraction >= 0.5
    free = fit_reward_weights(pool, [1 / 3] * 3, 0.1, RewardFitOptions(
        kl_coef=0.0, fit_strength=True, strength_bounds=(0.0, 6.0), min_ess_fraction=0.0,
        iterations=300))  # fmt: skip
    assert free.end.ess_fraction < 0.5  # without the floor the ascent runs off the samples


def test_bad_pool_and_options_name_the_parameter() -> None:
    space = Space(2, 4, BOTTLENECK, seed=9)
    pool = space.full_pool()
    with pytest.raises(InvalidParameter) as bad:
        ScoredPool(pool.log_ratios, pool.reference_logprobs[:, :2], pool.proposal_logprobs,
                   pool.utilities)  # fmt: skip
    assert bad.value.param == "samples"
    with pytest.raises(InvalidParameter) as bad:
        RewardFitOptions(kl_coef=-1.0).validate()
    assert bad.value.param == "kl_coef"


def _per_token_pool(space: Space, theta_r: torch.Tensor, seed: int) -> ScoredPool:
    """The full pool as if drawn from a decoded mixture at ``theta_r``, with random moments."""
    pool = space.full_pool()
    gen = torch.Generator().manual_seed(seed)
    moments = 0.3 * torch.randn(pool.log_ratios.shape, generator=gen, dtype=torch.float64)
    return ScoredPool(
        pool.log_ratios, pool.reference_logprobs, pool.proposal_logprobs, pool.utilities,
        token_moments=moments, proposal_coefficients=theta_r.expand_as(moments).clone(),
    )  # fmt: skip


def test_decoded_target_is_the_proposal_at_its_own_coefficients() -> None:
    space = Space(3, 8, BOTTLENECK, seed=10)
    theta_r = torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64)
    pool = _per_token_pool(space, theta_r, seed=11)
    at_proposal = estimate(pool, theta_r, 1.0, KL_COEF)
    assert at_proposal.ess_fraction == pytest.approx(1.0)  # every weight equal
    assert at_proposal.win_rates == pytest.approx(pool.utilities.mean(dim=(0, 1)).tolist())
    log_q_over_ref = (pool.proposal_logprobs - pool.reference_logprobs).mean()
    assert at_proposal.kl == pytest.approx(float(log_q_over_ref))
    moved = estimate(pool, torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64), 1.0, KL_COEF)
    assert moved.ess_fraction < 1.0


def test_decoded_target_gradient_matches_finite_differences() -> None:
    space = Space(3, 8, BOTTLENECK, seed=12)
    pool = _per_token_pool(space, torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64), seed=13)
    lam = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)

    def soft(lam: torch.Tensor, strength: float) -> float:
        return _point(pool, lam, strength, 0.5, 0.05).soft

    g_lam, g_s = gradient(pool, lam, 1.1, 0.5, 0.05)
    h = 1e-6
    for k in range(3):
        bump = torch.zeros(3, dtype=torch.float64)
        bump[k] = h
        numeric = (soft(lam + bump, 1.1) - soft(lam - bump, 1.1)) / (2 * h)
        assert float(g_lam[k]) == pytest.approx(numeric, rel=1e-5, abs=1e-8)
    assert g_s == pytest.approx((soft(lam, 1.1 + h) - soft(lam, 1.1 - h)) / (2 * h), rel=1e-5)


def _reference_then_mixture(seed: int) -> ScoredPool:
    """What the driver pools: m reference draws (utilities counted against themselves, with
    ties), then a round from a mixture (its own proposal density)."""
    gen = torch.Generator().manual_seed(seed)
    n, m, extra, k = 4, 6, 5, 3
    reference_rewards = torch.randint(0, 3, (n, m, 2), generator=gen).double()  # ties
    first = ScoredPool(
        torch.randn(n, m, k, generator=gen, dtype=torch.float64),
        -torch.rand(n, m, generator=gen, dtype=torch.float64) * 5,
        -torch.rand(n, m, generator=gen, dtype=torch.float64) * 5,  # not quite log pi_ref
        win_utilities(reference_rewards, reference_rewards),
        from_reference=m,
    )
    mixture_rewards = torch.randint(0, 4, (n, extra, 2), generator=gen).double()
    second = ScoredPool(
        torch.randn(n, extra, k, generator=gen, dtype=torch.float64) + 1,
        -torch.rand(n, extra, generator=gen, dtype=torch.float64) * 5,
        -torch.rand(n, extra, generator=gen, dtype=torch.float64) * 5,
        win_utilities(mixture_rewards, reference_rewards),
    )
    return first.extend(second)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_reference_row_is_one_half_with_no_kl(seed: int) -> None:
    pool = _reference_then_mixture(seed)
    assert pool.from_reference == 6 and pool.samples_per_prompt == 11
    got = estimate(pool, [1 / 3] * 3, 0.0, KL_COEF)
    assert got.win_rates == pytest.approx([0.5, 0.5], abs=1e-12)
    assert got.kl == 0.0 and got.objective == pytest.approx(0.5, abs=1e-12)
    # the same pool importance-weighted over every sample misses the half: what the report
    # used to print (33.6% / 52.7% / 49.2% with KL 0.819 on four prompts)
    pooled = ScoredPool(pool.log_ratios, pool.reference_logprobs, pool.proposal_logprobs,
                        pool.utilities)  # fmt: skip
    unweighted = estimate(pooled, [1 / 3] * 3, 0.0, KL_COEF)
    assert unweighted.win_rates != pytest.approx([0.5, 0.5], abs=1e-3)
    assert unweighted.kl == 0.0  # closed form at strength 0, with or without reference draws


def test_the_reference_draws_stay_leading_when_pools_extend() -> None:
    pool = _reference_then_mixture(0)
    assert pool.extend(pool).from_reference == 6  # a mixture round in between: not contiguous
    with pytest.raises(InvalidParameter, match="from_reference"):
        ScoredPool(pool.log_ratios, pool.reference_logprobs, pool.proposal_logprobs,
                   pool.utilities, from_reference=12)  # fmt: skip


def _candidate_objectives(pool: ScoredPool, strength: float, fit_strength: bool) -> dict:
    k = pool.log_ratios.shape[2]
    s = 1.0 if fit_strength else strength
    points = {"uniform": ([1 / k] * k, s)}
    points |= {f"vertex:{i}": ([float(i == j) for j in range(k)], s) for i in range(k)}
    if fit_strength:
        points["reference"] = ([1 / k] * k, 0.0)
    return {name: estimate(pool, w, st, KL_COEF) for name, (w, st) in points.items()}


@pytest.mark.parametrize("fit_strength", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_the_fit_returns_no_point_it_ranks_below_a_simple_one(seed: int, fit_strength) -> None:
    """A short ascent from a poor start (a corner the objective dislikes) would end below a
    vertex or uniform; the final check returns the better point and says which."""
    pool = _reference_then_mixture(seed)
    options = RewardFitOptions(
        kl_coef=KL_COEF, fit_strength=fit_strength, iterations=2, min_ess_fraction=0.0
    )
    result = fit_reward_weights(pool, [0.98, 0.01, 0.01], 0.7, options)
    rivals = _candidate_objectives(pool, 0.7, fit_strength)
    best = max(rivals.values(), key=lambda e: e.objective)
    assert result.end.objective >= best.objective - 1e-12
    again = estimate(pool, result.weights, result.strength, KL_COEF)
    assert again.objective == pytest.approx(result.end.objective, abs=1e-12)  # what it returns
    if seed == 0:  # two steps from that corner end below the third policy alone
        assert result.chosen == "vertex:2"
    if result.chosen != "iterate":
        assert result.chosen in rivals and result.chosen in result.note
        assert result.end.objective == pytest.approx(rivals[result.chosen].objective)


def test_a_candidate_under_the_ess_floor_is_named_not_taken() -> None:
    pool = _reference_then_mixture(1)
    rivals = _candidate_objectives(pool, 1.0, False)
    options = RewardFitOptions(kl_coef=KL_COEF, iterations=1, min_ess_fraction=0.99)
    result = fit_reward_weights(pool, [0.98, 0.01, 0.01], 1.0, options)
    floor = min(0.99, estimate(pool, [0.98, 0.01, 0.01], 1.0, KL_COEF).ess_fraction)
    untrusted = [
        name
        for name, rival in rivals.items()
        if rival.ess_fraction < floor and rival.objective > result.end.objective + 1e-12
    ]
    assert untrusted  # the case this test is about
    for name in untrusted:
        assert f"{name} estimates" in result.note and result.chosen != name
