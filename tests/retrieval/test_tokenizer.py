"""LMTokenizer: lossless round trip, special ids, stable hash, errors."""

from __future__ import annotations

import random

import pytest

from retrolm.retrieval.tokenizer import EOS_ID, PAD_ID, LMTokenizer

from .conftest import module_text

ALPHABETS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
    "<eos><pad>",  # literal text, not the special tokens
    " \t\n\r\x0b\x0c\u00a0\u2003\u3000",  # whitespace of many kinds
    "éüßçñøåæœ",
    "日本語中文한국어",
    "😀🎉🧪👩‍💻",
    "\x00\x01\x7f\u200b\u200d\ufeff\ufffd",  # control, zero-width, BOM, replacement
    "(){}[]<>;:'\"\\/|`~!@#$%^&*-_=+.,?",
    "\U0010fffd\U00020000\u0301",  # private use plane, CJK ext B, combining accent
]


@pytest.fixture(scope="module")
def tok() -> LMTokenizer:
    return LMTokenizer.train([module_text("json"), module_text("textwrap")], vocab_size=600)


def random_string(rng: random.Random) -> str:
    n = rng.randint(0, 60)
    return "".join(rng.choice(rng.choice(ALPHABETS)) for _ in range(n))


def test_round_trip_random_unicode(tok):
    rng = random.Random(0)
    for _ in range(2000):
        s = random_string(rng)
        assert tok.decode(tok.encode(s)) == s, repr(s)
    batch = [random_string(rng) for _ in range(200)]
    assert [tok.decode(ids) for ids in tok.encode_batch(batch)] == batch


def test_round_trip_real_text(tok):
    text = module_text("difflib")  # not seen in training
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode()) / 1.5  # BPE actually merges


def test_special_tokens_and_vocab(tok):
    assert (tok.pad_id, tok.eos_id) == (PAD_ID, EOS_ID) == (0, 1)
    assert tok.vocab_size == 600
    assert tok.decode([EOS_ID, PAD_ID] + tok.encode("hi")) == "hi"
    assert "<eos>" in tok.decode([EOS_ID], skip_special_tokens=False)
    literal = "a <eos> and <pad> in text"
    assert EOS_ID not in tok.encode(literal) and PAD_ID not in tok.encode(literal)
    assert tok.decode(tok.encode(literal)) == literal


def test_save_load_hash_and_determinism(tok, tmp_path):
    tok.save(tmp_path / "t.json")
    again = LMTokenizer.from_file(tmp_path / "t.json")
    assert again.hash == tok.hash and len(tok.hash) == 64
    assert again.encode("hello world") == tok.encode("hello world")
    retrained = LMTokenizer.train([module_text("json"), module_text("textwrap")], vocab_size=600)
    assert retrained.hash == tok.hash  # training is deterministic
    other = LMTokenizer.train([module_text("json")], vocab_size=500)
    assert other.hash != tok.hash


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json.*does not exist"):
        LMTokenizer.from_file(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read tokenizer file"):
        LMTokenizer.from_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        LMTokenizer.train(["abc"], vocab_size=100)
    from tokenizers import Tokenizer, models

    plain = Tokenizer(models.BPE())
    plain.save(str(tmp_path / "plain.json"))
    with pytest.raises(ValueError, match="must have '<pad>' as id 0"):
        LMTokenizer.from_file(tmp_path / "plain.json")
