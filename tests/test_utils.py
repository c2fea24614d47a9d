"""The shared file helpers: strict JSON written atomically, figures written atomically, and
field docstrings read back from a dataclass."""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from retrolm.utils import field_docs, json_safe, save_figure, write_json


def test_write_json_is_strict_json(tmp_path):
    path = write_json(
        tmp_path / "r.json",
        {"a": math.nan, "b": [1.5, math.inf, -math.inf], "c": (2, "x"), "d": {"e": None}},
    )
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    # the parser a strict consumer would use: no NaN/Infinity constants accepted

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    assert json.loads(text, parse_constant=refuse) == {
        "a": None,
        "b": [1.5, None, None],
        "c": [2, "x"],
        "d": {"e": None},
    }


def test_write_json_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = write_json(tmp_path / "r.json", {"step": 1})
    with pytest.raises(TypeError):
        write_json(path, {"step": 2, "bad": object()})  # not serialisable
    real_write = Path.write_text

    def write_half_then_fail(self, text, *args, **kwargs):  # a disk full / kill mid-write
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", write_half_then_fail)
    with pytest.raises(OSError):
        write_json(path, {"step": 3, "long": "x" * 1000})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary left behind


def test_json_safe_leaves_finite_values_alone():
    value = {"x": [0.0, -1e308, 3], "y": "nan", "z": True}
    assert json_safe(value) == value


def test_save_figure_writes_the_suffix_format_atomically(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "curve.png")
    plt.close(fig)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["curve.png"]


def test_field_docs_reads_the_string_under_each_field():
    @dataclass
    class Config:
        a: int = 1
        """The first field,
        over two lines."""
        b: str = "x"
        c: float = 0.5
        """The third."""

    assert field_docs(Config) == {"a": "The first field, over two lines.", "c": "The third."}
