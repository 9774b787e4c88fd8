"""Uploads: the multipart body streamed to a private folder within its limits, then judged by its bytes.

The body is never buffered by the web framework (which would store it in full before any check):
`receive_form` parses it as it arrives, writes the volume part into the job's own 0700 folder,
and stops with 413 as soon as the volume or the whole body passes its limit (with or without a
declared Content-Length), or with 408 when the client stalls.

`check_volume_file` then decides from the file's first bytes and header alone, in plain Python,
whether the server will ever hand it to an image reader: the format is recognised by its bytes
(not its name), the voxel data must be inside the file (a header that names another path is a
422), the decoded size is computed from the header and refused over the limit before anything is
decompressed, and a zip must hold one flat set of plain files whose declared sizes fit the limit.
Nothing a client sends is unpickled or torch.load'ed.
"""
from __future__ import annotations

import asyncio
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header

from ..errors import VolumeError
from ..volume_header import inspect_volume_file, sniff_kind
from ..volume_io import _check_sizes, check_declared_shape
from .errors import ApiError, echo, sentence

MAX_PARAMS_BYTES = 64 * 1024
MAX_PART_HEADER_BYTES = 8 * 1024
MAX_PART_HEADERS = 16
FORM_OVERHEAD_BYTES = 1 << 20          # the body may pass the volume limit by this much (params, framing)
IDLE_TIMEOUT_S = 60.0                  # a client that sends nothing for this long is dropped
MAX_ZIP_FILES = 5000
ZIP_EXPANSION_LIMIT = 4                # uncompressed DICOM may be at most this many times the decoded-size limit
UPLOAD_NAME = "the uploaded volume"

_SUFFIX = {"nrrd": ".nrrd", "nifti": ".nii", "nifti_gz": ".nii.gz", "metaimage": ".mha", "zip": ".zip"}


def too_large(limit_bytes: int) -> ApiError:
    return ApiError(413, "upload_too_large", f"The request is larger than the server's limit of "
                    f"{limit_bytes // 2**20} MB.", "Send a smaller volume, or start the server with a larger "
                    "--max-upload-mb.")


@dataclass
class ReceivedForm:
    params: str | None
    volume: Path | None          # the saved volume part, None when the form had none (a follow-up)
    volume_bytes: int


