"""The training loop (``config``, ``optim``, ``precision``, ``batches`` and ``metrics`` beside it):
AdamW, warmup + cosine, clipping, accumulation, bf16, DDP, resume.

Resuming is exact: the data order is a pure function of (seed, epoch), dropout is
re-seeded from (seed, step, rank) at every step, and the checkpoint holds the
optimizer state, the step and the autocast choice. A run killed at any moment and
rerun with the same command reaches the same loss at the same step as a run that
was never interrupted.

Distributed: launched by ``torchrun``, every rank reads its slice of each global
batch and DDP averages gradients; rank 0 alone writes checkpoints and metrics.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from retrolm.checkpoint import (
    check_data,
    check_data_kind,
    database_identity,
    find_checkpoint,
    load_train_state,
    load_weights,
    read_config,
    save_checkpoint,
)
from retrolm.data import RETRODataset, TextCorpus, TextData
from retrolm.errors import IncompatibleError
from retrolm.locking import LockedError, exclusive_lock
from retrolm.models.registry import Batch, config_to_dict, get_family
from retrolm.train.batches import BatchOrder, batches, collate
from retrolm.train.config import RESUMABLE_CHANGES, TrainConfig, TrainResult
from retrolm.train.metrics import Metrics, progress_bar, report
from retrolm.train.optim import lr_at
from retrolm.train.parallel import as_float, full_state, gradient_sync, parallel
from retrolm.train.precision import autocast, choose_precision
from retrolm.train.text import open_text

log = logging.getLogger(__name__)


def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


def _model_config(family, db, values: dict[str, Any] | None, preset: str | None):
    """The family's config with vocabulary, pad id and chunk size taken from the database.
    Without a preset or values from the user: the family's default preset (the values from
    the database alone do not make a model config)."""
    values = dict(values or {})
    if preset is None and not values:
        preset = family.default_preset
    names = {f.name for f in dataclasses.fields(family.config_class())}
    tok = getattr(db, "tokenizer", None)
    if "chunk_size" in names:
        if values.get("chunk_size") not in (None, db.chunk_size):
            raise IncompatibleError(
                f"model chunk_size {values['chunk_size']} differs from the database's "
                f"{db.chunk_size}; drop it from the config or rebuild the database"
            )
        values["chunk_size"] = int(db.chunk_size)
    if tok is not None:
        if "num_tokens" in names:
            values.setdefault("num_tokens", int(tok.vocab_size))
            if values["num_tokens"] < tok.vocab_size:
                raise IncompatibleError(
                    f"model num_tokens {values['num_tokens']} is smaller than the database "
                    f"tokenizer's vocabulary {tok.vocab_size}; raise num_tokens"
                )
        if "pad_id" in names:
            values["pad_id"] = int(tok.pad_id)
    try:
        return family.make_config(values, preset)
    except ValueError as e:
        presets = getattr(family.config_class(), "presets", {})
        made_for = presets.get(preset or "", {}).get("chunk_size")
        if made_for is None or made_for == db.chunk_size:
            raise
        raise IncompatibleError(
            f"preset {preset!r} is made for {made_for}-token chunks but the database has "
            f"{db.chunk_size}-token chunks ({e}); choose a preset made for "
            f"{db.chunk_size}-token chunks or set the sizes in the config's model_config"
        ) from None


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def train(
    db: Any,
    run_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    *,
    family: str = "retro",
    model_config: dict[str, Any] | None = None,
    preset: str | None = None,
    device: str | torch.device | None = None,
) -> TrainResult:
    """Train (or resume) a model on the sequences of retrieval database ``db``, or (a
    family without retrieval) on the windows of a text folder.

    ``db``: a RetrievalDatabase or its directory, or a ``TextData`` (no database: the run
    keeps its tokenizer as ``RUN/tokenizer.json``). ``run_dir`` gets ``checkpoints/``,
    ``metrics.csv`` and ``loss.png``; if it already holds a checkpoint of the same
    settings, training resumes from the newest whole one. One process (or one job's
    ranks) at a time: another holding ``run_dir`` raises ``LockedError`` at once.
    """
    cfg = config or TrainConfig()
    run_dir = Path(run_dir)
    fam = get_family(family)  # an unknown family fails before any set-up
    if isinstance(db, TextData):
        if fam.uses_retrieval:
            raise ValueError(
                f"model family {family!r} reads retrieval neighbours, so it trains on a "
                "database, not a text folder: build one (retrolm db build) and pass --db DB"
            )
        db.documents()  # a bad folder fails before any set-up
    elif isinstance(db, (str, os.PathLike)):
        from retrolm.retrieval import RetrievalDatabase

        db = RetrievalDatabase.open(db)
    world, rank, local_rank = _dist_info()
    own_group = world > 1 and not torch.distributed.is_initialized()
    if own_group:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        # ours, so ours to close: a group left to the interpreter's teardown can abort the
        # process at exit ("terminate called without an active exception", seen with gloo
        # after a finished run); a failed run closes it at exit, without a barrier
        atexit.register(_destroy_process_group)
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    with _run_lock(run_dir, rank, world, device):
        result = _train(db, run_dir, cfg, family, model_config, preset, device)
    if own_group:
        # every rank past its last collective before any closes its connections: a rank
        # tearing gloo down while another still talked died in std::terminate (1 run in 13
        # on a loaded 2-core host)
        torch.distributed.barrier()
        _destroy_process_group()
        atexit.unregister(_destroy_process_group)
    return result


@contextmanager
def _run_lock(run_dir: Path, rank: int, world: int, device: torch.device) -> Iterator[None]:
    """One job per run directory: rank 0 holds ``RUN/.lock`` for the job's ranks, and all
    ranks fail together when another process holds it."""
    with ExitStack() as stack:
        error = None
        if rank == 0:
            try:
                stack.enter_context(exclusive_lock(run_dir, "run"))
            except LockedError as e:
                error = e
        if world > 1:
            flag = torch.tensor([int(error is None)], device=device)
            torch.distributed.broadcast(flag, 0)
            if not flag.item() and error is None:
                error = LockedError(f"run {run_dir} is being written by another process")
        if error is not None:
            raise error
        yield


def _run_model_config(
    run_dir: Path,
    ckpt: Path | None,
    fam: Any,
    db: Any,
    cfg: TrainConfig,
    model_config: dict[str, Any] | None,
    preset: str | None,
) -> Any:
    """The model config of a new run, or of the run ``ckpt`` resumes after checking that
    the database, the train settings (but ``RESUMABLE_CHANGES``) and any model asked for
    are the run's."""
    family = fam.name
    if ckpt is not None:
        meta = read_config(ckpt)
        if meta["family"] != family:
            raise IncompatibleError(
                f"{run_dir} holds a {meta['family']!r} run, not {family!r}; "
                f"use --model {meta['family']} or another --out"
            )
        check_data(meta, db, run_dir)
        saved = TrainConfig.from_dict(meta["train_config"])
        for f in dataclasses.fields(TrainConfig):
            a, b = getattr(saved, f.name), getattr(cfg, f.name)
            if (
                f.name not in RESUMABLE_CHANGES
                and a != b
                and not (f.name == "precision" and cfg.precision == "auto")
            ):
                raise IncompatibleError(
                    f"{run_dir} was trained with {f.name}={a!r}, now {b!r}; rerun with the "
                    f"same settings to resume, or use another --out"
                )
        model_cfg = fam.make_config(meta["model_config"])
        if model_config is not None or preset is not None:  # asked for a model: the same?
            asked = config_to_dict(_model_config(fam, db, model_config, preset))
            have = config_to_dict(model_cfg)
            for key, value in asked.items():
                if key != "extra" and have.get(key) != value:
                    raise IncompatibleError(
                        f"{run_dir} was trained with model {key}={have.get(key)!r}, now "
                        f"{value!r}; rerun with the same model config to resume, or use "
                        "another --out"
                    )
    else:
        model_cfg = _model_config(fam, db, model_config, preset)
    return model_cfg


