"""Adapter families: config errors, grouped LoRA against PEFT, and the adapter backend
against the same adapters merged into full models (served by the full-model backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from peft import IA3Config, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from mpo_core.config import load_config, parse_config
from mpo_core.decoding.sampling import SamplingParams
from mpo_core.engine.core import Engine, EngineLimits, GenerationRequest
from mpo_core.errors import ConfigError
from mpo_core.fitting.driver import FitOptions, run_fit
from mpo_core.models.adapters import same_base
from mpo_core.models.lora import AdapterIndex, GroupedLoraLinear
from mpo_core.models.policies import PolicySet
from mpo_core.runners import AdapterRunner, SeparateModelsRunner, load_policy_set
from mpo_core.testing.families import make_tiny_family
from mpo_core.testing.lora import AdapterFamilyPaths, LoraShape, make_adapter, make_adapter_family

# Different ranks, alphas, targets and scalings, so that stacking must pad and skip.
SHAPES = [
    LoraShape(r=4, alpha=8, targets="attention"),
    LoraShape(r=8, alpha=4, targets="mlp"),
    LoraShape(r=2, alpha=16, targets="all", rslora=True),
]
PROMPTS = ["Could you please help me write a short poem?", "Thank you", "Numbers like 0 1 2"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    arch = request.param
    paths = make_adapter_family(tmp_path_factory.mktemp(f"lora_{arch}"), SHAPES, arch=arch)
    adapters = load_policy_set(load_config(paths.adapters_yaml))
    merged = load_policy_set(load_config(paths.merged_yaml))
    return arch, paths, adapters, merged


def _rows_of(ps: PolicySet, prompt: str, rows: int) -> torch.Tensor:
    ids = ps.tokenizer.encode(prompt)
    return torch.tensor([ids] * rows)


# -- the grouped layers ------------------------------------------------------------------


def test_grouped_forward_equals_peft_mixed_batch(family: Any) -> None:
    """One forward whose rows run different adapters (and none) equals PEFT's own mixed
    batch, ``adapter_names`` per row with ``__base__`` for the base."""
    arch, paths, adapters, _ = family
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(paths.base)),
        str(paths.adapters["helpful"]),
        adapter_name="helpful",
    )
    for name in ("harmless", "concise"):
        peft_model.load_adapter(str(paths.adapters[name]), adapter_name=name)
    peft_model.eval()
    ids = _rows_of(adapters, PROMPTS[0], 5)  # [5, L]
    names = ["concise", "__base__", "helpful", "harmless", "concise"]
    with torch.no_grad():
        expected = peft_model(input_ids=ids, adapter_names=names).logits  # [5, L, V']
        adapters.adapters.index.set(torch.tensor([3, 0, 1, 2, 3]))
        got = adapters.adapters.model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # the adapters really differ from each other and from the base
    assert (expected[0] - expected[1]).abs().max() > 0.1
    assert (expected[2] - expected[3]).abs().max() > 0.1


def test_a_batch_of_one_adapter_runs_only_its_factors(family: Any) -> None:
    """Rows that all run one adapter (or none) equal PEFT's, and read no other adapter's
    factors: poisoned with NaN, those would show in the logits if they were used."""
    arch, paths, adapters, _ = family
    model, index = adapters.adapters.model, adapters.adapters.index
    ids = _rows_of(adapters, PROMPTS[1], 3)  # [3, L]
    grouped = [m for m in model.modules() if isinstance(m, GroupedLoraLinear)]
    saved = [(m.lora_a.clone(), m.lora_b.clone()) for m in grouped]
    for adapter, name in ((2, "harmless"), (0, None)):
        peft_model = AutoModelForCausalLM.from_pretrained(str(paths.base))
        if name is not None:
            peft_model = PeftModel.from_pretrained(peft_model, str(paths.adapters[name]))
        with torch.no_grad():
            expected = peft_model.eval()(input_ids=ids).logits  # [3, L, V']
            for m in grouped:  # every slot but this adapter's holds NaN
                slot = index.table(m.layout)[adapter]
                keep = slice((slot - 1) * m.rank, slot * m.rank) if slot else slice(0, 0)
                m.lora_a[:, : keep.start] = float("nan")
                m.lora_a[:, keep.stop :] = float("nan")
            index.fill(3, adapter)
            got = model(input_ids=ids).logits
            for m, (a, b) in zip(grouped, saved):
                m.lora_a.copy_(a)
                m.lora_b.copy_(b)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_layers_are_grouped_and_pad_ranks(family: Any) -> None:
    arch, _, adapters, _ = family
    grouped = [m for m in adapters.adapters.model.modules() if isinstance(m, GroupedLoraLinear)]
    assert grouped, "no LoRA layer was grouped"
    assert not any("peft" in type(m).__module__ for m in adapters.adapters.model.modules())
    # llama: attention layers hold ranks 4 and 2 (padded to 4), MLP layers 8 and 2; GPT-2's
    # c_attn 4 and 2, c_fc 8 and 2, and its c_proj layers only the all-linear adapter's 2.
    rank_and_slots = {(m.rank, m.slots) for m in grouped}
    expected = {(4, 2), (8, 2)} if arch == "llama" else {(4, 2), (8, 2), (2, 1)}
    assert rank_and_slots == expected
    for m in grouped:
        blocks = m.lora_b.view(m.slots, m.rank, -1)  # [S, R, out]
        assert blocks.abs().sum(dim=(1, 2)).min() > 0  # every slot holds a real adapter
        if m.slots == 2:  # the rank-2 adapter's block is padded with zero rows
            assert blocks[1, 2:].abs().sum() == 0 and blocks[1, :2].abs().sum() > 0


def test_index_writes_in_place_and_maps_each_layout() -> None:
    index = AdapterIndex(num_adapters=3, device=torch.device("cpu"), capacity=4)
    attention = index.layout([0, 1, 0, 2])  # adapters 1 and 3 target it
    mlp = index.layout([0, 0, 1, 2])
    assert index.layout([0, 1, 0, 2]) == attention
    index.set(torch.tensor([1, 1, 1, 1]))
    before = index.mask(attention, 4)
    index.set(torch.tensor([3, 0, 2, 1]))
    assert index.slots(attention, 4) == [2, 0, 0, 1]
    assert index.slots(mlp, 4) == [2, 0, 1, 0]
    assert before.tolist() == [[0, 1], [0, 0], [0, 0], [1, 0]]  # in place: graph-safe
    index.set(torch.tensor([1] * 6))  # grows
    assert index.slots(attention, 6) == [1] * 6


# -- the engine: adapter backend against merged full models --------------------------------


def greedy(n: int, **kw: Any) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True, top_logprobs=5, **kw)


MIXTURES: list[tuple[dict[str, float], float]] = [
    ({"helpful": 1.0}, 1.0),  # one-hot: one row
    ({"harmless": 0.3, "concise": 0.7}, 0.6),  # two adapters and the base: three rows
    ({"helpful": 1.0, "harmless": 1.0, "concise": 1.0}, 0.5),  # s = 0.5: four rows
    ({"concise": 1.0}, 0.0),  # the base alone
    ({"helpful": 0.5, "concise": 0.5}, 1.4),  # extrapolation
]


def _assert_same_events(got: list[Any], want: list[Any]) -> None:
    assert [e.token_id for e in got] == [e.token_id for e in want]
    for g, w in zip(got, want):
        assert g.logprob == pytest.approx(w.logprob, abs=1e-4)
        assert [i for i, _ in g.top_logprobs] == [i for i, _ in w.top_logprobs]
        for (_, gv), (_, wv) in zip(g.top_logprobs, w.top_logprobs):
            assert gv == pytest.approx(wv, abs=1e-4)
        assert g.policy_logprobs.keys() == w.policy_logprobs.keys()
        for name, value in g.policy_logprobs.items():
            if value is None:
                assert w.policy_logprobs[name] is None
            else:
                assert value == pytest.approx(w.policy_logprobs[name], abs=1e-4)


def _submit_all(engine: Engine, ps: PolicySet) -> list[Any]:
    """Submit every mixture; each joins once the one before it has produced two tokens,
    so the batch changes while requests decode. Returns every request's events."""
    iterators, heads = [], []
    for i, (weights, strength) in enumerate(MIXTURES):
        prompt = ps.tokenizer.encode(PROMPTS[i % len(PROMPTS)] + " x" * i)
        if i % 2 == 0:
            params = greedy(10 + i)
        else:
            params = SamplingParams(
                max_new_tokens=10 + i, temperature=0.8, seed=i, ignore_eos=True, top_logprobs=5
            )
        stream = engine.submit(GenerationRequest(prompt, params, engine.mixture(weights, strength)))
        iterator = iter(stream)
        head = [next(iterator), next(iterator)]  # wait on events: this one is decoding
        iterators.append(iterator)
        heads.append(head)
    return [head + list(iterator) for head, iterator in zip(heads, iterators)]


