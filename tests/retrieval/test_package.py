"""Only retrolm.retrieval may load faiss, transformers or tokenizers (and the RETRO-fit adapter
of a Hugging Face base, which loads transformers when it opens one)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
HEAVY = ("faiss", "transformers", "tokenizers")
# outside retrieval/, the one module that may: it wraps a transformers model (imported in the
# functions that open one, so `import retrolm` stays light: the test above)
ALLOWED = {("models/retrofit/hf_base.py", "transformers")}


def test_import_retrolm_stays_light():
    code = (
        "import sys, retrolm, retrolm.cli, retrolm.utils, retrolm.errors; "
        f"print([m for m in sys.modules if m.split('.')[0] in {HEAVY!r}])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(SRC)},
        check=True,
    ).stdout
    assert out.strip() == "[]"


def test_heavy_imports_live_in_retrieval_only():
    for path in (SRC / "retrolm").rglob("*.py"):
        if "retrieval" in path.relative_to(SRC).parts:
            continue
        text, rel = path.read_text(), path.relative_to(SRC / "retrolm").as_posix()
        for name in HEAVY:
            if (rel, name) in ALLOWED:
                assert "\nimport transformers" not in text and "\nfrom transformers" not in text
                continue
            assert f"import {name}" not in text and f"from {name}" not in text, (path, name)
