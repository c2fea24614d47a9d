"""Model families that ``retrolm train --model NAME`` can build, train, evaluate and sample.

A family is (config class, model class, how a batch becomes a loss, how ids become
logits). Classes are named by import path and loaded on first use, so the registry never
imports a model (or its dependencies) it does not use. RETRO is the first entry; other
families register themselves with :func:`register_family`:

    register_family(ModelFamily(
        name="routing",
        config_cls="retrolm.models.routing.config:RoutingConfig",
        model_cls="retrolm.models.routing.model:RoutingTransformer",
        uses_retrieval=False,
    ))

Contract for the classes: ``config_cls.from_dict(d)`` / ``cfg.to_dict()`` (or a plain
dataclass), optionally ``config_cls.from_name(preset)``; ``model_cls(config=cfg)``;
``model.config`` with ``max_seq_len``. The default loss calls ``model(seq, return_loss=True)``;
the default ``logits`` calls ``model(ids)`` (or ``model(ids, cache=cache)``) and accepts
logits or ``(logits, aux_loss)``; ``model.init_cache(batch)``, where present, gives the
cache of incremental decoding (None: the family or this config has none).

Evaluation and generation find a model's family with :func:`family_of` (by class), so
they never read RETRO-only fields such as ``chunk_size`` from another family's config.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from retrolm.config import dataclass_from_dict
from retrolm.utils import unwrap


@dataclass
class Batch:
    """One training batch. ``retrieved``/``neighbour_mask`` are None without retrieval."""

    seq: Tensor  # (b, n+1) int64: inputs seq[:, :-1], labels seq[:, 1:]
    retrieved: Tensor | None = None  # (b, l, k, 2m) int64
    neighbour_mask: Tensor | None = None  # (b, l, k) bool, True = a real neighbour

    def to(self, device: torch.device | str) -> Batch:
        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(mv(self.seq), mv(self.retrieved), mv(self.neighbour_mask))


def plain_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Families without retrieval: the model computes its own loss from the sequence."""
    return model(batch.seq, return_loss=True)


def plain_logits(
    model: nn.Module,
    ids: Tensor,  # (b, n)
    cache: Any = None,
    retrieved: Tensor | None = None,
    neighbour_mask: Tensor | None = None,
    logits_to_keep: int | None = None,
) -> Tensor:  # (b, n, V), or (b, logits_to_keep, V)
    """Families without retrieval: ``model(ids)`` returns logits or ``(logits, aux_loss)``
    (the Routing Transformer's commitment loss); with ``cache`` only the new ids are fed.
    ``logits_to_keep``: only the last positions' logits (generation needs one); a model
    whose class sets ``takes_logits_to_keep = True`` is handed it (and may then skip work for
    the other positions, e.g. a prompt's last layer), else the logits are sliced here."""
    if retrieved is not None:
        raise ValueError("this model family does not read neighbours; pass retrieved=None")
    kw = {} if cache is None else {"cache": cache}
    if logits_to_keep is not None and getattr(model, "takes_logits_to_keep", False):
        kw["logits_to_keep"] = logits_to_keep
    out = model(ids, **kw)
    out = out[0] if isinstance(out, tuple) else out
    return out if logits_to_keep is None else out[:, -logits_to_keep:]


def model_init_cache(model: nn.Module, batch_size: int) -> Any:
    """``model.init_cache(batch_size)`` where the model has one, else None (no cache)."""
    fn = getattr(model, "init_cache", None)
    return fn(batch_size) if fn is not None else None


def _load(path: str | type) -> Any:
    if not isinstance(path, str):
        return path
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def lazy(path: str) -> Callable[..., Any]:
    """A hook named by import path (``"module:function"``), imported on its first call: the
    registry names every built-in family's hooks this way and so imports no model."""

    def hook(*args: Any, **kwargs: Any) -> Any:
        return _load(path)(*args, **kwargs)

    hook.__qualname__ = hook.__name__ = path.partition(":")[2]
    return hook


def no_eval_variants(model: nn.Module) -> dict[str, Callable[[nn.Module], Any]]:
    """Families without extra evaluation modes."""
    return {}