def test_adapter_mixture_equals_merged_mixture_with_joins(family: Any) -> None:
    _, _, adapters, merged = family
    with Engine(adapters, EngineLimits(max_running=8)) as engine:
        assert isinstance(engine.runner, AdapterRunner)
        got = _submit_all(engine, adapters)
    with Engine(merged, EngineLimits(max_running=8)) as engine:
        assert isinstance(engine.runner, SeparateModelsRunner)
        want = _submit_all(engine, merged)
    for g, w in zip(got, want, strict=True):
        _assert_same_events(g, w)
    # weight-0 policies ran no rows: no log-prob is reported for them
    assert got[0][0].policy_logprobs["harmless"] is None
    assert got[1][0].policy_logprobs["helpful"] is None


def test_both_runners_agree_on_an_adapter_family(family: Any) -> None:
    """The runner contract: K separate batches over the family's per-adapter views (one
    forward per model) give what the grouped runner gives in one forward."""
    _, _, adapters, _ = family
    with Engine(adapters, EngineLimits(max_running=8)) as engine:
        grouped = _submit_all(engine, adapters)
    runner = SeparateModelsRunner(adapters)
    with Engine(adapters, EngineLimits(max_running=8), runner=runner) as engine:
        separate = _submit_all(engine, adapters)
    for g, s in zip(grouped, separate, strict=True):
        _assert_same_events(g, s)


