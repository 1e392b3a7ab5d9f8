"""Mirror-descent weight fitting on hand-built log-ratio tensors, checked against scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.special import logsumexp, softmax

from mpo_core.errors import InvalidParameter
from mpo_core.fitting.mirror_descent import FitCancelled, evaluate_weights, fit_weights, objective


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: intra-op threads only add overhead (20x on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ITERATIONS = 3000  # full batch; enough for the mean iterate to settle within the tolerances


def synthetic_ratios(n: int, m: int, k: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Gaussian ``R`` with a per-objective offset: F strictly convex, one minimiser."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, m, k, generator=gen, dtype=torch.float64)  # [N, m, K]
    offset = 0.3 * torch.randn(1, 1, k, generator=gen, dtype=torch.float64)  # [1, 1, K]
    return scale * (noise + offset)


def exact_minimiser(ratios: torch.Tensor) -> tuple[np.ndarray, float]:
    """The minimiser of the same empirical F on the simplex, by SLSQP from several starts."""
    r = ratios.numpy()
    n, m, k = r.shape

    def f(lam: np.ndarray) -> float:
        return float((logsumexp(r @ lam, axis=1) - math.log(m)).mean())

    def grad(lam: np.ndarray) -> np.ndarray:
        return np.einsum("nm,nmk->k", softmax(r @ lam, axis=1), r) / n

    starts = [np.full(k, 1.0 / k)] + [0.8 * np.eye(k)[i] + 0.2 / k for i in range(k)]
    best = None
    for start in starts:
        result = minimize(
            f, start, jac=grad, method="SLSQP", bounds=[(0.0, 1.0)] * k,
            constraints=[{"type": "eq", "fun": lambda lam: lam.sum() - 1.0}],
            options={"ftol": 1e-15, "maxiter": 500},
        )  # fmt: skip
        if best is None or result.fun < best.fun:
            best = result
    assert best is not None
    lam = np.clip(best.x, 0.0, None)
    lam /= lam.sum()
    return lam, f(lam)


@pytest.mark.parametrize(
    ("n", "m", "k", "seed", "scale"),
    [
        (1, 8, 1, 0, 1.0),
        (1, 16, 2, 1, 1.0),
        (10, 4, 2, 2, 2.0),
        (20, 8, 3, 3, 1.0),
        (6, 32, 3, 4, 0.5),
        (40, 6, 4, 5, 1.0),
        (15, 10, 5, 6, 1.5),
        (3, 64, 5, 7, 1.0),
    ],
)
def test_fit_matches_scipy_minimiser(n: int, m: int, k: int, seed: int, scale: float) -> None:
    ratios = synthetic_ratios(n, m, k, seed, scale)
    expected, expected_value = exact_minimiser(ratios)
    result = fit_weights(ratios, iterations=ITERATIONS)
    weights = result.weights.numpy()
    assert weights.shape == (k,)
    assert weights.min() >= 0 and weights.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.abs(weights - expected).sum() <= 0.02, (weights, expected)
    assert result.objective == pytest.approx(objective(ratios, result.weights), abs=1e-12)
    assert result.objective - expected_value <= 1e-3
    assert result.objective >= expected_value - 1e-9  # scipy really found the minimum


def test_flat_direction_compares_values() -> None:
    """Two identical objectives: any split between them is optimal, so only F can be compared
    (and the total weight of the pair, which is unique)."""
    base = synthetic_ratios(12, 8, 2, seed=11)  # [N, m, 2]
    ratios = torch.cat([base, base[:, :, :1]], dim=2)  # [N, m, 3]: objective 2 copies 0
    expected, expected_value = exact_minimiser(ratios)
    result = fit_weights(ratios, iterations=ITERATIONS)
    weights = result.weights.numpy()
    assert result.objective - expected_value <= 1e-3
    assert weights[0] + weights[2] == pytest.approx(expected[0] + expected[2], abs=0.02)
    assert weights[0] == pytest.approx(weights[2], abs=1e-9)  # symmetric start, symmetric path


def test_history_and_average_of_iterates() -> None:
    ratios = synthetic_ratios(8, 6, 3, seed=3)
    result = fit_weights(ratios, iterations=50)
    assert len(result.history) == 50
    assert result.history.weights.shape == (50, 3)
    assert torch.allclose(result.history.weights[0], torch.full((3,), 1 / 3, dtype=torch.float64))
    assert torch.allclose(result.history.weights.sum(dim=1), torch.ones(50, dtype=torch.float64))
    assert torch.allclose(result.weights, result.history.weights.mean(dim=0))
    # full batch: the batch F of step t is F at the iterate of step t
    assert result.history.batch_objective[7].item() == pytest.approx(
        objective(ratios, result.history.weights[7])
    )
    assert result.history.batch_objective[-1] < result.history.batch_objective[0]


def test_default_step_size_is_c_over_sqrt_t() -> None:
    ratios = synthetic_ratios(5, 4, 3, seed=0)
    short = fit_weights(ratios, iterations=100)
    long = fit_weights(ratios, iterations=400)
    assert short.step_size > 0
    assert long.step_size == pytest.approx(short.step_size / 2)  # c / sqrt(T), same c
    assert fit_weights(ratios, iterations=10, step_size=0.3).step_size == 0.3


def test_minibatches_are_seeded_and_converge() -> None:
    ratios = synthetic_ratios(40, 8, 3, seed=21)
    _, best = exact_minimiser(ratios)
    first = fit_weights(ratios, iterations=2000, batch_size=8, seed=5)
    again = fit_weights(ratios, iterations=2000, batch_size=8, seed=5)
    other = fit_weights(ratios, iterations=2000, batch_size=8, seed=6)
    assert torch.equal(first.weights, again.weights)
    assert not torch.equal(first.weights, other.weights)
    assert first.objective - best <= 5e-3
    full = fit_weights(ratios, iterations=5, batch_size=1000)  # larger than N: full batch
    assert full.history.batch_objective[0].item() == pytest.approx(objective(ratios, [1 / 3] * 3))


def test_evaluation_matches_autograd_and_duality() -> None:
    ratios = synthetic_ratios(7, 9, 4, seed=2)
    lam = torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64, requires_grad=True)
    m = ratios.shape[1]
    value = (torch.logsumexp(ratios @ lam, dim=1) - math.log(m)).mean()
    (grad,) = torch.autograd.grad(value, lam)
    report = evaluate_weights(ratios, lam.detach())
    assert report.objective == pytest.approx(value.item())
    # the expected implicit rewards under pi_lam are the gradient of F
    assert np.allclose(report.rewards, grad.numpy())
    assert report.min_reward == pytest.approx(min(report.rewards))
    # F(lam) = lam . E_w[R] - KL(pi_lam || pi_ref)
    assert report.objective == pytest.approx(float(lam.detach() @ grad) - report.kl)
    assert report.kl > 0
    assert report.maxmin == pytest.approx(report.min_reward - report.kl)
    assert 1.0 <= report.ess_min <= report.ess_mean <= m
    assert report.samples_per_prompt == m


def test_evaluation_of_reference_like_samples() -> None:
    """R constant over a prompt's replies: the mixture is the reference, KL 0, ESS m."""
    ratios = torch.tensor([[[0.5, -0.5]] * 4, [[1.0, 2.0]] * 4], dtype=torch.float64)  # [2, 4, 2]
    report = evaluate_weights(ratios, [0.5, 0.5])
    assert report.kl == pytest.approx(0.0, abs=1e-12)
    assert report.ess_min == pytest.approx(4.0)
    assert report.rewards == pytest.approx([0.75, 0.75])


