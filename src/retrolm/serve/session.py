"""What ``retrolm serve`` computes, without the web: one loaded run, generation that reports
each token as it is sampled, the neighbours of every chunk of the result, per-token
surprisal with and without retrieval, and database search.

Notation: L prompt tokens, N = L + generated tokens, m chunk size, C = N // m complete
chunks, k neighbours per chunk.

Everything here is plain Python on plain data (lists and dicts ready for JSON), so the web
layer (``retrolm.serve.app``) only validates requests and streams; the tests check this
layer against ``retrolm.generate``, the database's own search and a direct forward.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrolm.generation import generate
from retrolm.models.registry import family_of
from retrolm.models.retro.family import NO_COPY  # RETRO's mode name for "copy head off"

log = logging.getLogger(__name__)

MAX_SNIPPET = 160  # characters of a search result's one-line snippet


class Session:
    """A run opened for serving: its model, tokenizer and (for RETRO) database.

    Requests are served one at a time (one model, one lock): a CPU model gains nothing
    from running two generations at once."""

    def __init__(
        self, model: nn.Module, meta: dict[str, Any], db: Any, tokenizer: Any, name: str = ""
    ) -> None:
        self.model, self.meta, self.db, self.tok = model.eval(), meta, db, tokenizer
        self.name = name
        self.fam = family_of(model, meta.get("family"))
        self.retrieves = self.fam.uses_retrieval and db is not None
        self.variants = self.fam.eval_variants(model)
        self.lock = threading.Lock()

    @classmethod
    def open(cls, run: str | os.PathLike, db: str | os.PathLike | None = None) -> Session:
        """Load ``run`` (a run or checkpoint folder) and its database (or ``db``)."""
        from retrolm.checkpoint import load_model, open_run_data, resolve_checkpoint

        model, meta = load_model(run)
        database, tok = open_run_data(meta, resolve_checkpoint(run), db)
        return cls(model, meta, database, tok, name=Path(run).name)

    # ---- limits and description ---------------------------------------------------------
    @property
    def max_prompt_tokens(self) -> int:
        """A prompt must leave room for one new token; a streaming family has no length cap,
        but the page scores the whole text in one forward: at most 4096 tokens."""
        return 4096 if self.fam.streaming else int(self.model.config.max_seq_len) - 1

    @property
    def chunk_size(self) -> int | None:
        return int(self.db.chunk_size) if self.retrieves else None

    @property
    def has_copy_head(self) -> bool:
        return self.retrieves and NO_COPY in self.variants

    def info(self) -> dict[str, Any]:
        """What the page needs to show the right controls."""
        return {
            "run": self.name,
            "family": self.fam.name,
            "retrieval": self.retrieves,
            "copy_head": self.has_copy_head,
            "chunk_size": self.chunk_size,
            "max_seq_len": int(self.model.config.max_seq_len),
            "max_prompt_tokens": self.max_prompt_tokens,
            "database": str(self.db.path) if self.db is not None else None,
            "surprisal_modes": self.modes(),
        }

    def modes(self) -> list[str]:
        """The modes each token's surprisal is scored in (RETRO: with and without retrieval,
        and with the copy head off when the model has one)."""
        if self.retrieves:
            return ["retrieval", "no_retrieval"] + ([NO_COPY] if self.has_copy_head else [])
        if self.fam.uses_retrieval:  # served without its database
            return ["no_retrieval"]
        return list(self.variants) or ["model"]  # a memory family: with and without memory

    def encode_prompt(self, prompt: str) -> list[int]:
        """The prompt's token ids; ValueError naming the limit when it is empty or too long."""
        if not prompt.strip():
            raise ValueError("the prompt is empty: type some text to continue")
        ids = self.tok.encode(prompt)
        if not ids:
            raise ValueError("the prompt encodes to no tokens: type some text to continue")
        if len(ids) > self.max_prompt_tokens:
            raise ValueError(
                f"the prompt has {len(ids)} tokens but this model takes at most "
                f"{self.max_prompt_tokens}; shorten it"
            )
        return ids

    # ---- generation ---------------------------------------------------------------------
    def warm_up(self) -> None:
        """One short generation, scored and searched as a request is: the first person to
        press Generate does not wait for the fused kernels or the encoder to load."""
        self.generate("warm up", max_new_tokens=2, seed=0)
        if self.db is not None:
            self.search("warm up", 1)

    def generate(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = 0.9,
        seed: int | None = None,
        neighbours: int = 2,
        retrieval: bool = True,
        copy_head: bool = True,
        on_text: Callable[[int, str], None] | None = None,
    ) -> dict[str, Any]:
        """Continue ``prompt``; ``on_text(token_id, text)`` sees each new token and the text it
        adds as it is sampled. Returns the whole analysis (``analyse``) of the result.

        ``retrieval=False`` generates without neighbours (RETRO[OFF]); ``copy_head=False``
        with the copy head switched off (only for a model that has one)."""
        ids = self.encode_prompt(prompt)
        if not copy_head and not self.has_copy_head:
            raise ValueError("this run's model has no copy head to switch off; drop copy_head")
        retrieve = retrieval and self.retrieves
        recorder = _Recorder(self.db) if retrieve else None
        stream = _TextStream(self.tok, on_text) if on_text is not None else None
        off = self.variants[NO_COPY] if retrieve and not copy_head else None
        with self.lock:
            with off(self.model) if off else contextlib.nullcontext():
                res = generate(
                    self.model,
                    ids,
                    max_new_tokens,
                    recorder,
                    num_neighbours=neighbours,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    eos_id=self.tok.eos_id,
                    seed=seed,
                    family=self.fam,
                    on_token=stream.push if stream is not None else None,
                )
            out = self.analyse(res.ids[0].tolist(), len(ids), neighbours, recorder)
        out.update(
            text=prompt + self.tok.decode(res.new_ids[0].tolist()),
            settings=dict(retrieval=retrieve, copy_head=copy_head or not self.has_copy_head),
        )
        return out

    def analyse(
        self, ids: list[int], prompt_len: int, k: int, recorder: _Recorder | None = None
    ) -> dict[str, Any]:
        """Tokens (text piece and surprisal per mode) and chunks (their neighbours) of a
        sequence (call it holding ``lock``). ``recorder``: the searches generation made
        (else the chunks are searched now, so that a text generated without retrieval still
        shows what retrieval finds)."""
        found = self._neighbours(ids, k, recorder)
        bits = self.surprisal(ids, found)
        pieces = token_pieces(self.tok, ids)
        tokens = [
            {
                "id": t,
                "text": p,
                "prompt": i < prompt_len,
                "surprisal": {m: b[i] for m, b in bits.items()},
            }
            for i, (t, p) in enumerate(zip(ids, pieces))
        ]
        return {
            "prompt_tokens": prompt_len,
            "tokens": tokens,
            "chunk_size": self.chunk_size,
            "chunks": self._chunks(ids, prompt_len, found),
            "modes": list(bits),
        }

    def _neighbours(
        self, ids: list[int], k: int, recorder: _Recorder | None
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """(C, k) neighbour ids and (C, k) squared L2 distances of the complete chunks."""
        if not self.retrieves:
            return None
        m = self.chunk_size
        c = len(ids) // m
        if c == 0:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        if recorder is not None and len(recorder.ids) >= c:
            return np.concatenate(recorder.ids)[:c], np.concatenate(recorder.dists)[:c]
        return self.db.search_tokens(np.asarray(ids[: c * m]).reshape(c, m), k)

    @torch.no_grad()
    def surprisal(
        self, ids: list[int], found: tuple[np.ndarray, np.ndarray] | None
    ) -> dict[str, list[float | None]]:
        """Per mode, the surprisal -log2 p(token | the tokens before it) of every token in
        bits (None for the first, which nothing predicts): one teacher-forced forward per
        mode through the family's logits hook, the neighbours of ``found`` read as in
        generation (chunk u's by the tokens from u*m + m-1 on)."""
        device = next(self.model.parameters()).device
        seq = torch.tensor([ids], dtype=torch.long, device=device)  # (1, N)
        inp, tgt = seq[:, :-1], seq[:, 1:]
        out: dict[str, list[float | None]] = {}
        for mode in self.modes():
            kw: dict[str, Tensor] = {}
            if mode in ("retrieval", NO_COPY) and found is not None and len(found[0]):
                toks, mask = self.db.retrieved_tokens(found[0])  # (C, k, 2m), (C, k)
                kw = {"retrieved": toks[None].to(device), "neighbour_mask": mask[None].to(device)}
            ctx = self.variants.get(mode)  # RETRO's copy head off; a memory family's modes
            with ctx(self.model) if ctx else contextlib.nullcontext():
                logits = self.fam.logits(self.model, inp, **kw)  # (1, N-1, V)
            logp = F.log_softmax(logits.float(), dim=-1).gather(-1, tgt[..., None])[0, :, 0]
            out[mode] = [None] + (-logp / math.log(2)).tolist()
        return out

    def _chunks(
        self, ids: list[int], prompt_len: int, found: tuple[np.ndarray, np.ndarray] | None
    ) -> list[dict[str, Any]]:
        """The sequence split at chunk boundaries, each complete chunk with its neighbours:
        source file, distance, tokens, and the longest run of tokens it shares with the
        chunk (``longest_match``)."""
        if found is None:
            return []
        m = self.chunk_size
        nbr_ids, dists = found
        values, valid = (
            self.db.retrieved_tokens(nbr_ids) if len(nbr_ids) else (None, None)
        )  # (C, k, 2m), (C, k)
        chunks = []
        for u, start in enumerate(range(0, len(ids), m)):
            chunk = ids[start : start + m]
            row: dict[str, Any] = {
                "index": u,
                "start": start,
                "end": start + len(chunk),
                "in_prompt": start + len(chunk) <= prompt_len,
                "neighbours": [],
            }
            if len(chunk) == m and u < len(nbr_ids):
                row["neighbours"] = [
                    self._neighbour(chunk, rank, int(cid), float(d), values[u, rank].tolist())
                    for rank, (cid, d, ok) in enumerate(zip(nbr_ids[u], dists[u], valid[u]))
                    if ok
                ]
            chunks.append(row)
        return chunks

    def _neighbour(
        self, chunk: list[int], rank: int, cid: int, dist: float, value: list[int]
    ) -> dict[str, Any]:
        pad = self.tok.pad_id
        while value and value[-1] == pad:  # a continuation past its document's end
            value = value[:-1]
        length, a, b = longest_match(chunk, value, pad)
        return {
            "rank": rank,
            "chunk_id": cid,
            "distance": dist,
            "file": str(self.db.doc_path(int(self.db.doc_ids[cid]))),
            "tokens": token_pieces(self.tok, value),
            "chunk_tokens": self.chunk_size,
            "overlap": {"length": length, "chunk_start": a, "neighbour_start": b},
        }

    # ---- the database -------------------------------------------------------------------
    def search(self, text: str, k: int = 5) -> list[dict[str, Any]]:
        """The ``retrolm db query DB TEXT`` view: the ``k`` nearest chunks of ``text`` with
        their source file, squared L2 distance and text."""
        if self.db is None:
            raise ValueError("this run has no retrieval database to search (start with --db DB)")
        if not text.strip():
            raise ValueError("the query is empty: type some text to look up")
        with self.lock:
            ids, dists = self.db.search([text], k)
        m = int(self.db.chunk_size)
        out = []
        for rank, (cid, d) in enumerate(zip(ids[0].tolist(), dists[0].tolist())):
            if cid < 0:
                break
            chunk = self.tok.decode(np.asarray(self.db.chunks[cid, :m]).tolist())
            out.append(
                {
                    "rank": rank,
                    "chunk_id": int(cid),
                    "distance": float(d),
                    "file": str(self.db.doc_path(int(self.db.doc_ids[cid]))),
                    "text": chunk,
                    "snippet": " ".join(chunk.split())[:MAX_SNIPPET],
                }
            )
        return out


class _Recorder:
    """A database seen through generation: passes every call on and keeps what each
    ``search_tokens`` call found (generation's ``Retrieval`` keeps ids, not distances)."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self.ids: list[np.ndarray] = []  # per call (1, k)
        self.dists: list[np.ndarray] = []

    def search_tokens(self, chunk_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        ids, dists = self.db.search_tokens(chunk_ids, k)
        self.ids.append(np.asarray(ids))
        self.dists.append(np.asarray(dists))
        return ids, dists

    def retrieved_tokens(self, ids: np.ndarray) -> tuple[Tensor, Tensor]:
        return self.db.retrieved_tokens(ids)


class _TextStream:
    """Turns tokens into text deltas: the decoded text so far minus what was already sent.
    While the text ends in an incomplete character (U+FFFD: a token began it, the next will
    finish it) the token adds nothing yet, and the next one sends the whole character."""

    def __init__(self, tok: Any, on_text: Callable[[int, str], None]) -> None:
        self.tok, self.on_text = tok, on_text
        self.ids: list[int] = []
        self.sent = ""

    def push(self, tokens: Tensor) -> None:  # tokens (1,): one step of generation
        self.push_id(int(tokens[0]))

    def push_id(self, token: int) -> None:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            self.on_text(token, "")
            return
        delta, self.sent = text[len(self.sent) :], text
        self.on_text(token, delta)

    def rest(self) -> str:
        """What the tokens add beyond the text sent (an incomplete character at the end)."""
        return self.tok.decode(self.ids)[len(self.sent) :]


def token_pieces(tok: Any, ids: list[int]) -> list[str]:
    """The text each token adds to the decoded sequence: the pieces join to its text (a
    token that only begins a character adds nothing; the one that completes it, all of it)."""
    pieces: list[str] = []
    stream = _TextStream(tok, lambda _token, text: pieces.append(text))
    for t in ids:
        stream.push_id(t)
    if pieces:
        pieces[-1] += stream.rest()
    return pieces


def longest_match(a: list[int], b: list[int], pad: int | None = None) -> tuple[int, int, int]:
    """The longest run of tokens common to ``a`` and ``b`` (``pad`` never matches):
    (length, start in a, start in b); (0, 0, 0) when they share no token. The paper's
    s(C) of one neighbour (``retrolm.evaluate.longest_common_run`` takes the maximum over
    neighbours and returns lengths only)."""
    best = (0, 0, 0)
    run = [0] * (len(b) + 1)  # run[j + 1]: length of the match ending at (i, j)
    for i, x in enumerate(a):
        prev = 0
        for j, y in enumerate(b):
            cur = run[j + 1]
            run[j + 1] = prev + 1 if x == y and x != pad else 0
            if run[j + 1] > best[0]:
                best = (run[j + 1], i - run[j + 1] + 1, j - run[j + 1] + 1)
            prev = cur
    return best
