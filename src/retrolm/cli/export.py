"""``retrolm export RUN OUT_DIR``: a run's newest checkpoint as a folder to share (weights,
config, tokenizer, model card), loaded by ``retrolm.from_pretrained(OUT_DIR)`` and uploaded
by ``push_to_hub``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a run as a shareable folder: model.safetensors, config.json, "
        "tokenizer.json and a model card (README.md)",
    )
    p.add_argument("run", help="run directory (or one of its checkpoint folders)")
    p.add_argument("out", metavar="OUT_DIR", help="folder to write (new or empty)")
    p.add_argument("--db", help="the run's retrieval database, where it moved")
    p.add_argument(
        "--name",
        help="Hub repository id the model card's example loads (default: --push, else "
        "OUT_DIR's name)",
    )
    p.add_argument(
        "--push",
        metavar="REPO_ID",
        help="then upload the folder to this Hugging Face Hub repository (owner/name; needs "
        "pip install 'retrolm[hub]' and a token from `hf auth login`)",
    )
    p.add_argument("--private", action="store_true", help="with --push: create it private")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from retrolm.export import export_run
    from retrolm.models.pretrained import CONFIG, hub, read_pretrained_config, upload_pretrained

    if args.push:
        hub()  # a missing extra fails before the export, not after
    elif args.private:
        raise ValueError("--private applies to --push REPO_ID; add --push or drop --private")
    out = export_run(args.run, args.out, db=args.db, name=args.name or args.push)
    meta = read_pretrained_config(out)
    files = ", ".join(sorted(f.name for f in out.iterdir()))
    steps = (meta.get("metadata") or {}).get("steps")
    print(f"{meta['family']} model ({meta['model_class']}, step {steps}) -> {out}: {files}")
    print(f"load it with retrolm.from_pretrained({str(out)!r}); config in {out / CONFIG}")
    if args.push:
        upload_pretrained(out, args.push, private=True if args.private else None)
        print(f"uploaded to https://huggingface.co/{args.push}")
    return 0
