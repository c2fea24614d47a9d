"""The web layer of ``retrolm serve``: a FastAPI app with one static page and JSON endpoints.

Endpoints (all JSON; every error is ``{"error": "one line"}`` with a 4xx status, or a 500
whose message names no internals; the traceback goes to the server's log only):

* ``GET /``: the page (``static/index.html``; plain HTML, CSS and JS, nothing fetched from
  elsewhere). URL parameters fill its form (``?prompt=...&seed=0&autorun=1`` generates at
  once, so a headless browser can render a result from a URL).
* ``GET /info``: the run (family, chunk size, whether it retrieves, has a copy head) and the
  limits of a request.
* ``POST /generate``: ``GenerateRequest`` -> with ``"stream": true`` (default) NDJSON lines
  ``{"type": "token", "id", "text"}`` as tokens are sampled, then one
  ``{"type": "result", ...}`` (``Session.generate``) or ``{"type": "error", "message"}``;
  with ``"stream": false`` the result object alone.
* ``POST /search``: ``SearchRequest`` -> ``{"results": [...]}`` (``Session.search``), the
  ``retrolm db query`` view.

Importing this module imports FastAPI (the ``serve`` extra); ``import retrolm`` does not.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections.abc import Iterator
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from retrolm.serve.session import Session

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 20_000  # before tokenizing; the token limit is the model's (GET /info)
MAX_NEW_TOKENS = 1024
MAX_NEIGHBOURS = 32
MAX_RESULTS = 50


class GenerateRequest(BaseModel):
    """``POST /generate``: continue ``prompt`` (sampling as ``retrolm generate`` does)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(0.8, ge=0.0, le=10.0, allow_inf_nan=False)
    """0 = greedy."""
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(0.9, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    neighbours: int = Field(2, ge=1, le=MAX_NEIGHBOURS)
    retrieval: bool = True
    """False: generate without neighbours (RETRO[OFF])."""
    copy_head: bool = True
    """False: the RETRO copy head switched off (only for a model that has one)."""
    stream: bool = True
    """True: NDJSON lines as tokens are sampled; False: one JSON object at the end."""


class SearchRequest(BaseModel):
    """``POST /search``: the ``k`` database chunks nearest to ``text``."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    k: int = Field(5, ge=1, le=MAX_RESULTS)


def create_app(
    run: str | os.PathLike | None = None,
    db: str | os.PathLike | None = None,
    *,
    session: Session | None = None,
) -> FastAPI:
    """The app serving ``run`` (a run or checkpoint folder; ``db`` overrides its database),
    or an already opened ``session``. The model loads here, so a bad run fails at startup."""
    if session is None:
        if run is None:
            raise ValueError("create_app needs a run folder (or an opened session)")
        session = Session.open(run, db)
    # no /docs or /redoc: their pages load scripts from a CDN; the schema is /openapi.json
    app = FastAPI(title="retrolm serve", docs_url=None, redoc_url=None)
    app.state.session = session
    _add_error_handlers(app)
    page = resources.files("retrolm.serve").joinpath("static/index.html").read_text("utf-8")

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/info")
    def info() -> dict[str, Any]:
        return session.info() | {
            "limits": {
                "prompt_chars": MAX_PROMPT_CHARS,
                "max_new_tokens": MAX_NEW_TOKENS,
                "neighbours": MAX_NEIGHBOURS,
                "k": MAX_RESULTS,
            }
        }

    @app.post("/generate")
    def generate(req: GenerateRequest) -> Any:
        settings = req.model_dump(exclude={"stream"})
        _check(session, req)
        if not req.stream:
            return _call(lambda: session.generate(**settings))
        return StreamingResponse(_stream(session, settings), media_type="application/x-ndjson")

    @app.post("/search")
    def search(req: SearchRequest) -> dict[str, Any]:
        return {"results": _call(lambda: session.search(req.text, req.k))}

    return app


def _check(session: Session, req: GenerateRequest) -> None:
    """The request errors a stream could only report after its 200: raised as 400 now."""
    _call(lambda: session.encode_prompt(req.prompt))
    if not req.copy_head and not session.has_copy_head:
        raise HTTPException(400, "this run's model has no copy head to switch off")


def _call(fn: Any) -> Any:
    """``fn()``, a ``ValueError`` (a request the model cannot serve) turned into a 400."""
    try:
        return fn()
    except ValueError as e:
        raise HTTPException(400, str(e)) from None


class _ClientLeft(Exception):
    """Raised from the token hook to stop a generation nobody reads any more."""


def _stream(session: Session, settings: dict[str, Any]) -> Iterator[bytes]:
    """NDJSON lines of one generation, run in a worker thread that hands each token over
    as it is sampled. When the client leaves (this generator is closed), the worker stops
    at its next token instead of holding the model to the end."""
    lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
    left = threading.Event()

    def on_text(token: int, text: str) -> None:
        if left.is_set():
            raise _ClientLeft
        lines.put({"type": "token", "id": token, "text": text})

    def work() -> None:
        try:
            lines.put({"type": "result", **session.generate(**settings, on_text=on_text)})
        except _ClientLeft:
            log.info("client left: generation stopped")
        except ValueError as e:
            lines.put({"type": "error", "message": str(e)})
        except Exception:
            log.exception("generation failed")
            lines.put({"type": "error", "message": "generation failed (see the server's log)"})
        finally:
            lines.put(None)

    threading.Thread(target=work, name="retrolm-generate", daemon=True).start()
    try:
        while (item := lines.get()) is not None:
            yield (json.dumps(item) + "\n").encode("utf-8")
    finally:
        left.set()


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as ``{"error": "one line"}``: validation 422 naming the field, refused
    requests 400, unknown paths 404, a bug 500 with its traceback in the log only."""

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [
            {"field": ".".join(str(p) for p in e["loc"][1:]) or "body", "message": e["msg"]}
            for e in exc.errors()
        ]
        text = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
        return JSONResponse({"error": text, "fields": fields}, status_code=422)

    @app.exception_handler(HTTPException)
    async def refused(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": "internal error (see the server's log)"}, status_code=500)
