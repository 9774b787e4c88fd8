"""The reader process: reads ONE uploaded volume under hard limits and hands the voxels to the server.

NRRD and MetaImage files are read through a header rebuilt by `volume_header.write_self_contained`
from the fields MedPruner's own parser checked, never through the header the client wrote.

Run by `bounded_read.read_upload` as `python -m medpruner.server.read_child SOURCE KIND MAX_BYTES
MEMORY_BYTES PARENT_PID`. Before touching the file it caps its own address space and file sizes,
asks the kernel to kill it when the server dies, and runs the image libraries single-threaded.
A crash, a hang or a memory blow-up of a reader (a crafted file meeting a library bug) therefore
ends this process, never the server.

Protocol on stdout: one JSON line, then (when it says ok) exactly nbytes of C-order voxels.
    {"ok": true, "dtype": "<i2", "shape": [z, y, x], "spacing": [...], "origin": [...], "direction": [...]}
    {"ok": false, "code": "...", "message": "...", "hint": "..."}
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import sys
import zipfile
import zlib
from pathlib import Path, PurePosixPath

CHUNK = 1 << 20
UPLOAD_NAME = "the uploaded volume"
ZIP_NAME = "the uploaded zip"


def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when the server exits, however it exits."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:   # the server died before prctl took effect
        os._exit(1)


def _limit(memory_bytes: int, max_file_bytes: int) -> None:
    for which, value in ((resource.RLIMIT_AS, memory_bytes), (resource.RLIMIT_FSIZE, max_file_bytes),
                         (resource.RLIMIT_CORE, 0)):
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass


def extract_dicom_zip(source: Path, target: Path, max_total_bytes: int) -> Path:
    """Extract a checked zip (see uploads.check_zip) flat into `target`, never past the sizes it declares."""
    from ..errors import VolumeError

    damaged = VolumeError("The zip file is damaged: its contents do not match its directory.",
                          "Zip the DICOM series folder again.")
    target.mkdir()
    written = 0
    try:
        with zipfile.ZipFile(source) as archive:
            for index, member in enumerate(m for m in archive.infolist() if not m.is_dir()):
                name = PurePosixPath(member.filename)
                if name.is_absolute() or ".." in name.parts:
                    raise damaged
                budget = member.file_size
                with archive.open(member) as data, open(target / f"{index:05d}.dcm", "wb") as sink:
                    while chunk := data.read(min(CHUNK, budget + 1)):
                        budget -= len(chunk)
                        written += len(chunk)
                        if budget < 0 or written > max_total_bytes:
                            raise damaged
                        sink.write(chunk)
                if budget != 0:
                    raise damaged
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError,
            OSError, KeyError) as exc:
        raise damaged from exc
    return target


def _read(source: Path, kind: str, max_bytes: int):
    from ..volume_header import inspect_volume_file, write_self_contained
    from ..volume_io import _check_sizes, load_volume

    if kind == "zip":
        folder = extract_dicom_zip(source, source.parent / "dicom", max_total_bytes=4 * max(max_bytes, CHUNK))
        try:
            return load_volume(folder, allow_detached=False, max_decoded_bytes=max_bytes, name=ZIP_NAME,
                               reveal_ids=False)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    if kind in ("nrrd", "metaimage"):   # the reader sees only a header rebuilt from the fields checked here
        facts = inspect_volume_file(source, allow_detached=False, max_decoded_bytes=max_bytes, name=UPLOAD_NAME,
                                    check_sizes=_check_sizes)
        checked = write_self_contained(source, facts, source.with_name("checked" + source.suffix))
        source.unlink()
        source = checked
    return load_volume(source, allow_detached=False, max_decoded_bytes=max_bytes, name=UPLOAD_NAME, reveal_ids=False)


def main(argv: list[str]) -> int:
    source, kind, max_bytes, memory_bytes, parent_pid = Path(argv[0]), argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    _die_with_parent(parent_pid)
    _limit(memory_bytes, max_file_bytes=max(max_bytes, source.stat().st_size) + CHUNK)
    out = sys.stdout.buffer

    def reply(message: dict) -> None:
        out.write(json.dumps(message).encode() + b"\n")
        out.flush()

    try:
        import numpy as np
        import SimpleITK as sitk

        from ..errors import MedPrunerError

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
        try:
            image = _read(source, kind, max_bytes)
        except MedPrunerError as exc:
            message = exc.message[:1].upper() + exc.message[1:]   # "the uploaded volume ..." opens the sentence
            reply({"ok": False, "code": exc.code, "message": message, "hint": exc.hint})
            return 0
        voxels = np.ascontiguousarray(sitk.GetArrayViewFromImage(image))
        notes = {key: image.GetMetaData(key) for key in ("medpruner.notes", "medpruner.geometry_assumed")
                 if image.HasMetaDataKey(key)}
        reply({"ok": True, "dtype": voxels.dtype.str, "shape": list(voxels.shape), "spacing": image.GetSpacing(),
               "origin": image.GetOrigin(), "direction": image.GetDirection(), "metadata": notes})
        out.write(memoryview(voxels).cast("B"))
        out.flush()
        return 0
    except MemoryError:
        reply({"ok": False, "code": "volume_too_large", "message": "Reading the volume needs more memory than the "
               "server allows a read.", "hint": "Send a smaller volume (crop it, or fewer slices)."})
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
