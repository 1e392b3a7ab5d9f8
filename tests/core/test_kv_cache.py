"""The KV cache's buffers: a narrower storage dtype, joins and leaves on them."""

import pytest
import torch

from mpo_core.config import parse_config
from mpo_core.decoding.sampling import SamplingParams
from mpo_core.engine.core import Engine, GenerationRequest
from mpo_core.errors import ConfigError
from mpo_core.models.kvcache import GrowingBatch, GrowingLayer, KVStorage, growing_layers


def test_kv_cache_dtype_is_validated():
    base = {"policies": [{"name": "a", "model": "org/a"}]}
    assert parse_config({**base, "kv_cache_dtype": "float16"}).kv_cache_dtype == "float16"
    assert parse_config(base).kv_cache_dtype == "auto"
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        parse_config({**base, "kv_cache_dtype": "int3"})


def test_policy_set_resolves_the_cache_dtype(llama_set, llama_set_f16_cache):
    assert llama_set.kv_dtype == llama_set.dtype == torch.float32
    assert llama_set_f16_cache.kv_dtype == torch.float16
    assert llama_set_f16_cache.dtype == torch.float32


def _batch(ps, dtype):
    return GrowingBatch(ps.policies[0], ps.vocab_size, ps.device, KVStorage(dtype))


def _next_token(last: int, position: int) -> int:
    """A fixed, varied token stream for the scripted decodes (ids inside the vocabulary)."""
    return (last * 7 + position) % 200 + 10


def _run_script(batch, tok):
    """Join, decode, join at a different length, decode, drop a row, decode; collect
    every step's log-probs keyed by row id."""
    out = []
    prompts = {0: tok.encode("Thank you so much"), 1: tok.encode("hi")}
    last = {rid: p[-1] for rid, p in prompts.items()}
    pos = {rid: len(p) for rid, p in prompts.items()}

    def step():
        ids = batch.row_ids
        tokens = torch.tensor([_next_token(last[r], pos[r]) for r in ids])
        lp = batch.decode(tokens, torch.tensor([pos[r] for r in ids]))
        for row, rid in enumerate(ids):
            last[rid], pos[rid] = int(tokens[row]), pos[rid] + 1
            out.append((rid, lp[row]))

    lp = batch.prefill([0, 1], [prompts[0], prompts[1]])
    out += [(0, lp[0]), (1, lp[1])]
    for _ in range(3):
        step()
    prompts[2] = tok.encode("Could you please help me write a short poem about rain?")
    last[2], pos[2] = prompts[2][-1], len(prompts[2])
    lp = batch.prefill([2], [prompts[2]])
    out.append((2, lp[0]))
    for _ in range(3):
        step()
    batch.keep({1, 2})
    for _ in range(40):  # past the first buffer's spare columns: the buffers grow
        step()
    return out


def test_float16_cache_stays_float16_and_close_to_float32(llama_set):
    tok = llama_set.tokenizer
    wide, narrow = _batch(llama_set, None), _batch(llama_set, torch.float16)
    got_wide = _run_script(wide, tok)
    got_narrow = _run_script(narrow, tok)
    layers = growing_layers(narrow.cache)
    assert all(layer.keys.dtype == torch.float16 for layer in layers)
    assert all(layer.values.dtype == torch.float16 for layer in layers)
    assert all(layer.keys.dtype == torch.float32 for layer in growing_layers(wide.cache))
    assert narrow.row_ids == wide.row_ids == [1, 2]
    assert len(got_wide) == len(got_narrow) > 80
    worst = max(float((a - b).abs().max()) for (_, a), (_, b) in zip(got_wide, got_narrow))
    # float16 keeps ~3 significant digits of each key and value
    assert 0 < worst < 2e-2


def test_a_row_decodes_the_same_alone_as_in_a_changing_batch(llama_set):
    """Joins (stacking with left padding) and leaves (index select, column trim) keep
    each row's cache intact: row 2's log-probs equal those of row 2 decoded alone."""
    tok = llama_set.tokenizer
    batch = _batch(llama_set, None)
    together = [lp for rid, lp in _run_script(batch, tok) if rid == 2]
    alone_batch = _batch(llama_set, None)
    prompt = tok.encode("Could you please help me write a short poem about rain?")
    alone = [alone_batch.prefill([2], [prompt])[0]]
    last, pos = prompt[-1], len(prompt)
    for _ in range(len(together) - 1):
        token = _next_token(last, pos)
        alone.append(alone_batch.decode(torch.tensor([token]), torch.tensor([pos]))[0])
        last, pos = token, pos + 1
    assert len(together) == 44
    for a, b in zip(alone, together):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_growing_layer_keeps_its_columns_across_growth():
    keys = torch.arange(2 * 1 * 3 * 2, dtype=torch.float32).reshape(2, 1, 3, 2)
    layer = GrowingLayer.stacking([(keys, -keys)], 3, KVStorage(torch.float16))
    capacity = layer._key_buf.shape[2]
    for i in range(capacity):  # one column at a time, past the capacity
        k = torch.full((2, 1, 1, 2), float(i))
        got_k, got_v = layer.update(k, -k)
        assert got_k.dtype == torch.float32  # attention reads the model's dtype
    assert layer._key_buf.shape[2] > capacity
    assert layer.get_seq_length() == 3 + capacity
    torch.testing.assert_close(got_k[:, :, :3], keys)
    torch.testing.assert_close(got_v[:, :, 3:, 0], -torch.arange(capacity).float().expand(2, 1, -1))


def test_engine_with_float16_cache_matches_float32_greedy_tokens(llama_set, llama_set_f16_cache):
    ids = llama_set.tokenizer.encode("Could you please help me write a short poem?")
    params = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
    weights = {"helpful": 0.2, "harmless": 0.5, "concise": 0.3}
    results = []
    for ps in (llama_set, llama_set_f16_cache):
        with Engine(ps) as engine:
            results.append(engine.generate(GenerationRequest(ids, params, engine.mixture(weights))))
    wide, narrow = results
    gaps = [abs(a.logprob - b.logprob) for a, b in zip(wide.events, narrow.events)]
    # The tiny models' greedy choices are not close calls, so rounding the cache keeps them.
    assert narrow.token_ids == wide.token_ids
    assert max(gaps) < 2e-2
