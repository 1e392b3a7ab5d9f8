import math

import pytest
import torch

from mpo_core.decoding.mixing import (
    Mixture,
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
        ({"helpful": -1}, "weights.helpful", ">= 0"),
        ({"helpful": float("nan")}, "weights.helpful", "finite"),
        ([1, float("inf"), 1], "weights[1]", "finite"),
        ({"kind": 1}, "weights.kind", "unknown policy 'kind'"),
        ({"helpful": 0, "harmless": 0}, "weights", "all be zero"),
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
        ([0, 0], "weights", "all be zero"),
        ([1, -1], "weights[1]", ">= 0"),
        ("ab", "weights", "non-empty list"),
    ],
)
def test_a_weight_list_is_checked_without_policy_names(weights, param, fragment):
    with pytest.raises(InvalidParameter, match=fragment) as err:
        check_weight_list(weights)
    assert err.value.param == param
    assert check_weight_list([1, 0, -0.0]) == [1.0, 0.0, 0.0]


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
