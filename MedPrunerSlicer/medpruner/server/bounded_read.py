"""Read an uploaded volume in a separate, limited process (`read_child`), with a deadline and cancel.

The image libraries parse attacker-controlled bytes. Running them in a child with a capped address
space, capped file sizes and a wall-clock deadline means a file that hangs a reader, crashes it or
makes it allocate without end fails its own job with a clear error, and the server stays healthy.
The voxels come back over a pipe into one preallocated array whose size the server checked first.
"""
from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import Cancelled, VolumeError, VolumeTooLarge

_DTYPES = {"|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f4", "<f8", ">u2", ">i2", ">u4", ">i4",
           ">u8", ">i8", ">f4", ">f8"}
_MAX_REPLY_LINE = 65536
# Address space the reader needs besides the volume: Python, numpy, SimpleITK and their libraries.
READER_BASE_BYTES = 1536 * 2**20


@dataclass(frozen=True)
class ReadLimits:
    """What one read may cost: decoded voxels, wall-clock time, and the reader's address space."""

    max_decoded_bytes: int
    timeout_s: float = 120.0
    memory_factor: float = 3.0     # the reader may hold this many copies of the decoded volume
    address_space_bytes: int | None = None   # overrides the budget computed from the two above

    @property
    def memory_bytes(self) -> int:
        if self.address_space_bytes is not None:
            return int(self.address_space_bytes)
        return int(READER_BASE_BYTES + self.memory_factor * self.max_decoded_bytes)


def read_upload(source: Path, kind: str, limits: ReadLimits, cancel: Callable[[], bool] = lambda: False):
    """The validated SimpleITK image of an uploaded file (kind from `sniff_kind`); VolumeError otherwise."""
    import SimpleITK as sitk

    command = [sys.executable, "-m", "medpruner.server.read_child", str(source), kind,
               str(limits.max_decoded_bytes), str(limits.memory_bytes), str(os.getpid())]
    env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS="1", OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    log_path = source.parent / "reader.log"
    deadline = time.monotonic() + limits.timeout_s
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=env,
                                   close_fds=True)
    pipe = _Reader(process, deadline, cancel, limits)
    try:
        line = pipe.line()
        try:
            reply = json.loads(line or b"null")
        except json.JSONDecodeError:
            reply = None
        if not isinstance(reply, dict):
            raise _reader_failed(process, log_path)
        if not reply.get("ok"):
            error_class = VolumeTooLarge if reply.get("code") == "volume_too_large" else VolumeError
            raise error_class(str(reply.get("message", "The volume cannot be read."))[:1000],
                              str(reply.get("hint", ""))[:500])
        voxels = _allocate(reply, limits)
        pipe.exact(memoryview(voxels).cast("B"))
        if pipe.exit_code() != 0:
            raise _reader_failed(process, log_path)
    finally:
        pipe.close()
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
    image = sitk.GetImageFromArray(voxels)
    del voxels
    image.SetSpacing(tuple(float(v) for v in reply["spacing"]))
    image.SetOrigin(tuple(float(v) for v in reply["origin"]))
    image.SetDirection(tuple(float(v) for v in reply["direction"]))
    metadata = reply.get("metadata") if isinstance(reply.get("metadata"), dict) else {}
    for key in ("medpruner.notes", "medpruner.geometry_assumed"):   # what reading left out or assumed
        if isinstance(metadata.get(key), str):
            image.SetMetaData(key, metadata[key][:4000])
    return image


def _allocate(reply: dict, limits: ReadLimits) -> np.ndarray:
    dtype, shape = reply.get("dtype"), reply.get("shape")
    if dtype not in _DTYPES or not isinstance(shape, list) or len(shape) != 3 or \
            not all(isinstance(n, int) and 0 < n <= 1 << 20 for n in shape) or \
            not all(isinstance(reply.get(k), list) and len(reply[k]) == n for k, n in
                    (("spacing", 3), ("origin", 3), ("direction", 9))):
        raise VolumeError("The volume reader returned an unusable answer.", "See the server's log.")
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if nbytes > limits.max_decoded_bytes:
        raise VolumeTooLarge(f"The uploaded volume is {nbytes / 2**20:.0f} MB once decoded, over the limit of "
                             f"{limits.max_decoded_bytes / 2**20:.0f} MB.", "Send a smaller volume.")
    return np.empty(shape, dtype=np.dtype(dtype))


class _Reader:
    """The child's stdout with the deadline and the cancel check applied to every wait."""

    def __init__(self, process: subprocess.Popen, deadline: float, cancel: Callable[[], bool], limits: ReadLimits):
        self.process, self.deadline, self.cancel, self.limits = process, deadline, cancel, limits
        self.fd = process.stdout.fileno()
        try:
            import fcntl

            fcntl.fcntl(self.fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)   # fewer, larger reads
        except (ImportError, OSError):
            pass
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.fd, selectors.EVENT_READ)

    def close(self) -> None:
        self.selector.close()

    def _wait_readable(self) -> None:
        while True:
            if self.cancel():
                raise Cancelled()
            if time.monotonic() > self.deadline:
                raise VolumeError(f"Reading the uploaded volume took longer than {self.limits.timeout_s:.0f} s and "
                                  "was stopped.", "Send a smaller volume, as NRRD or NIfTI (raw or gzip).")
            if self.selector.select(timeout=0.1):
                return

    def line(self) -> bytes:
        line = bytearray()
        while not line.endswith(b"\n"):
            self._wait_readable()
            byte = os.read(self.fd, 1)
            if not byte:
                return b""
            line += byte
            if len(line) > _MAX_REPLY_LINE:
                raise VolumeError("The volume reader returned an unusable answer.", "See the server's log.")
        return bytes(line)

    def exact(self, view: memoryview) -> None:
        done = 0
        while done < len(view):
            self._wait_readable()
            got = os.readv(self.fd, [view[done:done + (8 << 20)]])
            if got == 0:
                raise VolumeError("The volume reader stopped before sending every voxel.", "See the server's log.")
            done += got

    def exit_code(self) -> int:
        while True:
            if self.cancel():
                raise Cancelled()
            try:
                return self.process.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                if time.monotonic() > self.deadline:
                    raise VolumeError(f"Reading the uploaded volume took longer than {self.limits.timeout_s:.0f} s "
                                      "and was stopped.", "Send a smaller volume.") from None


def _reader_failed(process: subprocess.Popen, log_path: Path) -> VolumeError:
    code = process.poll()
    killed_here = code is None
    if killed_here:   # it answered nonsense and is still running
        process.kill()
        code = process.wait()
    try:
        tail = log_path.read_bytes()[-2000:].decode("utf-8", "replace")
    except OSError:
        tail = ""
    import logging

    logging.getLogger("medpruner.server").warning("volume reader exited with %s: %s", code, tail)
    if "MemoryError" in tail or "bad_alloc" in tail or (code == -9 and not killed_here):
        return VolumeTooLarge("Reading the uploaded volume needed more memory than the server allows a read.",
                              "Send a smaller volume (crop it, or fewer slices).")
    return VolumeError("The uploaded volume could not be read: the reader failed on it"
                       + (f" (signal {-code})" if code and code < 0 else "") + ".",
                       "Export the volume again as NRRD or NIfTI; if it keeps failing, see the server's log.")
