"""``retrolm train --db DB [--neighbours DIR] --out RUN [--config FILE] [--no-retrieval]``,
``retrolm train --db DB --out RUN --retrofit BASE [--cca-layers 3,6] [--unfreeze NAMES]``
(RETRO-fit a trained decoder: ``train/retrofit.py``),
or for a family without retrieval ``retrolm train --model routing --text DIR --out RUN
[--tokenizer FILE | --vocab-size N] [--glob PATTERN]`` (no database)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

# command-line flag -> TrainConfig field (flags override the config file)
FLAGS = {
    "steps": int,
    "batch_size": int,
    "grad_accum": int,
    "seq_len": int,
    "lr": float,
    "warmup_steps": int,
    "precision": str,
    "seed": int,
    "eval_every": int,
    "save_every": int,
    "num_neighbours": int,
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model on a retrieval database or a text folder (resumes an interrupted run)",
        description="Train RETRO (or another family) on the sequences of a retrieval database; "
        "a family without retrieval (routing, hierarchical) can train from a text folder "
        "instead (--text), with no database. Rerunning the same command after an "
        "interruption resumes from the last checkpoint.",
    )
    p.add_argument("--db", help="retrieval database directory")
    p.add_argument(
        "--neighbours",
        metavar="NEIGHBOURS_DIR",
        help="with --db: train on the sequences of another corpus, retrieving from DB "
        "(made by `retrolm db query DB --text TRAIN_DIR --out NEIGHBOURS_DIR`)",
    )
    p.add_argument(
        "--text",
        help="folder of documents (families without retrieval): trained on directly, "
        "the tokenizer kept as RUN/tokenizer.json",
    )
    p.add_argument("--tokenizer", help="with --text: a tokenizer.json to use (default: train one)")
    p.add_argument(
        "--vocab-size",
        type=int,
        help="with --text: vocabulary of the tokenizer trained on the folder (default 16384)",
    )
    p.add_argument("--glob", help="with --text: which files are documents (default **/*.txt)")
    p.add_argument("--out", required=True, help="run directory (checkpoint, metrics, loss.png)")
    p.add_argument(
        "--config",
        help='JSON file: {"model": "retro", "preset": "retro-small", '
        '"model_config": {...}, "train": {...}}',
    )
    p.add_argument("--model", help="model family (default retro, or the config file's)")
    from retrolm.models.registry import FAMILIES

    defaults = ", ".join(f"{f.default_preset} ({name})" for name, f in FAMILIES.items())
    p.add_argument(
        "--preset",
        help=f"named model config; without one and without a config file: {defaults}",
    )
    p.add_argument(
        "--no-retrieval",
        action="store_true",
        help="train the same decoder without neighbours (the baseline)",
    )
    p.add_argument(
        "--retrofit",
        metavar="BASE",
        help="RETRO-fit a trained decoder: BASE is a retrolm run trained without retrieval or "
        "a local Hugging Face causal-LM folder; it stays frozen and only a neighbour encoder "
        "and chunked cross-attention are trained (DB built with --tokenizer BASE)",
    )
    p.add_argument(
        "--cca-layers",
        metavar="3,6",
        help="with --retrofit: the base layers chunked cross-attention follows (1-based; "
        "default: every 3rd from 6, or the last layer of a shallow base)",
    )
    p.add_argument(
        "--unfreeze",
        metavar="NAMES",
        help="with --retrofit: base parameters to train too, comma-separated names or "
        "prefixes as the base names them (e.g. final_norm, transformer.ln_f)",
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard parameters, gradients and optimizer state across the "
        "processes (FSDP2) instead of replicating them (DDP)",
    )
    add_config_flags(p)
    p.set_defaults(func=run)


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per ``FLAGS`` field, its help the field's docstring in ``TrainConfig``."""
    from retrolm.cli.flags import add_dataclass_flags
    from retrolm.train import PRECISIONS, TrainConfig

    # default None: the config file's value, else TrainConfig's default
    add_dataclass_flags(p, TrainConfig, FLAGS, defaults=False, choices={"precision": PRECISIONS})


