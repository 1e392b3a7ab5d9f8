"""Persona prompts in a policy-set config meet the text rule: a lone surrogate (which a
YAML double-quoted ``"\\ud800"`` makes) is a config error naming the persona's field."""

from __future__ import annotations

import pytest

from mpo_core.config import parse_config
from mpo_core.errors import ConfigError


@pytest.mark.parametrize("field", ["system", "prefix"])
def test_a_persona_prompt_that_is_not_unicode_text_is_a_config_error(field: str) -> None:
    policies = [
        {"name": "cheerful", "persona": "base", field: "Be cheerful \ud800"},
        {"name": "brief", "persona": "base", "system": "Be brief."},
    ]
    raw = {"served_name": "p", "policies": policies, "reference": {"name": "base", "model": "m"}}
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    message = str(err.value)
    assert f"policy 'cheerful': `persona.{field}`" in message and "unicode" in message.lower()
