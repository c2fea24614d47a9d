"""The seed libraries' conveniences, over the pipeline pieces: ``TrainingWrapper`` (RETRO's
one-object API), ``RETRODataset`` (``retrolm.data``) and ``AutoregressiveWrapper`` (the
routing / hierarchical seeds' loss-and-sample wrapper, ``retrolm.models.autoregressive``:
it lives with the models because the Routing language model is one).

    wrapper = TrainingWrapper(retro=retro, knn=2, chunk_size=64,
                              documents_path="./text_folder", glob="**/*.txt", ...)
    train_dl = iter(wrapper.get_dataloader(batch_size=2, shuffle=True))
    optim = wrapper.get_optimizer(lr=3e-4, wd=0.01)
    seq, retrieved = next(train_dl)
    sampled = wrapper.generate(prompt, filter_thres=0.9, temperature=1.0)

It builds a retrieval database from the folder with ``build_database`` (resumable;
``REPROCESS=1`` in the environment forces a rebuild), serves ``RETRODataset`` batches
and samples with ``retrolm.generate``. The seed's memmap paths and memory settings are
accepted for compatibility: the database directory holds the real files (next to
``chunks_memmap_path``, or at ``db_path``), and ``max_index_memory_usage`` is the index
memory budget.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from retrolm.data import RETRODataset
from retrolm.models.autoregressive import AutoregressiveWrapper

log = logging.getLogger(__name__)

__all__ = ["AutoregressiveWrapper", "RETRODataset", "TrainingWrapper"]


class TrainingWrapper:
    def __init__(
        self,
        *,
        retro: nn.Module,
        chunk_size: int,
        documents_path: str | os.PathLike,
        knn: int = 2,
        glob: str = "**/*.txt",
        chunks_memmap_path: str | os.PathLike | None = None,
        seqs_memmap_path: str | os.PathLike | None = None,
        doc_ids_memmap_path: str | os.PathLike | None = None,
        max_chunks: int = 1_000_000,
        max_seqs: int = 100_000,
        knn_extra_neighbors: int = 100,
        max_index_memory_usage: str = "100m",
        current_memory_available: str = "1G",
        db_path: str | os.PathLike | None = None,
        encoder: str | os.PathLike | None = None,
        vocab_size: int | None = None,
    ):
        from retrolm.retrieval import BuildConfig, RetrievalDatabase, build_database

        del seqs_memmap_path, doc_ids_memmap_path, current_memory_available  # seed compat
        cfg = retro.config
        if chunk_size != cfg.chunk_size:
            raise ValueError(
                f"chunk_size {chunk_size} differs from the model's chunk_size {cfg.chunk_size}; "
                "pass the same value to both"
            )
        self.retro, self.knn, self.chunk_size = retro, int(knn), int(chunk_size)
        self.max_seq_len = int(cfg.max_seq_len)
        if db_path is None:
            base = Path(chunks_memmap_path or "./train.chunks.dat")
            db_path = base.with_name(base.stem + ".retrolm-db")
        self.db_path = Path(db_path)
        if os.environ.get("REPROCESS") == "1" and (self.db_path / "manifest.json").is_file():
            log.info("REPROCESS=1: rebuilding %s", self.db_path)
            shutil.rmtree(self.db_path)
        vocab = vocab_size or min(16384, int(cfg.num_tokens))
        build_database(
            documents_path,
            self.db_path,
            BuildConfig(
                glob=glob,
                chunk_size=self.chunk_size,
                seq_len=self.max_seq_len,
                neighbours=self.knn,
                extra_neighbours=int(knn_extra_neighbors),
                memory_budget=str(max_index_memory_usage).upper(),
                vocab_size=vocab,
                encoder=None if encoder is None else str(encoder),
            ),
        )
        self.db = RetrievalDatabase.open(self.db_path)
        tok = self.db.tokenizer
        if tok.vocab_size > cfg.num_tokens:
            raise ValueError(
                f"the database tokenizer has {tok.vocab_size} tokens but the model only "
                f"{cfg.num_tokens}; build the model with num_tokens >= {tok.vocab_size}"
            )
        if self.db.num_chunks > max_chunks or len(self.db.seq_starts) > max_seqs:
            raise ValueError(
                f"{documents_path} gives {self.db.num_chunks} chunks and "
                f"{len(self.db.seq_starts)} sequences, over max_chunks={max_chunks} or "
                f"max_seqs={max_seqs}; raise them"
            )
        self.eos_id, self.pad_id = tok.eos_id, tok.pad_id

    def dataset(self) -> RETRODataset:
        """Sequences of max_seq_len + 1 tokens with knn neighbours per chunk: (seq, retrieved)."""
        return RETRODataset(
            self.db, seq_len=self.max_seq_len, num_neighbours=self.knn, return_mask=False
        )

    def get_dataloader(self, **kwargs: Any) -> DataLoader:
        return DataLoader(self.dataset(), **kwargs)

    def get_optimizer(self, lr: float = 3e-4, wd: float = 0.0, **kwargs: Any):
        from retrolm.train import param_groups

        groups = param_groups(self.retro, wd)
        for g in groups:  # no scheduler here: apply each group's learning-rate scale once
            g["lr"] = lr * g["lr_scale"]
        return torch.optim.AdamW(groups, lr=lr, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        start: Tensor | None = None,
        filter_thres: float = 0.9,
        temperature: float = 1.0,
        max_new_tokens: int | None = None,
        seed: int | None = None,
    ) -> Tensor:
        """Sample up to max_seq_len tokens, retrieving at every chunk; stops early at EOS.

        ``filter_thres`` keeps the top (1 - filter_thres) fraction of the vocabulary, as in
        the seed. Returns (b, <= max_seq_len) including ``start`` (default: one EOS token,
        the document separator).
        """
        from retrolm.generation import generate

        if not 0.0 <= filter_thres < 1.0:
            raise ValueError(f"filter_thres must be in [0, 1), got {filter_thres}")
        device = next(self.retro.parameters()).device
        if start is None:
            start = torch.full((1, 1), self.eos_id, dtype=torch.long)
        start = torch.as_tensor(start, dtype=torch.long)
        start = start[None] if start.dim() == 1 else start
        top_k = max(1, int((1 - filter_thres) * self.retro.config.num_tokens))
        budget = self.max_seq_len - start.shape[1]
        out = generate(
            self.retro,
            start.to(device),
            budget if max_new_tokens is None else min(budget, max_new_tokens),
            self.db,
            num_neighbours=self.knn,
            temperature=temperature,
            top_k=top_k,
            eos_id=self.eos_id,
            seed=seed,
        )
        return out.ids
