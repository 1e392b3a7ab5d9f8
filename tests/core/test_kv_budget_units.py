"""The KV budget's messages give sizes in a unit that shows the number (never "0.00 GiB")."""

from __future__ import annotations

import re

import pytest

from mpo_core.decoding.sampling import SamplingParams
from mpo_core.engine.core import Engine, EngineLimits, GenerationRequest
from mpo_core.errors import InvalidParameter
from mpo_core.models.kv_budget import KVBudget, format_bytes, token_bytes
from mpo_core.models.kvcache import _capacity_for

UNITS = {"bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
SIZE = re.compile(r"(\d+(?:\.\d+)?) (bytes|KiB|MiB|GiB|TiB)")


def _read(text: str) -> float:
    number, unit = SIZE.fullmatch(text).groups()  # type: ignore[union-attr]
    return float(number) * UNITS[unit]


@pytest.mark.parametrize(
    "count", [0, 1, 1000, 1024, 3 * 1024 + 512, 5_000_000, 96 << 20, 1_342_177_280, 5 << 40]
)
def test_a_size_reads_back_within_its_three_digits(count: int) -> None:
    text = format_bytes(count)
    number = float(text.split()[0])
    assert number >= 1 or count == 0, text  # the unit keeps the number visible
    assert number < 1024 or text.endswith("TiB"), text  # and is the largest that does
    assert _read(text) == pytest.approx(count, rel=0.01), text


def test_small_budgets_name_their_size(llama_set) -> None:
    """A budget of a few KiB (a tiny model's) reads as such in the engine's refusal and in
    its start-up line: the number shown is the budget, not 0.00 GiB."""
    per_token = sum(token_bytes(m, llama_set.kv_dtype) for m in llama_set.policies)
    budget = _capacity_for(16) * per_token
    described = KVBudget(budget, [per_token], [[0]], growing=True).describe()
    shown = SIZE.search(described)
    assert shown is not None and _read(shown.group(0)) == pytest.approx(budget, rel=0.01)
    with Engine(llama_set, EngineLimits(kv_cache_bytes=budget)) as engine:
        request = GenerationRequest([5, 6], SamplingParams(max_new_tokens=200, ignore_eos=True))
        with pytest.raises(InvalidParameter) as err:
            engine.submit(request)
    sizes = [_read(m.group(0)) for m in SIZE.finditer(err.value.message)]
    assert "0.00" not in err.value.message and len(sizes) == 2, err.value.message
    need, whole = sizes
    assert whole == pytest.approx(budget, rel=0.01) and need > whole
