"""Save, load and share a model: ``save_pretrained``, ``from_pretrained``, ``push_to_hub``.

A pretrained model is a folder (or a Hugging Face Hub repository holding the same files):

    model.safetensors   the weights (no pickle; tied weights stored once)
    config.json         {"retrolm_format": 1, "family": ..., "model_class": ..., "config": {...},
                         "dtype": ..., "tokenizer_hash": ..., "database": {...} (RETRO),
                         "metadata": {...} (what the caller adds: steps, data, eval)}
    tokenizer.json      the LM tokenizer, when one was given
    README.md           the model card (``retrolm.model_card``): YAML metadata, then Markdown

Every family's model class inherits :class:`PreTrainedMixin` (``class RETRO(PreTrainedMixin,
nn.Module)``); a new family does the same and registers itself in ``registry.py``, which is
where the family name written to ``config.json`` comes from. Nothing else is needed: the
config goes through the family's ``to_dict`` / ``make_config``, the weights through the
state dict.

This is the mechanism only: it knows no run, checkpoint or evaluation (``retrolm export``,
in ``retrolm.export``, writes a run's folder with its training data and eval table).
``huggingface_hub`` (the ``hub`` extra) is imported only to download or upload.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retrolm.errors import IncompatibleError
from retrolm.utils import fsync_path, move_aside, unwrap

FORMAT = 1
"""The version of the folder layout this retrolm writes; it reads this one and older."""
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
CARD = "README.md"
FILES = (WEIGHTS, CONFIG, TOKENIZER, CARD)
"""Everything a pretrained folder can hold (and all ``push_to_hub`` uploads)."""
HUB_EXTRA = "pip install 'retrolm[hub]'"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub():
    """The ``huggingface_hub`` module, or a one-line ValueError naming the extra."""
    try:
        import huggingface_hub
    except ImportError:
        raise ValueError(
            f"the Hugging Face Hub needs the optional package huggingface_hub: {HUB_EXTRA}"
        ) from None
    return huggingface_hub


class PreTrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for a registered family's
    model class (put it first among the bases: ``class M(PreTrainedMixin, nn.Module)``)."""

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        tokenizer: Any = None,
        database: dict[str, Any] | None = None,
        card: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Path:
        """Write the folder (module docstring) and return its path.

        ``tokenizer``: the LM tokenizer (an object with ``save(path)``, or a ``tokenizer.json``
        path); ``database``: for RETRO, the identity of its retrieval database (encoder name
        and hash, tokenizer hash, chunk size); ``card``: the README.md text (default: a short
        card from the config); ``metadata``: any JSON-able extras kept in config.json.
        The folder appears whole or not at all; an earlier model folder there is replaced,
        any other non-empty folder is refused.
        """
        return save_pretrained(
            self,  # type: ignore[arg-type]
            save_directory,
            tokenizer=tokenizer,
            database=database,
            card=card,
            metadata=metadata,
        )

    # signature twin of the module-level from_pretrained (deliberate): the class method loads
    # its own family, the function any family
    @classmethod
    def from_pretrained(
        cls,
        name: str | os.PathLike,
        *,
        map_location: str | torch.device = "cpu",
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
    ) -> Any:
        """The model saved in folder ``name`` or Hub repository ``name`` (``owner/repo``,
        downloaded with huggingface_hub), in eval mode. A folder of another family is refused
        (with the class that loads it); ``retrolm.from_pretrained`` takes any family."""
        folder = resolve_pretrained(name, revision, token, cache_dir, local_files_only)
        return load_pretrained(folder, cls, map_location)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        tokenizer: Any = None,
        database: dict[str, Any] | None = None,
        card: str | None = None,
        metadata: dict[str, Any] | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        commit_message: str = "Upload retrolm model",
    ) -> Any:
        """``save_pretrained`` into a temporary folder, then upload its files to Hub
        repository ``repo_id`` (created if missing) in one commit; returns the commit info."""
        with tempfile.TemporaryDirectory(prefix="retrolm-push-") as tmp:
            folder = save_pretrained(
                self,  # type: ignore[arg-type]
                Path(tmp) / "model",
                tokenizer=tokenizer,
                database=database,
                card=card,
                metadata=metadata,
                card_name=repo_id,
            )
            return upload_pretrained(
                folder,
                repo_id,
                private=private,
                token=token,
                revision=revision,
                create_pr=create_pr,
                commit_message=commit_message,
            )


