"""A family placed over 3 ranks (gloo, local processes) decodes, scores and reports exactly
what the same family does in one process (docs/distributed.md).

Rank 0 is this test process: loading the ranked family spawns ranks 1 and 2 as worker
processes; stopping its engine stops them. Each engine gets a freshly loaded family.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import yaml

from mpo_core.config import SpeculativeConfig, load_config, parse_config
from mpo_core.decoding.sampling import SamplingParams
from mpo_core.engine import Engine, EngineLimits, GenerationRequest
from mpo_core.errors import ConfigError
from mpo_core.models.policies import PolicySet
from mpo_core.runners import load_policy_set
from mpo_core.runners.distributed_world import UNUSED, shard_of
from mpo_core.testing.families import make_persona_family, make_tiny_family

PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26]]
# (weights, strength): uniform with the reference, one member alone, signed (guidance).
MIXTURES: list[tuple[dict[str, float] | None, float]] = [
    (None, 0.5),
    ({"harmless": 1.0}, 1.0),
    ({"helpful": 2.0, "concise": -1.0}, 1.0),
]


def _ranked(path: Path, ranks: list[int], reference_rank: int = 0, **extra: Any) -> Path:
    data = yaml.safe_load(path.read_text())
    data["policies"] = [dict(p, rank=r) for p, r in zip(data["policies"], ranks)]
    if reference_rank:
        data["reference"]["rank"] = reference_rank
    data.update(extra)
    out = path.with_name(f"ranked-{'-'.join(map(str, ranks))}-{reference_rank}.yaml")
    out.write_text(yaml.safe_dump(data))
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_family(tmp_path_factory.mktemp("dist") / "family")


@pytest.fixture(scope="module")
def alone(family: Path) -> PolicySet:
    return load_policy_set(load_config(family))


def _decode(engine: Engine, weights: dict[str, float] | None, strength: float) -> list[Any]:
    sampling = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)
    mixture = engine.mixture(weights, strength)
    streams = [engine.submit(GenerationRequest(p, sampling, mixture)) for p in PROMPTS]
    return [[e for e in s] for s in streams]  # concurrently: rows join and leave together


def _same(got: list[Any], want: list[Any]) -> None:
    for got_events, want_events in zip(got, want, strict=True):
        assert [e.token_id for e in got_events] == [e.token_id for e in want_events]
        for g, w in zip(got_events, want_events, strict=True):
            assert abs(g.logprob - w.logprob) < 1e-5
            assert g.policy_logprobs.keys() == w.policy_logprobs.keys()
            for name, value in w.policy_logprobs.items():
                if value is None:
                    assert g.policy_logprobs[name] is None
                else:
                    assert abs(g.policy_logprobs[name] - value) < 1e-5, name


def _reference_run(alone: PolicySet, speculative: SpeculativeConfig | None) -> list[Any]:
    with Engine(alone, EngineLimits(max_running=4), speculative=speculative) as engine:
        return [_decode(engine, w, s) for w, s in MIXTURES]


SPECULATION = {
    "off": None,
    "ngram": SpeculativeConfig(method="ngram", max_draft_tokens=3),
    "draft": SpeculativeConfig(method="draft", draft_model="base", max_draft_tokens=3),
}


@pytest.mark.parametrize("speculation", list(SPECULATION))
def test_three_ranks_decode_what_one_process_does(
    family: Path, alone: PolicySet, speculation: str
) -> None:
    """Greedy tokens, the mixture's log-probs and every policy's own, with speculation off,
    n-gram drafts, and a draft model (the reference, on rank 0) checked on all ranks."""
    speculative = SPECULATION[speculation]
    want = _reference_run(alone, speculative)
    ranked = load_policy_set(load_config(_ranked(family, [0, 1, 2])))
    assert ranked.backend == "distributed"
    with Engine(ranked, EngineLimits(max_running=4), speculative=speculative) as engine:
        assert engine.is_alive
        got = [_decode(engine, w, s) for w, s in MIXTURES]
        described = engine.runner.describe()
        if speculation == "draft":
            assert engine.speculator is not None
    for g, w in zip(got, want, strict=True):
        _same(g, w)
    ranks = {r["rank"]: r for r in described["ranks"]}
    assert set(ranks[1]["members"]) == {"harmless"}
    assert set(ranks[2]["members"]) == {"concise"}
    assert described["traffic"]["steps"] > 0 and described["traffic"]["received_bytes"] > 0
    assert not dist.is_initialized()  # the engine's stop ended the group


def test_scoring_and_prompt_logprobs_across_ranks(family: Path, alone: PolicySet) -> None:
    """Teacher-forced scores (fits, evaluation) and prompt log-probs gather every rank's
    members; the reference on rank 2, a rank of its own."""
    prompts, completions = [[5, 6, 7], [8, 9]], [[10, 11, 12], [13]]
    with Engine(alone) as engine:
        want = engine.score(prompts, completions)
        want_prompt = engine.prompt_logprobs([5, 6, 7, 8, 9], engine.mixture(None, 0.5)).result()
    ranked = load_policy_set(load_config(_ranked(family, [0, 1, 1], reference_rank=2)))
    with Engine(ranked) as engine:
        got = engine.score(prompts, completions)
        got_prompt = engine.prompt_logprobs([5, 6, 7, 8, 9], engine.mixture(None, 0.5)).result()
        members = {r["rank"]: set(r["members"]) for r in engine.runner.describe()["ranks"]}
    assert members == {0: {"helpful"}, 1: {"harmless", "concise"}, 2: {"base"}}
    torch.testing.assert_close(got.policy_logprobs, want.policy_logprobs, atol=1e-5, rtol=0)
    assert got.reference_logprobs is not None and want.reference_logprobs is not None
    torch.testing.assert_close(got.reference_logprobs, want.reference_logprobs, atol=1e-5, rtol=0)
    assert got_prompt.token_ids == want_prompt.token_ids
    assert want_prompt.logprobs[0] is None and got_prompt.logprobs[0] is None
    for g, w in zip(got_prompt.logprobs[1:], want_prompt.logprobs[1:], strict=True):
        assert g is not None and w is not None and abs(g - w) < 1e-5


def test_persona_family_over_two_ranks(tmp_path: Path) -> None:
    """A persona family (one model, K prompts) split over ranks: each rank loads the model
    for its own personas; the reference rows run on rank 0."""
    path = make_persona_family(tmp_path / "personas")
    alone = load_policy_set(load_config(path))
    data = yaml.safe_load(path.read_text())
    names = [p["name"] for p in data["policies"]]
    data["policies"] = [dict(p, rank=1 if i else 0) for i, p in enumerate(data["policies"])]
    ranked_path = path.with_name("ranked.yaml")
    ranked_path.write_text(yaml.safe_dump(data))
    sampling = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)

    def run(ps: PolicySet) -> list[list[Any]]:
        with Engine(ps, EngineLimits(max_running=4)) as engine:
            mixture = engine.mixture({names[0]: 0.5, names[1]: 0.3, names[2]: 0.2}, 0.8)
            streams = [engine.submit(GenerationRequest(p, sampling, mixture)) for p in PROMPTS]
            return [list(s) for s in streams]

    want = run(alone)
    got = run(load_policy_set(load_config(ranked_path)))
    _same(got, want)


def test_shards_of_each_kind_of_family(family: Path, tmp_path: Path) -> None:
    """What each rank loads: its members; a persona family's model on every rank with a
    persona; the reference alone on a rank of its own."""
    config = load_config(_ranked(family, [0, 1, 1], reference_rank=2))
    zero, one, two = (shard_of(config, r) for r in range(3))
    assert zero is not None and one is not None and two is not None
    assert zero.config.policy_names == ["helpful"] and zero.config.reference is None
    assert zero.members == [0]
    assert one.config.policy_names == ["harmless", "concise"] and one.members == [1, 2]
    assert two.config.policy_names == ["base"] and two.members == [3]
    assert two.local_coefs([0.1, 0.2, 0.3, 0.4]) == (0.4,)
    personas = yaml.safe_load(make_persona_family(tmp_path / "p").read_text())
    personas["policies"][2]["rank"] = 1
    config = parse_config(personas, base_dir=tmp_path / "p")
    one = shard_of(config, 1)
    assert one is not None and one.members == [2, UNUSED]  # the model, its rows run on 0
    assert one.config.reference is not None and one.config.reference.rank == 0
    assert all(p.rank == 0 for p in one.config.policies)


def test_placement_errors_are_one_clear_line(family: Path) -> None:
    data = yaml.safe_load(family.read_text())
    data["policies"][0]["rank"] = 2
    with pytest.raises(ConfigError, match="rank 1 hosts no member, but rank 2 does"):
        parse_config(data, base_dir=family.parent)
    data["policies"][0]["rank"] = -1
    with pytest.raises(ConfigError, match="rank"):
        parse_config(data, base_dir=family.parent)


def test_a_worker_that_fails_to_load_is_named(family: Path) -> None:
    data = yaml.safe_load(family.read_text())
    data["policies"][2].update(rank=1, model=str(family.parent / "nowhere"))
    path = family.with_name("broken.yaml")
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"rank 1: .*'concise'"):
        load_policy_set(load_config(path))
    assert not dist.is_initialized()


@pytest.fixture
def torchrun_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Rank 0 as torchrun (or a manifest) starts it: the world is given, nothing spawned."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "0")
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    yield
    assert "RANK" in os.environ


def test_a_rank_that_never_joins_is_a_start_up_error(family: Path, torchrun_env: None) -> None:
    path = _ranked(family, [0, 1, 1], distributed={"start_timeout_s": 1.0})
    with pytest.raises(ConfigError, match="rank 1 never joined"):
        load_policy_set(load_config(path))


def test_torchrun_world_size_must_match_the_ranks(family: Path, torchrun_env: None) -> None:
    path = _ranked(family, [0, 1, 2])
    with pytest.raises(ConfigError, match="torchrun started 2 processes but .* 3 ranks"):
        load_policy_set(load_config(path))


def test_cancel_grammar_and_each_ranks_budget(family: Path, alone: PolicySet) -> None:
    """A stream cancelled mid-reply is dropped on every rank (the rows after it still
    decode as in one process); a grammar is applied on rank 0; a request whose KV cache
    cannot fit a rank's budget is refused, naming ``max_new_tokens``."""
    from mpo_core.decoding.grammar import GrammarSpec
    from mpo_core.errors import InvalidParameter

    spec = GrammarSpec(kind="regex", value="(ab|ba)+c", param="grammar")
    sampling = SamplingParams(max_new_tokens=12, temperature=0.0)
    with Engine(alone) as engine:
        want = engine.generate(GenerationRequest(PROMPTS[0], sampling, engine.mixture(None, 0.5)))
        grammar = engine.compile_grammar(spec)
        want_grammar = engine.generate(GenerationRequest(PROMPTS[1], sampling, grammar=grammar))
    ranked = load_policy_set(load_config(_ranked(family, [0, 1, 2])))
    limits = EngineLimits(max_running=4, kv_cache_bytes=64 * 1024)
    with Engine(ranked, limits) as engine:
        long = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
        stream = engine.submit(GenerationRequest(PROMPTS[2], long))
        next(iter(stream))
        stream.cancel()
        assert [e.finish_reason for e in stream][-1:] in (["cancelled"], [])
        got = engine.generate(GenerationRequest(PROMPTS[0], sampling, engine.mixture(None, 0.5)))
        grammar = engine.compile_grammar(spec)
        got_grammar = engine.generate(GenerationRequest(PROMPTS[1], sampling, grammar=grammar))
        with pytest.raises(InvalidParameter) as refused:
            engine.submit(GenerationRequest(PROMPTS[0], SamplingParams(max_new_tokens=200)))
        assert refused.value.param == "max_new_tokens"
        assert "rank 1" in engine.kv_budget.describe()
    assert got.token_ids == want.token_ids
    assert got_grammar.token_ids == want_grammar.token_ids
    assert got_grammar.text == want_grammar.text


