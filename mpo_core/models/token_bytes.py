"""The exact bytes of every token, from the tokenizer's own byte mapping.

Decoding one token alone gives U+FFFD for any token that holds part of a multi-byte
character (every emoji and CJK character in GPT-2, Llama-3 or SmolLM2 style vocabularies),
so the reported ``bytes`` of such a token must come from the vocabulary itself:

- byte-level BPE (GPT-2 style: a ``ByteLevel`` decoder): each character of a token's
  string stands for one byte through GPT-2's printable-byte table; invert that table;
- byte-fallback tokens (SentencePiece style, ``<0xNN>``): the raw byte NN; the decoder's
  ``Replace`` rules (``▁`` for a space) apply to the other tokens;
- anything else, and added/special tokens: the UTF-8 of the token decoded alone.

Joining the bytes of a reply's tokens gives the reply's UTF-8 exactly (the text a
detokeniser produces, before stop strings cut it).
"""

from __future__ import annotations

import codecs
import json
import logging
import re
from functools import lru_cache
from typing import Any

logger = logging.getLogger(__name__)

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def byte_level_decoder() -> dict[str, int]:
    """GPT-2's table, inverted: the printable character that stands for each byte -> byte.

    Bytes that are printable Latin-1 characters stand for themselves; the 68 others
    (controls, space, soft hyphen, ...) are moved, in byte order, to 256 and up.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {chr(b): b for b in printable}
    moved = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + moved)] = b
            moved += 1
    return table


def _decoder_steps(tokenizer: Any) -> list[dict[str, Any]]:
    """The fast tokenizer's decoder pipeline as JSON dicts ([] if there is none)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return []
    try:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
    except (ValueError, AttributeError):
        return []
    if decoder.get("type") == "Sequence":
        return list(decoder.get("decoders") or [])
    return [decoder] if decoder else []


class TokenBytes:
    """``bytes_of(token_id)``: one table per tokenizer, built on first use."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._table: list[bytes] | None = None

    def bytes_of(self, token_id: int) -> bytes:
        if self._table is None:
            self._table = self._build()
        return self._table[token_id]

    def _build(self) -> list[bytes]:
        steps = _decoder_steps(self.tokenizer)
        kinds = {str(step.get("type")) for step in steps}
        replaces = [
            (str(step["pattern"].get("String", "")), str(step.get("content", "")))
            for step in steps
            if step.get("type") == "Replace" and isinstance(step.get("pattern"), dict)
        ]
        if "Metaspace" in kinds:
            replaces.append(("▁", " "))
        added = set(getattr(self.tokenizer, "added_tokens_decoder", {}) or {})
        pieces = self.tokenizer.convert_ids_to_tokens(list(range(self.vocab_size)))
        byte_level = byte_level_decoder() if "ByteLevel" in kinds else None
        table = []
        for token_id, piece in enumerate(pieces):
            if token_id in added or piece is None:
                table.append(self._decoded_alone(token_id))
            elif byte_level is not None:
                table.append(self._byte_level(token_id, piece, byte_level))
            elif "ByteFallback" in kinds and (hit := _BYTE_FALLBACK.match(piece)):
                table.append(bytes([int(hit.group(1), 16)]))
            elif replaces or "ByteFallback" in kinds:
                for pattern, content in replaces:
                    piece = piece.replace(pattern, content)
                table.append(piece.encode("utf-8"))
            else:
                table.append(self._decoded_alone(token_id))
        logger.debug("token byte table: %d tokens, decoder steps %s", len(table), sorted(kinds))
        return table

    def _byte_level(self, token_id: int, piece: str, table: dict[str, int]) -> bytes:
        try:
            return bytes(table[ch] for ch in piece)
        except KeyError:  # a character outside the byte table: not a byte-level piece
            return self._decoded_alone(token_id)

    def _decoded_alone(self, token_id: int) -> bytes:
        text: str = self.tokenizer.decode([token_id])
        return text.encode("utf-8")


class TokenPieces:
    """A reply's token bytes turned back into text one token at a time.

    The text of a token is the characters its bytes complete: a token holding the first
    bytes of an emoji has the text "" and the token that finishes it has the emoji, so the
    tokens' texts join to the reply's text (TGI's ``details.tokens[].text``).
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, data: bytes, final: bool = False) -> str:
        text: str = self._decoder.decode(data, final=final)
        return text
