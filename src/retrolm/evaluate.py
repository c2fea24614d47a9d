"""Held-out evaluation: bits per byte with and without retrieval, and the leakage curve.

Protocol (paper §4.1, §2.6; research A.13). Notation: m chunk size, n window length, s
stride (both multiples of m), k neighbours fed to the model, K neighbours for the
leakage analysis (paper: 10).

- Each held-out document is tokenized (with its <eos>) and chunked from its start,
  so every window starts at a chunk boundary; windows of n tokens slide by s and
  score only tokens no earlier window scored (the first window scores all).
- Every chunk's neighbours come from the database's search (held-out text never
  enters the database). The model reads k of them; retrieval OFF is the same model
  with ``retrieved=None``. A RETRO with the neighbour copy head is also scored with the
  head off (mode ``retrieval_no_copy``: chunked cross-attention alone).
- Leakage: for chunk C, s(C) = longest common token substring between C and any of
  its K retrieved values (neighbour + continuation), r(C) = s(C) / |C|;
  bpb(alpha) = sum of NLL over chunks with r <= alpha / (ln 2 * their bytes).
- bits/byte = total NLL / (ln 2 * UTF-8 bytes of the scored text, i.e. each document
  without its first token); token perplexity = exp(NLL per scored token).

Every model family is scored the same way (``ModelFamily.logits``). Families without
retrieval have m = 1 (windows of any length, no chunks) and one mode, ``no_retrieval``.
A ``streaming`` family (its cache is a memory of the whole past: Memorizing Transformer,
Infini-attention) is scored without windows: each document streams whole through one
cache, ``segment_len`` tokens at a time, in each of the family's modes (``memory``,
``no_memory``); every target is predicted from the whole document before it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrolm.models.registry import ModelFamily, check_no_retrieval, family_of
from retrolm.utils import atomic_path, save_figure, write_json

log = logging.getLogger(__name__)

ALPHAS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


@dataclass
class EvalConfig:
    """How held-out text is scored."""

    seq_len: int | None = None
    """n: window length in tokens (multiple of the chunk size); default the model's max."""
    stride: int | None = None
    """s: window step (multiple of the chunk size); default n/2 as in the paper."""
    num_neighbours: int = 2
    """k: neighbours per chunk the model reads."""
    leakage_neighbours: int = 10
    """K: neighbours per chunk searched for the overlap analysis (paper: 10)."""
    alphas: tuple[float, ...] = ALPHAS
    """Overlap thresholds of the leakage curve."""
    batch_size: int = 4
    """Windows per forward pass."""
    max_tokens: int | None = None
    """Score at most this many tokens per document (None: all)."""
    glob: str = "**/*.txt"
    """Which files of the held-out folder are documents."""

    def __post_init__(self) -> None:
        self.alphas = tuple(float(a) for a in self.alphas)
        if self.num_neighbours < 1 or self.leakage_neighbours < 1 or self.batch_size < 1:
            raise ValueError("num_neighbours, leakage_neighbours and batch_size must be >= 1")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {self.max_tokens}")