def test_rows_per_request_follow_the_coefficients(family: Any) -> None:
    """A request holds one slot per model whose coefficient is not zero, and frees them."""
    _, _, adapters, _ = family
    with Engine(adapters) as engine:
        runner = engine.runner
    assert isinstance(runner, AdapterRunner)

    class FakeRow:
        def __init__(self, sid: int, weights: dict[str, float], strength: float) -> None:
            self.sid = sid
            self.token_ids = adapters.tokenizer.encode(PROMPTS[sid % 3])
            self.coefs = engine.mixture(weights, strength).coefficients

    rows = [
        FakeRow(0, {"harmless": 0.3, "concise": 0.7}, 0.6),  # 2 adapters + base
        FakeRow(1, {"helpful": 1.0}, 1.0),  # 1
        FakeRow(2, {"helpful": 1.0}, 0.0),  # the base only
    ]
    output = runner.step([], rows)
    assert output.logprobs.shape == (4, 3, adapters.vocab_size)
    assert sorted(runner.batch.row_ids) == [1, 2, 3, 4, 11]  # sid * (K + 1) + model
    runner.step(rows, [])  # decode: rows keep their slots
    assert len(runner.batch) == 5
    runner.keep({1})
    assert runner.batch.row_ids == [4]


def test_cancel_frees_every_slot_of_the_request(family: Any) -> None:
    """max_running counts requests: a 3-slot request fills max_running=1, and cancelling
    it frees all three of its slots for the next request."""
    _, _, adapters, _ = family
    ids = adapters.tokenizer.encode(PROMPTS[0])
    with Engine(adapters, EngineLimits(max_running=1, max_queued=4)) as engine:
        runner = engine.runner
        assert isinstance(runner, AdapterRunner)
        mixture = engine.mixture({"harmless": 0.3, "concise": 0.7}, 0.6)
        stream = engine.submit(GenerationRequest(ids, greedy(200), mixture))
        events = iter(stream)
        next(events)
        assert len(runner.batch) == 3  # 2 adapters + the base, one request
        queued = engine.submit(GenerationRequest(ids, greedy(3), engine.mixture({"helpful": 1})))
        stream.cancel()
        assert list(events)[-1].finish_reason == "cancelled"
        assert len(list(queued)) == 3  # it got the slot once the cancelled request left
    assert len(runner.batch) == 0  # after the engine's thread is done: no slot leaked


