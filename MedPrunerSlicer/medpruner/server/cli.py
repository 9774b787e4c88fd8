"""`medpruner serve`: load the model once, then answer jobs over HTTP on loopback (or, with a token, the LAN)."""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from ..errors import InputError

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def add_serve_parser(commands) -> None:
    serve = commands.add_parser(
        "serve", help="run the HTTP job server the Slicer module talks to",
        description="Loads the model once and answers jobs one at a time on its device. Binds 127.0.0.1 by "
                    "default and refuses any other address without a token. Finished jobs are kept for "
                    "--keep-minutes and at most --keep-jobs of them, then deleted with their files. API: "
                    "GET /v1/health, POST /v1/jobs, GET /v1/jobs/{id}[/result|/heatmaps/kept|/heatmaps/attention], "
                    "DELETE /v1/jobs/{id}; interactive docs at /docs.")
    serve.add_argument("--model", required=True, help="checkpoint directory or hub id, or tiny for the demo model (random weights)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    token = serve.add_mutually_exclusive_group()
    token.add_argument("--token", default=None, help="access token clients must send (prefer --token-file)")
    token.add_argument("--token-file", default=None, help="file holding the access token")
    serve.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    serve.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                       help="weights dtype (default: the checkpoint's own)")
    serve.add_argument("--max-upload-mb", type=int, default=2048, help="largest volume upload (default 2048)")
    serve.add_argument("--max-queue", type=int, default=8, help="jobs waiting at most; more get 429 (default 8)")
    serve.add_argument("--keep-jobs", type=int, default=50, help="finished jobs kept at most (default 50)")
    serve.add_argument("--keep-minutes", type=float, default=60.0, help="minutes a finished job is kept (default 60)")
    serve.add_argument("--cache-gb", type=float, default=4.0,
                       help="memory for prepared volumes reused by follow-up questions (default 4; 0 disables)")
    serve.set_defaults(func=cmd_serve)


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        try:
            value = Path(args.token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise InputError(f"Cannot read the token file {args.token_file}: {exc.strerror}.",
                             "Give a readable file holding the token.") from exc
        if not value:
            raise InputError(f"The token file {args.token_file} is empty.", "Write the token into it.")
        return value
    return args.token or None


def _check(args: argparse.Namespace) -> None:
    for name, value, low in (("--port", args.port, 1), ("--max-upload-mb", args.max_upload_mb, 1),
                             ("--max-queue", args.max_queue, 1), ("--keep-jobs", args.keep_jobs, 1)):
        if value < low:
            raise InputError(f"{name} must be at least {low}, got {value}.")
    if args.keep_minutes <= 0 or args.cache_gb < 0:
        raise InputError("--keep-minutes must be > 0 and --cache-gb >= 0.")


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise InputError(f"The server needs {exc.name}, which is not installed.",
                         'Install the server extras: pip install -e ".[server]" in the MedPrunerSlicer checkout.') from exc
    from ..cli import _load_engine, _StderrProgress
    from ..prepared_cache import PreparedCache
    from .app import ServerSettings, create_app
    from .jobs import JobManager

    _check(args)
    token = _token(args)
    if args.host not in LOOPBACK and token is None:
        raise InputError(f"Refusing to listen on {args.host} without an access token: anyone on the network "
                         "could send volumes to this model.", "Add --token-file FILE, or listen on 127.0.0.1.")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    progress = _StderrProgress()
    engine = _load_engine(args.model, args.device, args.dtype, progress)
    root = Path(tempfile.mkdtemp(prefix="medpruner-serve-"))   # private (0700): uploads and job outputs
    (root / "uploads").mkdir()
    (root / "jobs").mkdir()
    cache = PreparedCache(int(args.cache_gb * 2**30)) if args.cache_gb > 0 else None
    manager = JobManager(engine, root / "jobs", max_queue=args.max_queue, keep_jobs=args.keep_jobs,
                         keep_seconds=args.keep_minutes * 60, prepared_cache=cache)
    manager.start()
    app = create_app(manager, ServerSettings(token=token, max_upload_bytes=args.max_upload_mb * 2**20,
                                             upload_root=root / "uploads"))
    progress.say(f"serving {engine.model_id} on http://{args.host}:{args.port} "
                 f"({'token required' if token else 'no token'}); Ctrl-C stops")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        manager.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0
