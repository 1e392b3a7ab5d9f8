"""Constrained decoding: a per-request grammar masks the mixture's next-token log-probs.

A request may carry a grammar (a JSON schema, any JSON object, or a regular expression).
It is compiled once when the request arrives, off the engine thread (``GrammarCompiler``);
each sequence then holds its own matcher (``RowGrammar``), which says after every token
which tokens may come next. Inside a step, the rows with grammars have every other token
set to -inf in the **mixed** log-probs, after mixing and before the sampling processors
(``constrain``); rows without a grammar are left exactly as they were. EOS is allowed only
where the grammar accepts the text so far; once the grammar is complete, EOS is the only
token left. After sampling each matcher takes its row's token (``advance``).

The library is llguidance: no dependencies of its own (xgrammar pulls triton and a TVM
runtime, a heavy install for a CPU machine), errors reported as a matcher state rather
than exceptions, and masks for draft tokens should speculative decoding verify against a
grammar later. Its mask fill is slower than xgrammar's, but both are a small share of a
step (bench/grammar.py measures both).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import llguidance
import llguidance.hf
import torch

from ..errors import InvalidParameter

logger = logging.getLogger(__name__)

GrammarKind = Literal["json_schema", "json_object", "regex"]
# JSON is written compactly, with Python's separators: no free whitespace between tokens
# (a flexible-whitespace grammar lets a model pad the reply with newlines until it runs
# out of tokens). A schema's own "x-guidance" options override these.
JSON_OPTIONS: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class GrammarSpec:
    """What a request asks for, and the request parameter it came from (for errors)."""

    kind: GrammarKind
    value: Any = None  # the JSON schema (dict or JSON text), or the regex; None: json_object
    param: str = "grammar"


@dataclass(frozen=True)
class Grammar:
    """A grammar checked against the tokenizer: every sequence makes its own matcher."""

    spec: GrammarSpec
    source: str  # llguidance's grammar text
    prototype: Any  # an llguidance.LLMatcher at the start, never advanced

    def matcher(self) -> RowGrammar:
        # A copy of the prototype costs microseconds; building a matcher from the source
        # re-parses the grammar (a millisecond for a small schema), which would stall the
        # thread that submits (the server's event loop).
        return RowGrammar(self.prototype.deep_copy())


class RowGrammar:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def advance(self, token: int) -> None:
        # A token the mask allowed is always accepted; a refused one puts the matcher in
        # its error state, whose mask is empty: the row then fails (``error``).
        self.matcher.consume_token(token)

    @property
    def error(self) -> str:
        return str(self.matcher.get_error()) if self.matcher.is_error() else ""


def grammar_source(spec: GrammarSpec) -> str:
    """llguidance's grammar text for a spec; InvalidParameter names ``spec.param``."""
    if spec.kind == "regex":
        if not isinstance(spec.value, str) or not spec.value:
            raise InvalidParameter(spec.param, "a regex grammar needs a non-empty string")
        return str(llguidance.LLMatcher.grammar_from_regex(spec.value))
    schema: Any = {"type": "object"} if spec.kind == "json_object" else spec.value
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise InvalidParameter(
                spec.param, f"the JSON schema is not valid JSON: {exc}"
            ) from None
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise InvalidParameter(spec.param, "a JSON schema must be a JSON object")
    try:
        return str(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS))
    except (ValueError, TypeError) as exc:
        raise InvalidParameter(spec.param, f"the JSON schema cannot be compiled: {exc}") from None


class GrammarCompiler:
    """Compiles grammars for one tokenizer; safe to call from any thread."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self.hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> Any:
        """llguidance's view of the tokenizer (about a second for a large vocabulary: once)."""
        with self._lock:
            if self._tokenizer is None:
                eos: Any = self.eos_token_ids or None
                self._tokenizer = llguidance.hf.from_tokenizer(
                    self.hf_tokenizer, n_vocab=self.vocab_size, eos_token=eos
                )
            return self._tokenizer

    def compile(self, spec: GrammarSpec) -> Grammar:
        source = grammar_source(spec)
        tokenizer = self.tokenizer
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(source, tokenizer)
        if is_error:
            what = "regex" if spec.kind == "regex" else "JSON schema"
            detail = messages[0] if messages else "unknown error"
            raise InvalidParameter(spec.param, f"the {what} cannot be compiled: {detail}")
        return Grammar(spec, source, llguidance.LLMatcher(tokenizer, source, log_level=0))


def allowed_tokens(
    grammars: Sequence[RowGrammar], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """Each grammar's next-token mask: [G, V] bool on ``device``.

    The masks are filled one row after another on the calling (engine) thread.
    llguidance's parallel executor hands the rows to worker threads instead; at c = 16 on
    the demo family that hand-off cost several times the fill itself (bench/grammar.py;
    docs/server.md has the figures), since the workers sleep through each forward.
    """
    words = (vocab_size + 31) // 32
    bitmask = torch.zeros(len(grammars), words, dtype=torch.int32)  # [G, W] 32 tokens a word
    start, row_bytes = bitmask.data_ptr(), words * 4
    for row, grammar in enumerate(grammars):
        grammar.matcher.unsafe_compute_mask_ptr(start + row * row_bytes, row_bytes)
    bitmask = bitmask.to(device, non_blocking=True)
    shifts = torch.arange(32, device=device, dtype=torch.int32)  # [32]
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [G, W, 32] token 32 w + b
    return bits.reshape(len(grammars), words * 32)[:, :vocab_size].bool()  # [G, V]


def constrain(
    logprobs: torch.Tensor,  # [B, V] mixed log-probs
    grammars: Sequence[RowGrammar | None],
) -> torch.Tensor:
    """Rows with a grammar keep only the tokens it allows (-inf elsewhere); the others,
    and the input tensor itself, are unchanged. Returns ``logprobs`` when no row has one."""
    rows = [row for row, grammar in enumerate(grammars) if grammar is not None]
    if not rows:
        return logprobs
    active = [g for g in grammars if g is not None]
    allowed = allowed_tokens(active, logprobs.shape[-1], logprobs.device)  # [G, V]
    index = torch.tensor(rows, device=logprobs.device)  # [G]
    out = logprobs.clone()  # [B, V]
    out[index] = logprobs[index].masked_fill(~allowed, -torch.inf)
    return out


def advance(grammars: Sequence[RowGrammar | None], tokens: torch.Tensor) -> None:
    """Feed each row's sampled token (``tokens`` [B]) to its grammar."""
    if all(grammar is None for grammar in grammars):
        return
    for grammar, token in zip(grammars, tokens.tolist()):
        if grammar is not None:
            grammar.advance(token)