def test_one_hot_greedy_equals_peft_generate(family: Any) -> None:
    _, paths, adapters, _ = family
    ids = adapters.tokenizer.encode(PROMPTS[0])
    rows = adapters.adapters.model.get_output_embeddings().weight.shape[0]
    with Engine(adapters) as engine:
        for name in ("harmless", "concise"):
            peft_model = PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(str(paths.base)),
                str(paths.adapters[name]),
                adapter_name=name,
            ).eval()
            expected = peft_model.generate(
                input_ids=torch.tensor([ids]),
                max_new_tokens=12,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=adapters.tokenizer.pad_token_id,
                suppress_tokens=list(range(adapters.vocab_size, rows)),
            )[0, len(ids) :].tolist()
            got = engine.generate(GenerationRequest(ids, greedy(12), engine.mixture({name: 1})))
            assert got.token_ids == expected, name


def test_fit_on_adapters_equals_fit_on_merged(family: Any) -> None:
    _, _, adapters, merged = family
    options = FitOptions(samples_per_prompt=3, max_new_tokens=4, iterations=60, seed=7)
    with Engine(adapters) as engine:
        got = run_fit(engine, PROMPTS, options)
    with Engine(merged) as engine:
        want = run_fit(engine, PROMPTS, options)
    assert got.mean_reply_tokens == want.mean_reply_tokens  # same replies from the base
    for name in adapters.names:
        assert got.weights[name] == pytest.approx(want.weights[name], abs=1e-4)
    assert got.objective == pytest.approx(want.objective, abs=1e-4)
    assert got.weights != {n: 1 / 3 for n in adapters.names}  # the fit moved


# -- config errors ---------------------------------------------------------------------


