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

A request may bring personas of its own (``RequestPersonaText``: a name and a system
message or a prefix, checked by ``check_request_personas``). The same rule turns each
into token ids once per distinct text (``PersonaRules``, a bounded cache), and the
request's rows carry them as plain data (``RequestPersona``) to the runner.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import PersonaSpec
from ..errors import ConfigError, InvalidParameter
from ..names import check_name
from ..rules import check_text

__all__ = [
    "MAX_REQUEST_PERSONAS",
    "PersonaPrompts",
    "PersonaRules",
    "RequestPersona",
    "RequestPersonaText",
    "build_persona_prompts",
    "check_request_personas",
    "render_prompt",
]

# The most personas a request may bring, whatever the setting (a runner's slots per request
# are K + 1 + this many).
MAX_REQUEST_PERSONAS = 32
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
        return render_prompt(self.prefix[model], self.strip[model], self.bos_token_id, prompt)


def render_prompt(
    prefix: Sequence[int], strip: Sequence[int], bos: int | None, prompt: Sequence[int]
) -> list[int]:
    """A persona's prompt ids for the request prompt ``prompt`` (the rule above)."""
    ids = list(prompt)
    if strip and ids[: len(strip)] == list(strip):
        return [*prefix, *ids[len(strip) :]]
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


def _persona_rule(tokenizer: Any, spec: PersonaSpec) -> tuple[list[int], list[int]]:
    """(prefix, strip) of one persona, ``system:`` or ``prefix:``."""
    if spec.system is not None:
        return _system_prompt(tokenizer, spec)
    assert spec.prefix is not None
    prefix = list(tokenizer.encode(spec.prefix, add_special_tokens=False))
    if not prefix:
        raise ConfigError(f"persona {spec.name!r}: `prefix:` encodes to no tokens")
    return prefix, []


def build_persona_prompts(
    tokenizer: Any, specs: Sequence[PersonaSpec], reference: str
) -> PersonaPrompts:
    """The prompt rule of every persona in ``specs`` and of the plain model ``reference``."""
    prefixes, strips = [], []
    for spec in specs:
        prefix, strip = _persona_rule(tokenizer, spec)
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


# -- personas a request brings -----------------------------------------------------------


@dataclass(frozen=True)
class RequestPersonaText:
    """A persona a request brings (``personas`` of a request or a stored profile): its
    name and exactly one of a system message or a raw prefix, as the request wrote them."""

    name: str
    system: str | None = None
    prefix: str | None = None

    def wire(self) -> str | dict[str, str]:
        """The request's own form: a system message is a plain string."""
        return self.system if self.system is not None else {"prefix": str(self.prefix)}


@dataclass(frozen=True)
class RequestPersona:
    """What a runner reads of a request's persona: plain data (names and token ids), so
    that it travels to a runner in another process as it is. Model ``K + 1 + i`` of a row
    is its ``personas[i]``; its prompt is ``render_prompt(prefix, strip, bos, prompt)`` and
    its opening (whose KV a runner may keep) is ``prefix``."""

    name: str
    prefix: tuple[int, ...]
    strip: tuple[int, ...]


def check_request_personas(
    raw: object, members: Sequence[str], limit: int
) -> tuple[RequestPersonaText, ...]:
    """``{name: "system message" | {"system": ...} | {"prefix": ...}}`` -> the personas, in
    the request's order. Names follow the name rule and differ from ``members`` (the
    configured policies and the plain model); at most ``limit`` (0: this family runs no
    request personas). InvalidParameter names ``personas`` or ``personas.<name>``."""
    if raw is None or (isinstance(raw, Mapping) and not raw):
        return ()
    if not isinstance(raw, Mapping):
        raise InvalidParameter("personas", f"personas must be an object, got {raw!r}")
    if limit <= 0:
        raise InvalidParameter(
            "personas",
            "this server runs no request personas: they need a persona family (one model "
            "under several system prompts) on a backend with room for them (docs/server.md)",
        )
    if len(raw) > limit:
        raise InvalidParameter(
            "personas", f"a request brings at most {limit} personas, got {len(raw)}"
        )
    out = []
    for name, value in raw.items():
        param = f"personas.{name}" if isinstance(name, str) else "personas"
        check_name(name, "personas", "persona")
        if name in members:
            raise InvalidParameter(
                param,
                f"persona {name!r} clashes with a configured member of the family "
                f"({', '.join(members)}); give it another name",
            )
        out.append(_persona_text(name, value, param))
    return tuple(out)


def _persona_text(name: str, value: object, param: str) -> RequestPersonaText:
    """One persona's text: a string is a system message, else one of system / prefix."""
    if isinstance(value, str):
        value = {"system": value}
    if not isinstance(value, Mapping) or len(value) != 1 or next(iter(value)) not in (
        "system", "prefix"
    ):  # fmt: skip
        raise InvalidParameter(
            param,
            f"{param} must be a system message (a string) or an object with exactly one of "
            f"system or prefix, got {value!r}",
        )
    kind, text = next(iter(value.items()))
    at = f"{param}.{kind}"
    if not isinstance(text, str) or not text:
        raise InvalidParameter(at, f"{at} must be a non-empty string, got {text!r}")
    check_text(text, at)
    return RequestPersonaText(name, **{kind: text})


class PersonaRules:
    """The prompt rule (prefix and strip ids) of request personas, computed once per
    distinct text by the loader's rule and kept for the ``capacity`` most recent texts;
    ``hits`` and ``misses`` count the look-ups. ``room``: the opening tokens the family's
    context limit already leaves (its longest persona's). Any thread may call it."""

    def __init__(self, tokenizer: Any, room: int = 0, capacity: int = 256) -> None:
        self.tokenizer = tokenizer
        self.room = room
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._rules: OrderedDict[tuple[str | None, str | None], tuple[list[int], list[int]]]
        self._rules = OrderedDict()
        self._lock = threading.Lock()

    def of(self, persona: RequestPersonaText) -> RequestPersona:
        """The persona's ids; a text the template cannot use is a 400 naming it."""
        key = (persona.system, persona.prefix)
        with self._lock:
            rule = self._rules.get(key)
            if rule is not None:
                self.hits += 1
                self._rules.move_to_end(key)
        if rule is None:
            spec = PersonaSpec(
                name=persona.name, persona="request", system=persona.system,
                prefix=persona.prefix,
            )  # fmt: skip
            try:
                rule = _persona_rule(self.tokenizer, spec)
            except ConfigError as exc:
                kind = "system" if persona.system is not None else "prefix"
                raise InvalidParameter(f"personas.{persona.name}.{kind}", str(exc)) from None
            with self._lock:
                self.misses += 1
                self._rules[key] = rule
                while len(self._rules) > self.capacity:
                    self._rules.popitem(last=False)
        prefix, strip = rule
        return RequestPersona(persona.name, tuple(prefix), tuple(strip))

    def beyond_room(self, personas: Sequence[RequestPersona]) -> int:
        """How many tokens the longest of ``personas``' openings needs past the room the
        context limit leaves: they count against the request's context."""
        return max([0, *(len(p.prefix) - self.room for p in personas)])