def parameter_count(model: nn.Module) -> int:
    """Parameters, each shared tensor counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _family_name(model: nn.Module) -> str:
    from retrolm.models.registry import DECODER, family_of

    fam = family_of(model)
    if fam is DECODER:
        raise ValueError(
            f"{type(model).__name__} belongs to no registered model family, so from_pretrained "
            "could not rebuild it: register its family (retrolm.models.registry.register_family)"
        )
    return fam.name


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    tokenizer: Any = None,
    database: dict[str, Any] | None = None,
    card: str | None = None,
    metadata: dict[str, Any] | None = None,
    card_name: str | None = None,
) -> Path:
    """``model.save_pretrained(...)`` for any registered family's model (see the mixin);
    ``card_name``: what the default card's loading example names (default: the folder's)."""
    from safetensors.torch import save_model

    from retrolm import __version__
    from retrolm.models.registry import config_to_dict

    model = unwrap(model)
    family, dest = _family_name(model), Path(save_directory)
    config = {
        "retrolm_format": FORMAT,
        "retrolm_version": __version__,
        "family": family,
        "model_class": type(model).__name__,
        "config": config_to_dict(model.config),
    }
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) == 1:  # restored by from_pretrained (a bf16 model stays bf16)
        config["dtype"] = str(dtypes.pop()).removeprefix("torch.")
    if tokenizer is not None:
        config["tokenizer_hash"] = getattr(tokenizer, "hash", None)
    if database is not None:
        config["database"] = database
    if metadata is not None:
        config["metadata"] = metadata
    if card is None:
        from retrolm.model_card import model_card

        card = model_card(
            family=family,
            model_class=type(model).__name__,
            parameters=parameter_count(model),
            config=config["config"],
            database=database,
            name=card_name or dest.name,
        )
    _check_destination(dest)
    with _whole_folder(dest) as tmp:
        save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if isinstance(tokenizer, (str, os.PathLike)):
            shutil.copyfile(tokenizer, tmp / TOKENIZER)
        elif tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER)
        (tmp / CARD).write_text(card, encoding="utf-8")
    return dest


def _check_destination(dest: Path) -> None:
    """Refuse to replace anything but an empty folder or an earlier model folder."""
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"{dest} is a file; save_pretrained writes a folder: choose another path")
    if dest.is_dir() and any(dest.iterdir()):
        try:
            ours = "retrolm_format" in json.loads((dest / CONFIG).read_text())
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours or any(f.name not in FILES for f in dest.iterdir()):
            raise ValueError(
                f"{dest} is a folder with other files in it; save to a new or empty folder "
                "(a folder save_pretrained wrote is replaced whole)"
            )


@contextmanager
def _whole_folder(dest: Path) -> Iterator[Path]:
    """Yield a hidden temporary sibling of ``dest``, renamed onto it when the block succeeds
    (an earlier folder moved aside first), so the folder appears whole or not at all."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            fsync_path(f)
        old = move_aside(dest) if dest.exists() else None
        os.replace(tmp, dest)
        fsync_path(dest.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        # what saves killed earlier left (mkdtemp's names: 8 random characters)
        left = re.compile(rf"\.{re.escape(dest.name)}\.(old\.)?\w{{8}}\.tmp")
        for f in dest.parent.iterdir():
            if left.fullmatch(f.name):
                shutil.rmtree(f, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_pretrained(
    name: str | os.PathLike,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local folder, or Hub repository ``owner/repo`` downloaded (its model files only)."""
    path = Path(name)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; from_pretrained reads the folder that holds it")
    if isinstance(name, os.PathLike) or not _REPO_ID.fullmatch(str(name)):
        raise FileNotFoundError(
            f"no folder {str(name)!r} (and it is no Hub repository id owner/name): check the path"
        )
    folder = hub().snapshot_download(
        str(name),
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        allow_patterns=list(FILES),
        library_name="retrolm",
    )
    return Path(folder)


def read_pretrained_config(folder: str | os.PathLike) -> dict[str, Any]:
    """A pretrained folder's ``config.json``, checked to be one this retrolm reads."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: {folder} is not a folder save_pretrained or `retrolm export` wrote"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IncompatibleError(f"{path} is corrupt ({e.__class__.__name__}: {e})") from None
    if not isinstance(meta, dict) or "retrolm_format" not in meta:
        run = isinstance(meta, dict) and "model_config" in meta
        raise IncompatibleError(
            f"{path} is a training checkpoint, not a pretrained folder: export it with "
            "`retrolm export RUN OUT_DIR`"
            if run
            else f"{path} is not a retrolm model's config (it has no retrolm_format)"
        )
    if not isinstance(meta["retrolm_format"], int) or meta["retrolm_format"] > FORMAT:
        raise IncompatibleError(
            f"{folder} has retrolm_format {meta['retrolm_format']!r}, newer than this retrolm "
            f"reads (<= {FORMAT}): upgrade retrolm (pip install -U retrolm)"
        )
    return meta


def _class_family(cls: type) -> str | None:
    from retrolm.models.registry import FAMILIES

    for base in cls.__mro__:  # a subclass of a family's class belongs to that family
        for fam in FAMILIES.values():
            if fam.model_cls is base or fam.model_cls == f"{base.__module__}:{base.__qualname__}":
                return fam.name
    return None


def _build(folder: Path, meta: dict[str, Any], expected: type | None) -> nn.Module:
    """The model of ``meta``'s family and config (not yet loaded), checked against the class
    ``from_pretrained`` was called on."""
    from retrolm.models.registry import FAMILIES

    family = meta.get("family")
    if family not in FAMILIES:
        raise IncompatibleError(
            f"{folder} holds a model of family {family!r}, which this retrolm does not know "
            f"(it knows {sorted(FAMILIES)}): upgrade retrolm"
        )
    fam = FAMILIES[family]
    want = _class_family(expected) if expected is not None else None
    if want is not None and want != family:
        cls = fam.model_class().__name__
        raise IncompatibleError(
            f"{folder} holds a {family!r} model, not a {want!r} one: load it with "
            f"retrolm.{cls}.from_pretrained (or retrolm.from_pretrained, any family)"
        )
    try:
        config = fam.make_config(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise IncompatibleError(f"{folder / CONFIG}: bad model config ({e})") from None
    if want == family and issubclass(expected, fam.model_class()):  # type: ignore[arg-type]
        return expected(config=config)  # a user's subclass comes back as itself
    return fam.build(config)


def load_pretrained(
    folder: str | os.PathLike,
    expected: type | None = None,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """The model in local pretrained ``folder``, in eval mode (``expected``: the class asked
    for; a folder of another family is refused)."""
    from safetensors.torch import load_model

    folder = Path(folder)
    meta = read_pretrained_config(folder)
    model = _build(folder, meta, expected)
    if "dtype" in meta:
        dtype = getattr(torch, str(meta["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise IncompatibleError(f"{folder / CONFIG}: unknown dtype {meta['dtype']!r}")
        model.to(dtype)
    path = folder / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; copy or download the folder whole")
    try:
        load_model(model, str(path), strict=True)
    except Exception as e:  # safetensors raises several types for truncated/garbled files
        first = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise IncompatibleError(
            f"{path} cannot be loaded ({first}): the file is damaged, "
            "or from another model; download it again"
        ) from None
    return model.to(map_location).eval()


def from_pretrained(
    name: str | os.PathLike,
    *,
    map_location: str | torch.device = "cpu",
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> nn.Module:
    """The model in folder or Hub repository ``name``, of whatever family its config.json
    names, in eval mode."""
    folder = resolve_pretrained(name, revision, token, cache_dir, local_files_only)
    return load_pretrained(folder, None, map_location)


def pretrained_config(name: str | os.PathLike, **hub_kwargs: Any) -> dict[str, Any]:
    """``config.json`` of folder or Hub repository ``name``: family, config, tokenizer hash,
    and for RETRO the identity of its retrieval database (``database``)."""
    return read_pretrained_config(resolve_pretrained(name, **hub_kwargs))


def load_tokenizer(name: str | os.PathLike, **hub_kwargs: Any) -> Any:
    """The LM tokenizer (``LMTokenizer``) saved beside the model in folder or Hub repository
    ``name``, checked against the hash its config.json records."""
    from retrolm.retrieval.tokenizer import LMTokenizer

    folder = resolve_pretrained(name, **hub_kwargs)
    meta = read_pretrained_config(folder)
    if not (folder / TOKENIZER).is_file():
        raise FileNotFoundError(
            f"{folder} has no {TOKENIZER}: it was saved without a tokenizer "
            "(save_pretrained(..., tokenizer=tok) or `retrolm export` keep one)"
        )
    tok = LMTokenizer.from_file(folder / TOKENIZER)
    saved = meta.get("tokenizer_hash")
    if saved is not None and tok.hash != saved:
        raise IncompatibleError(
            f"{folder / TOKENIZER} is not the tokenizer saved with the model (hash "
            f"{tok.hash[:12]}, recorded {saved[:12]}): download the folder again"
        )
    return tok


def upload_pretrained(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str = "Upload retrolm model",
) -> Any:
    """Upload pretrained ``folder``'s files (``FILES``, no others) to Hub repository
    ``repo_id`` in one commit, creating the repository if needed."""
    folder = Path(folder)
    read_pretrained_config(folder)  # refuse to upload anything else
    hf = hub()
    api = hf.HfApi(token=token, library_name="retrolm")
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    operations = [
        hf.CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))
        for name in FILES
        if (folder / name).is_file()
    ]
    return api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message,
        revision=revision,
        create_pr=create_pr,
        repo_type="model",
    )