@dataclass(frozen=True)
class ModelFamily:
    """How to build and train one model family."""

    name: str
    """Name used on the command line (``--model``) and in ``config.json``."""
    config_cls: str | type
    """The config dataclass, or ``"module:Class"`` loaded on first use."""
    model_cls: str | type
    """The ``nn.Module`` built as ``model_cls(config=cfg)``, or ``"module:Class"``."""
    uses_retrieval: bool = False
    """Whether batches carry neighbours (only then is ``--no-retrieval`` meaningful)."""
    loss: Callable[[nn.Module, Batch], Tensor] = plain_loss
    """Maps (model, batch) to a scalar loss."""
    default_preset: str | None = None
    """Preset passed to ``config_cls.from_name`` when the user gives no model config."""
    logits: Callable[..., Tensor] = plain_logits
    """``(model, ids, cache=None, retrieved=None, neighbour_mask=None, logits_to_keep=None)
    -> logits (b, n, V)``:
    what evaluation and generation call (with a cache, logits of the new ids only)."""
    init_cache: Callable[[nn.Module, int], Any] = model_init_cache
    """``(model, batch_size) -> cache or None``; None: generation reruns the whole prefix."""
    eval_variants: Callable[[nn.Module], dict[str, Callable[[nn.Module], Any]]] = no_eval_variants
    """``model -> {mode: context(model)}``: retrieval modes evaluation scores beside
    ``retrieval``, each run inside its context (RETRO's copy head switched off). For a
    ``streaming`` family: every mode it is scored in (``memory``, ``no_memory``)."""
    streaming: bool = False
    """The model's cache is a memory of the whole past (Memorizing Transformer,
    Infini-attention): ``logits(model, ids, cache)`` takes any number of new ids, so
    evaluation streams each document whole through one cache (no sliding windows) and
    generation is not capped by ``max_seq_len``; ``model(ids)`` of any length equals it."""
    segment_losses: Callable[[nn.Module, Batch], Sequence[Callable[[], Tensor]]] | None = None
    """Training in pieces (a recurrent family's truncated backprop through segments):
    ``(model, batch) -> [piece, ...]``, each piece a callable returning its share of the
    batch's loss (the loss is their sum), run in order. What a piece hands the next must be
    detached, so the trainer backpropagates each piece before running the next: one piece's
    activations are alive at a time, and the gradients equal one backward of the sum. Under
    DDP ``model`` is the wrapper, and all but the last backward skip gradient sync. None: one
    piece, ``loss``."""

    def __post_init__(self) -> None:
        if self.uses_retrieval and self.logits is plain_logits:
            raise ValueError(
                f"model family {self.name!r} uses retrieval but its logits hook is "
                "plain_logits, which takes no neighbours; pass logits=retro_logits or your own"
            )

    def config_class(self) -> type:
        return _load(self.config_cls)

    def model_class(self) -> type:
        return _load(self.model_cls)

    def make_config(self, values: dict[str, Any] | None = None, preset: str | None = None) -> Any:
        """A config from an optional preset, overridden by ``values``."""
        cls = self.config_class()
        preset = preset or (None if values else self.default_preset)
        base: dict[str, Any] = {}
        if preset is not None:
            if not hasattr(cls, "from_name"):
                raise ValueError(f"model family {self.name!r} has no presets (got {preset!r})")
            base = config_to_dict(cls.from_name(preset))
        base.update(values or {})
        return config_from_dict(cls, base)

    def build(self, config: Any) -> nn.Module:
        return self.model_class()(config=config)

    def chunk_size(self, config: Any) -> int:
        """The unit that evaluation windows align to: RETRO's retrieval chunk (neighbours
        belong to chunks), 1 for families without retrieval (any window length works)."""
        return int(config.chunk_size) if self.uses_retrieval else 1

    def serves(self, model: nn.Module) -> bool:
        """Whether ``model`` is (a subclass of) this family's model class; never imports."""
        for cls in type(model).__mro__:
            if self.model_cls is cls or self.model_cls == f"{cls.__module__}:{cls.__qualname__}":
                return True
        return False


def config_to_dict(cfg: Any) -> dict[str, Any]:
    if hasattr(cfg, "to_dict"):
        return dict(cfg.to_dict())
    return dataclasses.asdict(cfg)


def config_from_dict(cls: type, d: dict[str, Any]) -> Any:
    """``cls.from_dict(d)``, or for a plain dataclass config the same checks."""
    return cls.from_dict(d) if hasattr(cls, "from_dict") else dataclass_from_dict(cls, d)


FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily, *, replace: bool = False) -> None:
    if family.name in FAMILIES and not replace:
        raise ValueError(f"model family {family.name!r} is already registered")
    FAMILIES[family.name] = family


def uses_retrieval(meta: dict[str, Any]) -> bool:
    """Whether a run (its checkpoint metadata) belongs to a family that reads neighbours;
    the others only use the run's database for its tokenizer."""
    return get_family(meta.get("family", "retro")).uses_retrieval


DECODER = ModelFamily(name="decoder", config_cls=object, model_cls=nn.Module)
"""Not registered: the hooks used for a model of no registered family (a plain decoder
such as a bare ``RoutingTransformerLM``: no retrieval, ``init_cache`` if it has one)."""


