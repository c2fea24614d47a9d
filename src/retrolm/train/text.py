"""A run trained from a text folder (no database): its tokenizer, made once and kept as
``RUN/tokenizer.json``, and the folder read with it (``data.TextCorpus``)."""

from __future__ import annotations

import logging
from pathlib import Path

from retrolm.checkpoint import RUN_TOKENIZER
from retrolm.data import TextCorpus, TextData
from retrolm.errors import IncompatibleError
from retrolm.utils import atomic_path

log = logging.getLogger(__name__)


def open_text(spec: TextData, run_dir: Path, resume: bool, rank: int) -> TextCorpus:
    """The text folder with the run's tokenizer: on resume the one in ``RUN/tokenizer.json``
    (a different ``spec.tokenizer`` or ``vocab_size`` is refused), else the given one or
    one trained on the folder, written there atomically (by rank 0; the others read it)."""
    from retrolm.retrieval.chunking import iter_texts
    from retrolm.retrieval.tokenizer import LMTokenizer

    path = run_dir / RUN_TOKENIZER
    if resume and path.is_file():
        tok = LMTokenizer.from_file(path)
        if spec.tokenizer is not None and LMTokenizer.from_file(spec.tokenizer).hash != tok.hash:
            raise IncompatibleError(
                f"{run_dir} was trained with the tokenizer in {path}, not {spec.tokenizer}; "
                "drop --tokenizer to resume, or use another --out"
            )
        if spec.vocab_size not in (None, tok.vocab_size):
            raise IncompatibleError(
                f"{run_dir} was trained with a {tok.vocab_size}-token vocabulary, now "
                f"--vocab-size {spec.vocab_size}; drop it to resume, or use another --out"
            )
        return TextCorpus(Path(spec.path), tok, spec.glob)
    if spec.tokenizer is not None:
        tok = LMTokenizer.from_file(spec.tokenizer)
    else:
        docs = spec.documents()
        size = {} if spec.vocab_size is None else {"vocab_size": spec.vocab_size}
        log.info("training a byte-level BPE tokenizer on %d files of %s", len(docs), spec.path)
        tok = LMTokenizer.train(iter_texts(docs), **size)  # deterministic: all ranks agree
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tok.save(tmp)
    return TextCorpus(Path(spec.path), tok, spec.glob)
