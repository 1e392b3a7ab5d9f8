"""Incremental reply text: hold-backs for partial characters and partial stop strings."""

from mpo_core.detokenize import ReplyText, stop_prefix_len


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
