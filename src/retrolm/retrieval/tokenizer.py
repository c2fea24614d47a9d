"""The language model's tokenizer: a lossless byte-level BPE (HF ``tokenizers``).

The LM vocabulary is independent of the frozen encoder's WordPiece vocabulary
(which is uncased and drops whitespace, so an LM could never write code with it).
Chunk tokens are decoded back to text and re-tokenized by the encoder.

Special tokens: ``<pad>`` = id 0 and ``<eos>`` = id 1 (end of document). A pretrained
model's ``tokenizer.json`` (a Hugging Face folder's, for RETRO-fitting it) is read too: its
end-of-text token (``END_TOKENS``) ends documents, and pads as well unless it has ``<pad>``
(GPT-2's convention); its ids are the model's, so they are kept as they are. Byte-level
pre-tokenization maps every byte to a visible symbol, so ``decode(encode(t)) == t``
for any string ``t`` (no normalizer, no prefix space, no unknown token; the literal
text "<eos>" in a document is encoded as text, never as the special id).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD_TOKEN, EOS_TOKEN = "<pad>", "<eos>"
PAD_ID, EOS_ID = 0, 1
MIN_VOCAB = 256 + 2  # every byte plus the two special tokens
END_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
"""End-of-text tokens of pretrained tokenizers (GPT-2, Llama/T5, Llama 3, Gemma), in order."""


def _special_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    """(pad id, eos id): ours (``<pad>`` = 0, ``<eos>`` = 1), else a pretrained tokenizer's
    first special token of ``END_TOKENS`` (its ``<pad>`` if it has one, else that token)."""
    if tokenizer.token_to_id(PAD_TOKEN) == PAD_ID and tokenizer.token_to_id(EOS_TOKEN) == EOS_ID:
        return PAD_ID, EOS_ID
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    for name in END_TOKENS:
        if name in special:
            eos = tokenizer.token_to_id(name)
            pad = tokenizer.token_to_id(PAD_TOKEN) if PAD_TOKEN in special else eos
            return pad, eos
    raise ValueError(
        f"LM tokenizer must have {PAD_TOKEN!r} as id {PAD_ID} and {EOS_TOKEN!r} as id {EOS_ID} "
        f"(or, a pretrained model's, a special end token among {list(END_TOKENS)}); got "
        f"{tokenizer.token_to_id(PAD_TOKEN)} and {tokenizer.token_to_id(EOS_TOKEN)}: "
        "train one with `retrolm db build --vocab-size N`"
    )


class LMTokenizer:
    """Byte-level BPE with ``<pad>`` = 0, ``<eos>`` = 1 (or a pretrained model's tokenizer,
    module docstring); make with ``train`` or ``from_file``."""

    def __init__(self, tokenizer: Tokenizer):
        self._pad_id, self._eos_id = _special_ids(tokenizer)
        tokenizer.no_padding()
        tokenizer.no_truncation()
        # text that happens to contain "<eos>" is text: never turn it into the special id
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer
        self._json = tokenizer.to_str(pretty=False)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 16384) -> LMTokenizer:
        """Train on an iterator of documents (streamed; deterministic for the same input)."""
        if vocab_size < MIN_VOCAB:
            raise ValueError(f"vocab_size={vocab_size} is too small: use at least {MIN_VOCAB}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[PAD_TOKEN, EOS_TOKEN],  # ids 0 and 1, in this order
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> LMTokenizer:
        """Load a ``tokenizer.json`` (it must define ``<pad>`` = 0 and ``<eos>`` = 1)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer file {str(path)!r} does not exist: pass a tokenizer.json"
            )
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception
            raise ValueError(f"cannot read tokenizer file {str(path)!r}: {e}") from None
        return cls(tok)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self._json, encoding="utf-8")

    # ---- properties ---------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def hash(self) -> str:
        """sha256 of the canonical (compact) tokenizer.json: the tokenizer's identity."""
        return hashlib.sha256(self._json.encode("utf-8")).hexdigest()

    # ---- encode / decode ----------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; ``<pad>``/``<eos>`` are dropped unless ``skip_special_tokens=False``.

        A multi-byte character cut by a chunk boundary decodes to U+FFFD in each half.
        """
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_batch(self, rows: Iterable[Iterable[int]]) -> list[str]:
        """Decode each row (a list of ids or a 2-D integer array), dropping special tokens."""
        rows = rows.tolist() if hasattr(rows, "tolist") else [[int(i) for i in r] for r in rows]
        return self._tok.decode_batch(rows, skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"LMTokenizer(vocab_size={self.vocab_size}, hash={self.hash[:12]})"