def family_of(model: nn.Module, family: str | ModelFamily | None = None) -> ModelFamily:
    """The family whose hooks evaluate and sample ``model``.

    ``family``: a name or family to use instead of the lookup. Otherwise the registered
    family whose model class ``model`` is (DDP / ``torch.compile`` wrappers looked through;
    its own class before the classes it inherits), or :data:`DECODER` for a model of no
    registered family.
    """
    if isinstance(family, ModelFamily):
        return family
    if family is not None:
        return get_family(family)
    # the most specific class first: a subclass registered as its own family (RETRO-fit's
    # RetrofitRETRO is a RETRO) is served by that family, not its parent's
    for cls in type(unwrap(model)).__mro__:
        for f in FAMILIES.values():
            if f.model_cls is cls or f.model_cls == f"{cls.__module__}:{cls.__qualname__}":
                return f
    return DECODER


def check_no_retrieval(fam: ModelFamily, model: nn.Module, what: str) -> None:
    """Refuse neighbours (``what``: the argument that carried them) for a family without
    retrieval, naming the fix."""
    if fam.uses_retrieval:
        return
    if fam is DECODER:
        raise ValueError(
            f"{type(model).__name__} belongs to no registered model family, so it is used as "
            f"a plain decoder without retrieval; pass family= (e.g. 'retro') or register its "
            f"family, or {what}=None"
        )
    raise ValueError(f"a {fam.name!r} model reads no neighbours: pass {what}=None")


def get_family(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(
            f"unknown model family {name!r}; choose one of {sorted(FAMILIES)}"
        ) from None


# The built-in families, one entry each: alike in shape by design (each names its own
# classes and hooks by import path), not code to share.
register_family(
    ModelFamily(
        name="retro",
        config_cls="retrolm.models.retro.config:RetroConfig",
        model_cls="retrolm.models.retro.model:RETRO",
        uses_retrieval=True,
        loss=lazy("retrolm.models.retro.family:retro_loss"),
        default_preset="retro-small",  # sized for a CPU (the demo's); 64-token chunks
        logits=lazy("retrolm.models.retro.family:retro_logits"),
        eval_variants=lazy("retrolm.models.retro.family:retro_eval_variants"),
    )
)

# RETRO-fit (models/retrofit/): a frozen trained decoder read as RETRO's, so RETRO's hooks
register_family(
    ModelFamily(
        name="retrofit",
        config_cls="retrolm.models.retrofit.config:RetrofitConfig",
        model_cls="retrolm.models.retrofit.model:RetrofitRETRO",
        uses_retrieval=True,
        loss=lazy("retrolm.models.retro.family:retro_loss"),
        default_preset="retrofit-demo",
        logits=lazy("retrolm.models.retro.family:retro_logits"),
        eval_variants=lazy("retrolm.models.retro.family:retro_eval_variants"),
    )
)

register_family(
    ModelFamily(
        name="hierarchical",
        config_cls="retrolm.models.hierarchical.config:HierarchicalConfig",
        model_cls="retrolm.models.hierarchical.model:HierarchicalTransformer",
        uses_retrieval=False,
        loss=lazy("retrolm.models.hierarchical.model:hierarchical_loss"),
        default_preset="hier-tiny",
    )
)

register_family(
    ModelFamily(
        name="routing",
        config_cls="retrolm.models.routing.config:RoutingConfig",
        model_cls="retrolm.models.routing.model:RoutingLanguageModel",
        uses_retrieval=False,
        default_preset="routing-tiny",
    )
)

register_family(
    ModelFamily(
        name="delight",
        config_cls="retrolm.models.delight.config:DeLighTConfig",
        model_cls="retrolm.models.delight.model:DeLighTLM",
        uses_retrieval=False,
        default_preset="delight-tiny",
    )
)

register_family(
    ModelFamily(
        name="memorizing",
        config_cls="retrolm.models.memorizing.config:MemorizingConfig",
        model_cls="retrolm.models.memorizing.model:MemorizingLanguageModel",
        uses_retrieval=False,
        default_preset="memorizing-tiny",
        eval_variants=lazy("retrolm.models.memorizing.family:eval_modes"),
        streaming=True,
        segment_losses=lazy("retrolm.models.memorizing.family:segment_losses"),
    )
)

register_family(
    ModelFamily(
        name="infini",
        config_cls="retrolm.models.infini.config:InfiniConfig",
        model_cls="retrolm.models.infini.lm:InfiniLanguageModel",
        uses_retrieval=False,
        default_preset="infini-tiny",
        eval_variants=lazy("retrolm.models.infini.family:eval_modes"),
        streaming=True,
    )
)
