"""Small stand-ins honouring the contracts of the RETRO model and the retrieval database.

They let the train/evaluate/generate pipeline be tested in isolation and in seconds:
- ``TinyRetro``: a one-layer causal decoder with a KV cache whose "cross-attention"
  adds a projection of chunk u's mean neighbour embedding at positions
  u*m+m-1 ... u*m+2m-2 (the paper's CCA offsets), so retrieval timing errors show.
- ``StreamingToy``: a model of a ``streaming`` family (Memorizing, Infini-attention): its
  cache is a running memory of the whole past, so evaluation and generation stream.
- ``FakeDatabase``: documents chunked within themselves, a byte tokenizer, brute-force
  search over token histograms, neighbour candidates excluding self and same document.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class TinyConfig:
    num_tokens: int = 260
    chunk_size: int = 4
    max_seq_len: int = 32
    dim: int = 32
    pad_id: int = 0
    dropout: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TinyConfig:
        return cls(**d)

    @classmethod
    def from_name(cls, name: str) -> TinyConfig:
        return cls()


class TinyRetro(nn.Module):
    def __init__(self, config: TinyConfig | None = None, **kw):
        super().__init__()
        self.config = c = config or TinyConfig(**kw)
        self.tok = nn.Embedding(c.num_tokens, c.dim)
        self.pos = nn.Embedding(c.max_seq_len, c.dim)
        self.norm = nn.LayerNorm(c.dim)
        self.qkv = nn.Linear(c.dim, 3 * c.dim)
        self.ret = nn.Linear(c.dim, c.dim)
        self.ff = nn.Sequential(nn.Linear(c.dim, 2 * c.dim), nn.GELU(), nn.Linear(2 * c.dim, c.dim))
        self.drop = nn.Dropout(c.dropout)
        self.out = nn.Linear(c.dim, c.num_tokens, bias=False)

    def init_cache(self, batch_size: int) -> dict:
        return {"k": None, "v": None, "len": 0}

    def forward(self, seq, retrieved=None, neighbour_mask=None, return_loss=False, cache=None):
        c = self.config
        if return_loss:
            seq, labels = seq[:, :-1], seq[:, 1:]
        b, n = seq.shape
        start = cache["len"] if cache is not None else 0
        pos = torch.arange(start, start + n, device=seq.device)
        x = self.tok(seq) + self.pos(pos)
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        if cache is not None:
            if cache["k"] is not None:
                k = torch.cat([cache["k"], k], 1)
                v = torch.cat([cache["v"], v], 1)
            cache["k"], cache["v"], cache["len"] = k, v, start + n
        kpos = torch.arange(k.shape[1], device=seq.device)
        att = (q @ k.transpose(1, 2)) / math.sqrt(c.dim)
        att = att.masked_fill(kpos[None, None, :] > pos[None, :, None], float("-inf"))
        x = x + self.drop(att.softmax(-1) @ v)
        if retrieved is not None:
            m = c.chunk_size
            l = (start + n) // m
            e = self.tok(retrieved[:, :l])  # (b, l, k, 2m, d)
            w = (retrieved[:, :l] != c.pad_id).float()
            if neighbour_mask is not None:
                w = w * neighbour_mask[:, :l, :, None].float()
            e = (e * w[..., None]).sum((2, 3)) / w.sum((2, 3)).clamp(min=1)[..., None]  # (b, l, d)
            u = (pos + 1) // m - 1  # chunk whose neighbours position p reads
            ok = (u >= 0) & (u < l)
            gathered = e[:, u.clamp(0, max(l - 1, 0))] if l > 0 else torch.zeros_like(x)
            x = x + self.ret(gathered) * ok[None, :, None].float()
        x = x + self.drop(self.ff(x))
        logits = self.out(x)
        if not return_loss:
            return logits
        return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=c.pad_id)


class ByteTokenizer:
    pad_id, eos_id = 0, 1
    vocab_size = 258
    hash = "bytes-v1"

    def encode(self, text: str) -> list[int]:
        return [b + 2 for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(int(i) - 2 for i in ids if int(i) >= 2).decode("utf-8", errors="replace")


class FakeDatabase:
    def __init__(
        self,
        docs: list[list[int]],
        chunk_size: int = 4,
        num_candidates: int = 6,
        seq_chunks: int = 8,
        doc_names: list[str] | None = None,
        root: Path | None = None,
    ):
        m = self.chunk_size = chunk_size
        self.tokenizer = ByteTokenizer()
        rows, doc_ids = [], []
        for d, toks in enumerate(docs):
            toks = list(toks) + [self.tokenizer.eos_id]
            for s in range(0, len(toks), m):
                row = toks[s : s + m + 1]
                rows.append(row + [0] * (m + 1 - len(row)))
                doc_ids.append(d)
        self.chunks = np.array(rows, dtype=np.int32)
        self.doc_ids = np.array(doc_ids, dtype=np.int32)
        self.num_chunks = len(rows)
        self.seq_starts = np.arange(0, self.num_chunks, seq_chunks, dtype=np.int64)
        self.doc_names = doc_names or [f"doc{d}.txt" for d in range(len(docs))]
        self.root = root or Path("/fake")
        self.manifest = {"id": "fake", "chunk_size": m, "num_chunks": self.num_chunks}
        emb = self._embed(self.chunks[:, :m])
        d2 = ((emb[:, None] - emb[None]) ** 2).sum(-1)
        d2[self.doc_ids[:, None] == self.doc_ids[None]] = np.inf  # self and same document
        order = np.argsort(d2, axis=1, kind="stable")[:, :num_candidates]
        self.neighbours = np.where(np.isfinite(np.take_along_axis(d2, order, 1)), order, -1)
        self.neighbours = self.neighbours.astype(np.int32)
        self.num_neighbours = num_candidates
        self._emb = emb

    @staticmethod
    def _embed(tokens: np.ndarray) -> np.ndarray:
        h = np.zeros((len(tokens), 16), dtype=np.float64)
        for j in range(tokens.shape[1]):
            np.add.at(h, (np.arange(len(tokens)), tokens[:, j] % 16), 1.0)
        return h

    def doc_path(self, doc_id: int) -> Path:
        return self.root / self.doc_names[int(doc_id)]

    def search_tokens(self, chunk_ids, k, exclude_doc_ids=None):
        q = self._embed(np.asarray(chunk_ids))
        d2 = ((q[:, None] - self._emb[None]) ** 2).sum(-1)
        order = np.argsort(d2, axis=1, kind="stable")[:, :k]
        return order.astype(np.int64), np.take_along_axis(d2, order, 1)

    def retrieved_tokens(self, ids):
        ids = np.asarray(ids, dtype=np.int64)
        m = self.chunk_size
        out = np.zeros(ids.shape + (2 * m,), dtype=np.int64)
        valid = ids >= 0
        for idx in zip(*np.nonzero(valid)):
            c = ids[idx]
            out[idx][:m] = self.chunks[c, :m]
            if c + 1 < self.num_chunks and self.doc_ids[c + 1] == self.doc_ids[c]:
                out[idx][m:] = self.chunks[c + 1, :m]
        return torch.from_numpy(out), torch.from_numpy(valid)


def random_docs(n_docs: int = 6, length: int = 40, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(length // 2, length, size=n_docs)
    return [list(rng.integers(2, 40, size=int(s))) for s in sizes]


def register_tiny() -> None:
    from retrolm.models.registry import FAMILIES, ModelFamily
    from retrolm.models.retro.family import retro_logits, retro_loss

    FAMILIES["tiny"] = ModelFamily(
        name="tiny",
        config_cls=TinyConfig,
        model_cls=TinyRetro,
        uses_retrieval=True,
        loss=retro_loss,
        default_preset="tiny",
        logits=retro_logits,
    )


@dataclass
class StreamConfig:
    """A toy model of a ``streaming`` family (its cache is a memory of the whole past)."""

    num_tokens: int = 258
    dim: int = 8
    max_seq_len: int = 6
    segment_len: int = 3
    pad_id: int = 0


class StreamingToy(nn.Module):
    """Logits at t read token t and the mean embedding of every token up to t (the memory):
    ``model(ids)`` of any length equals feeding it piece by piece through ``init_cache``."""

    def __init__(self, config: StreamConfig | None = None) -> None:
        super().__init__()
        self.config = config or StreamConfig()
        self.emb = nn.Embedding(self.config.num_tokens, self.config.dim)
        self.head = nn.Linear(2 * self.config.dim, self.config.num_tokens)
        self.use_memory = True

    def init_cache(self, batch: int) -> dict[str, Tensor]:
        return {"sum": torch.zeros(batch, self.config.dim), "count": torch.zeros(())}

    def forward(self, ids: Tensor, cache: dict[str, Tensor] | None = None) -> Tensor:
        cache = cache if cache is not None else self.init_cache(ids.shape[0])
        e = self.emb(ids)  # (b, n, d)
        total = cache["sum"][:, None] + e.cumsum(1)
        count = cache["count"] + torch.arange(1, ids.shape[1] + 1)
        cache["sum"], cache["count"] = total[:, -1], count[-1]
        mem = total / count[None, :, None] if self.use_memory else torch.zeros_like(e)
        return self.head(torch.cat([e, mem], -1))


def toy_memory_off(model: StreamingToy):
    @contextlib.contextmanager
    def off():
        model.use_memory = False
        try:
            yield
        finally:
            model.use_memory = True

    return off()


def register_streaming_toy() -> None:
    from retrolm.models.registry import FAMILIES, ModelFamily

    FAMILIES["streaming-toy"] = ModelFamily(
        name="streaming-toy",
        config_cls=StreamConfig,
        model_cls=StreamingToy,
        streaming=True,
        eval_variants=lambda model: {
            "memory": lambda m: contextlib.nullcontext(),
            "no_memory": toy_memory_off,
        },
    )
