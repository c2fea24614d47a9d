"""``retrolm demo``: the whole pipeline on the bundled King James Bible."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="build, train RETRO and a baseline, evaluate, generate on the bundled KJV",
        description="Runs the whole pipeline on the bundled King James Bible, sized to the "
        "time budget from rates measured on this machine. Rerunning resumes in --work.",
    )
    p.add_argument("--work", default="retrolm-demo", help="work folder (resumable)")
    p.add_argument("--budget-min", type=float, default=15.0, help="time budget in minutes")
    p.add_argument("--steps", type=int, help="training steps per model (default: fit budget)")
    p.add_argument("--corpus", help="the KJV archive (default: data/kjv.tar.xz)")
    p.add_argument("--prompt", help="text to continue at the end (default: 2 Chronicles 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from retrolm.demo import format_report, run_demo

    if args.budget_min <= 0:
        raise ValueError(f"--budget-min must be positive, got {args.budget_min}")
    rep = run_demo(
        args.work,
        budget_min=args.budget_min,
        corpus=args.corpus,
        steps=args.steps,
        prompt=args.prompt,
    )
    print(format_report(rep))
    print(
        f"\nreport: {args.work}/report.json, curves: {args.work}/runs/*/loss.png, "
        f"{args.work}/report/retro_leakage.png"
    )
    return 0
