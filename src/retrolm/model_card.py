"""The model card of a shared model: ``README.md`` with YAML metadata, then Markdown.

    ---                         YAML front matter (what the Hugging Face Hub indexes)
    library_name: retrolm
    tags: [retrolm, <family>, ...]
    retrolm: {family, model_class, parameters, steps, training_data, database, eval}
    ---
    # title, how to load it, training, database, evaluation table, configuration

Plain text from plain values: it imports no model, no pipeline and no YAML library (the
YAML written here is the small subset every parser reads: block mappings and lists of
plain scalars, strings double-quoted). ``save_pretrained`` writes a short card when given
none; ``retrolm export`` (``retrolm.export``) fills in training and evaluation.
"""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal
from typing import Any

_PLAIN = re.compile(r"[A-Za-z_][\w.-]*")
"""Strings written unquoted (the rest double-quoted): no YAML indicator, no number."""
_KEYWORDS = {"yes", "no", "true", "false", "null", "on", "off", "y", "n"}


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "null"
        # the shortest repr in fixed point: YAML 1.1 parsers read "1e-05" (no dot) as a string
        text = format(Decimal(repr(value)), "f")
        return text if "." in text else text + ".0"
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _KEYWORDS:
        return text
    return json.dumps(text)  # a JSON string is a YAML double-quoted scalar


def to_yaml(value: Any, indent: int = 0) -> list[str]:
    """``value`` (dicts, lists, scalars) as block-style YAML lines."""
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return [pad + "{}"]
        lines = []
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{_scalar(str(key))}:")
                lines.extend(to_yaml(item, indent + 2))
            else:
                lines.append(f"{pad}{_scalar(str(key))}: {to_yaml(item)[0].strip()}")
        return lines
    if isinstance(value, list):
        if not value:
            return [pad + "[]"]
        lines = []
        for item in value:
            sub = to_yaml(item, indent + 2)
            lines.append(f"{pad}- {sub[0].strip()}")
            lines.extend(sub[1:])
        return lines
    return [pad + _scalar(value)]


def front_matter(card: str) -> str:
    """The YAML text between a card's two ``---`` lines (ValueError if it has none)."""
    lines = card.splitlines()
    if not lines or lines[0].strip() != "---" or "---" not in (x.strip() for x in lines[1:]):
        raise ValueError("a model card starts with YAML metadata between two '---' lines")
    end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
    return "\n".join(lines[1:end]) + "\n"


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def model_card(
    *,
    family: str,
    model_class: str,
    parameters: int,
    config: dict[str, Any] | None = None,
    steps: int | None = None,
    training_data: dict[str, Any] | None = None,
    database: dict[str, Any] | None = None,
    eval_modes: dict[str, dict[str, float]] | None = None,
    eval_data: dict[str, Any] | None = None,
    eval_table: str | None = None,
    name: str = "FOLDER_OR_REPO_ID",
) -> str:
    """The card's text. ``training_data``: what the model was trained on (a text folder's
    files, bytes and digest, or a database's); ``database``: for RETRO, the identity of the
    retrieval database it reads (encoder, tokenizer, chunk size); ``eval_modes``: the
    ``modes`` of an ``eval.json`` (bits/byte with and without retrieval or memory, kept in
    the metadata); ``eval_data``: what was scored; ``eval_table``: the evaluation as
    Markdown (``EvalResult.markdown()``);
    ``name``: what the loading example passes to ``from_pretrained``."""
    meta: dict[str, Any] = {"family": family, "model_class": model_class, "parameters": parameters}
    for key, value in (
        ("steps", steps),
        ("training_data", training_data),
        ("database", database),
        ("eval", {m: r.get("bits_per_byte") for m, r in (eval_modes or {}).items()} or None),
        ("eval_data", eval_data),
    ):
        if value is not None:
            meta[key] = value
    head = {
        "library_name": "retrolm",
        "pipeline_tag": "text-generation",
        "tags": ["retrolm", family, "text-generation"],
        "retrolm": meta,
    }
    trained = f", trained for {steps} steps" if steps is not None else ""
    parts = [
        "---",
        *to_yaml(head),
        "---",
        "",
        f"# {family} model ({model_class})",
        "",
        f"A `{model_class}` of the **{family}** family, {_millions(parameters)} parameters"
        f"{trained}, made with retrolm.",
        "",
        "## Use",
        "",
        "```python",
        "import retrolm",
        "",
        f'model = retrolm.{model_class}.from_pretrained("{name}")  # in eval mode',
        f'tokenizer = retrolm.load_tokenizer("{name}")',
        "```",
    ]
    if training_data:
        parts += ["", "## Training data", "", *_bullets(training_data)]
    if database:
        parts += [
            "",
            "## Retrieval database",
            "",
            "The model reads neighbours from a database built with this encoder, tokenizer and "
            "chunk size (the database is not part of this folder: build one with "
            "`retrolm db build TEXT DB --encoder ENCODER`):",
            "",
            *_bullets(database),
        ]
    if eval_table:
        parts += ["", "## Evaluation", ""]
        parts += [*_bullets(eval_data), ""] if eval_data else []
        parts.append(eval_table.strip())
    if config:
        parts += ["", "## Configuration", "", "```json", json.dumps(config, indent=2), "```"]
    return "\n".join(parts) + "\n"


def _bullets(d: dict[str, Any]) -> list[str]:
    out = []
    for key, value in d.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        out.append(f"- {key.replace('_', ' ')}: {value}")
    return out
