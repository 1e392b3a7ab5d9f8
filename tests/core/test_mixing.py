import math

import pytest
import torch

from mpo_core.decoding.mixing import (
    Mixture,
    check_plausibility,
    check_strength,
    check_weight_list,
    mix_logprobs,
    normalize_weights,
)
from mpo_core.errors import InvalidParameter

NAMES = ["helpful", "harmless", "concise"]


def test_weights_normalised_from_map_list_and_none():
    assert normalize_weights({"helpful": 2, "concise": 2}, NAMES) == [0.5, 0.0, 0.5]
    assert normalize_weights([1, 1, 2], NAMES) == [0.25, 0.25, 0.5]
    assert normalize_weights(None, NAMES) == pytest.approx([1 / 3] * 3)
    assert normalize_weights({}, NAMES) == pytest.approx([1 / 3] * 3)


@pytest.mark.parametrize(
    ("weights", "param", "fragment"),
    [
        ({"helpful": -1}, "weights", "sum to more than 0"),
        ({"helpful": 1, "harmless": -1}, "weights", "sum to more than 0"),
        ({"helpful": 1, "harmless": -2e9}, "weights.harmless", "between -1e+09"),
        ({"helpful": 6, "harmless": -5.5}, "weights.helpful", "between -10 and 10"),
        ({"helpful": float("nan")}, "weights.helpful", "finite"),
        ([1, float("inf"), 1], "weights[1]", "finite"),
        ({"kind": 1}, "weights.kind", "unknown policy 'kind'"),
        ({"helpful": 0, "harmless": 0}, "weights", "sum to more than 0"),
        ([1, 2], "weights", "3 policies"),
        ({"helpful": "a lot"}, "weights.helpful", "number"),
        ("helpful", "weights", "object or a list"),
    ],
)
def test_bad_weights_name_the_parameter(weights, param, fragment):
    with pytest.raises(InvalidParameter) as err:
        normalize_weights(weights, NAMES)
    assert err.value.param == param
    assert fragment in err.value.message


@pytest.mark.parametrize(
    ("weights", "param", "fragment"),
    [
        ([], "weights", "non-empty list"),
        ([0, 0], "weights", "sum to more than 0"),
        ([1, -1], "weights", "sum to more than 0"),
        ([1, -0.95], "weights[0]", "between -10 and 10"),
        ("ab", "weights", "non-empty list"),
    ],
)
def test_a_weight_list_is_checked_without_policy_names(weights, param, fragment):
    with pytest.raises(InvalidParameter, match=fragment) as err:
        check_weight_list(weights)
    assert err.value.param == param
    assert check_weight_list([1, 0, -0.0]) == [1.0, 0.0, 0.0]
    assert check_weight_list([3, -1]) == [3.0, -1.0]  # signed: normalised 1.5 and -0.5


def test_a_mixture_is_checked_against_the_policy_set_it_meets():
    mixture = Mixture.build(NAMES, [1, 2, 1], 0.5, has_reference=True)
    mixture.check_fits(NAMES, has_reference=True)  # its own policy set: nothing to say
    for names in (NAMES[:2], [*NAMES[1:], NAMES[0]]):  # fewer policies, another order
        with pytest.raises(InvalidParameter, match="mixture is over the policies") as err:
            mixture.check_fits(names, has_reference=True)
        assert err.value.param == "weights"
    with pytest.raises(InvalidParameter, match="needs a reference") as err:
        mixture.check_fits(NAMES, has_reference=False)
    assert err.value.param == "strength"


def test_strength_checks():
    assert check_strength(1, has_reference=False) == 1.0
    assert check_strength(0.5, has_reference=True) == 0.5
    with pytest.raises(InvalidParameter, match="needs a reference") as err:
        check_strength(0.5, has_reference=False)
    assert err.value.param == "strength"
    for bad in (-0.1, float("nan"), float("inf"), "1"):
        with pytest.raises(InvalidParameter):
            check_strength(bad, has_reference=True)


def test_half_half_mixture_matches_independent_formula():
    torch.manual_seed(0)
    a, b = torch.randn(4, 50), torch.randn(4, 50)  # [B, V] logits
    policy = torch.stack([a.log_softmax(-1), b.log_softmax(-1)])  # [K, B, V]
    coef = torch.full((4, 2), 0.5)
    expected = torch.log_softmax(0.5 * a.log_softmax(-1) + 0.5 * b.log_softmax(-1), dim=-1)
    torch.testing.assert_close(mix_logprobs(policy, coef), expected, atol=1e-6, rtol=0)


