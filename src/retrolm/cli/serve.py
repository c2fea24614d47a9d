"""``retrolm serve RUN [--db DB] [--host 127.0.0.1] [--port 8000]``: a local web page that
generates and shows what was retrieved (``retrolm.serve``)."""

from __future__ import annotations

import argparse
import importlib.util
import socket


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="a local web page: generate, see each chunk's neighbours and per-token surprisal",
        description="Serve RUN on a local web page (and JSON endpoints /generate, /search, "
        "/info). Needs the serve extra: pip install 'retrolm[serve]'.",
    )
    p.add_argument("run", help="run directory (or one of its checkpoint folders)")
    p.add_argument("--db", help="retrieval database (default: the run's)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only)",
    )
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(
            f"retrolm serve needs {' and '.join(missing)}: pip install 'retrolm[serve]'"
        )
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is not a port number (0-65535)")
    check_free(args.host, args.port)  # before the model loads
    import uvicorn

    from retrolm.serve.app import create_app

    app = create_app(args.run, args.db)
    s = app.state.session
    s.warm_up()
    where = f"{s.fam.name} run {args.run}" + (f", database {s.db.path}" if s.db else "")
    print(f"serving {where} on http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def check_free(host: str, port: int) -> None:
    """ValueError naming the fix when ``host:port`` cannot be listened on."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise ValueError(
            f"cannot listen on {host}:{port} ({e.strerror}); pass another --port"
            + ("" if host in ("127.0.0.1", "localhost", "0.0.0.0") else " or --host")
        ) from None