def test_chunked_prefill_across_ranks(family: Path, alone: PolicySet) -> None:
    """A prompt prefilled in chunks of 4 tokens (each chunk reaches the workers with the
    next call) decodes as the whole prompt does in one process."""
    prompt = list(range(5, 45))
    sampling = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    with Engine(alone) as engine:
        want = engine.generate(GenerationRequest(prompt, sampling, engine.mixture(None, 0.5)))
    ranked = load_policy_set(load_config(_ranked(family, [0, 1, 2])))
    with Engine(ranked, EngineLimits(max_running=4, prefill_chunk_tokens=4)) as engine:
        chunks: list[list[int]] = []
        forward = engine.runner.prefill_chunk

        def counted(rows: Any, ends: Any) -> None:
            chunks.append(list(ends))
            forward(rows, ends)

        engine.runner.prefill_chunk = counted  # type: ignore[method-assign]
        short = engine.submit(GenerationRequest(PROMPTS[1], sampling))
        got = engine.generate(GenerationRequest(prompt, sampling, engine.mixture(None, 0.5)))
        assert len(list(short)) == 8
    assert len(chunks) >= 5  # the 40-token prompt did run in chunks
    assert got.token_ids == want.token_ids
    for g, w in zip(got.events, want.events, strict=True):
        assert abs(g.logprob - w.logprob) < 1e-5