class _FormSink:
    """Callbacks of the streaming multipart parser: headers per part, params in memory, volume to disk."""

    def __init__(self, folder: Path, max_volume_bytes: int) -> None:
        self.folder, self.max_volume_bytes = folder, max_volume_bytes
        self.params = bytearray()
        self.seen: set[str] = set()
        self.header_field, self.header_value = bytearray(), bytearray()
        self.headers: dict[bytes, bytes] = {}
        self.part: str | None = None
        self.handle = None
        self.volume: Path | None = None
        self.volume_bytes = 0
        self.ended = False

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin, "on_header_field": self._field, "on_header_value": self._value,
            "on_header_end": self._header_end, "on_headers_finished": self._headers_finished,
            "on_part_data": self._data, "on_part_end": self._part_end, "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self.headers, self.part = {}, None

    def _field(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]
        self._check_header_size()

    def _value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]
        self._check_header_size()

    def _check_header_size(self) -> None:
        if len(self.header_field) + len(self.header_value) > MAX_PART_HEADER_BYTES or \
                len(self.headers) > MAX_PART_HEADERS:
            raise ApiError(422, "invalid_request", "A part of the multipart body has oversized headers.",
                           "Send multipart/form-data with a `params` JSON field and a `volume` file.")

    def _header_end(self) -> None:
        self.headers[bytes(self.header_field).lower()] = bytes(self.header_value)
        self.header_field, self.header_value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("latin-1")
        if name not in ("params", "volume"):
            raise ApiError(422, "invalid_request", f"Unknown form field {name[:64]!r}.",
                           "Send multipart/form-data with a `params` JSON field and, for a new volume, a `volume` file.")
        if name in self.seen:
            raise ApiError(422, "invalid_request", f"The form field {name!r} was sent twice.", "Send each field once.")
        self.seen.add(name)
        self.part = name
        if name == "volume":
            if not options.get(b"filename"):   # an empty file input sends a part without a file name
                self.part = "no-file"
                return
            self.volume = self.folder / "upload.bin"
            self.handle = open(self.volume, "wb")

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self.part == "params":
            self.params += data[start:end]
            if len(self.params) > MAX_PARAMS_BYTES:
                raise ApiError(422, "invalid_params", f"params is longer than {MAX_PARAMS_BYTES // 1024} KB.",
                               'Send params as a short JSON object, e.g. {"question": "Is there a liver lesion?"}.')
        elif self.part == "volume":
            self.volume_bytes += end - start
            if self.volume_bytes > self.max_volume_bytes:
                raise too_large(self.max_volume_bytes)
            self.handle.write(data[start:end])

    def _part_end(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def _end(self) -> None:
        self.ended = True

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


async def receive_form(request, folder: Path, max_volume_bytes: int, idle_timeout: float = IDLE_TIMEOUT_S) -> ReceivedForm:
    """Stream a multipart/form-data body into `folder` (see module docstring); ApiError on any violation."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type == b"application/x-www-form-urlencoded":   # a follow-up may send params alone
        return await _receive_urlencoded(request, idle_timeout)
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise ApiError(415, "unsupported_media_type", "The request is not multipart/form-data.",
                       "Send multipart/form-data with a `params` JSON field and a `volume` file.")
    sink = _FormSink(folder, max_volume_bytes)
    parser = MultipartParser(boundary, sink.callbacks())
    body_limit = max_volume_bytes + FORM_OVERHEAD_BYTES
    received = 0
    try:
        async for chunk in _chunks(request, idle_timeout):
            received += len(chunk)
            if received > body_limit:
                raise too_large(max_volume_bytes)
            try:
                parser.write(chunk)
            except MultipartParseError:
                raise ApiError(422, "invalid_request", "The multipart body is malformed.",
                               "Send multipart/form-data with a `params` JSON field and a `volume` file.") from None
    finally:
        sink.close()
    if not sink.ended:
        raise ApiError(422, "invalid_request", "The multipart body is incomplete (the upload was cut short).",
                       "Send the request again.")
    params = sink.params.decode("utf-8", "replace") if "params" in sink.seen else None
    return ReceivedForm(params=params, volume=sink.volume, volume_bytes=sink.volume_bytes)


async def _chunks(request, idle_timeout: float):
    """The body as it arrives; 408 when nothing arrives for `idle_timeout` seconds."""
    stream = request.stream().__aiter__()
    while True:
        try:
            yield await asyncio.wait_for(stream.__anext__(), timeout=idle_timeout)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise ApiError(408, "upload_timeout", f"The upload stalled: nothing arrived for {idle_timeout:.0f} s.",
                           "Check the network and send the request again.") from None


async def _receive_urlencoded(request, idle_timeout: float) -> ReceivedForm:
    """A form without a file (params only), read within MAX_PARAMS_BYTES."""
    from urllib.parse import parse_qs

    body = bytearray()
    async for chunk in _chunks(request, idle_timeout):
        body += chunk
        if len(body) > MAX_PARAMS_BYTES + 1024:
            raise ApiError(413, "upload_too_large", "A form without a file may be at most "
                           f"{MAX_PARAMS_BYTES // 1024} KB.", "Send the volume as multipart/form-data.")
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=8)
    except (UnicodeDecodeError, ValueError):
        raise ApiError(422, "invalid_request", "The form is malformed.", "Send multipart/form-data.") from None
    unknown = sorted(set(fields) - {"params"})
    if unknown or len(fields.get("params", [])) > 1:
        raise ApiError(422, "invalid_request", f"Unexpected form fields {echo(', '.join(unknown) or 'params twice')}.",
                       "Send a `params` JSON field and, for a new volume, a `volume` file (multipart/form-data).")
    params = fields.get("params", [None])[0]
    return ReceivedForm(params=params, volume=None, volume_bytes=0)


def check_volume_file(path: Path, max_decoded_bytes: int) -> tuple[str, Path]:
    """(kind, path) of the upload after every check that needs only its header (ApiError otherwise); the file is
    renamed to the suffix of its format, so the reader's format is the one the bytes say."""
    with open(path, "rb") as handle:
        head = handle.read(540)
    if not head:
        raise ApiError(400, "empty_file", "The uploaded volume file is empty.", "Attach the volume file itself.")
    kind = sniff_kind(head)
    if kind not in _SUFFIX:
        what = ("a PNG image" if head.startswith(b"\x89PNG") else "a JPEG image" if head.startswith(b"\xff\xd8") else
                "a single DICOM file" if kind == "dicom" else "not a recognised volume format")
        raise ApiError(415, "unsupported_file", f"The uploaded file is {what}.",
                       "Send a 3D volume as NRRD, NIfTI (.nii/.nii.gz), MHA, or a .zip of one DICOM series.")
    source = path.with_name("volume" + _SUFFIX[kind])
    path.rename(source)
    try:
        if kind == "zip":
            check_zip(source, max_decoded_bytes)
        else:
            facts = inspect_volume_file(source, allow_detached=False, max_decoded_bytes=max_decoded_bytes,
                                        name=UPLOAD_NAME, check_sizes=_check_sizes)
            check_declared_shape(facts, UPLOAD_NAME)
    except VolumeError as exc:
        raise ApiError(422, exc.code, sentence(exc.message), exc.hint) from exc
    return kind, source


MAX_ZIP_DIRECTORY_BYTES = 8 << 20   # 5000 entries with names of up to ~1.6 KB


def _zip_directory_size(path: Path) -> tuple[int, int] | None:
    """(entries, central directory bytes) from the end-of-central-directory record (zip64 too), found the way
    zipfile finds it; None when there is none. Read before zipfile builds an object per entry."""
    import struct

    with open(path, "rb") as handle:
        handle.seek(0, 2)
        size = handle.tell()
        handle.seek(max(0, size - 65557))
        tail = handle.read()
        exact = len(tail) - 22   # zipfile first takes a record that ends the file with no comment
        at = exact if exact >= 0 and tail[exact:exact + 4] == b"PK\x05\x06" and tail[-2:] == b"\0\0" \
            else tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < 22:
            return None
        entries, directory = struct.unpack("<HI", tail[at + 10:at + 16])
        if entries == 0xFFFF or directory == 0xFFFFFFFF:   # zip64: the real values are in the zip64 record
            locator = tail.rfind(b"PK\x06\x07", 0, at)
            if locator < 0 or len(tail) - locator < 20:
                return None
            (record,) = struct.unpack("<Q", tail[locator + 8:locator + 16])
            if record > size - 56:
                return None
            handle.seek(record)
            zip64 = handle.read(56)
            if not zip64.startswith(b"PK\x06\x06"):
                return None
            entries, directory = struct.unpack("<QQ", zip64[32:48])
    return entries, directory


def check_zip(path: Path, max_decoded_bytes: int) -> None:
    """A zip the reader may extract: readable directory, 1..MAX_ZIP_FILES plain files, safe names, bounded sizes,
    and data that decompresses to exactly what the directory declares (read in memory, a chunk at a time)."""
    def bad(message: str, hint: str = "Zip the DICOM series folder again.") -> VolumeError:
        return VolumeError(message, hint)

    directory = _zip_directory_size(path)
    if directory is None:
        raise bad("The zip file is damaged: its directory cannot be read.")
    if directory[0] > MAX_ZIP_FILES or directory[1] > MAX_ZIP_DIRECTORY_BYTES:
        raise bad(f"The zip holds {directory[0]} entries in a {directory[1] // 1024} KB directory.",
                  f"Send a zip of one DICOM series (1 to {MAX_ZIP_FILES} files).")
    try:
        with zipfile.ZipFile(path) as archive:
            if len(archive.infolist()) > MAX_ZIP_FILES:
                raise bad(f"The zip holds {len(archive.infolist())} entries.",
                          f"Send a zip of one DICOM series (1 to {MAX_ZIP_FILES} files).")
            members = [m for m in archive.infolist() if not m.is_dir()]
            if not members or len(members) > MAX_ZIP_FILES:
                raise bad(f"The zip holds {len(members)} files.",
                          f"Send a zip of one DICOM series (1 to {MAX_ZIP_FILES} files).")
            for member in members:
                name = PurePosixPath(member.filename.replace("\\", "/"))
                if name.is_absolute() or ".." in name.parts:
                    raise bad("The zip holds a file outside its own folder.")
                if member.flag_bits & 0x1:
                    raise bad("The zip is encrypted.", "Send an unencrypted zip of the DICOM series.")
                if (member.external_attr >> 16) & 0o170000 == 0o120000:
                    raise bad("The zip holds a symbolic link.", "Zip the DICOM files themselves.")
                if member.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise bad("The zip uses a compression method other than deflate.",
                              "Zip the series with the usual (deflate) compression.")
            if sum(m.file_size for m in members) > ZIP_EXPANSION_LIMIT * max_decoded_bytes:
                raise VolumeError("The zip expands beyond the server's size limit.", "Send a smaller series.")
            for member in members:   # every member must decompress to exactly its declared size and CRC
                left = member.file_size
                with archive.open(member) as data:
                    while chunk := data.read(min(1 << 20, left + 1)):
                        left -= len(chunk)
                        if left < 0:
                            break
                if left != 0:
                    raise bad("The zip file is damaged: a file's data does not match its declared size.")
    except VolumeError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError, NotImplementedError,
            RuntimeError, KeyError, IndexError, UnicodeDecodeError):
        raise bad("The zip file is damaged: its directory or headers cannot be read.") from None


def private_folder(root: Path) -> Path:
    """A fresh 0700 directory under `root` for one upload."""
    return Path(tempfile.mkdtemp(prefix="upload-", dir=root))
