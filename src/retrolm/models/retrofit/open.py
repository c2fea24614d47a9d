"""``open_base``: the RETRO-fit base at a path, of the kind its files say (a Hugging Face
causal-LM folder, or a retrolm run)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from retrolm.models.retrofit.base import DecoderBase


def is_hf_folder(path: Path) -> bool:
    """A Hugging Face model folder: a config.json with a ``model_type``."""
    try:
        meta = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "model_type" in meta


def open_base(path: str | os.PathLike, **hf_kwargs: Any) -> DecoderBase:
    """The base at ``path``: a Hugging Face causal-LM folder or a retrolm run (or one of its
    checkpoint folders). Anything else is a one-line ValueError."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"base {path} does not exist: pass a retrolm run trained without retrieval or a "
            "local Hugging Face causal-LM folder"
        )
    if is_hf_folder(path):
        from retrolm.models.retrofit.hf_base import HFBase

        return HFBase.load(path, **hf_kwargs)
    from retrolm.models.retrofit.retrolm_base import RetrolmBase

    return RetrolmBase.load(path)