def test_a_rank_with_another_vocabulary_is_refused(family: Path, tmp_path: Path) -> None:
    """Rank 1's member has one more token: the start-up check names rank 1 and the
    vocabularies, and nothing is served."""
    import shutil

    from transformers import AutoTokenizer

    data = yaml.safe_load(family.read_text())
    other = tmp_path / "harmless-extra"
    shutil.copytree(family.parent / data["policies"][1]["model"], other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<|extra|>"])
    tokenizer.save_pretrained(other)
    data["policies"][1].update(model=str(other), rank=1)
    path = tmp_path / "mismatch.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="rank 1 loaded a different tokenizer"):
        load_policy_set(parse_config(yaml.safe_load(path.read_text()), base_dir=family.parent))
    assert not dist.is_initialized()


def test_a_step_that_fails_on_rank_0_leaves_the_workers_in_step(
    family: Path, alone: PolicySet
) -> None:
    """Rank 0's own members fail one step after the workers ran it: their answers are still
    read, so the next request decodes as in one process (not from last step's tensors)."""
    from mpo_core.errors import GenerationFailed

    sampling = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    with Engine(alone) as engine:
        want = engine.generate(GenerationRequest(PROMPTS[0], sampling, engine.mixture(None, 0.5)))
    ranked = load_policy_set(load_config(_ranked(family, [0, 1, 2])))
    with Engine(ranked) as engine:
        local = engine.runner.local  # type: ignore[attr-defined]
        verify, failed = local.verify, []

        def fail_once(*args: Any) -> Any:
            if not failed:
                failed.append(True)
                raise RuntimeError("rank 0's members failed")
            return verify(*args)

        local.verify = fail_once
        with pytest.raises(GenerationFailed):
            engine.generate(GenerationRequest(PROMPTS[1], sampling, engine.mixture(None, 0.5)))
        got = engine.generate(GenerationRequest(PROMPTS[0], sampling, engine.mixture(None, 0.5)))
        assert engine.is_alive
    assert got.token_ids == want.token_ids
    for g, w in zip(got.events, want.events, strict=True):
        assert abs(g.logprob - w.logprob) < 1e-5
