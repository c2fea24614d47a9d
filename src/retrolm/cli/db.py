"""``retrolm db build | add | info | query | check | plan``: the retrieval database, by command."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from retrolm.cli.flags import add_dataclass_flags
from retrolm.retrieval.build import ENGINES, BuildConfig


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
    add_dataclass_flags(b, BuildConfig, choices={"engine": ENGINES})
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
    _register_query(sub)
    _register_add(sub)
    _register_check(sub)
    _register_plan(sub)


def _register_query(sub) -> None:
    q = sub.add_parser(
        "query",
        help="nearest chunks of a text; or, with --text DIR --out OUT, the neighbours of "
        "every chunk of another corpus (for training)",
        description="Two forms. `retrolm db query DB TEXT [-k 5]` prints the nearest chunks "
        "of TEXT with their source file and distance. `retrolm db query DB --text TRAIN_DIR "
        "--out NEIGHBOURS_DIR` chunks the folder with DB's tokenizer, embeds it with DB's "
        "encoder and stores each chunk's neighbours in DB (a chunk never retrieves its own "
        "document: shared documents are matched by content); rerun to resume. Train on it "
        "with `retrolm train --db DB --neighbours NEIGHBOURS_DIR`.",
    )
    q.add_argument("db_dir", metavar="DB")
    q.add_argument("text", nargs="?", metavar="TEXT", help="a text to look up")
    q.add_argument("-k", type=int, default=5, help="results for TEXT (default: 5)")
    q.add_argument(
        "--encoder",
        help="encoder folder to embed with (default: the one the database records); "
        "its weights must be the build's",
    )
    q.add_argument("--text", dest="text_dir", metavar="TRAIN_DIR", help="a corpus folder")
    q.add_argument("--out", metavar="NEIGHBOURS_DIR", help="with --text: where to store")
    q.add_argument("--glob", default="**/*.txt", help="with --text: documents (default **/*.txt)")
    q.add_argument(
        "--block-size", type=int, default=4096, help="with --text: chunks per resumable block"
    )
    q.add_argument(
        "--restart", action="store_true", help="with --text: discard what NEIGHBOURS_DIR holds"
    )
    add_search_flags(q)
    q.set_defaults(func=run_query)


def _register_add(sub) -> None:
    a = sub.add_parser(
        "add",
        help="append the documents of a folder to a database (chunks, embeddings, index)",
        description="Grow a database: chunk NEW_DIR with its tokenizer, embed with its "
        "encoder, add the keys to its index (an IVF/PQ index keeps its trained quantizer "
        "unless --retrain) and store the new chunks' neighbours among all chunks. The "
        "manifest records each addition. Rerun the same command to resume.",
    )
    a.add_argument("db_dir", metavar="DB")
    a.add_argument("new_dir", metavar="NEW_DIR")
    a.add_argument("--glob", default="**/*.txt", help="documents in NEW_DIR (default **/*.txt)")
    a.add_argument(
        "--retrain",
        action="store_true",
        help="train a new index of the build's kind for the grown size (slower; worth it "
        "once `db info` says the index was trained on far fewer chunks)",
    )
    a.add_argument(
        "--refresh-neighbours",
        action="store_true",
        help="also recompute the stored neighbours of the older chunks (the new chunks may "
        "be nearer); without it they keep theirs",
    )
    a.set_defaults(func=run_add)


def _register_check(sub) -> None:
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


def _register_plan(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="the index, memory and time per stage of a build of N chunks (from measured rates)",
        description="Plan a build of N chunks under a memory budget: the index the build "
        "would choose (its own rule, --index auto), the index's bytes, each stage's peak "
        "memory and time on the machine the rates were measured on, and with --workers W "
        "(embed, index add and neighbours split over W workers of that machine's cores). "
        "Rates ship with retrolm (benchmarks/scale/bench_scale.py); --rates FILE uses others.",
    )
    p.add_argument("--chunks", required=True, help="N: chunks to build (e.g. 1M, 30M, 300000)")
    p.add_argument("--memory", required=True, help="memory budget of the index (e.g. 4G, 64G)")
    p.add_argument("--workers", type=int, default=1, help="workers (default: 1)")
    p.add_argument("--index", default="auto", help="index kind (default: auto, as the build)")
    p.add_argument(
        "--nprobe",
        type=int,
        default=0,
        help="ivf/ivfpq lists probed per neighbour search, as `db build --nprobe` "
        "(default: nlist/8); fewer is faster at a lower recall",
    )
    p.add_argument("--rates", help="a rates JSON written by bench_scale (default: shipped)")
    p.add_argument("--json", action="store_true", help="the plan as JSON")
    p.set_defaults(func=run_plan)


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


def apply_search_flags(args: argparse.Namespace, db, retrieve: bool) -> None:
    """``--nprobe`` / ``--ef-search`` onto the database a command retrieves from; refused
    (one line) where nothing is retrieved."""
    given = [f for f, v in (("--nprobe", args.nprobe), ("--ef-search", args.ef_search)) if v]
    if not given:
        return
    if not retrieve or db is None:
        raise ValueError(f"{' and '.join(given)} set(s) how the database is searched, but this "
                         "command retrieves nothing here; drop it")  # fmt: skip
    db.set_search(args.nprobe, args.ef_search)


def run_build(args: argparse.Namespace) -> int:
    from retrolm.retrieval.build import build_database

    config = BuildConfig(**{f.name: getattr(args, f.name) for f in fields(BuildConfig)})
    if config.tokenizer and Path(config.tokenizer).is_dir():  # a base to RETRO-fit
        from retrolm.train.retrofit import base_tokenizer_file

        config.tokenizer = str(base_tokenizer_file(config.tokenizer))
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
        from retrolm.retrieval.grow import index_advice

        print(f"index      {m['index']['kind']} ({m['index']['factory']})")
        if advice := index_advice(m):
            print(f"           note: {advice}")
    for n, add in enumerate(m.get("additions", []), 1):
        print(
            f"addition {n} {add['time']}: {add['inputs']['files']} files, {add['documents']} "
            f"documents, {add['chunks']} chunks from {add['text_dir']} (index {add['index']}"
            f"{', neighbours refreshed' if add['refreshed_neighbours'] else ''})"
        )
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

    if (args.text is None) == (args.text_dir is None):
        raise ValueError(
            "give a TEXT to look up, or --text TRAIN_DIR --out NEIGHBOURS_DIR for a corpus"
            f"{', not both' if args.text else ''}"
        )
    if (args.text_dir is None) != (args.out is None):
        raise ValueError("--text TRAIN_DIR and --out NEIGHBOURS_DIR go together: pass both")
    if args.k < 1:
        raise ValueError(f"-k {args.k} must be at least 1")
    db = RetrievalDatabase.open(args.db_dir, encoder=args.encoder)
    db.set_search(args.nprobe, args.ef_search)
    if args.text_dir is not None:
        from retrolm.retrieval.query import query_corpus

        m = query_corpus(
            db,
            args.text_dir,
            args.out,
            glob=args.glob,
            block_size=args.block_size,
            restart=args.restart,
        )
        print(
            f"neighbours {args.out}: {m['num_chunks']} chunks of {m['num_documents']} documents "
            f"({m['report']['documents_in_database']} also in the database), "
            f"K={m['num_neighbour_columns']} from {args.db_dir}"
        )
        return 0
    ids, dists = db.search([args.text], args.k)
    for rank, (i, d) in enumerate(zip(ids[0], dists[0]), 1):
        if i < 0:
            break
        text = db.tokenizer.decode(db.chunks[i, :-1])
        snippet = " ".join(text.split())[:160]
        print(f"{rank}. chunk {i}  dist {d:.4f}  {db.doc_path(db.doc_ids[i])}\n   {snippet}")
    return 0


def run_add(args: argparse.Namespace) -> int:
    from retrolm.retrieval.grow import add_documents

    m = add_documents(
        args.db_dir,
        args.new_dir,
        glob=args.glob,
        retrain=args.retrain,
        refresh_neighbours=args.refresh_neighbours,
    )
    a = m["additions"][-1]
    print(
        f"database {args.db_dir}: +{a['chunks']} chunks from {a['documents']} documents, now "
        f"{m['num_chunks']} chunks (index {a['index']})"
    )
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


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def run_plan(args: argparse.Namespace) -> int:
    from retrolm.retrieval.plan import plan_build

    p = plan_build(args.chunks, args.memory, args.workers, args.index, args.rates, args.nprobe)
    if args.json:
        print(json.dumps(p.to_json(), indent=1))
        return 0
    gib, ix = 2**30, p.index
    search = f", nprobe {ix['nprobe']}" if ix["nprobe"] else ""
    search += f", ef_search {ix['ef_search']}" if ix["ef_search"] else ""
    trained = f", trained on {ix['train_size']:,}" if ix["train_size"] else ""
    peak = max(p.stages, key=lambda s: s.peak_bytes)
    w = f"{p.workers} worker{'s' if p.workers > 1 else ''}"
    print(f"plan       {p.num_chunks:,} chunks, memory budget {p.memory_budget / gib:.1f} GiB")
    print(f"index      {ix['kind']} ({ix['factory']}{search}{trained})")
    print(
        f"memory     index {p.index_bytes / gib:.2f} GiB; build peak "
        f"{p.build_peak_bytes / gib:.2f} GiB ({peak.stage} stage, per worker)"
    )
    print(f"{'stage':10s} {'1 worker':>10s} {w:>10s} {'peak':>10s}")
    for s in p.stages:
        how = "parallel" if s.parallel else "one process"
        print(
            f"{s.stage:10s} {_duration(s.seconds):>10s} {_duration(s.seconds_workers):>10s} "
            f"{s.peak_bytes / gib:7.2f} GiB  {how}{' (modelled)' if s.modelled else ''}"
        )
    print(f"{'total':10s} {_duration(p.seconds):>10s} {_duration(p.seconds_workers):>10s}")
    print(f"rates      measured on {p.cpu}, {p.rates_date}")
    for note in p.notes:
        print(f"note       {note}")
    return 0
