"""Tokenizers and the incremental detokenizer: streamed text equals a full decode."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentos.kernel.runner.tokenizer import ByteTokenizer, HFTokenizer, IncrementalDetokenizer
from hf_models import TOKENIZER_TEXTS, make_bpe_tokenizer, make_sentencepiece_tokenizer

SAMPLES = ["", "hello world", "Grüße, Köln", "東京は晴れです", "🦊🐶👍🏽 ✨", "a\u0000b\nc\t",
           "mixed: ascii, ünïcödé, 中文, 🇺🇳, e\u0301"]
SPM_FIRST_BYTE = 200  # id of <0x00> in make_sentencepiece_tokenizer's vocabulary
HYPOTHESIS = settings(max_examples=150, deadline=None, derandomize=True)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> HFTokenizer:
    return HFTokenizer.from_folder(make_bpe_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def spm(tmp_path_factory) -> HFTokenizer:
    return HFTokenizer.from_folder(make_sentencepiece_tokenizer(tmp_path_factory.mktemp("spm")))


def stream(tokenizer, ids, skip_special_tokens=True) -> tuple[list[str], str]:
    """Pushes ids one by one; returns (the deltas, flush included, and detok.text)."""
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    return deltas, detok.text


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and ids[1:] == list(text.encode())
    assert tok.decode(ids) == text
    assert tok.encode(text, add_special_tokens=False) == ids[1:]
    assert tok.decode(ids, skip_special_tokens=False) == "<bos>" + text


def test_byte_specials_and_errors():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_ids, tok.pad_token_id) == (
        260, 256, [257], 258)
    assert tok.decode([104, 105, 257, 258, 259]) == "hi"
    assert tok.decode([104, 257], skip_special_tokens=False) == "h<eos>"
    assert tok.decode([0xE2, 0x82]) == "\ufffd"  # an unfinished character
    with pytest.raises(ValueError, match="outside"):
        tok.decode([260])
    with pytest.raises(ValueError, match="outside"):
        IncrementalDetokenizer(tok).push(-1)


@given(st.text())
@HYPOTHESIS
def test_byte_round_trip_any_text(text):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text


@given(st.lists(st.integers(0, 259), max_size=60), st.booleans())
@HYPOTHESIS
def test_byte_stream_equals_decode_of_any_ids(ids, skip):
    # any ids, including invalid UTF-8 and specials in the middle of a character
    tok = ByteTokenizer()
    deltas, text = stream(tok, ids, skip)
    assert "".join(deltas) == text == tok.decode(ids, skip_special_tokens=skip)


@given(st.text(max_size=40))
@HYPOTHESIS
def test_byte_stream_of_text_holds_partial_characters(text):
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok)
    for i in tok.encode(text):
        delta = detok.push(i)
        assert "\ufffd" not in delta
        assert text.startswith(detok.text)
    assert detok.flush() == "" and detok.text == text


def test_byte_stream_emoji_is_released_whole():
    tok = ByteTokenizer()
    deltas, _ = stream(tok, list("a🦊b".encode()))
    assert deltas == ["a", "", "", "", "🦊", "b", ""]


def test_hf_tokenizer_from_folder(bpe, tmp_path):
    assert (bpe.bos_token_id, bpe.eos_token_ids) == (0, [1])
    assert bpe.vocab_size == 300
    for text in SAMPLES + TOKENIZER_TEXTS:
        ids = bpe.encode(text)
        assert ids[0] == 0 and bpe.encode(text, add_special_tokens=False) == ids[1:]
        assert bpe.decode(ids) == text  # byte-level BPE is lossless
    assert len(bpe.encode(TOKENIZER_TEXTS[0], add_special_tokens=False)) < len(TOKENIZER_TEXTS[0])
    assert bpe.decode([0, *bpe.encode("hi", False), 1], skip_special_tokens=False) == "<s>hi</s>"
    no_bos = HFTokenizer.from_folder(make_bpe_tokenizer(tmp_path / "nobos", add_bos=False))
    assert no_bos.encode("hi") == bpe.encode("hi", add_special_tokens=False)


def test_hf_tokenizer_bad_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        HFTokenizer.from_folder(tmp_path)
    folder = make_bpe_tokenizer(tmp_path / "t")
    (folder / "tokenizer_config.json").write_text('{"bos_token": "<nope>"}')
    with pytest.raises(ValueError, match="not in tokenizer.json"):
        HFTokenizer.from_folder(folder)


@pytest.mark.parametrize("text", SAMPLES + TOKENIZER_TEXTS)
def test_hf_stream_equals_decode(bpe, text):
    ids = bpe.encode(text)
    deltas, streamed = stream(bpe, ids)
    assert "".join(deltas) == streamed == bpe.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)


@given(st.lists(st.integers(0, 299), max_size=60), st.booleans())
@HYPOTHESIS
def test_hf_stream_equals_decode_of_any_ids(bpe, ids, skip):
    deltas, text = stream(bpe, ids, skip)
    assert "".join(deltas) == text == bpe.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("text", SAMPLES + TOKENIZER_TEXTS)
def test_sentencepiece_stream_equals_decode(spm, text):
    # "▁" marks spaces, the decoder strips the first one, rare characters are byte tokens
    ids = spm.encode(text)
    assert ids[0] == spm.bos_token_id == 1 and spm.eos_token_ids == [2]
    assert spm.tok.id_to_token(SPM_FIRST_BYTE) == "<0x00>"
    deltas, streamed = stream(spm, ids)
    assert "".join(deltas) == streamed == spm.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)


def byte_tokens(char: str) -> list[int]:
    return [SPM_FIRST_BYTE + b for b in char.encode()]


@given(st.lists(st.one_of(st.integers(0, SPM_FIRST_BYTE - 1).map(lambda i: [i]),
                          st.characters().map(byte_tokens)), max_size=40), st.booleans())
@HYPOTHESIS
def test_sentencepiece_stream_equals_decode_of_any_text_ids(spm, pieces, skip):
    # any mix of word pieces, specials and characters spelled as byte tokens. NOTE: not
    # invalid byte runs: ByteFallback turns a whole run with a bad byte into U+FFFDs, even
    # characters already released, so a stream cannot match a full decode there.
    ids = [i for piece in pieces for i in piece]
    deltas, text = stream(spm, ids, skip)
    assert "".join(deltas) == text == spm.decode(ids, skip_special_tokens=skip)


class CountingTokenizer(HFTokenizer):
    """Records the longest id list decoded, to show the detokenizer's window is bounded."""

    longest = 0

    def decode(self, ids, skip_special_tokens=True):
        self.longest = max(self.longest, len(ids))
        return super().decode(ids, skip_special_tokens)


def test_hf_stream_cost_per_token_is_bounded(bpe):
    tok = CountingTokenizer(bpe.tok, bpe.bos_token_id, bpe.eos_token_ids)
    ids = tok.encode(" ".join(TOKENIZER_TEXTS * 20), add_special_tokens=False)
    deltas, text = stream(tok, ids)
    assert text == tok.decode(ids)
    assert len(ids) > 1000 and tok.longest == len(ids)  # only the check above decoded all
    tok.longest = 0
    stream(tok, ids)
    assert tok.longest <= 10