def _family_yaml(folder: Path, policies: list[dict[str, Any]], base: str = "base") -> Path:
    path = folder / "family.yaml"
    config = {"base": {"name": "base", "model": base}, "policies": policies, "device": "cpu"}
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two bases of the same shape (``base``, ``other/base``), one smaller (``small/base``),
    and adapters of the first: plain, IA3, DoRA, with trained biases."""
    folder = tmp_path_factory.mktemp("bases")
    make_tiny_family(folder, num_policies=0, seed=1)
    make_tiny_family(folder / "other", num_policies=0, seed=2)
    make_tiny_family(folder / "small", num_policies=0, seed=3, hidden=16)
    base = (folder / "base").resolve()
    make_adapter(base, folder / "plain", "llama", LoraShape(), seed=1)
    make_adapter(base, folder / "dora", "llama", LoraShape(extra={"use_dora": True}), seed=1)
    make_adapter(base, folder / "biased", "llama", LoraShape(extra={"bias": "all"}), seed=1)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(base)),
        IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
    )
    model.save_pretrained(str(folder / "ia3"))
    small = (folder / "small" / "base").resolve()
    make_adapter(small, folder / "small_plain", "llama", LoraShape(), seed=1)
    return folder


@pytest.mark.parametrize(
    ("policy", "base", "message"),
    [
        ({"adapter": "ia3"}, "base", "'p' is a PEFT IA3 adapter, not LoRA"),
        ({"adapter": "dora"}, "base", "'p' uses DoRA"),
        ({"adapter": "biased"}, "base", "'p' trains biases (bias='all')"),
        ({"adapter": "./missing"}, "base", "adapter 'p': path"),
        ({"adapter": "plain"}, "other/base", "adapter 'p' was trained on"),
        ({"adapter": "small_plain", "check_base": False}, "base", "adapter 'p': cannot load"),
    ],
)
def test_config_errors_name_the_adapter(
    bases: Path, policy: dict[str, Any], base: str, message: str
) -> None:
    path = _family_yaml(bases, [{"name": "p", **policy}], base=base)
    with pytest.raises(ConfigError) as info:
        load_policy_set(load_config(path))
    assert message in str(info.value)


def test_the_base_check_can_be_switched_off_for_a_same_shaped_base(bases: Path) -> None:
    path = _family_yaml(
        bases, [{"name": "p", "adapter": "plain", "check_base": False}], "other/base"
    )
    ps = load_policy_set(load_config(path))
    assert ps.names == ["p"] and ps.reference_name == "base"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {
                "base": {"name": "b", "model": "m"},
                "policies": [{"name": "a", "adapter": "x"}, {"name": "c", "model": "y"}],
            },
            "policies ['a'] are adapters and ['c'] are full models",
        ),
        ({"policies": [{"name": "a", "adapter": "x"}]}, "adapter policy 'a' needs"),
        (
            {
                "base": {"name": "b", "model": "m"},
                "reference": {"name": "r", "model": "m"},
                "policies": [{"name": "a", "adapter": "x"}],
            },
            "remove `reference:`",
        ),
        (
            {"base": {"name": "a", "model": "m"}, "policies": [{"name": "a", "adapter": "x"}]},
            "duplicate model name 'a'",
        ),
    ],
)
def test_family_shape_errors(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match="invalid policy-set config") as info:
        parse_config(config)
    assert message in str(info.value)


def test_same_base_rule(tmp_path: Path) -> None:
    cached = tmp_path / "hub" / "models--Org--Base-1B" / "snapshots" / "abc"
    cached.mkdir(parents=True)
    assert same_base(None, "org/base")
    assert same_base("Org/Base", "org/base")  # hub ids are case-insensitive
    assert not same_base("org/other", "org/base")
    assert same_base(str(tmp_path / "hub" / ".." / "hub"), str(tmp_path / "hub"))
    assert not same_base(str(tmp_path), str(tmp_path / "hub"))
    assert same_base("org/base-1b", str(cached))  # the base is that repo in the hub cache
    assert not same_base("org/other", str(cached))
    assert not same_base(str(tmp_path), "org/base")  # a folder is not a hub id


def test_relative_adapter_paths_resolve_against_the_yaml(tmp_path: Path) -> None:
    (tmp_path / "ad").mkdir()
    path = _family_yaml(tmp_path, [{"name": "p", "adapter": "ad"}])
    config = load_config(path)
    assert config.adapter_policies[0].adapter == str((tmp_path / "ad").resolve())
    assert config.is_adapter_family and config.model_policies == []


def test_adapter_family_describes_its_adapters(family: Any) -> None:
    _, paths, adapters, merged = family
    assert isinstance(paths, AdapterFamilyPaths)
    assert adapters.names == merged.names == ["helpful", "harmless", "concise"]
    assert adapters.vocab_size == merged.vocab_size
    assert [a.rank for a in adapters.adapters.adapters] == [4, 8, 2]


def test_hub_adapters_pass_their_revision_to_peft(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, str | None]] = []

    def offline(source: str, revision: str | None = None, **kw: Any) -> Any:
        seen.append((source, revision))
        raise OSError("offline: not in the cache")  # what HF_HUB_OFFLINE=1 gives

    monkeypatch.setattr("mpo_core.models.adapters.PeftConfig.from_pretrained", offline)
    config = parse_config(
        {
            "base": {"name": "b", "model": "org/base"},
            "policies": [{"name": "p", "adapter": "org/p-lora", "revision": "v2"}],
        }
    )
    with pytest.raises(ConfigError, match="adapter 'p': cannot read a PEFT adapter config"):
        load_policy_set(config)
    assert seen == [("org/p-lora", "v2")]