def _seq_len(db: Any, cfg: TrainConfig, model_cfg: Any) -> int:
    """Training sequence length: ``cfg.seq_len`` or the model's, a multiple of the chunk."""
    m = int(db.chunk_size)
    seq_len = cfg.seq_len or getattr(model_cfg, "max_seq_len", None)
    if seq_len is None:
        raise ValueError("set train seq_len: the model config has no max_seq_len")
    seq_len = (int(seq_len) // m) * m
    if getattr(model_cfg, "max_seq_len", seq_len) < seq_len:
        raise ValueError(
            f"seq_len {seq_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}"
        )
    return seq_len


def _choose_precision(model, first: Batch, loss_fn, device: torch.device, world: int) -> str:
    """``auto``: the faster precision on this machine; every rank uses rank 0's choice."""
    precision = choose_precision(model, first, loss_fn, device)
    if world > 1:
        flag = torch.tensor([precision == "bf16"], dtype=torch.int64, device=device)
        torch.distributed.broadcast(flag, 0)
        precision = "bf16" if flag.item() else "fp32"
    return precision


def _optimizer_step(
    ddp_model: nn.Module,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    pieces_fn: Callable[[nn.Module, Batch], Sequence[Callable[[], Tensor]]],
    stream: Iterator[Batch],
    lr: float,
    cfg: TrainConfig,
    precision: str,
    device: torch.device,
    world: int,
) -> tuple[float, Tensor | None]:
    """One optimizer step over ``cfg.grad_accum`` micro-batches of ``stream``, each loss
    backpropagated piece by piece (``ModelFamily.segment_losses``; DDP syncs gradients on the
    last piece of the last micro-batch only); returns (the batch's loss over all ranks, grad
    norm)."""
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    total = 0.0
    for micro_i in range(cfg.grad_accum):
        pieces = pieces_fn(ddp_model, next(stream))
        for piece_i, piece in enumerate(pieces):
            last = micro_i == cfg.grad_accum - 1 and piece_i == len(pieces) - 1
            with gradient_sync(ddp_model, last or world == 1):
                with autocast(precision, device):
                    loss = piece() / cfg.grad_accum
                loss.backward()
            total += float(loss.detach())
    if world > 1:  # log the loss of the whole batch, not rank 0's share
        t = torch.tensor([total], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        total = float(t) / world
    gnorm = (
        as_float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        if cfg.grad_clip > 0
        else None
    )
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total, gnorm


def _out_of_time(deadline: float, world: int, device: torch.device) -> bool:
    """Whether the run's time limit has passed; all ranks stop together (rank 0 decides)."""
    out_of_time = time.perf_counter() > deadline
    if world > 1:
        flag = torch.tensor([int(out_of_time)], device=device)
        torch.distributed.broadcast(flag, 0)
        out_of_time = bool(flag.item())
    return out_of_time


def _split(n: int, cfg: TrainConfig, rank: int, world: int) -> tuple[BatchOrder, list[int], int]:
    """(this rank's order of the training sequences, the validation sequences (the last
    ones), sequences per micro-batch) for a dataset of ``n`` sequences."""
    n_val = min(cfg.val_sequences, n // 10) if cfg.eval_every else 0
    train_idx = list(range(n - n_val))
    val_idx = list(range(n - n_val, n))
    micro = cfg.batch_size // (cfg.grad_accum * world)
    if micro < 1 or cfg.batch_size % (cfg.grad_accum * world):
        raise ValueError(
            f"batch_size {cfg.batch_size} must be divisible by grad_accum ({cfg.grad_accum}) "
            f"x processes ({world})"
        )
    return BatchOrder(train_idx, micro, cfg.seed, rank, world), val_idx, micro


def _validate(
    model,
    loss_fn,
    ds,
    val_idx: list[int],
    micro: int,
    cfg: TrainConfig,
    precision: str,
    use_retrieval: bool,
    device: torch.device,
) -> float | None:
    """Mean loss over (up to ``cfg.eval_batches``) micro-batches of the validation set,
    read with neighbours when ``use_retrieval``."""
    if not val_idx:
        return None
    model.eval()
    losses = []
    with torch.no_grad(), autocast(precision, device):
        for i in range(0, min(len(val_idx), cfg.eval_batches * micro), micro):
            b = collate([ds[j] for j in val_idx[i : i + micro]], use_retrieval)
            losses.append(float(loss_fn(model, b)))
    model.train()
    return sum(losses) / len(losses)


def _load_state(model: nn.Module, ckpt: Path, run_dir: Path) -> tuple[int, int, str, dict]:
    """Weights (into the unsharded model) and RNG state of checkpoint ``ckpt``: (step,
    position, precision, the optimizer's state to load once the optimizer exists)."""
    load_weights(model, ckpt)
    state = load_train_state(ckpt)
    step, position, precision = int(state["step"]), int(state["position"]), state["precision"]
    torch.set_rng_state(state["rng_cpu"])
    log.info("resuming %s at step %d from %s", run_dir, step, ckpt)
    return step, position, precision, state["optimizer"]


def _save(run: _Run, meta: dict[str, Any], progress: dict[str, Any]) -> None:
    """Rank 0 writes the checkpoint (``progress``: step, position, precision); all wait. A
    sharded model is gathered first (every rank takes part) and written through a plain
    replica, so the folder is the same as an unsharded run's and loads in one process."""
    model, opt_state = run.model, None
    if run.sharded:
        weights, opt_state = full_state(run.model, run.opt)
        if run.rank == 0:
            model = run.replica()
            model.load_state_dict(weights)
    if run.rank == 0:
        state = {
            "optimizer": run.opt.state_dict() if opt_state is None else opt_state,
            "step": progress["step"],
            "position": progress["position"],
            "precision": progress["precision"],
            "rng_cpu": torch.get_rng_state(),
        }
        save_checkpoint(run.run_dir, model, meta, state)
    if run.world > 1:
        torch.distributed.barrier()


def _loss_pieces(fam: Any, loss_fn: Callable, device: torch.device) -> Callable:
    """``(model, batch) -> [piece, ...]``: the batch's loss in pieces, each backpropagated
    on its own (``ModelFamily.segment_losses``; one piece, ``loss``, by default)."""

    def pieces(mod: nn.Module, b: Batch) -> Sequence[Callable[[], Tensor]]:
        if fam.segment_losses is None:
            return [lambda: loss_fn(mod, b)]
        return fam.segment_losses(mod, b.to(device))

    return pieces


def _train(
    db: Any,
    run_dir: Path,
    cfg: TrainConfig,
    family: str,
    model_config: dict[str, Any] | None,
    preset: str | None,
    device: torch.device,
) -> TrainResult:
    """``train`` after the set-up, holding the run's lock."""
    fam = get_family(family)
    use_retrieval = fam.uses_retrieval and cfg.retrieval
    world, rank, _ = _dist_info()

    # ---- resume or start: from the newest whole checkpoint
    ckpt = find_checkpoint(run_dir)
    resume = ckpt is not None
    if isinstance(db, TextData):
        if resume:  # the run's kind of data before any tokenizer work
            check_data_kind(read_config(ckpt), True, run_dir)
        db = open_text(db, run_dir, resume, rank)
    model_cfg = _run_model_config(run_dir, ckpt, fam, db, cfg, model_config, preset)

    torch.manual_seed(cfg.seed)
    model = fam.build(model_cfg).to(device)
    describe = getattr(model, "describe_blocks", None)  # a family's per-block table, if any
    if describe is not None and rank == 0:
        log.info("%s parameters and MACs per token, per block:\n%s", family, describe())
    seq_len = _seq_len(db, cfg, model_cfg)
    if isinstance(db, TextCorpus):
        ds, data_id = db.dataset(seq_len), {"text": db.identity()}
    else:
        k = cfg.num_neighbours if use_retrieval else 0
        ds = RETRODataset(db, seq_len=seq_len, num_neighbours=k)
        data_id = {"database": database_identity(db)}
    order, val_idx, micro = _split(len(ds), cfg, rank, world)

    step, position, precision, opt_state = 0, 0, cfg.precision, None
    if resume:
        step, position, precision, opt_state = _load_state(model, ckpt, run_dir)
    last = min(cfg.steps, cfg.stop_after or cfg.steps)
    if step >= last:
        log.info("%s already trained for %d steps", run_dir, step)
        return TrainResult(run_dir, step, None, None, None, precision)

    def loss_fn(mod: nn.Module, b: Batch) -> Tensor:
        return fam.loss(mod, b.to(device))

    pieces = _loss_pieces(fam, loss_fn, device)

    data = batches(ds, order, position, use_retrieval, cfg.prefetch)
    first = next(data)
    if precision == "auto":  # (timed on an unsharded copy)
        precision = _choose_precision(model, first, loss_fn, device, world)
    unused = fam.uses_retrieval and not use_retrieval
    ddp_model, opt, sharded = parallel(model, cfg, opt_state, unused, device, world)

    meta = {
        "family": family,
        "model_config": config_to_dict(model_cfg),
        "train_config": cfg.to_dict(),
        **data_id,
        "seq_len": seq_len,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = Metrics(run_dir, step, enabled=rank == 0)
    run = _Run(
        cfg, run_dir, model, ddp_model, opt, pieces, precision, device, rank, world, meta, metrics
    )
    run.sharded, run.replica = sharded, lambda: fam.build(model_cfg)

    def validate() -> dict[str, float] | None:
        def val(retrieve: bool) -> float | None:
            return _validate(model, loss_fn, ds, val_idx, micro, cfg, precision, retrieve, device)

        loss = val(use_retrieval)
        if loss is None:
            return None
        both = use_retrieval and cfg.val_without_retrieval
        return {"val_loss": loss, **({"val_loss_no_retrieval": val(False)} if both else {})}

    model.train()
    stream = itertools.chain([first], data)  # the batch timed for `auto` is trained on
    try:
        step, last_loss, last_val, tps = _loop(run, stream, validate, step, position, last, seq_len)
    finally:
        metrics.close()
        data.close()
    return TrainResult(run_dir, step, last_loss, last_val, tps, precision, metrics.rows)


@dataclass
class _Run:
    """What the steps of one run share."""

    cfg: TrainConfig
    run_dir: Path
    model: nn.Module
    ddp_model: nn.Module  # the model itself in a single process
    opt: torch.optim.Optimizer
    pieces_fn: Callable[[nn.Module, Batch], Sequence[Callable[[], Tensor]]]  # a batch's loss
    precision: str
    device: torch.device
    rank: int
    world: int
    meta: dict[str, Any]  # the checkpoint's config.json, less the step
    metrics: Metrics
    sharded: bool = False  # FSDP: checkpoints gather the shards
    replica: Callable[[], nn.Module] | None = None  # a plain model that rank 0 saves through


def _loop(
    run: _Run,
    stream: Iterator[Batch],
    validate: Callable[[], dict[str, float] | None],
    step: int,
    position: int,
    last: int,
    seq_len: int,
) -> tuple[int, Any, Any, Any]:
    """Optimizer steps from ``step`` up to ``last`` (or the time limit), validating, logging
    and saving on the way; returns (step reached, last loss, last val loss, tokens/s)."""
    cfg, is_main = run.cfg, run.rank == 0
    tokens_per_step = cfg.batch_size * seq_len
    t_start = time.perf_counter()
    last_loss = last_val = tps = None
    bar = progress_bar(cfg.steps, step, is_main)
    try:
        deadline = t_start + 60 * cfg.max_minutes if cfg.max_minutes else math.inf
        while step < last:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            # dropout depends only on (seed, step, rank): resuming replays it exactly
            torch.manual_seed(cfg.seed * 1_000_003 + step * 1_009 + run.rank)
            total, gnorm = _optimizer_step(
                run.ddp_model,
                run.model,
                run.opt,
                run.pieces_fn,
                stream,
                lr,
                cfg,
                run.precision,
                run.device,
                run.world,
            )
            position += cfg.grad_accum
            step += 1
            dt = time.perf_counter() - t0
            tps = tokens_per_step / dt
            last_loss = total
            vals = validate() if cfg.eval_every and step % cfg.eval_every == 0 else None
            if vals is not None:
                last_val = vals["val_loss"]
            row = dict(step=step, loss=total, vals=vals or {}, lr=lr, gnorm=gnorm, tps=tps)
            report(run.metrics, bar, row, time.perf_counter() - t_start, cfg.steps, is_main)
            if _out_of_time(deadline, run.world, run.device):
                log.info("time limit of %.1f min reached at step %d", cfg.max_minutes, step)
                last = step
            if step % cfg.save_every == 0 or step == last:
                progress = {"step": step, "position": position, "precision": run.precision}
                meta = {**run.meta, "step": step}
                _save(run, meta, progress)
                if cfg.plot and is_main:
                    run.metrics.plot(run.run_dir / "loss.png")
    finally:
        bar.close()
    return step, last_loss, last_val, tps
