"""``retrolm db build | info | query | check``: the retrieval database from the command line."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from retrolm.cli.flags import add_dataclass_flags
from retrolm.retrieval.build import BuildConfig


def register(subparsers) -> None:
    db = subparsers.add_parser("db", help="build, inspect and query a retrieval database")
    sub = db.add_subparsers(dest="db_command", metavar="DB_COMMAND", required=True)

    b = sub.add_parser(
        "build",
        help="text folder -> chunks -> embeddings -> index -> neighbours",
        description="Build (or resume) a retrieval database; rerun to resume.",
    )
    b.add_argument("text_dir", metavar="TEXT_DIR")
    b.add_argument("db_dir", metavar="DB_DIR")
    add_dataclass_flags(b, BuildConfig)
    b.add_argument(
        "--restart",
        action="store_true",
        help="discard the build already in DB_DIR (its files only) and build from scratch; "
        "needed after TEXT_DIR changed",
    )
    b.set_defaults(func=run_build)

    i = sub.add_parser("info", help="print a database's manifest and file sizes")
    i.add_argument("db_dir", metavar="DB")
    i.add_argument("--json", action="store_true", help="the raw manifest")
    i.set_defaults(func=run_info)

    q = sub.add_parser("query", help="nearest chunks of a text, with source file and distance")
    q.add_argument("db_dir", metavar="DB")
    q.add_argument("text")
    q.add_argument("-k", type=int, default=5, help="results (default: 5)")
    q.add_argument(
        "--encoder",
        help="encoder folder to embed the query with (default: the one the database records); "
        "its weights must be the build's",
    )
    add_search_flags(q)
    q.set_defaults(func=run_query)

    c = sub.add_parser(
        "check",
        help="recall@k of the index against exact search on a sample, and the query time",
        description="Query the index with a sample of the database's own chunks and compare "
        "with an exact (brute-force) search over the stored embeddings: recall@k (1.0 for an "
        "exact index) and milliseconds per query. Try --nprobe / --ef-search values here "
        "before using them.",
    )
    c.add_argument("db_dir", metavar="DB")
    c.add_argument("--sample", type=int, default=1000, help="chunks queried (default: 1000)")
    c.add_argument("-k", type=int, default=10, help="neighbours compared (default: 10)")
    c.add_argument("--seed", type=int, default=0, help="which chunks are sampled (default: 0)")
    c.add_argument("--json", action="store_true", help="the report as JSON")
    add_search_flags(c)
    c.set_defaults(func=run_check)


def add_search_flags(p: argparse.ArgumentParser) -> None:
    """Query-time index parameters (the build's values by default)."""
    p.add_argument(
        "--nprobe",
        type=int,
        help="ivf/ivfpq: inverted lists searched per query, 1..nlist (default: the build's)",
    )
    p.add_argument(
        "--ef-search",
        type=int,
        help="hnsw: beam width of the graph search (default: the build's)",
    )


def run_build(args: argparse.Namespace) -> int:
    from retrolm.retrieval.build import build_database

    config = BuildConfig(**{f.name: getattr(args, f.name) for f in fields(BuildConfig)})
    m = build_database(args.text_dir, args.db_dir, config, restart=args.restart)
    print(
        f"database {args.db_dir}: {m['num_chunks']} chunks from {m['num_documents']} documents, "
        f"index {m['index']['kind']}, K={m['num_neighbour_columns']}"
    )
    return 0


def run_info(args: argparse.Namespace) -> int:
    from retrolm.retrieval.store import read_manifest

    root = Path(args.db_dir)
    m = read_manifest(root)
    if m is None:
        raise FileNotFoundError(f"{args.db_dir!r} is not a retrieval database (no manifest.json)")
    if args.json:
        print(json.dumps(m, indent=1, sort_keys=True))
        return 0
    status = "complete" if m.get("complete") else f"INCOMPLETE ({', '.join(m['stages_done'])})"
    print(f"database   {root} ({status}, format v{m['format_version']})")
    print(f"text       {m['text_dir']} (glob {m['config']['glob']!r})")
    if "inputs" in m:
        i = m["inputs"]
        print(
            f"inputs     {i['files']} files, {i['bytes'] / 2**20:.1f} MiB (listed in {i['file']})"
        )
    if "num_chunks" in m:
        print(
            f"chunks     {m['num_chunks']} x {m['chunk_size']} tokens from "
            f"{m['num_documents']} documents; {m['num_sequences']} sequences of {m['seq_len']}"
        )
    if "tokenizer" in m:
        t = m["tokenizer"]
        print(f"tokenizer  byte-level BPE, vocab {t['vocab_size']}, sha256 {t['hash'][:16]}")
    if "encoder" in m:
        e = m["encoder"]
        print(
            f"encoder    {e['name']} ({e['dim']}-d, {e['pooling']}, {e['dtype']}, "
            f"max_length {e['max_length']}), sha256 {e['sha256'][:16]}"
        )
    if "index" in m:
        print(f"index      {m['index']['kind']} ({m['index']['factory']})")
    if "neighbours" in m:
        print(f"neighbours {m['neighbours']} + {m['extra_neighbours']} extra columns")
    rep = m.get("report", {}).get("chunk")
    if rep:
        print(
            f"report     {rep['files']} files: {rep['documents']} documents, "
            f"{rep['skipped_empty']} empty and {rep['skipped_binary']} binary skipped, "
            f"{rep['invalid_utf8_replaced']} with invalid UTF-8 replaced"
        )
    total = 0
    for name, a in sorted(m.get("arrays", {}).items()):
        size = (root / a["file"]).stat().st_size if (root / a["file"]).exists() else 0
        total += size
        print(f"  {name:16s} {a['dtype']:8s} {str(tuple(a['shape'])):18s} {size / 2**20:10.1f} MiB")
    if "index" in m and (root / m["index"]["file"]).exists():
        size = (root / m["index"]["file"]).stat().st_size
        total += size
        print(f"  {'index':16s} {'faiss':8s} {'':18s} {size / 2**20:10.1f} MiB")
    print(f"  {'total':16s} {'':8s} {'':18s} {total / 2**20:10.1f} MiB")
    return 0


def run_query(args: argparse.Namespace) -> int:
    from retrolm.retrieval.database import RetrievalDatabase

    if args.k < 1:
        raise ValueError(f"-k {args.k} must be at least 1")
    db = RetrievalDatabase.open(args.db_dir, encoder=args.encoder)
    db.set_search(args.nprobe, args.ef_search)
    ids, dists = db.search([args.text], args.k)
    for rank, (i, d) in enumerate(zip(ids[0], dists[0]), 1):
        if i < 0:
            break
        text = db.tokenizer.decode(db.chunks[i, :-1])
        snippet = " ".join(text.split())[:160]
        print(f"{rank}. chunk {i}  dist {d:.4f}  {db.doc_path(db.doc_ids[i])}\n   {snippet}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from retrolm.retrieval.check import check_index
    from retrolm.retrieval.database import RetrievalDatabase

    db = RetrievalDatabase.open(args.db_dir)
    db.set_search(args.nprobe, args.ef_search)
    r = check_index(db.searcher, db.embeddings, sample=args.sample, k=args.k, seed=args.seed)
    if args.json:
        print(json.dumps(r.to_json(), indent=1))
        return 0
    params = [f"nprobe {r.nprobe}"] if r.nprobe else []
    params += [f"ef_search {r.ef_search}"] if r.ef_search else []
    print(
        f"index      {r.kind} ({r.factory}) over {r.ntotal} chunks{', ' if params else ''}"
        f"{', '.join(params)}"
    )
    print(f"recall@{r.k:<3d} {r.recall:.4f} on {r.queries} sampled chunks (exact search as truth)")
    print(
        f"query time {r.ms_per_query:.3f} ms/query (index), "
        f"{r.exact_ms_per_query:.3f} ms/query (exact numpy search)"
    )
    return 0