def read_config_file(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} does not exist")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"config file {p} is not valid JSON ({e})") from None
    allowed = {"model", "preset", "model_config", "train"}
    if not isinstance(cfg, dict) or set(cfg) - allowed:
        raise ValueError(f"config file {p}: top-level keys must be among {sorted(allowed)}")
    for key, typ, words in (
        ("model", str, "a family name (string)"),
        ("preset", str, "a preset name (string)"),
        ("model_config", dict, "a JSON object of field: value"),
        ("train", dict, "a JSON object of field: value"),
    ):
        if key in cfg and not isinstance(cfg[key], typ):
            raise ValueError(f"config file {p}: {key} must be {words}, got {cfg[key]!r}")
    return cfg


def _data(args: argparse.Namespace) -> Any:
    """The database directory, or the text folder (``TextData``) to train on."""
    from retrolm.data import TextData

    if (args.db is None) == (args.text is None):
        raise ValueError(
            "pass --db DB (a retrieval database) or --text DIR (a folder of documents, for a "
            f"family without retrieval){', not both' if args.db else ''}"
        )
    text_flags = [f"--{n.replace('_', '-')}" for n in ("tokenizer", "vocab_size", "glob")]
    if args.db is not None:
        given = [f for f in text_flags if getattr(args, f[2:].replace("-", "_")) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: only with --text, not with --db; drop it")
        if args.neighbours is not None:
            from retrolm.retrieval.query import NeighbourSet

            return NeighbourSet.open(args.db, args.neighbours)
        return args.db
    if args.neighbours is not None:
        raise ValueError(
            "--neighbours DIR goes with --db DB (the database its neighbours point into), "
            "not with --text: pass --db DB --neighbours DIR"
        )
    return TextData(args.text, args.glob or "**/*.txt", args.tokenizer, args.vocab_size)


def _retrofit(
    args: argparse.Namespace, family: str, values: dict[str, Any] | None
) -> tuple[str, dict[str, Any]]:
    """The family and model config of ``--retrofit BASE``: the base's identity added, its
    tokenizer checked against the database's."""
    from retrolm.train.retrofit import retrofit_model_config

    if args.retrofit is None:
        raise ValueError("--cca-layers and --unfreeze go with --retrofit BASE; add it or drop them")
    if family not in ("retro", "retrofit"):
        raise ValueError(f"--retrofit trains the 'retrofit' family, not --model {family}; drop one")
    if args.db is None:
        raise ValueError("--retrofit reads neighbours: pass --db DB (built with --tokenizer BASE)")
    values = dict(values or {})
    if args.cca_layers:
        try:
            values["cca_layers"] = [int(x) for x in args.cca_layers.split(",")]
        except ValueError:
            bad = args.cca_layers
            raise ValueError(f"--cca-layers {bad!r}: write 1-based layers as 3,6") from None
    if args.unfreeze:
        values["unfreeze"] = [x.strip() for x in args.unfreeze.split(",") if x.strip()]
    return "retrofit", retrofit_model_config(args.retrofit, _data(args), values)


def run(args: argparse.Namespace) -> int:
    from retrolm.config import check_fields
    from retrolm.models.registry import get_family
    from retrolm.train import TrainConfig, train

    file_cfg = read_config_file(args.config)
    values = dict(file_cfg.get("train", {}))
    for name in FLAGS:
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.no_retrieval:
        values["retrieval"] = False
    if args.fsdp:
        values["fsdp"] = True
    # flags are typed by argparse: a wrong type can only come from the file, so name it
    source = f"config file {args.config}: train" if args.config else "TrainConfig"
    cfg = TrainConfig.from_dict(values, where=source)
    family = args.model or file_cfg.get("model", "retro")
    model_config = file_cfg.get("model_config")
    if args.retrofit is not None or args.cca_layers or args.unfreeze:
        family, model_config = _retrofit(args, family, model_config)
    if "model_config" in file_cfg:  # checked before the database opens and a model is built
        where = f"config file {args.config}: model_config"
        check_fields(get_family(family).config_class(), file_cfg["model_config"], where)
    res = train(
        _data(args),
        args.out,
        cfg,
        family=family,
        model_config=model_config,
        preset=args.preset or file_cfg.get("preset"),
    )
    if os.environ.get("RANK", "0") != "0":  # under torchrun: one summary, from rank 0
        return 0
    loss = "n/a" if res.loss is None else f"{res.loss:.4f}"
    val = "" if res.val_loss is None else f", validation loss {res.val_loss:.4f}"
    print(f"{res.run_dir}: step {res.step}, loss {loss}{val} ({res.precision})")
    return 0
