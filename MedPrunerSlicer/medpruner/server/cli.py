"""`medpruner serve`: load the model once, then answer jobs over HTTP on loopback (or, with a token, the LAN)."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from ..errors import InputError

LOOPBACK = ("127.0.0.1", "::1", "localhost")
STOP_TIMEOUT_S = 3.0         # SIGTERM to exit: the Slicer module waits 5 s before it kills




def add_serve_parser(commands) -> None:
    serve = commands.add_parser(
        "serve", help="run the HTTP job server the Slicer module talks to",
        description="Loads the model once and answers jobs one at a time on its device. Binds 127.0.0.1 by "
                    "default and refuses any other address without a token. Finished jobs are kept for "
                    "--keep-minutes and at most --keep-jobs of them, then deleted with their files. API: "
                    "GET /v1/health, POST /v1/jobs, GET /v1/jobs/{id}[/result|/events|/heatmaps/kept|/heatmaps/attention], "
                    "DELETE /v1/jobs/{id}; interactive docs at /docs.")
    serve.add_argument("--model", required=True, help="checkpoint directory or hub id, or tiny for the demo model (random weights)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 lets the system pick a free one)")
    serve.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                       help="another host name clients may use to reach this server (besides 127.0.0.1, localhost, "
                            "[::1] and --host); repeatable")
    serve.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                       help="a web origin (e.g. https://viewer.example.org) whose pages may call this server "
                            "(CORS); repeatable; default none")
    token = serve.add_mutually_exclusive_group()
    token.add_argument("--token", default=None, help="access token clients must send (prefer --token-file)")
    token.add_argument("--token-file", default=None, help="file holding the access token")
    serve.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    serve.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                       help="weights dtype (default: the checkpoint's own)")
    serve.add_argument("--max-upload-mb", type=int, default=2048, help="largest volume upload (default 2048)")
    serve.add_argument("--max-volume-mb", type=int, default=1024,
                       help="largest decoded volume (voxels x bytes, judged from the header before reading; "
                            "default 1024)")
    serve.add_argument("--read-timeout", type=float, default=120.0,
                       help="seconds one volume read may take before its job fails (default 120)")
    serve.add_argument("--max-queue", type=int, default=8, help="jobs waiting at most; more get 429 (default 8)")
    serve.add_argument("--keep-jobs", type=int, default=50, help="finished jobs kept at most (default 50)")
    serve.add_argument("--keep-minutes", type=float, default=60.0, help="minutes a finished job is kept (default 60)")
    serve.add_argument("--cache-gb", type=float, default=4.0,
                       help="memory for prepared volumes reused by follow-up questions (default 4; 0 disables)")
    cluster = serve.add_argument_group("replica set (Ray Serve; needs pip install -e \".[cluster]\")")
    cluster.add_argument("--replicas", type=int, default=None, metavar="N",
                         help="run N engine replicas on Ray Serve behind this server (one model load each); new "
                              "jobs go to the least-loaded replica, follow-ups to the one holding their volume; "
                              "--max-queue then counts the jobs waiting across all of them, and --cache-gb is per "
                              "replica. See docs/SCALING.md")
    cluster.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                         help="join this Ray cluster (from one of its machines) instead of starting a local one")
    cluster.add_argument("--gpus-per-replica", type=float, default=None, metavar="G",
                         help="GPUs each replica holds: a whole number or 1/k (default 1 when the cluster has "
                              "GPUs, else 0: CPU replicas)")
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
    for name, value, low in (("--port", args.port, 0), ("--max-upload-mb", args.max_upload_mb, 1),
                             ("--max-volume-mb", args.max_volume_mb, 1), ("--max-queue", args.max_queue, 1),
                             ("--keep-jobs", args.keep_jobs, 1)):
        if value < low:
            raise InputError(f"{name} must be at least {low}, got {value}.")
    if args.port > 65535:
        raise InputError(f"--port must be at most 65535, got {args.port}.")
    if args.replicas is not None and args.replicas < 1:
        raise InputError(f"--replicas must be at least 1, got {args.replicas}.")
    if args.replicas is None and (args.ray_address or args.gpus_per_replica is not None):
        raise InputError("--ray-address and --gpus-per-replica only apply to a replica set.", "Add --replicas N.")
    if args.keep_minutes <= 0 or args.cache_gb < 0 or args.read_timeout <= 0:
        raise InputError("--keep-minutes and --read-timeout must be > 0, and --cache-gb >= 0.")


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads, so a busy port is said at once."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InputError(f"Cannot listen on {host}: {exc.strerror}.", "Give an address of this machine with --host.") from None
    family, kind, proto, _, address = sorted(infos, key=lambda info: info[0] != socket.AF_INET)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise InputError(f"Port {port} on {host} is already in use (another medpruner serve?).",
                             "Stop the other server, or choose another port with --port N (0 picks a free one).") from None
        raise InputError(f"Cannot listen on {host}:{port}: {exc.strerror}.",
                         "Choose another --host or --port.") from None
    sock.set_inheritable(False)
    return sock


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise InputError(f"The server needs {exc.name}, which is not installed.",
                         'Install the server extras: pip install -e ".[server]" in the MedPrunerSlicer checkout.') from exc
    _check(args)
    token = _token(args)
    if args.host not in LOOPBACK and token is None:
        raise InputError(f"Refusing to listen on {args.host} without an access token: anyone on the network "
                         "could send volumes to this model.", "Add --token-file FILE, or listen on 127.0.0.1.")
    sock = _bind(args.host, args.port)
    port = sock.getsockname()[1]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    from .errors import register_private_path
    from .workspace import create_workspace, remove_workspace, sweep_dead_workspaces

    sweep_dead_workspaces()
    root = create_workspace()
    register_private_path(root)

    def stop_while_loading(signum, frame) -> None:
        # No job exists before serving starts: delete the folder and leave at once (the model may take minutes).
        if args.replicas is not None:
            _stop_ray_quietly()
        remove_workspace(root)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop_while_loading)
    signal.signal(signal.SIGINT, stop_while_loading)
    running: dict = {}
    worker_ended = True
    try:
        _serve(args, token, sock, port, root, uvicorn, running)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # cleanup must not be interrupted
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if "manager" in running:
            worker_ended = running["manager"].stop(timeout=STOP_TIMEOUT_S)
        remove_workspace(root)
        sock.close()
        print("medpruner: server stopped; its uploads and job files are deleted", file=sys.stderr, flush=True)
    if not worker_ended:   # a job that would not stop in time must not write into a deleted folder
        sys.stderr.flush()
        os._exit(0)
    return 0


def _stop_ray_quietly() -> None:
    """A signal while the replica set starts: take down what Ray started, if it did (never raises)."""
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:
        pass


def _uvicorn_server(uvicorn, config, manager):
    """A uvicorn server that ends the open event streams as it begins to stop: an open stream would
    otherwise hold the stop for uvicorn's graceful timeout, and the Slicer module kills after 5 s."""
    class StreamEndingServer(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            manager.end_streams()
            await super().shutdown(sockets=sockets)

    return StreamEndingServer(config)


def _serve(args: argparse.Namespace, token: str | None, sock: socket.socket, port: int, root: Path, uvicorn,
           running: dict) -> None:
    """Load the model, then serve until a signal; `running["manager"]` is the job manager, for the caller to stop."""
    from ..cli import _load_engine, _resolve_model, _StderrProgress
    from ..prepared_cache import PreparedCache
    from .app import ServerSettings, create_app
    from .bounded_read import ReadLimits
    from .guard import HostPolicy
    from .jobs import JobManager

    progress = _StderrProgress()
    max_volume = args.max_volume_mb * 2**20
    read_limits = ReadLimits(max_decoded_bytes=max_volume, timeout_s=args.read_timeout)
    if args.replicas is not None:
        from ..checkpoints import check_model_reachable
        from .cluster_front import start_replica_set

        model = _resolve_model(args.model, progress)   # the demo model is built once, here, not by each replica
        check_model_reachable(model)                   # an unknown model is said before Ray starts
        manager = start_replica_set(args, model, root / "jobs", read_limits, progress.say)
        model_id = manager.health()["model_id"]
    else:
        engine = _load_engine(args.model, args.device, args.dtype, progress)
        cache = PreparedCache(int(args.cache_gb * 2**30)) if args.cache_gb > 0 else None
        manager = JobManager(engine, root / "jobs", max_queue=args.max_queue, keep_jobs=args.keep_jobs,
                             keep_seconds=args.keep_minutes * 60, prepared_cache=cache, read_limits=read_limits)
        manager.start()
        model_id = engine.model_id
    running["manager"] = manager
    policy = HostPolicy(args.host, port, allowed_hosts=args.allowed_host, allow_origins=args.allow_origin)
    app = create_app(manager, ServerSettings(token=token, max_upload_bytes=args.max_upload_mb * 2**20,
                                             upload_root=root / "uploads", max_volume_bytes=max_volume, policy=policy))
    shown = f"[{args.host}]" if ":" in args.host else args.host
    progress.say(f"serving {model_id} on http://{shown}:{port} "
                 f"({'token required' if token else 'no token'}); Ctrl-C stops")
    # h11 and asyncio, named: uvicorn would pick httptools/uvloop when installed (Ray brings both), and the
    # guard's refusals (CL+TE, drains, 408s) were verified on these.
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, lifespan="off", http="h11",
                            loop="asyncio")
    # uvicorn handles SIGTERM/SIGINT while it serves (graceful stop), then raises the signal again once it has
    # stopped: let that one pass, so the caller's cleanup runs instead of the default "die at once".
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    _uvicorn_server(uvicorn, config, manager).run(sockets=[sock])
