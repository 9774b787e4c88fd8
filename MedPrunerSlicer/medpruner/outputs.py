"""One answer's output files land together or not at all.

`staged_outputs` gives a temporary folder beside the output folder; the outputs are written there,
and only when every one of them exists are they moved into the output folder, one rename each,
with SIGINT/SIGTERM held back for those few renames. An interrupted or failed run therefore leaves
the folder as it was (the previous set of outputs, or nothing new), and a finished run leaves a
complete new set, never new heatmaps beside an old report.
"""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)}


@contextmanager
def staged_outputs(out_dir: str | os.PathLike, make_parents: bool = True) -> Iterator[Path]:
    """Yield a staging folder beside `out_dir`; on a normal exit, move its files into `out_dir` together.

    `make_parents` creates missing folders above `out_dir` (the command line); the server passes False so
    that a job finishing during shutdown cannot recreate a folder the server has just deleted.
    """
    out = Path(out_dir)
    if make_parents:
        out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield staging
        _move_all(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_all(staging: Path, out: Path) -> None:
    out.mkdir(exist_ok=True)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
    try:
        for path in sorted(staging.iterdir()):
            os.replace(path, out / path.name)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)   # a held signal is delivered now, after the set is whole


def check_writable_folder(path: str | os.PathLike) -> str | None:
    """Why outputs could not be written to `path` (created if missing), or None when they can; writes nothing
    that stays: the nearest existing folder above it is probed with an empty temporary folder."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        return f"{target} is a file, not a folder"
    probe_in = target if target.exists() else target.parent
    while not probe_in.exists():
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        return f"{probe_in} is a file, not a folder"
    try:
        shutil.rmtree(tempfile.mkdtemp(prefix=".medpruner-write-test-", dir=probe_in))
    except OSError as exc:
        return f"cannot create files in {probe_in} ({exc.strerror or exc})"
    return None
