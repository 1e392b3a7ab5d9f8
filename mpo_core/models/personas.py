"""Persona families: one model, K system prompts (docs/models.md).

A persona is the family's model conditioned on its own system prompt,
``pi_k(y | x) = pi(y | system_k, x)``; the plain model (the conversation as the user
sent it) is the reference. The engine receives token ids, not chat messages, so each
persona's prompt is derived from the request's ids by the rule below, computed once
from the tokenizer at load time (``PersonaPrompts``) and applied by the persona runner
to every slot it prefills and to every sequence it scores:

- a ``system:`` persona: the chat template is rendered for a probe conversation with
  and without the persona's system message; the token ids that differ at the front are
  the plain rendering's own opening ``strip`` (the template's default system block,
  often empty) and the persona's opening ``prefix``. A prompt that starts with ``strip``
  (a chat prompt without a system message of its own) becomes ``prefix`` + the rest:
  exactly the ids of the template rendering the same conversation with the persona's
  system message, which the loader checks on a second probe. Any other prompt (the
  user's own system message, raw text) gets ``prefix`` put in front of it whole.
- a ``prefix:`` persona: its text is tokenized alone (no special tokens added) and its
  ids are put in front of every prompt, chat or raw (a prefix ending in a newline or a
  special token keeps the tokenization of what follows it unchanged).

A leading BOS that both the prefix and the prompt carry is kept once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..config import PersonaSpec
from ..errors import ConfigError

__all__ = ["PersonaPrompts", "build_persona_prompts"]

# Two probe conversations whose user turns share no token with a system prompt.
_PROBES = ("\u2402 probe one \u2403", "\u2402 second probe, longer \u2403")


@dataclass(frozen=True)
class PersonaPrompts:
    """How each model of a persona family sees a prompt: K personas, then the plain model.

    ``strip[m]`` is replaced by ``prefix[m]`` at the front of a prompt (``strip[m]`` empty:
    ``prefix[m]`` is only put in front). ``cached[m]`` is the opening of model m's prompts
    whose KV the runner computes once and reuses (the persona's prefix; for the plain
    model the template's default opening).
    """

    names: list[str]  # K personas, then the reference
    prefix: list[list[int]]
    strip: list[list[int]]
    cached: list[list[int]]
    bos_token_id: int | None = None

    @property
    def models(self) -> int:
        return len(self.names)

    @property
    def longest_extra(self) -> int:
        """The most tokens a persona's prompt can have beyond the request's own prompt."""
        return max(len(p) for p in self.prefix)

    def render(self, model: int, prompt: Sequence[int]) -> list[int]:
        """Model ``model``'s prompt ids for the request prompt ``prompt``."""
        prefix, strip = self.prefix[model], self.strip[model]
        ids = list(prompt)
        if strip and ids[: len(strip)] == strip:
            return [*prefix, *ids[len(strip) :]]
        bos = self.bos_token_id
        if bos is not None and prefix and ids and prefix[0] == bos and ids[0] == bos:
            ids = ids[1:]
        return [*prefix, *ids]


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The ids of a rendered conversation, encoded as the chat route encodes it."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(str(text), add_special_tokens=False))


def common_suffix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens ``a`` and ``b`` share at their ends."""
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def _system_prompt(tokenizer: Any, spec: PersonaSpec) -> tuple[list[int], list[int]]:
    """(prefix, strip) of a ``system:`` persona, checked on a second probe."""
    assert spec.system is not None
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"persona {spec.name!r}: `system:` needs a tokenizer with a chat template, and "
            "this model has none; give the persona a raw `prefix:` text instead"
        )
    system = {"role": "system", "content": spec.system}
    pairs = []
    try:
        for probe in _PROBES:
            user = {"role": "user", "content": probe}
            pairs.append((_chat_ids(tokenizer, [system, user]), _chat_ids(tokenizer, [user])))
    except Exception as exc:  # jinja: a template that refuses system messages
        raise ConfigError(
            f"persona {spec.name!r}: the chat template cannot render a system message "
            f"({exc}); give the persona a raw `prefix:` text instead"
        ) from None
    with_system, plain = pairs[0]
    common = common_suffix(with_system, plain)
    prefix, strip = with_system[: len(with_system) - common], plain[: len(plain) - common]
    other_system, other_plain = pairs[1]
    mapped = [*prefix, *other_plain[len(strip) :]] if other_plain[: len(strip)] == strip else None
    if not prefix or mapped != other_system:
        raise ConfigError(
            f"persona {spec.name!r}: the chat template does not render the system message as "
            "an opening that the rest of the conversation follows unchanged; give the "
            "persona a raw `prefix:` text instead"
        )
    return prefix, strip


def build_persona_prompts(
    tokenizer: Any, specs: Sequence[PersonaSpec], reference: str
) -> PersonaPrompts:
    """The prompt rule of every persona in ``specs`` and of the plain model ``reference``."""
    prefixes, strips = [], []
    for spec in specs:
        if spec.system is not None:
            prefix, strip = _system_prompt(tokenizer, spec)
        else:
            assert spec.prefix is not None
            prefix = list(tokenizer.encode(spec.prefix, add_special_tokens=False))
            strip = []
            if not prefix:
                raise ConfigError(f"persona {spec.name!r}: `prefix:` encodes to no tokens")
        prefixes.append(prefix)
        strips.append(strip)
    # The plain model's own opening: the template's default system block, if any.
    default = max(strips, key=len)  # each is an opening of the plain rendering
    bos = getattr(tokenizer, "bos_token_id", None)
    return PersonaPrompts(
        names=[*(s.name for s in specs), reference],
        prefix=[*prefixes, []],
        strip=[*strips, []],
        cached=[*prefixes, default],
        bos_token_id=int(bos) if isinstance(bos, int) else None,
    )
