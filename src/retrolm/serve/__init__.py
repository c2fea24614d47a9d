"""``retrolm serve``: a local web page that generates and shows what was retrieved.

``Session`` (``session.py``) computes everything on plain data; ``create_app``
(``app.py``) is the FastAPI layer over it, importing FastAPI only when it is used (the
``serve`` extra: ``pip install 'retrolm[serve]'``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Session", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from retrolm.serve.app import create_app

        return create_app
    if name == "Session":
        from retrolm.serve.session import Session

        return Session
    raise AttributeError(f"module 'retrolm.serve' has no attribute {name!r}")
