"""The server's private folder for uploads and job outputs, and the sweep of folders left by dead servers.

Every patient-derived file a server writes lives under one 0700 folder `medpruner-serve-*` in the
temp directory. A marker in it names the owning process (pid and its start time, so a recycled
pid is not mistaken for the owner). The server deletes the folder on every exit it controls
(normal, SIGTERM, SIGINT); after one it cannot (kill -9, power loss), the next server started by
the same user deletes it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger("medpruner.server")

PREFIX = "medpruner-serve-"
MARKER = "owner.json"
UNMARKED_GRACE_S = 60.0      # a folder without a marker is only swept when older than this


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start_time: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if start_time is not None and Path("/proc").is_dir():
        return _start_time(pid) == start_time
    return True


def create_workspace(parent: str | os.PathLike | None = None, subfolders: bool = True, kind: str = "") -> Path:
    """A fresh 0700 folder (with uploads/ and jobs/ unless `subfolders` is False), marked as this process's;
    `kind` goes into its name after the prefix (e.g. "replica-"), so the sweep covers every kind."""
    root = Path(tempfile.mkdtemp(prefix=PREFIX + kind, dir=parent))
    marker = {"pid": os.getpid(), "start_time": _start_time(os.getpid()), "created": time.time()}
    (root / MARKER).write_text(json.dumps(marker))
    if subfolders:
        (root / "uploads").mkdir(mode=0o700)
        (root / "jobs").mkdir(mode=0o700)
    return root


def sweep_dead_workspaces(parent: str | os.PathLike | None = None, announce: bool = True) -> list[Path]:
    """Delete the workspaces of servers that are no longer running (this user's only); return them.
    `announce` False: the caller just stopped their owners itself, so they are no sign of a crash."""
    base = Path(parent or tempfile.gettempdir())
    swept = []
    try:
        candidates = [p for p in base.iterdir() if p.name.startswith(PREFIX)]
    except OSError:
        return swept
    for folder in candidates:
        try:
            info = folder.lstat()
            if not folder.is_dir() or folder.is_symlink() or info.st_uid != os.getuid():
                continue
            try:
                marker = json.loads((folder / MARKER).read_text())
                dead = not _alive(int(marker["pid"]), marker.get("start_time"))
            except (OSError, ValueError, KeyError, TypeError):
                dead = time.time() - info.st_mtime > UNMARKED_GRACE_S
        except OSError:
            continue
        if dead and folder.resolve() != Path.cwd().resolve():
            shutil.rmtree(folder, ignore_errors=True)
            swept.append(folder)
    if swept and announce:
        log.warning("deleted %d folder(s) left by servers that did not stop cleanly", len(swept))
    return swept


def remove_workspace(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
