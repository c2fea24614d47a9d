"""``retrolm eval RUN --text DIR [--db DB]``: bits/byte with and without retrieval.

Any model family: runs of families without retrieval are scored without it (their
database only provides the tokenizer; a run trained from a text folder has none and
brings its own)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="bits/byte on held-out text (with vs without retrieval and the leakage curve "
        "for RETRO)",
    )
    p.add_argument("run", help="run directory (or one of its checkpoint folders)")
    p.add_argument("--text", required=True, help="folder of held-out documents")
    p.add_argument("--db", help="retrieval database (default: the one the run was trained on)")
    p.add_argument("--no-retrieval", action="store_true", help="only score without retrieval")
    p.add_argument("--seq-len", type=int, help="window length (default max_seq_len)")
    p.add_argument("--stride", type=int, help="window stride (default half the window)")
    p.add_argument(
        "--neighbours",
        type=int,
        default=2,
        help="neighbours per chunk the model reads (the paper trains with 2 and reports its "
        "main results with 10, as the demo does; more cost evaluation time)",
    )
    p.add_argument("--max-tokens", type=int, help="score at most this many tokens per document")
    p.add_argument("--glob", default="**/*.txt", help="which files are documents")
    p.add_argument("--out", help="report folder (default RUN/eval)")
    from retrolm.cli.db import add_search_flags

    add_search_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from retrolm.checkpoint import load_model, open_run_data, resolve_checkpoint, run_of
    from retrolm.cli.db import apply_search_flags
    from retrolm.evaluate import EvalConfig, evaluate, read_documents, save_report
    from retrolm.models.registry import uses_retrieval

    read_documents(args.text, args.glob)  # a bad folder fails before the model loads
    model, meta = load_model(args.run)
    ckpt = resolve_checkpoint(args.run)
    db, tok = open_run_data(meta, ckpt, args.db)
    cfg = EvalConfig(
        seq_len=args.seq_len,
        stride=args.stride,
        num_neighbours=args.neighbours,
        max_tokens=args.max_tokens,
        glob=args.glob,
    )
    retrieve = not args.no_retrieval and uses_retrieval(meta)
    apply_search_flags(args, db, retrieve)
    res = evaluate(
        model,
        args.text,
        db if retrieve else None,
        tokenizer=tok,
        config=cfg,
        family=meta["family"],
    )
    out = Path(args.out) if args.out else run_of(ckpt) / "eval"
    paths = save_report(res, out)
    tokens = next(iter(res.modes.values()))["tokens"]
    scored = f"{res.chunks} chunks" if res.chunks else f"{tokens} tokens"
    print(f"{meta['family']} model, {res.documents} documents, {scored} from {args.text}")
    print(res.table())
    print("report: " + ", ".join(str(p) for p in paths))
    return 0