@dataclass
class EvalResult:
    modes: dict[str, dict[str, float]]
    """"retrieval"/"no_retrieval" -> bits_per_byte, perplexity, nll_per_token, tokens, bytes."""
    leakage: list[dict[str, float]] = field(default_factory=list)
    """Per alpha: fraction of chunks kept and bits/byte of each mode on them."""
    documents: int = 0
    chunks: int = 0
    """Retrieval chunks scored (0 for families without retrieval)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        lines = [f"{'':17s} {'bits/byte':>10s} {'token ppl':>10s} {'tokens':>9s}"]
        for mode, r in self.modes.items():
            lines.append(
                f"{mode:17s} {r['bits_per_byte']:10.4f} {r['perplexity']:10.2f} "
                f"{int(r['tokens']):9d}"
            )
        for on, off in (("retrieval", "no_retrieval"), ("memory", "no_memory")):
            if on in self.modes and off in self.modes:
                gain = 1 - self.modes[on]["bits_per_byte"] / self.modes[off]["bits_per_byte"]
                lines.append(f"{on} lowers bits/byte by {100 * gain:.1f}%")
        if self.leakage:
            lines.append("")
            lines.append(
                "leakage: bits/byte on chunks whose overlap with their neighbours r <= alpha"
            )
            head = f"{'alpha':>6s} {'chunks':>7s}" + "".join(f" {m:>17s}" for m in self.modes)
            lines.append(head)
            for row in self.leakage:
                vals = "".join(f" {_cell(row.get(m, math.nan)):>17s}" for m in self.modes)
                lines.append(f"{row['alpha']:6.3f} {row['fraction']:7.1%}{vals}")
        return "\n".join(lines)

    def markdown(self) -> str:
        """The table as Markdown: one row per mode, then the leakage curve where there is one
        (what a model card or a README quotes)."""
        lines = ["| mode | bits/byte | token perplexity | tokens |", "|---|---:|---:|---:|"]
        for mode, r in self.modes.items():
            lines.append(
                f"| {mode} | {r['bits_per_byte']:.4f} | {r['perplexity']:.2f} "
                f"| {int(r['tokens'])} |"
            )
        if self.leakage:
            lines += ["", "| alpha | chunks | " + " | ".join(self.modes) + " |"]
            lines.append("|---:|---:|" + "---:|" * len(self.modes))
            for row in self.leakage:
                cells = " | ".join(_cell(row.get(m, math.nan)) for m in self.modes)
                lines.append(f"| {row['alpha']:.3f} | {row['fraction']:.1%} | {cells} |")
        return "\n".join(lines) + "\n"

    def csv_rows(self) -> list[dict[str, Any]]:
        """One row per mode: mode, bits_per_byte, perplexity, nll_per_token, tokens, bytes."""
        return [{"mode": mode, **r} for mode, r in self.modes.items()]


def _cell(bpb: float) -> str:
    """A table cell: "-" where no chunk falls below the threshold (no bits/byte to show)."""
    return "-" if math.isnan(bpb) else f"{bpb:.4f}"


def read_documents(text_dir: str | os.PathLike, glob: str) -> list[tuple[Path, str]]:
    root = Path(text_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"held-out folder {root} does not exist; pass --text DIR")
    docs = [
        (p, p.read_text(encoding="utf-8", errors="replace"))
        for p in sorted(root.glob(glob))
        if p.is_file()
    ]
    docs = [(p, t) for p, t in docs if t.strip()]
    if not docs:
        raise ValueError(
            f"held-out folder {root} has no non-empty file matching {glob!r}; "
            "put .txt documents in it (or pass another --glob)"
        )
    return docs


def longest_common_run(a: np.ndarray, b: np.ndarray, block: int = 128) -> np.ndarray:
    """Longest common contiguous run of tokens between a[i] and any of b[i, j].

    a: (C, m) with padding marked -1; b: (C, K, r) with padding marked -2 (so pads never
    match). Returns (C,) int: the paper's s(C).
    """
    out = np.zeros(len(a), dtype=np.int64)
    for s in range(0, len(a), block):
        aa, bb = a[s : s + block], b[s : s + block]
        eq = aa[:, None, :, None] == bb[:, :, None, :]  # (c, K, m, r)
        run = np.zeros(eq.shape[:2] + (eq.shape[3] + 1,), dtype=np.int32)
        best = np.zeros(len(aa), dtype=np.int64)
        for i in range(eq.shape[2]):  # run[j+1] = length of the match ending at (i, j)
            run[:, :, 1:] = (run[:, :, :-1] + 1) * eq[:, :, i, :]
            best = np.maximum(best, run.max(axis=(1, 2)))
        out[s : s + block] = best
    return out


def _window_shape(cfg: EvalConfig, m: int, max_len: int) -> tuple[int, int]:
    """(n, s): the window length and stride, rounded down to multiples of m."""
    n = int(cfg.seq_len or max_len) // m * m
    stride = int(cfg.stride or max(m, n // 2)) // m * m
    if n < m or stride < m or stride > n or n > max_len:
        unit = f"multiples of the chunk size {m} with " if m > 1 else ""
        raise ValueError(
            f"window {cfg.seq_len or max_len} / stride {cfg.stride or n // 2} must be {unit}"
            f"1 <= stride <= window <= the model's max_seq_len {max_len}; "
            "pass a smaller --seq-len / --stride"
        )
    return n, stride


@torch.no_grad()
def evaluate(
    model: nn.Module,
    text_dir: str | os.PathLike,
    db: Any = None,
    *,
    tokenizer: Any = None,
    config: EvalConfig | None = None,
    family: str | ModelFamily | None = None,
) -> EvalResult:
    """Score the documents of ``text_dir``; with ``db`` also with retrieval and leakage.

    Any model family: ``family`` (a name, default: looked up from the model's class)
    says how ids become logits and whether windows align to retrieval chunks. Families
    without retrieval are scored in the mode ``no_retrieval`` only and need ``tokenizer``.
    """
    cfg = config or EvalConfig()
    fam = family_of(model, family)
    if db is not None:
        check_no_retrieval(fam, model, "db")
    tok = tokenizer or getattr(db, "tokenizer", None)
    if tok is None:
        raise ValueError("evaluate needs the LM tokenizer: pass db= or tokenizer=")
    if fam.streaming:
        return _evaluate_streamed(fam, model, read_documents(text_dir, cfg.glob), tok, cfg)
    mcfg = model.config
    m, max_len = fam.chunk_size(mcfg), int(mcfg.max_seq_len)
    pad = int(getattr(mcfg, "pad_id", tok.pad_id))
    n, stride = _window_shape(cfg, m, max_len)
    docs = read_documents(text_dir, cfg.glob)
    # the family's extra retrieval modes (RETRO with a copy head: the head off) sit between
    variants = fam.eval_variants(model) if db is not None else {}
    modes = ["retrieval", *variants, "no_retrieval"] if db is not None else ["no_retrieval"]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    k, big_k = cfg.num_neighbours, max(cfg.num_neighbours, cfg.leakage_neighbours)
    from tqdm.auto import tqdm

    totals = {mode: 0.0 for mode in modes}
    num_tokens = num_bytes = 0
    chunk_nll: dict[str, list[np.ndarray]] = {mode: [] for mode in modes}
    chunk_bytes: list[np.ndarray] = []
    overlaps: list[np.ndarray] = []
    try:
        for _path, text in tqdm(docs, desc="evaluate", unit="doc", disable=None):
            ids = np.asarray(tok.encode(text) + [tok.eos_id], dtype=np.int64)
            if cfg.max_tokens:
                ids = ids[: cfg.max_tokens]
            ret = mask = None
            if db is not None:
                chunk_rows, nbr, ret, mask = _neighbours(db, ids, m, pad, k, big_k)
                overlaps.append(_overlaps(db, chunk_rows, nbr, pad))
            # nll[mode][t]: NLL of token t given the tokens before it (token 0: unscored, 0)
            nll = _score_document(
                fam, model, ids, modes, variants, ret, mask, n, stride, m, pad, cfg, device
            )
            # bits/byte divides by the bytes of the scored text: every token but the first
            num_tokens += len(ids) - 1
            num_bytes += len(tok.decode(ids[1:].tolist()).encode("utf-8"))
            for mode in modes:
                totals[mode] += float(nll[mode].sum())
            if db is not None:  # per chunk, for the leakage curve
                chunks = len(chunk_rows)
                for mode in modes:
                    padded = np.zeros(chunks * m)
                    padded[: len(ids)] = nll[mode]
                    chunk_nll[mode].append(padded.reshape(chunks, m).sum(1))
                chunk_bytes.append(_chunk_bytes(tok, ids, chunks, m))
    finally:
        model.train(was_training)

    results = {mode: _summary(totals[mode], num_tokens, num_bytes) for mode in modes}
    leakage = _leakage(cfg.alphas, modes, chunk_nll, chunk_bytes, overlaps) if overlaps else []
    return EvalResult(results, leakage, len(docs), sum(len(b) for b in chunk_bytes))


def _neighbours(
    db: Any, ids: np.ndarray, m: int, pad: int, k: int, big_k: int
) -> tuple[np.ndarray, np.ndarray, Tensor, Tensor]:
    """The document's chunks (C, m) (its end padded), their ``big_k`` nearest database
    chunks (C, K) and the ``k`` first of them as model input (C, k, 2m), mask (C, k)."""
    chunk_rows = np.full((math.ceil(len(ids) / m), m), pad, dtype=np.int64)
    chunk_rows.reshape(-1)[: len(ids)] = ids
    nbr, _ = db.search_tokens(chunk_rows, big_k)
    ret, mask = db.retrieved_tokens(nbr[:, :k])
    return chunk_rows, nbr, ret, mask


@torch.no_grad()
def document_nll(
    model: nn.Module,
    ids: Any,
    db: Any = None,
    *,
    modes: list[str] | None = None,
    config: EvalConfig | None = None,
    family: str | ModelFamily | None = None,
    pad_id: int = 0,
    greedy: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Per mode, the (L,) NLL (nats) of each token of one tokenized document ``ids`` given
    the tokens before it (token 0: unscored, 0), scored exactly as ``evaluate`` scores a
    document: the same windows and neighbours (``db``), or streamed whole for a streaming
    family. ``modes`` (default all of ``evaluate``'s) picks e.g. ``["retrieval"]`` or
    ``["no_retrieval"]``; ``greedy``, when given, is filled per mode with (L,) bools: is
    each token the model's most likely one."""
    cfg = config or EvalConfig()
    fam = family_of(model, family)
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if db is not None:
        check_no_retrieval(fam, model, "db")
    mcfg = model.config
    pad = int(getattr(mcfg, "pad_id", pad_id))
    device = next(model.parameters()).device
    variants = fam.eval_variants(model) if db is not None or fam.streaming else {}
    if fam.streaming:
        every = list(variants) or ["memory"]
    else:
        every = ["retrieval", *variants, "no_retrieval"] if db is not None else ["no_retrieval"]
    modes = list(modes or every)
    if not set(modes) <= set(every):
        raise ValueError(f"modes {modes} must be among {every} for this model and database")
    was_training = model.training
    model.eval()
    try:
        if fam.streaming:
            return _stream_document(fam, model, ids, modes, variants, cfg, device, greedy)
        m = fam.chunk_size(mcfg)
        n, stride = _window_shape(cfg, m, int(mcfg.max_seq_len))
        ret = mask = None
        if db is not None:
            # searched as deep as evaluate's leakage search: the same k first neighbours
            k, big_k = cfg.num_neighbours, max(cfg.num_neighbours, cfg.leakage_neighbours)
            _rows, _nbr, ret, mask = _neighbours(db, ids, m, pad, k, big_k)
        return _score_document(
            fam, model, ids, modes, variants, ret, mask, n, stride, m, pad, cfg, device, greedy
        )
    finally:
        model.train(was_training)


def _stream_document(fam, model, ids, modes, variants, cfg, device, greedy):
    """``document_nll`` of a streaming family: the document whole through one cache."""
    mcfg = model.config
    piece = int(cfg.seq_len or getattr(mcfg, "segment_len", None) or mcfg.max_seq_len)
    inp = torch.from_numpy(ids)[None].to(device)
    out = {}
    for mode in modes:
        with variants[mode](model) if mode in variants else contextlib.nullcontext():
            hits: list[Tensor] = []
            nll = _stream_nll(fam, model, inp, piece, hits)[0].numpy()
        out[mode] = np.concatenate([[0.0], nll])
        if greedy is not None:
            greedy[mode] = np.concatenate([[True], torch.cat(hits, 1)[0].numpy()])
    return out


def _summary(tot: float, num_tokens: int, num_bytes: int) -> dict[str, float]:
    """One mode's scores from its total NLL (nats) over the scored tokens and bytes."""
    return {
        "bits_per_byte": tot / math.log(2) / max(num_bytes, 1),
        "perplexity": math.exp(tot / max(num_tokens, 1)),
        "nll_per_token": tot / max(num_tokens, 1),
        "tokens": num_tokens,
        "bytes": num_bytes,
    }


def _chunk_bytes(tok: Any, ids: np.ndarray, chunks: int, m: int) -> np.ndarray:
    """(chunks,) bytes of the scored text of each chunk (token 0 is never scored)."""
    return np.array(
        [
            len(tok.decode(ids[max(c * m, 1) : (c + 1) * m].tolist()).encode())
            for c in range(chunks)
        ],
        dtype=np.float64,
    )


def _overlaps(db: Any, chunk_rows: np.ndarray, nbr: np.ndarray, pad: int) -> np.ndarray:
    """r(C) = s(C) / |C| of every chunk against its K retrieved values (C,)."""
    values, vmask = db.retrieved_tokens(nbr)  # (C, K, 2m)
    a = np.where(chunk_rows == pad, -1, chunk_rows)
    bvals = np.where(values.numpy() == pad, -2, values.numpy())
    bvals[~vmask.numpy()] = -2
    real = np.maximum((a >= 0).sum(1), 1)
    return longest_common_run(a, bvals) / real


def _leakage(alphas, modes, chunk_nll, chunk_bytes, overlaps) -> list[dict[str, float]]:
    """Bits/byte of each mode on the chunks with overlap r <= alpha. Chunk bytes decode
    each chunk alone, so at alpha = 1 this equals the mode's bits/byte up to characters
    that a chunk boundary splits."""
    r, b = np.concatenate(overlaps), np.concatenate(chunk_bytes)
    nll = {mode: np.concatenate(chunk_nll[mode]) for mode in modes}
    rows = []
    for alpha in alphas:
        keep = r <= alpha + 1e-9
        row = {"alpha": alpha, "fraction": float(keep.mean())}
        kept = b[keep].sum()
        for mode in modes:
            row[mode] = float(nll[mode][keep].sum() / math.log(2) / kept) if kept else float("nan")
        rows.append(row)
    return rows


def _score_document(
    fam: ModelFamily,
    model: nn.Module,
    ids: np.ndarray,  # (L,) one document
    modes: list[str],
    variants: dict[str, Any],  # mode -> context(model) it is scored in
    ret: Tensor | None,  # (C, k, 2m) neighbours of every chunk, or None
    mask: Tensor | None,  # (C, k)
    n: int,
    stride: int,
    m: int,
    pad: int,
    cfg: EvalConfig,
    device: torch.device,
    greedy: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Slide windows over one document; each target is scored by the first window that
    holds it with at least one token of context. Returns per mode the (L,) token NLLs
    (and fills ``greedy``, if given, with whether each target is the argmax)."""
    windows, done, w = [], 1, 0  # done: index of the first target not yet scored
    while done < len(ids):
        end = min(w + n + 1, len(ids))  # the window's tokens ids[w:end]
        windows.append((w, end, done))
        done = end
        w += stride
    nll = {mode: np.zeros(len(ids)) for mode in modes}
    if greedy is not None:
        greedy.update({mode: np.ones(len(ids), dtype=bool) for mode in modes})
    for i in range(0, len(windows), cfg.batch_size):
        group = windows[i : i + cfg.batch_size]
        inp = torch.full((len(group), n + 1), pad, dtype=torch.long)
        for j, (w, end, _) in enumerate(group):
            inp[j, : end - w] = torch.from_numpy(ids[w:end])
        inp = inp.to(device)
        for mode in modes:
            kw = {}
            if mode != "no_retrieval":
                l = n // m
                r = torch.zeros(len(group), l, ret.shape[1], 2 * m, dtype=torch.long)
                rm = torch.zeros(len(group), l, ret.shape[1], dtype=torch.bool)
                for j, (w, _end, _) in enumerate(group):
                    c0, c1 = w // m, min(w // m + l, ret.shape[0])
                    r[j, : c1 - c0], rm[j, : c1 - c0] = ret[c0:c1], mask[c0:c1]
                kw = {"retrieved": r.to(device), "neighbour_mask": rm.to(device)}
            with variants[mode](model) if mode in variants else contextlib.nullcontext():
                logits = fam.logits(model, inp[:, :-1], **kw)  # (g, n, V)
            logp = F.log_softmax(logits.float(), dim=-1)
            tgt_nll = -logp.gather(-1, inp[:, 1:, None]).squeeze(-1).cpu().numpy()  # (g, n)
            top = (logp.argmax(-1) == inp[:, 1:]).cpu().numpy() if greedy is not None else None
            for j, (w, end, first) in enumerate(group):
                # target t sits at index t - w - 1 of the window's predictions
                nll[mode][first:end] = tgt_nll[j, first - w - 1 : end - w - 1]
                if top is not None:
                    greedy[mode][first:end] = top[j, first - w - 1 : end - w - 1]
    return nll


def _evaluate_streamed(
    fam: ModelFamily, model: nn.Module, docs: list[tuple[Path, str]], tok: Any, cfg: EvalConfig
) -> EvalResult:
    """Score a streaming family: each document whole through one cache (module docstring).

    Documents are batched ``cfg.batch_size`` at a time in order of length; a shorter one is
    padded at its end, which (causal model) changes none of its scored positions."""
    mcfg = model.config
    piece = int(cfg.seq_len or getattr(mcfg, "segment_len", None) or mcfg.max_seq_len)
    if piece < 1:
        raise ValueError(f"seq_len must be >= 1 tokens per streamed piece, got {piece}")
    pad = int(getattr(mcfg, "pad_id", tok.pad_id))
    variants = fam.eval_variants(model)
    modes = list(variants) or ["memory"]
    encoded = []
    for _path, text in docs:
        ids = np.asarray(tok.encode(text) + [tok.eos_id], dtype=np.int64)
        encoded.append(ids[: cfg.max_tokens] if cfg.max_tokens else ids)
    device = next(model.parameters()).device
    totals = dict.fromkeys(modes, 0.0)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    try:
        for g in tqdm(range(0, len(order), cfg.batch_size), desc="evaluate", disable=None):
            group = [encoded[i] for i in order[g : g + cfg.batch_size]]
            inp = torch.full((len(group), max(map(len, group))), pad, dtype=torch.long)
            for j, ids in enumerate(group):
                inp[j, : len(ids)] = torch.from_numpy(ids)
            for mode in modes:
                with variants[mode](model) if mode in variants else contextlib.nullcontext():
                    nll = _stream_nll(fam, model, inp.to(device), piece)  # (g, L - 1)
                totals[mode] += sum(
                    float(nll[j, : len(ids) - 1].sum()) for j, ids in enumerate(group)
                )
    finally:
        model.train(was_training)
    num_tokens = sum(len(ids) - 1 for ids in encoded)
    num_bytes = sum(len(tok.decode(ids[1:].tolist()).encode("utf-8")) for ids in encoded)
    results = {mode: _summary(totals[mode], num_tokens, num_bytes) for mode in modes}
    return EvalResult(results, [], len(docs), 0)


def _stream_nll(
    fam: ModelFamily, model: nn.Module, inp: Tensor, piece: int, hits: list | None = None
) -> Tensor:
    """(g, L - 1) NLL of each token of ``inp`` (g, L) but the first, fed ``piece`` tokens at
    a time through one fresh cache (``hits``, if given, gets per piece whether each target
    is the argmax)."""
    cache = fam.init_cache(model, inp.shape[0])
    if cache is None:
        raise ValueError(f"the streaming family {fam.name!r} returned no cache from init_cache")
    out = []
    for s in range(0, inp.shape[1] - 1, piece):
        x = inp[:, s : min(s + piece, inp.shape[1] - 1)]
        logp = F.log_softmax(fam.logits(model, x, cache).float(), dim=-1)  # (g, p, V)
        tgt = inp[:, s + 1 : s + 1 + x.shape[1], None]
        out.append(-logp.gather(-1, tgt).squeeze(-1).cpu())
        if hits is not None:
            hits.append((logp.argmax(-1) == tgt[..., 0]).cpu())
    return torch.cat(out, dim=1)


def save_report(result: EvalResult, out_dir: str | os.PathLike, name: str = "eval") -> list[Path]:
    """Write ``name.json``, the table as ``name.csv`` and ``name.md`` and, with matplotlib,
    ``name_leakage.png``; returns the paths."""
    import csv

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.csv", out / f"{name}.md"]
    write_json(paths[0], result.to_dict())  # empty leakage bins: null, not NaN
    rows = result.csv_rows()
    with atomic_path(paths[1]) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with atomic_path(paths[2]) as tmp:
        Path(tmp).write_text(result.markdown())
    if result.leakage:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return paths
        fig, ax = plt.subplots(figsize=(6, 4))
        alphas = [r["alpha"] for r in result.leakage]
        for mode in result.modes:
            ax.plot(alphas, [r[mode] for r in result.leakage], "o-", label=mode.replace("_", " "))
        ax.set_xlabel("max overlap r = s/m with retrieved neighbours (alpha)")
        ax.set_ylabel("bits per byte")
        ax.set_title("held-out bits/byte on chunks with overlap <= alpha")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        paths.append(out / f"{name}_leakage.png")
        save_figure(fig, paths[-1])
        plt.close(fig)
    return paths