def test_one_hot_recovers_the_policy_even_when_others_have_minus_inf():
    a = torch.randn(2, 10).log_softmax(-1)
    b = torch.full((2, 10), -math.inf)  # a model that was never run
    mixed = mix_logprobs(torch.stack([a, b]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    torch.testing.assert_close(mixed, a)
    assert torch.isfinite(mixed).all()


def test_strength_uses_the_reference():
    torch.manual_seed(1)
    pol, ref = torch.randn(3, 20).log_softmax(-1), torch.randn(3, 20).log_softmax(-1)
    s = torch.tensor([0.0, 1.0, 2.0])
    mixed = mix_logprobs(pol.unsqueeze(0), s.unsqueeze(1), ref, 1 - s)
    torch.testing.assert_close(mixed[0], ref[0])
    torch.testing.assert_close(mixed[1], pol[1])
    torch.testing.assert_close(mixed[2], torch.log_softmax(2 * pol[2] - ref[2], dim=-1))


def test_signed_weights_normalise_to_sum_1():
    assert normalize_weights({"helpful": 3, "concise": -1}, NAMES) == [1.5, 0.0, -0.5]
    assert normalize_weights([-2, 0, 4], NAMES) == [-1.0, 0.0, 2.0]
    mixture = Mixture.build(NAMES, {"helpful": 3, "concise": -1}, 2.0, has_reference=True)
    assert mixture.coefficients == (3.0, 0.0, -1.0, -1.0)
    assert mixture.alpha == 0.1  # a negative policy term: the default alpha is in force


@pytest.mark.parametrize("bad", [-0.1, 1, 1.5, float("nan"), float("inf"), "0.1", True, None])
def test_plausibility_is_checked_and_named(bad):
    with pytest.raises(InvalidParameter) as err:
        check_plausibility(bad)
    assert err.value.param == "plausibility"
    with pytest.raises(InvalidParameter) as err:
        Mixture.build(NAMES, [2, -1, 0], has_reference=True, plausibility=bad)
    assert err.value.param == "plausibility"
    assert check_plausibility(0) == 0.0 and check_plausibility(0.999) == 0.999


def _independent_row(policy, coef, ref, ref_coef, alpha):
    """One row's signed mixture from the definition, in float64 with plain loops."""
    terms = [(c, lp) for c, lp in zip(coef.tolist(), policy)] + [(ref_coef, ref)]
    scores = sum(c * lp.double() for c, lp in terms if c != 0)
    positive = [(c, lp.double()) for c, lp in terms if c > 0]
    total = sum(c for c, _ in positive)
    q = sum(c / total * lp for c, lp in positive).softmax(-1)
    keep = q >= alpha * q.max()
    return scores.masked_fill(~keep, float("-inf")).log_softmax(-1)


def test_the_plausibility_constraint_matches_its_definition_row_by_row():
    torch.manual_seed(3)
    k, b, v = 3, 4, 40
    policy = torch.randn(k, b, v).mul(3).log_softmax(-1)  # [K, B, V]
    ref = torch.randn(b, v).mul(3).log_softmax(-1)  # [B, V]
    coef = torch.tensor(
        [[2.0, 0.0, -1.0], [1.0, 1.0, -0.5], [0.5, 0.5, 0.0], [3.0, -1.0, -1.0]]
    )  # [B, K]
    ref_coef = 1 - coef.sum(-1)  # [B]: strengths 1, 1.5, 1 and 1
    alpha = torch.tensor([0.1, 0.5, 0.3, 0.0])  # [B]; row 2 has no negative policy term
    mixed = mix_logprobs(policy, coef, ref, ref_coef, alpha)  # [B, V]
    for row in range(b):
        expected = _independent_row(policy[:, row], coef[row], ref[row], ref_coef[row].item(),
                                    alpha[row].item())  # fmt: skip
        torch.testing.assert_close(mixed[row].double(), expected, atol=1e-5, rtol=0)
    assert torch.isinf(mixed[0]).any() and torch.isinf(mixed[1]).any()  # tokens excluded
    assert torch.isfinite(mixed[3]).all()  # alpha 0: the plain signed formula


def test_a_negative_term_that_rules_a_token_out_gives_no_nan_where_the_head_excludes_it():
    good = torch.tensor([[0.0, -1.0, -50.0]]).log_softmax(-1)  # [B, V]
    bad = torch.tensor([[-1.0, 0.0, float("-inf")]])  # [B, V]: 1 / p = +inf on token 2
    mixed = mix_logprobs(
        torch.stack([good, bad]), torch.tensor([[2.0, -1.0]]), alpha=torch.tensor([0.1])
    )  # [B, V]
    assert not torch.isnan(mixed).any()
    assert mixed[0, 2] == float("-inf") and torch.isfinite(mixed[0, :2]).all()
