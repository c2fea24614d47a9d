"""The README's RETRO example runs (at reduced sizes, same code)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"

SHRINK = [
    ("2048", "256"),
    ("(2, 32, 2, 128)", "(2, 4, 2, 128)"),
    ("(2, 32, 2, dtype", "(2, 4, 2, dtype"),
    ("dec_depth=12", "dec_depth=3"),
    ("(6, 9, 12)", "(3,)"),
    ("enc_dim=896", "enc_dim=64"),
    ("dec_dim=768", "dec_dim=64"),
]


def test_readme_retro_example_runs():
    block = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    for a, b in SHRINK:
        assert a in block, f"README example changed: {a!r} not found; update this test"
        block = block.replace(a, b)
    scope: dict = {}
    exec(compile(block, str(README), "exec"), scope)
    assert scope["logits"].shape == (2, 256, 20000)
    assert scope["loss"].isfinite()


def test_readme_family_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    block = next(b for b in blocks if "RoutingTransformerLM(" in b)
    scope: dict = {}
    exec(compile(block, str(README), "exec"), scope)
    assert scope["logits"].shape == (1, 256, 256)
    assert scope["sample"].shape == (1, 16)
    assert scope["loss"].isfinite()


def test_readme_memory_and_delight_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    block = next(b for b in blocks if "MemorizingTransformer(" in b)
    scope: dict = {}
    exec(compile(block, str(README), "exec"), scope)
    assert scope["logits"].shape == (1, 32, 256)
    assert scope["whole"].shape == (1, 300, 256)
    assert scope["loss"].isfinite()
    assert scope["new"].shape == (1, 8)
    assert "block 2" in capsys.readouterr().out
