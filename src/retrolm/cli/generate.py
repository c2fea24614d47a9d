"""``retrolm generate RUN --prompt "..."``: sample from a run of any family; RETRO retrieves
at every chunk boundary."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt (RETRO: retrieving as it writes)")
    p.add_argument("run", help="run directory (or one of its checkpoint folders)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument(
        "--max-new-tokens", type=int, default=64, help="stop after this many (default: 64)"
    )
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, help="keep this many most likely tokens")
    p.add_argument(
        "--top-p", type=float, default=0.9, help="keep this much probability mass (default: 0.9)"
    )
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.add_argument(
        "--neighbours",
        type=int,
        default=2,
        help="neighbours per chunk (default: 2, as trained; the paper evaluates with 10)",
    )
    p.add_argument("--db", help="retrieval database (default: the run's)")
    p.add_argument("--no-retrieval", action="store_true", help="generate without neighbours")
    p.add_argument(
        "--prefill-dtype",
        choices=("bf16", "fp16", "fp32"),
        help="run the prompt in this precision (autocast), the new tokens in the weights' "
        "(bf16 speeds up long prompts on CPU; default: the weights' dtype throughout)",
    )
    from retrolm.cli.db import add_search_flags

    add_search_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from retrolm.checkpoint import load_model, open_run_data, resolve_checkpoint
    from retrolm.cli.db import apply_search_flags
    from retrolm.generation import describe_sources, generate
    from retrolm.models.registry import uses_retrieval

    model, meta = load_model(args.run)
    db, tok = open_run_data(meta, resolve_checkpoint(args.run), args.db)
    ids = tok.encode(args.prompt)
    retrieve = not args.no_retrieval and uses_retrieval(meta)
    apply_search_flags(args, db, retrieve)
    res = generate(
        model,
        ids,
        args.max_new_tokens,
        db if retrieve else None,
        num_neighbours=args.neighbours,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_id=tok.eos_id,
        seed=args.seed,
        family=meta["family"],
        prefill_dtype=args.prefill_dtype,
    )
    print(args.prompt + tok.decode(res.new_ids[0].tolist()))
    sources = describe_sources(db, res) if retrieve else []
    if sources:
        print("\nretrieved while writing (chunk: file, text):")
        for s in sources:
            print(f"  [{s['chunk']}.{s['rank']}] {s['file']}: {s['snippet']}")
    elif retrieve:
        m = model.config.chunk_size
        print(f"\n(nothing retrieved: the text never completed a {m}-token chunk)")
    return 0
