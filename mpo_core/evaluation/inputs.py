"""Reading an evaluation's prompt set: a text file (one prompt a line) or JSONL."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from ``path``: ``.jsonl`` lines with a ``prompt`` field, else one a line.

    Blank lines are skipped; a JSONL line without a non-empty string ``prompt`` is an
    error naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompts file {str(path)!r} does not exist")
    lines = path.read_text().splitlines()
    if path.suffix != ".jsonl":
        prompts = [line.strip() for line in lines if line.strip()]
    else:
        prompts = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{number}: not valid JSON: {exc}") from None
            prompt = record.get("prompt") if isinstance(record, dict) else None
            if not isinstance(prompt, str) or not prompt.strip():
                raise ConfigError(f"{path}:{number}: needs a non-empty string field 'prompt'")
            prompts.append(prompt.strip())
    if not prompts:
        raise ConfigError(f"prompts file {str(path)!r} has no prompts")
    return prompts
