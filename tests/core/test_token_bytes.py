"""Token bytes from the tokenizer's byte mapping: they join to the text's exact UTF-8."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mpo_core.models.token_bytes import TokenBytes, TokenPieces, byte_level_decoder
from mpo_core.testing.families import make_tokenizer

TEXTS = ["Hi 🌍🚀🎉, what is 世界?", "café ñandú\n\tdone", "日本語のテキスト 👍🏽"]


def test_the_byte_table_is_gpt2s_alphabet_inverted():
    table = byte_level_decoder()
    assert sorted(table.values()) == list(range(256))
    assert set(table) == set(pre_tokenizers.ByteLevel.alphabet())
    assert table["Ġ"] == ord(" ") and table["Ċ"] == ord("\n") and table["a"] == ord("a")


def test_byte_level_bpe_bytes_join_to_the_text_with_emoji_and_cjk():
    tokenizer = make_tokenizer()
    table = TokenBytes(tokenizer, len(tokenizer))
    for text in TEXTS:
        ids = tokenizer.encode(text)
        alone = [tokenizer.decode([i]) for i in ids]
        assert "\ufffd" in alone  # decoding alone loses the split characters' bytes
        assert b"".join(table.bytes_of(i) for i in ids) == text.encode("utf-8")


def test_special_tokens_are_their_content():
    tokenizer = make_tokenizer()
    table = TokenBytes(tokenizer, len(tokenizer))
    assert table.bytes_of(tokenizer.eos_token_id) == b"<|eos|>"


def byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-shaped tokenizer: a few word pieces, every byte as <0xNN>."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", "▁hello", "▁world", "a", "é"]:
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def test_byte_fallback_tokens_are_their_raw_byte():
    tokenizer = byte_fallback_tokenizer()
    table = TokenBytes(tokenizer, len(tokenizer))
    assert table.bytes_of(tokenizer.convert_tokens_to_ids("<0xF0>")) == b"\xf0"
    assert table.bytes_of(tokenizer.convert_tokens_to_ids("▁hello")) == b" hello"
    text = "hello 🌍 world é"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any(tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in ids)
    # The decoder strips the one leading space the normaliser prepended.
    assert b"".join(table.bytes_of(i) for i in ids) == b" " + text.encode("utf-8")


def test_pieces_give_each_character_to_the_token_that_completes_it():
    pieces = TokenPieces()
    emoji = "🌍".encode()
    assert [pieces.push(b"a"), pieces.push(emoji[:2]), pieces.push(emoji[2:])] == ["a", "", "🌍"]
    assert pieces.push(b"\xf0", final=True) == "\ufffd"  # cut short: as the reply's text
