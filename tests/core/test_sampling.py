import math

import pytest
import torch

from mpo_core.decoding.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    filter_scores,
    sample_tokens,
)
from mpo_core.errors import InvalidParameter


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", 0),
        ("temperature", -0.5),
        ("temperature", float("nan")),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", 2.0),
        ("repetition_penalty", 0.0),
        ("seed", -3),
        ("stop", [""]),
        ("stop_token_ids", [10_000]),
        ("top_logprobs", 50),
    ],
)
def test_validate_names_the_bad_field(field, value):
    params = SamplingParams(**{field: value})
    with pytest.raises(InvalidParameter) as err:
        params.validate(vocab_size=100)
    assert err.value.param == field
    shown = [repr(value), str(value)] + ([str(value[0])] if isinstance(value, list) else [])
    assert any(text in err.value.message for text in shown)


def test_filters_keep_the_expected_tokens():
    logprobs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(3, 1)  # [3, 4]
    out = filter_scores(
        logprobs,
        top_k=torch.tensor([2, 0, 0]),
        top_p=torch.tensor([1.0, 0.7, 1.0]),
        min_p=torch.tensor([0.0, 0.0, 0.4]),
    )
    kept = torch.isfinite(out)
    assert kept.tolist() == [
        [True, True, False, False],  # top-k 2
        [True, True, False, False],  # top-p 0.7: 0.5 < 0.7, 0.8 >= 0.7 -> stop after 2
        [True, True, False, False],  # min-p 0.4 of 0.5 = 0.2
    ]
    torch.testing.assert_close(out[kept], logprobs[kept])


def test_rows_with_every_filter_off_pass_through_and_the_others_filter_as_alone():
    torch.manual_seed(0)
    scores = torch.randn(5, 50).log_softmax(-1)  # [5, 50]
    top_k = torch.tensor([0, 3, 0, 50, 0])  # 50 = the vocabulary: off
    top_p = torch.tensor([1.0, 1.0, 0.6, 1.0, 1.0])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.2])
    out = filter_scores(scores, top_k, top_p, min_p)
    for row in range(5):
        alone = filter_scores(scores[row : row + 1], top_k[row : row + 1],
                              top_p[row : row + 1], min_p[row : row + 1])  # fmt: skip
        assert torch.equal(out[row], alone[0])
    assert torch.equal(out[[0, 3]], scores[[0, 3]])  # filters off: unchanged
    assert torch.isfinite(out[1]).sum().item() == 3
    assert 1 <= torch.isfinite(out[2]).sum().item() < 50
    assert 1 <= torch.isfinite(out[4]).sum().item() < 50
    off = filter_scores(scores, torch.zeros(5, dtype=torch.long), torch.ones(5), torch.zeros(5))
    assert torch.equal(off, scores)


def test_filters_never_drop_the_best_token():
    out = filter_scores(
        torch.tensor([[-0.1, -3.0]]), torch.tensor([0]), torch.tensor([1e-6]), torch.tensor([1.0])
    )
    assert math.isfinite(out[0, 0].item()) and out[0, 1].item() == -math.inf


def test_repetition_penalty_lowers_seen_tokens_only():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0]])
    out = apply_repetition_penalty(logprobs, [[1, 1]], [2.0])
    assert out.tolist() == [[-1.0, -4.0, -3.0]]
    assert logprobs.tolist() == [[-1.0, -2.0, -3.0]]  # input untouched


def _gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def test_sampling_greedy_and_seeded():
    logprobs = torch.randn(2, 30).log_softmax(-1)
    greedy = sample_tokens(
        logprobs, [SamplingParams(temperature=0)] * 2, [_gen(0), _gen(1)], [[], []]
    )
    assert greedy.tolist() == logprobs.argmax(-1).tolist()
    params = [SamplingParams(temperature=1.0, seed=5), SamplingParams(temperature=0)]
    first = sample_tokens(logprobs, params, [_gen(5), _gen(9)], [[], []])
    again = sample_tokens(logprobs, params, [_gen(5), _gen(1)], [[], []])
    assert first.tolist() == again.tolist()
    assert first[1].item() == logprobs[1].argmax().item()


def test_top_k_one_sampling_is_greedy():
    logprobs = torch.randn(1, 30).log_softmax(-1)
    params = [SamplingParams(temperature=5.0, top_k=1)]
    drawn = {sample_tokens(logprobs, params, [_gen(s)], [[]]).item() for s in range(10)}
    assert drawn == {logprobs.argmax().item()}


def test_tiny_temperature_is_greedy():
    logprobs = torch.randn(2, 30).log_softmax(-1)  # [2, 30]
    for temperature in (1e-45, 1e-30, 1e-6):
        params = [SamplingParams(temperature=temperature, seed=3)] * 2
        assert params[0].greedy
        tokens = sample_tokens(logprobs, params, [_gen(3), _gen(4)], [[], []])
        assert tokens.tolist() == logprobs.argmax(-1).tolist()
    assert not SamplingParams(temperature=1e-4).greedy


def test_one_rows_numerical_trouble_does_not_fail_the_others():
    torch.manual_seed(0)
    good = torch.randn(1, 30).log_softmax(-1)  # [1, 30]
    nan_row = torch.full((1, 30), float("nan"))
    dead_row = torch.full((1, 30), -math.inf)  # nothing left to sample from
    logprobs = torch.cat([nan_row, good, dead_row])  # [3, 30]
    params = [SamplingParams(temperature=1.0, seed=s) for s in (1, 2, 3)]
    tokens = sample_tokens(logprobs, params, [_gen(1), _gen(2), _gen(3)], [[], [], []])
    assert all(0 <= t < 30 for t in tokens.tolist())
    # The healthy row draws exactly what it draws alone with the same generator.
    alone = sample_tokens(good, [params[1]], [_gen(2)], [[]])
    assert tokens[1].item() == alone.item()
