"""The embedded demo family: the build (small variant), its cache, and the scorers."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from mpo_core.config import load_config
from mpo_core.demo import RECIPES, SCORERS, build_demo, corpus, family_dir, pipeline, train
from mpo_core.demo import build as demo_build
from mpo_core.demo.recipe import ModelShape
from mpo_core.demo.tokenizer import encode_prompt
from mpo_core.errors import InvalidParameter
from mpo_core.testing.families import make_tokenizer

NAMES = ("polite", "concise", "upbeat")


@pytest.fixture(scope="module")
def small_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mpo_home")


@pytest.fixture(scope="module")
def small_family(small_home: Path) -> Path:
    return build_demo(home=small_home, variant="small", seed=0, progress=False)


# -- the build ---------------------------------------------------------------------------


def test_yaml_names_and_relative_paths(small_family: Path) -> None:
    raw = yaml.safe_load(small_family.read_text())
    assert raw["served_name"] == "mpo"
    assert raw["reference"] == {"name": "base", "model": "base"}
    assert [p["name"] for p in raw["policies"]] == list(NAMES)
    assert all(not Path(p["model"]).is_absolute() for p in raw["policies"])

    config = load_config(small_family)
    assert config.policy_names == list(NAMES)
    assert config.reference is not None and config.reference.name == "base"
    assert Path(config.reference.model) == (small_family.parent / "base").resolve()


@pytest.mark.parametrize("name", ["base", *NAMES])
def test_each_folder_loads_alone(small_family: Path, name: str) -> None:
    folder = small_family.parent / name
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer)
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        assert getattr(model.config, key) == getattr(tokenizer, key) is not None
        assert getattr(model.generation_config, key) == getattr(tokenizer, key)


def test_chat_template(small_family: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(small_family.parent / "polite")
    messages = [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "How do I cook rice?"},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|bos|><|system|>Be nice.<|end|><|user|>How do I cook rice?<|end|><|assistant|>"
    without = tokenizer.apply_chat_template(messages, tokenize=False)
    assert isinstance(without, str) and not without.endswith("<|assistant|>")
    encoded = tokenizer.apply_chat_template(messages[1:], add_generation_prompt=True)
    ids: list[int] = encoded if isinstance(encoded, list) else encoded["input_ids"]  # type: ignore[assignment,index]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids) == "<|bos|><|user|>How do I cook rice?<|end|><|assistant|>"
    # byte-level: text the corpus never contains still round-trips
    odd = "Grüße, 東京! 🙂"
    assert tokenizer.decode(tokenizer.encode(odd, add_special_tokens=False)) == odd


# The smallest recipe found whose fine-tunes measurably move towards their rewards: the
# "small" variant's reference never learns the corpus's grammar (its replies carry no tone
# phrases to re-weight), so its fine-tunes score the same as the reference. This one builds
# in about 30 s on one thread (docs/demo.md); the full variant takes 75 s or more.
CI_RECIPE = dataclasses.replace(
    RECIPES["small"],
    shape=ModelShape(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2),
    vocab_size=1280,
    ref_steps=200,
    ref_lr=5e-3,
    samples_per_prompt=4,
    max_new_tokens=40,
    ft_steps=30,
    ft_batch=16,
    ft_lr=1.5e-3,
)


@pytest.fixture(scope="module")
def ci_family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ci_family") / "family"
    pipeline.build_family(out, CI_RECIPE, "ci", seed=0, progress=False, recipe_version="test")
    return out


@pytest.mark.slow  # builds and samples the CI recipe (about 30 s)
def test_each_policy_beats_the_reference_on_its_own_objective(ci_family: Path) -> None:
    """192 sampled replies to the held-out prompts per model, scored by every scorer."""
    tokenizer = AutoTokenizer.from_pretrained(ci_family / "base")
    prompt_ids = [encode_prompt(tokenizer, p.text) for p in corpus.heldout_prompts()]

    def mean_scores(name: str) -> dict[str, float]:
        model = AutoModelForCausalLM.from_pretrained(ci_family / name)
        torch.manual_seed(1)  # the same sampling randomness for every model
        groups = train.sample_replies(
            model, tokenizer, prompt_ids, per_prompt=8, max_new_tokens=40, batch_prompts=32
        )
        texts = [t for group in groups for t in tokenizer.batch_decode(group, True)]
        return {k: sum(map(scorer, texts)) / len(texts) for k, scorer in SCORERS.items()}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is ~10x faster on a busy 2-core box
    try:
        reference = mean_scores("base")
        own = {name: mean_scores(name)[name] for name in NAMES}
    finally:
        torch.set_num_threads(threads)
    for name in NAMES:
        # seed 0 measured margins of +0.37, +0.22 and +0.32; a standard error is ~0.04
        assert own[name] > reference[name] + 0.1, (name, own, reference)


# -- the cache ---------------------------------------------------------------------------


def test_second_call_hits_cache(
    small_home: Path, small_family: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mtime = small_family.stat().st_mtime_ns

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached family was built again")

    monkeypatch.setattr(demo_build, "_build_family", no_build)
    again = build_demo(home=small_home, variant="small", seed=0, progress=False)
    assert again == small_family
    assert again.stat().st_mtime_ns == mtime


def test_home_from_environment(
    small_home: Path, small_family: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MPO_HOME", str(small_home))
    assert build_demo(variant="small", progress=False) == small_family


def test_recipe_version_and_seed_change_the_folder(
    small_home: Path, small_family: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert family_dir(small_home, "small", 0) == small_family.parent
    assert family_dir(small_home, "small", 1) != small_family.parent
    assert family_dir(small_home, "full", 0) != small_family.parent
    monkeypatch.setattr(demo_build, "RECIPE_VERSION", "test-bumped")
    assert family_dir(small_home, "small", 0) != small_family.parent


def test_no_half_built_family_is_left(small_home: Path, small_family: Path) -> None:
    leftovers = [p.name for p in small_family.parent.parent.iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []
    for name in ["base", *NAMES]:
        assert (small_family.parent / name / "model.safetensors").is_file()


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(demo_build, "_build_family", explode)
    with pytest.raises(RuntimeError, match="boom"):
        build_demo(home=tmp_path, variant="small", progress=False)
    assert [p.name for p in (tmp_path / "demo").iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.slow  # two processes, each importing torch and building
def test_concurrent_builders_share_one_build(tmp_path: Path) -> None:
    """Two processes asking at once: one builds under the lock, the other waits for it."""
    code = (
        "import sys; from mpo_core.demo import build_demo; "
        "print(build_demo(home=sys.argv[1], variant='small', seed=3, progress=False))"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, env=env, text=True
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=300)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert outputs[0] == outputs[1]
    assert Path(outputs[0]).is_file()
    families = [p for p in (tmp_path / "demo").iterdir() if not p.name.endswith(".lock")]
    assert families == [Path(outputs[0]).parent]


def test_invalid_variant(tmp_path: Path) -> None:
    with pytest.raises(InvalidParameter) as info:
        build_demo(home=tmp_path, variant="huge")
    assert info.value.param == "variant"
    assert "huge" in info.value.message
    assert not (tmp_path / "demo").exists()


def test_invalid_seed(tmp_path: Path) -> None:
    with pytest.raises(InvalidParameter) as info:
        build_demo(home=tmp_path, variant="small", seed=-1)
    assert info.value.param == "seed"


def test_deterministic_for_a_seed(tmp_path: Path, small_family: Path) -> None:
    other = build_demo(home=tmp_path, variant="small", seed=0, progress=False)
    a = AutoModelForCausalLM.from_pretrained(small_family.parent / "upbeat")
    b = AutoModelForCausalLM.from_pretrained(other.parent / "upbeat")
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


# -- the corpus and the scorers ------------------------------------------------------------


def test_heldout_prompts_are_disjoint_from_training() -> None:
    train = {p.text for p in corpus.train_prompts()}
    heldout = {p.text for p in corpus.heldout_prompts()}
    assert len(heldout) >= 20
    assert not train & heldout
    import random

    dialogues = corpus.sample_dialogues(500, random.Random(0))
    assert all(request in train for request, _ in dialogues)


def test_scorers_are_documented() -> None:
    assert set(SCORERS) == set(NAMES)
    for scorer in SCORERS.values():
        assert scorer.__doc__ and "[" in scorer.__doc__  # states its range


def test_polite_scorer() -> None:
    polite = SCORERS["polite"]
    nice = "Of course, happy to help. Please water them once a week. Thanks for asking."
    plain = "Water them once a week."
    rude = "Well, obviously. Just water them. Figure out the rest yourself."
    assert polite(nice) > polite(plain) > polite(rude)
    assert polite(nice) == 1.0 and polite(plain) == 0.0 and polite(rude) == -1.0


def test_concise_scorer() -> None:
    concise = SCORERS["concise"]
    short = "Water them once a week."
    long = " ".join(["Water them once a week, and give them plenty of light."] * 3)
    assert concise(short) == 1.0
    assert 0.0 <= concise(long) < concise("Water them once a week, and give them light.") < 1.0
    assert concise("") == 0.0


def test_upbeat_scorer() -> None:
    upbeat = SCORERS["upbeat"]
    happy = "Great question! It is really fun! Good luck, you've got this!"
    flat = "Water them once a week."
    gloomy = "Sorry, this can be tricky. Unfortunately, it takes a long time."
    assert upbeat(happy) == 1.0 and upbeat(flat) == 0.0 and upbeat(gloomy) == -1.0


def test_scorers_pull_against_each_other() -> None:
    warm = "Of course, I would be happy to help. Water them once a week. Hope this helps!"
    curt = "Water them."
    assert SCORERS["polite"](warm) > SCORERS["polite"](curt)
    assert SCORERS["concise"](warm) < SCORERS["concise"](curt)
    apology = "Sorry, this can be tricky. Water them once a week."
    assert SCORERS["polite"](apology) > 0 > SCORERS["upbeat"](apology)


def test_scorers_match_whole_words() -> None:
    assert SCORERS["upbeat"]("A funnel.") == 0.0  # "fun" inside a word
    assert SCORERS["polite"]("Adjust the pleased cat.") == 0.0


# -- through the engine ---------------------------------------------------------------------


def test_engine_generates_from_the_small_family(small_family: Path) -> None:
    from mpo_core.decoding.sampling import SamplingParams
    from mpo_core.engine.core import Engine, GenerationRequest
    from mpo_core.runners import load_policy_set

    policy_set = load_policy_set(load_config(small_family))
    assert policy_set.names == list(NAMES)
    assert policy_set.reference_name == "base"
    tokenizer = policy_set.tokenizer
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": corpus.heldout_prompts()[0].text}],
        add_generation_prompt=True,
        tokenize=False,
    )
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    with Engine(policy_set) as engine:
        for weights, strength in [({"polite": 1.0}, 1.0), (None, 1.0), (None, 0.0)]:
            result = engine.generate(
                GenerationRequest(
                    prompt_ids=prompt_ids,
                    sampling=SamplingParams(max_new_tokens=12, seed=1),
                    mixture=engine.mixture(weights, strength),
                )
            )
            assert 1 <= len(result.token_ids) <= 12
            assert result.finish_reason in ("length", "eos_token")
            assert result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True)


# -- the training target: reward-weighted regression towards pi_ref exp(r / beta) -------------


def test_tilted_weights_are_exp_reward_over_beta_per_prompt() -> None:
    rewards = torch.tensor([[0.0, 1.0, -1.0, 0.5], [0.2, -0.4, 0.9, 0.7]])  # [P, m]
    finished = torch.tensor([[True, True, True, False], [True, True, True, True]])
    beta = 0.5
    probs = train.tilted_sample_probs(rewards, finished, beta).view(2, 4)  # [P, m]
    assert probs[0, 3] == 0  # cut at the token limit: no weight
    assert probs.sum(dim=1).tolist() == pytest.approx([0.5, 0.5])  # equal mass per prompt
    for row in range(2):
        done = finished[row]
        expected = 0.5 * torch.softmax(rewards[row][done] / beta, dim=0)
        assert torch.allclose(probs[row][done], expected)
        # a higher reward gets a higher weight, by exp(delta r / beta)
        order = rewards[row][done].argsort()
        assert bool((probs[row][done][order].diff() > 0).all())
    assert probs[0, 1] / probs[0, 0] == pytest.approx(math.exp(1.0 / beta))


def test_reply_rewards_are_the_scorers_values() -> None:
    texts = [["Thank you, please let me know.", "Obviously. Just do it."], ["Water them.", ""]]
    rewards = train.score_replies(texts, SCORERS["polite"])  # [P, m]
    assert rewards.tolist() == [[1.0, -1.0], [0.0, 0.0]]


def test_reward_weighted_training_raises_the_likelihood_of_rewarded_replies() -> None:
    """Two replies to one prompt, rewards +1 and -1: training moves mass to the first."""
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    model = train.make_model(tokenizer, ModelShape(32, 64, num_layers=1, num_heads=2))
    prompt = tokenizer.encode("Could you help me?")
    good, bad = tokenizer.encode(" Sure, happy to help."), tokenizer.encode(" Figure it out.")
    pool = [(prompt + good, len(prompt)), (prompt + bad, len(prompt))]
    rewards, finished = torch.tensor([[1.0, -1.0]]), torch.tensor([[True, True]])  # [1, 2]
    probs = train.tilted_sample_probs(rewards, finished, beta=0.2)

    def reply_logprob(ids: list[int], start: int) -> float:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)  # [S - 1, V]
        targets = torch.tensor(ids[1:])
        return float(logits[torch.arange(len(targets)), targets][start - 1 :].sum())

    before = [reply_logprob(*example) for example in pool]
    train.train_lm(
        model,
        pool,
        steps=20,
        batch_size=4,
        lr=1e-2,
        pad_id=tokenizer.pad_token_id,
        generator=torch.Generator().manual_seed(0),
        sample_probs=probs,
    )
    after = [reply_logprob(*example) for example in pool]
    assert after[0] - before[0] > 1.0  # the rewarded reply became much more likely
    assert after[0] - after[1] > before[0] - before[1] + 1.0  # relative to the other
