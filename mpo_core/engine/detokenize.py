"""A reply's text as its tokens arrive: what may be sent now, and where a stop string cut it.

Two things hold text back from a stream: a trailing incomplete UTF-8 character (byte-level
tokenizers split characters across tokens; its bytes decode to U+FFFD until complete)
and a suffix that may still grow into a stop string. A stop string found in the text
ends the reply just before it; the stop string itself is never sent.

Each token decodes a short window, not the whole reply: the text of the tokens already
settled is kept, and the newest tokens are decoded together with the last settled
one(s) as context (tokenizers that drop a word's leading space at the start of a decode
would otherwise glue words together), then the context's own text is cut off the front.
The window moves on once its text no longer ends in an incomplete character.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..models.token_bytes import TokenBytes, TokenPieces
from .streams import TokenEvent


class ReplyText:
    """Incremental detokenisation of one reply, with stop strings."""

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.text = ""  # the reply decoded so far
        self.emitted = 0  # characters of ``text`` already sent
        self.stop_at: int | None = None  # where a stop string begins in ``text``, once found
        self._settled = ""  # the text of token_ids[: self._read]
        self._context = 0  # the window starts here: the tokens before _read give context
        self._read = 0
        self._context_text = ""  # token_ids[_context:_read] decoded alone

    def _decode(self, token_ids: list[int]) -> str:
        text: str = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return text

    def update(self, token_ids: list[int]) -> None:
        """Take the reply's tokens so far (nothing changes once a stop string was found)."""
        if self.stop_at is not None:
            return
        window = self._decode(token_ids[self._context :])
        if not window.startswith(self._context_text):
            # The tokenizer's clean-up rewrote the context inside the window: decode the
            # whole reply this time.
            self.text = self._decode(token_ids)
            return
        tail = window[len(self._context_text) :]
        self.text = self._settled + tail
        if not tail.endswith("\ufffd"):  # complete: settle it and move the window on
            self._settled = self.text
            self._context, self._read = self._read, len(token_ids)
            self._context_text = self._decode(token_ids[self._context : self._read])

    def find_stop(self) -> bool:
        """Look for a stop string in the text not yet sent; remember where it starts."""
        if not self.stops:
            return False
        start = max(0, self.emitted - max(len(s) for s in self.stops))
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.stop_at = min(hits)
        return bool(hits)

    def take(self, final: bool) -> str:
        """Text to send now; with ``final`` everything up to the end (or the stop string)."""
        text = self.text if self.stop_at is None else self.text[: self.stop_at]
        if final:
            end = len(text)
        elif text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its bytes
            return ""
        else:
            end = len(text) - stop_prefix_len(text, self.stops)
        new = text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return new


class TokenTexts:
    """Each token decoded alone, cached, and its exact bytes (``token_bytes``): one per
    engine, shared by all its streams (reported alternatives use it too). Entries are only
    ever added, so readers on several threads need no lock: at worst two of them decode the
    same token once each."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}
        self._bytes = TokenBytes(tokenizer, vocab_size)

    def __call__(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = str(self.tokenizer.decode([token]))
        return text

    def bytes_of(self, token: int) -> bytes:
        return self._bytes.bytes_of(token)


class ReplyReader:
    """The consumer's side of one stream: fills in each event's text as it is read.

    The engine thread sends token ids and finish reasons only; detokenising and matching
    stop strings happen here, on the thread that reads the stream (the server's event loop),
    as vLLM's output processor does them outside its engine core. A stop string found ends
    the reply at the event that completed it (``stop_sequence``); the stream then cancels
    the sequence, which leaves the batch at the engine's next step.
    """

    def __init__(self, tokenizer: Any, stops: list[str], token_text: Callable[[int], str]) -> None:
        self.reply = ReplyText(tokenizer, stops)
        self.token_text = token_text
        self.generated: list[int] = []  # the reply's token ids read so far
        self.pieces = TokenPieces()  # token bytes -> the characters each completes

    def read(self, event: TokenEvent) -> TokenEvent:
        """``event`` with its text; its finish reason is ``stop_sequence`` at a stop string."""
        if event.token_id < 0:  # a closing event without a token (cancelled)
            return event
        self.generated.append(event.token_id)
        self.reply.update(self.generated)
        if self.reply.find_stop():
            event.finish_reason = "stop_sequence"
        final = event.finish_reason is not None
        event.token_text = self.token_text(event.token_id)
        event.text = self.reply.take(final=final)
        # A special token's piece is its own text, not part of the reply's characters.
        event.token_piece = (
            event.token_text if event.special else self.pieces.push(event.token_bytes, final)
        )
        return event


def stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that begins some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