def test_single_policy_and_single_prompt() -> None:
    ratios = synthetic_ratios(1, 5, 1, seed=4)  # N = 1, K = 1
    result = fit_weights(ratios, iterations=20)
    assert result.weights.tolist() == [1.0]
    assert result.objective == pytest.approx(objective(ratios, [1.0]))


def test_one_dominating_reply_is_handled() -> None:
    ratios = synthetic_ratios(4, 8, 3, seed=9)
    ratios[:, 0, 1] = 1e4  # one reply per prompt is overwhelmingly likely under policy 1
    result = fit_weights(ratios, iterations=500)
    assert torch.isfinite(result.weights).all() and math.isfinite(result.objective)
    assert result.weights.sum().item() == pytest.approx(1.0)
    # weight on the dominating policy blows F up: the fit moves away from it
    assert result.weights[1] < 1 / 3
    report = evaluate_weights(ratios, [0.0, 1.0, 0.0])
    assert report.ess_min == pytest.approx(1.0)
    assert math.isfinite(report.objective) and math.isfinite(report.kl)


@pytest.mark.parametrize(
    ("ratios", "text"),
    [
        (torch.tensor([[[0.0, float("nan")]]]), "non-finite"),
        (torch.tensor([[[0.0, float("-inf")]]]), "non-finite"),
        (torch.zeros(0, 4, 2), "empty"),
        (torch.zeros(3, 0, 2), "empty"),
        (torch.zeros(3, 4, 0), "empty"),
        (torch.zeros(3, 4), "shape"),
    ],
)
def test_bad_log_ratios_are_rejected(ratios: torch.Tensor, text: str) -> None:
    with pytest.raises(InvalidParameter, match=text) as caught:
        fit_weights(ratios, iterations=10)
    assert caught.value.param == "log_ratios"
    with pytest.raises(InvalidParameter):
        evaluate_weights(ratios, [1.0] * max(1, ratios.shape[-1]))


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"iterations": 0}, "iterations"),
        ({"iterations": 2.5}, "iterations"),
        ({"iterations": 10, "step_size": -1.0}, "step_size"),
        ({"iterations": 10, "step_size": float("nan")}, "step_size"),
        ({"iterations": 10, "batch_size": 0}, "batch_size"),
    ],
)
def test_bad_options_are_rejected(kwargs: dict, param: str) -> None:
    with pytest.raises(InvalidParameter) as caught:
        fit_weights(synthetic_ratios(2, 3, 2, seed=0), **kwargs)
    assert caught.value.param == param


@pytest.mark.parametrize("weights", [[1.0], [0.0, 0.0], [-1.0, 2.0], [float("nan"), 1.0]])
def test_bad_weights_are_rejected(weights: list[float]) -> None:
    with pytest.raises(InvalidParameter) as caught:
        evaluate_weights(synthetic_ratios(2, 3, 2, seed=0), weights)
    assert caught.value.param == "weights"


def test_on_step_can_cancel() -> None:
    seen: list[int] = []

    def on_step(step: int, total: int) -> None:
        seen.append(step)
        if step == 3:
            raise FitCancelled("stop")

    with pytest.raises(FitCancelled):
        fit_weights(synthetic_ratios(2, 3, 2, seed=0), iterations=100, on_step=on_step)
    assert seen == [1, 2, 3]
