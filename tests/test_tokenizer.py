"""The SentencePiece wrapper on a model trained in the test: prompt encoding, per-frame pieces, non-text ids."""

import pytest

from callbot.engine.model.tokenizer import EPAD_ID, PAD_ID, TextTokenizer, wrap_with_system_tags
from tests.tiny_assets import train_sentencepiece


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return TextTokenizer(train_sentencepiece(tmp_path_factory.mktemp("spm") / "tokenizer_spm_32k_3.model"))


def test_special_ids_are_not_text(tokenizer):
    assert [tokenizer.piece(i) for i in range(4)] == [None, None, None, None]
    assert tokenizer.piece(EPAD_ID) is None and tokenizer.piece(PAD_ID) is None
    # ids the text stream can sample beyond this vocabulary are not text either
    assert tokenizer.piece(tokenizer.vocab_size) is None and tokenizer.piece(-1) is None


def test_pieces_concatenate_back_to_the_text(tokenizer):
    text = "Hello, thank you for calling."
    ids = tokenizer.encode(text)
    assert ids and all(i > 3 for i in ids)  # no BOS/EOS added
    pieces = [tokenizer.piece(i) for i in ids]
    assert all(isinstance(p, str) and "\u2581" not in p for p in pieces)
    assert "".join(pieces) == " " + text  # a word-starting piece carries its space
    assert tokenizer.decode([PAD_ID, *ids[:2], EPAD_ID, *ids[2:], PAD_ID]) == " " + text


def test_system_tags():
    assert wrap_with_system_tags("  You are Jane. ") == "<system> You are Jane. <system>"
    assert wrap_with_system_tags("<system> You are Jane. <system>") == "<system> You are Jane. <system>"
    assert wrap_with_system_tags("") == "<system>  <system>"


def test_missing_or_bad_model_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        TextTokenizer(tmp_path / "nope.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"bad\.model: not a SentencePiece model"):
        TextTokenizer(tmp_path / "bad.model")
