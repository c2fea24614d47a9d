"""How much verbatim material can retrieval offer the demo's held-out books at all?

A diagnostic for the demo's retrieval gain (issue 4), no model involved:

  books  : per KJV book, the fraction of its LM tokens that end a 5-token run found in some
           *other* book (what any retriever could at best hand to a copying model), with
           the books it shares most with. Picks which books to hold out.
  align  : for a built database and a held-out folder, how often a retrieved neighbour's
           continuation holds the next chunk's token *at the same position* (the copy that
           RETRO learns first, see history/demo.md), as retrieved and after shifting each
           neighbour window by the offset that best aligns it with its query chunk
           (most matching bigrams, later positions weighted up); also for training
           sequences, with the dataset's document filtering.

    python -m benchmarks.experiments.retrieval_ceiling books WORK/kjv DB
    python -m benchmarks.experiments.retrieval_ceiling align DB HELD_OUT_DIR
(``DB`` provides the tokenizer in ``books``; any demo database will do.)
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np

from benchmarks import common


def book_overlap(kjv: Path, db_path: str, g: int = 5, top: int = 20) -> None:
    from retrolm.retrieval import RetrievalDatabase

    tok = RetrievalDatabase.open(db_path).tokenizer
    books = {f.stem: tok.encode(f.read_text()) for f in sorted(kjv.glob("*.txt"))}
    where: dict[tuple, set] = collections.defaultdict(set)
    for name, ids in books.items():
        for i in range(len(ids) - g + 1):
            where[tuple(ids[i : i + g])].add(name)
    rows = []
    for name, ids in books.items():
        others = [where[tuple(ids[i : i + g])] - {name} for i in range(len(ids) - g + 1)]
        src = collections.Counter(o for s in others for o in s)
        rows.append((np.mean([bool(s) for s in others]), name, len(ids), src.most_common(3)))
    print(f"{'copyable':>8s}  {'book':10s} {'tokens':>6s}  shares most with (5-grams)")
    for frac, name, n, src in sorted(rows, reverse=True)[:top]:
        print(f"{frac:8.3f}  {name:10s} {n:6d}  {', '.join(f'{b} {c}' for b, c in src)}")


class Aligner:
    """Windows of 2m database tokens around a neighbour chunk, optionally re-aligned."""

    def __init__(self, db, search: int | None = None):
        self.m = m = db.chunk_size
        self.flat = np.asarray(db.chunks)[:, :m].astype(np.int64).reshape(-1)
        self.docs = np.asarray(db.doc_ids)
        self.tokdoc = np.repeat(self.docs, m)
        self.w = search or m
        self.pad = db.tokenizer.pad_id

    def _tokens(self, c: int, idx: np.ndarray, fill: int) -> np.ndarray:
        ok = (idx >= 0) & (idx < len(self.flat))
        safe = np.clip(idx, 0, len(self.flat) - 1)
        ok &= self.tokdoc[safe] == self.docs[c]  # never read into another document
        return np.where(ok, self.flat[safe], fill)

    def offset(self, q: np.ndarray, c: int) -> int:
        m, w = self.m, self.w
        s = self._tokens(c, c * m - w + np.arange(2 * w + m), -1)
        eq = np.lib.stride_tricks.sliding_window_view(s, m) == q[None]  # (2w+1, m)
        bigram = eq[:, 1:] & eq[:, :-1]
        score = (bigram * (1 + np.arange(1, m) / m)).sum(1)
        d = int(np.argmax(score))
        return d - w if bigram[d].sum() >= 2 else 0

    def continuation(self, c: int, d: int = 0) -> np.ndarray:
        return self._tokens(c, c * self.m + d + self.m + np.arange(self.m), self.pad)


def positional_copy(al: Aligner, triples) -> dict[str, float]:
    """triples: (query chunk (m,), next chunk (m,), neighbour ids (k,))."""
    hit0 = hit_a = moved = nbrs = total = 0
    for q, nxt, ids in triples:
        h0 = np.zeros(al.m, bool)
        ha = np.zeros(al.m, bool)
        for c in ids:
            if c < 0:
                continue
            d = al.offset(q, int(c))
            moved, nbrs = moved + (d != 0), nbrs + 1
            h0 |= al.continuation(int(c)) == nxt
            ha |= al.continuation(int(c), d) == nxt
        hit0, hit_a, total = hit0 + h0.sum(), hit_a + ha.sum(), total + al.m
    return dict(as_retrieved=hit0 / total, aligned=hit_a / total, moved=moved / max(nbrs, 1))


def alignment(db_path: str, held: Path, k: int, sequences: int) -> None:
    from retrolm.data import RETRODataset
    from retrolm.retrieval import RetrievalDatabase

    db = RetrievalDatabase.open(db_path)
    al, m, tok = Aligner(db), db.chunk_size, db.tokenizer
    print(f"{'text':14s} {'same-position copy, as retrieved':>33s} {'aligned':>8s} {'moved':>6s}")
    for f in sorted(held.glob("*.txt")):
        ids = tok.encode(f.read_text())
        rows = np.array(ids[: len(ids) // m * m]).reshape(-1, m)
        nbr, _ = db.search_tokens(rows, k)
        r = positional_copy(al, [(rows[c], rows[c + 1], nbr[c]) for c in range(len(rows) - 1)])
        print(f"{f.stem:14s} {r['as_retrieved']:33.4f} {r['aligned']:8.4f} {r['moved']:6.2f}")
    ds = RETRODataset(db, seq_len=db.manifest.get("seq_len", 256), num_neighbours=k)
    chunks = np.asarray(db.chunks)[:, :m]
    rng = np.random.default_rng(0)
    triples = []
    for i in rng.choice(len(ds), min(sequences, len(ds)), replace=False):
        cid, nb = ds.chunk_ids(i), ds.neighbour_ids(i)
        triples += [(chunks[cid[u]], chunks[cid[u] + 1], nb[u]) for u in range(len(cid) - 1)]
    r = positional_copy(al, triples)
    print(f"{'training':14s} {r['as_retrieved']:33.4f} {r['aligned']:8.4f} {r['moved']:6.2f}")


def main() -> None:
    p = common.parser(__doc__)
    sub = p.add_subparsers(dest="what", required=True)
    b = sub.add_parser("books")
    b.add_argument("kjv", type=Path)
    b.add_argument("db")
    a = sub.add_parser("align")
    a.add_argument("db")
    a.add_argument("held", type=Path)
    a.add_argument("--neighbours", type=int, default=2)
    a.add_argument("--sequences", type=int, default=300)
    args = p.parse_args()
    if args.what == "books":
        book_overlap(args.kjv, args.db)
    else:
        alignment(args.db, args.held, args.neighbours, args.sequences)


if __name__ == "__main__":
    main()
