"""The soup of an adapter family: the base plus the weighted sum of the adapters' deltas."""

import pytest
import torch

from mpo_core.config import load_config
from mpo_core.runners import build_soup, load_policy_set
from mpo_core.testing.lora import LoraShape, make_adapter_family


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapter_soup_equals_the_soup_of_the_merged_adapters(arch, tmp_path):
    shapes = [LoraShape(r=4, targets="attention"), LoraShape(r=2, targets="all", rslora=True)]
    paths = make_adapter_family(tmp_path, shapes, arch=arch)
    adapters = load_policy_set(load_config(paths.adapters_yaml))
    merged = load_policy_set(load_config(paths.merged_yaml))
    ids = torch.tensor([adapters.tokenizer.encode("Could you please help me write a poem?")])
    for weights in ([1.0, 0.0], [0.3, 0.7]):
        got = build_soup(adapters, weights)(input_ids=ids).logits
        want = build_soup(merged, weights)(input_ids=ids).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # the soup is a plain model: no grouped layer left, and the family itself untouched
    soup = build_soup(adapters, [0.5, 0.5])
    assert not any(type(m).__name__ == "GroupedLoraLinear" for m in soup.modules())
    base_logits = adapters.reference.model(input_ids=ids).logits
    assert not torch.allclose(soup(input_ids=ids).logits, base_logits, atol=1e-3)
