"""Incremental reply text: hold-backs for partial characters and partial stop strings."""

from mpo_core.engine.detokenize import ReplyText, stop_prefix_len


class PieceTokenizer:
    """Token id i decodes to pieces[i]; joined pieces are the text (bytes for 'partial')."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def stream(pieces: list[bytes], stops: list[str]) -> tuple[list[str], ReplyText]:
    reply = ReplyText(PieceTokenizer(pieces), stops)
    sent = []
    for n in range(1, len(pieces) + 1):
        reply.update(list(range(n)))
        stopped = reply.find_stop()
        sent.append(reply.take(final=stopped or n == len(pieces)))
        if stopped:
            break
    return sent, reply


def test_partial_utf8_is_held_until_complete():
    e_acute = "é".encode()
    sent, _ = stream([b"caf", e_acute[:1], e_acute[1:], b"!"], [])
    assert sent == ["caf", "", "é", "!"]


def test_a_stop_string_across_tokens_is_cut_and_never_sent():
    sent, reply = stream([b"Hello wo", b"rld, E", b"ND here", b" more"], ["END"])
    assert "".join(sent) == "Hello world, "
    assert sent[1] == "rld, "  # "E" is held back: it may start "END"
    assert reply.stop_at == len("Hello world, ")


def test_held_back_prefix_is_released_when_it_does_not_become_a_stop():
    sent, _ = stream([b"a E", b"x", b"."], ["END"])
    assert sent == ["a ", "Ex", "."]


def test_stop_prefix_len():
    assert stop_prefix_len("abcEN", ["END", "xyz"]) == 2
    assert stop_prefix_len("abc", ["END"]) == 0
    assert stop_prefix_len("abcx", ["END", "xy"]) == 1


class CountingTokenizer:
    """Wraps a tokenizer; records how many ids each decode call was given."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.lengths: list[int] = []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.lengths.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def _stream_all(tokenizer, ids: list[int]) -> str:
    reply = ReplyText(tokenizer, [])
    sent = []
    for n in range(1, len(ids) + 1):
        reply.update(ids[:n])
        sent.append(reply.take(final=n == len(ids)))
    return "".join(sent)


def test_streamed_text_equals_the_whole_decode_and_each_decode_is_short():
    from mpo_core.testing.families import make_tokenizer

    tok = make_tokenizer()
    text = "Thanks so much! Café au lait, naïve façade, 東京 and 🙂 emoji. " * 12
    ids = tok.encode(text, add_special_tokens=False)
    counting = CountingTokenizer(tok)
    assert _stream_all(counting, ids) == tok.decode(ids, skip_special_tokens=True)
    assert len(ids) > 300
    # a window of a few tokens (longer only while a character is split), never the reply
    assert max(counting.lengths) <= 8


class LeadingSpaceDroppingTokenizer(PieceTokenizer):
    """Like SentencePiece decoders: a decode drops the leading space of its first piece."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return super().decode(ids, skip_special_tokens).removeprefix(" ")


def test_the_window_keeps_spaces_that_a_decode_drops_at_its_start():
    pieces = [b" Hello", b" world", b",", b" again", b" \xc3", b"\xa9t\xc3\xa9", b" !"]
    tok = LeadingSpaceDroppingTokenizer(pieces)
    ids = list(range(len(pieces)))
    assert _stream_all(tok, ids) == tok.decode(ids) == "Hello world, again été !"
