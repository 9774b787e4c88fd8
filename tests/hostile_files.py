"""Hostile volume files, each written by the test: headers that name other files, devices and pipes,
claim absurd sizes, lie about their data, carry NaN geometry, or zips that are damaged in every way.

Each case: (name, file bytes, expected HTTP status at submit, expected error code, words in the message).
`secret` is a file outside any upload folder that no case may ever make the server read.
"""
from __future__ import annotations

import gzip
import io
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

DETACHED = "does not hold its own voxel data"
TOO_LARGE = "once decoded, over the limit"
LIES = "truncated or its header lies"
NON_FINITE = "non-finite value"
ZIP_DAMAGED = "zip file is damaged"


def _nrrd(fields: str, data: bytes = b"", sizes: str = "4 4 4", typ: str = "short", encoding: str = "raw") -> bytes:
    return (f"NRRD0004\ntype: {typ}\ndimension: 3\nsizes: {sizes}\nencoding: {encoding}\nendian: little\n{fields}"
            ).encode() + b"\n" + data


def _meta(fields: str, data: bytes = b"", dims: str = "4 4 4") -> bytes:
    return (f"ObjectType = Image\nNDims = 3\nDimSize = {dims}\nElementType = MET_SHORT\n{fields}").encode() + data


def _small_nifti() -> bytes:
    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    image = sitk.GetImageFromArray(arr)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "small.nii"
        sitk.WriteImage(image, str(path))
        return path.read_bytes()


def _patched(data: bytes, offset: int, fmt: str, *values) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


def _zip(entries: list[tuple[str, bytes]], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


def _zip_with_symlink() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo("series/link.dcm")
        info.external_attr = (0o120777 << 16)
        archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def _zip_lying_size() -> bytes:
    """The central directory says 10 bytes; the data holds 4000."""
    data = bytearray(_zip([("a.dcm", b"D" * 4000)]))
    central = data.rfind(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, 10)   # uncompressed size in the central directory
    local = data.find(b"PK\x03\x04")
    struct.pack_into("<I", data, local + 22, 10)
    return bytes(data)


def _zip_crc_mismatch() -> bytes:
    data = bytearray(_zip([("a.dcm", b"DICM" * 500)], compression=zipfile.ZIP_STORED))
    local = data.find(b"PK\x03\x04")
    name_len, extra_len = struct.unpack_from("<HH", data, local + 26)
    data[local + 30 + name_len + extra_len + 10] ^= 0xFF   # one data byte flipped
    return bytes(data)


def _zip_local_name_differs() -> bytes:
    data = bytearray(_zip([("aaaa.dcm", b"x" * 100)]))
    local = data.find(b"PK\x03\x04")
    data[local + 30:local + 34] = b"../x"
    return bytes(data)


def _encrypted_zip() -> bytes:
    data = bytearray(_zip([("a.dcm", b"x" * 100)], compression=zipfile.ZIP_STORED))
    for signature, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.find(signature)
        flags = struct.unpack_from("<H", data, at + flag_at)[0]
        struct.pack_into("<H", data, at + flag_at, flags | 1)
    return bytes(data)


def _bzip2_zip() -> bytes:
    return _zip([("a.dcm", b"x" * 100)], compression=zipfile.ZIP_BZIP2)


def _zip_many_directories() -> bytes:
    """One file and 6000 directory entries: the entry count is judged from the end record, before any parsing."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(6000):
            archive.writestr(zipfile.ZipInfo(f"d{i}/"), b"")
        archive.writestr("a.dcm", b"x")
    return buffer.getvalue()


def _zip_bomb() -> bytes:
    """A few KB of zip that declares (and holds) 64 MB of zeros."""
    return _zip([(f"{i}.dcm", b"\0" * (16 << 20)) for i in range(4)])


def hostile_cases(secret: Path, fifo: Path) -> list[tuple[str, bytes, int, str, str]]:
    raw = np.arange(64, dtype=np.int16).tobytes()
    nifti = _small_nifti()
    s, f = str(secret), str(fifo)
    nan32 = float("nan")
    return [
        # -- NRRD headers that name other files -------------------------------------------------
        ("nrrd data file absolute", _nrrd(f"data file: {s}\n"), 422, "bad_volume", DETACHED),
        ("nrrd data file relative", _nrrd("data file: ../../../../secret.raw\n"), 422, "bad_volume", DETACHED),
        ("nrrd data file LIST", _nrrd("data file: LIST\n") + f"{s}\n{s}\n{s}\n{s}\n".encode(), 422, "bad_volume",
         DETACHED),
        ("nrrd data file pattern", _nrrd(f"data file: {s}%d 1 4 1\n"), 422, "bad_volume", DETACHED),
        ("nrrd datafile spelling", _nrrd(f"datafile: {s}\n"), 422, "bad_volume", DETACHED),
        ("nrrd DATA FILE capitals", _nrrd(f"DATA  FILE: {s}\n"), 422, "bad_volume", DETACHED),
        ("nrrd data file after a CR", _nrrd(f"content: x\rdata file: {s}\n", raw), 422, "bad_volume", DETACHED),
        ("nrrd data file behind a NUL", _nrrd(f"data file: {s}\0:=\n", raw), 422, "bad_volume", "control characters"),
        ("nrrd byte skip behind a NUL", _nrrd("byte skip: 8\0:=\n", raw), 422, "bad_volume", "control characters"),
        ("nrrd data file /dev/ptmx", _nrrd("data file: /dev/ptmx\n"), 422, "bad_volume", DETACHED),
        ("nrrd data file /dev/zero", _nrrd("data file: /dev/zero\n", sizes="512 512 16"), 422, "bad_volume",
         DETACHED),
        ("nrrd data file a FIFO", _nrrd(f"data file: {f}\n"), 422, "bad_volume", DETACHED),
        ("nrrd detached header only", _nrrd(f"data file: {s}\n")[:-1], 422, "bad_volume", DETACHED),
        # -- NRRD cost and lies -------------------------------------------------------------------
        ("nrrd ascii 1024^3 floats", b"NRRD0004\ntype: float\ndimension: 3\nsizes: 1024 1024 1024\nencoding: ascii\n\n1",
         422, "volume_too_large", TOO_LARGE),
        ("nrrd gzip claims 2 GB", _nrrd("", gzip.compress(b"\0" * 4096), sizes="1024 1024 1024", encoding="gzip"),
         422, "volume_too_large", TOO_LARGE),
        ("nrrd gzip size lie", _nrrd("", gzip.compress(b"\1" * 4096), sizes="64 64 64", encoding="gzip"), 422,
         "bad_volume", LIES),
        ("nrrd gzip not gzip", _nrrd("", b"\0" * 200, encoding="gzip"), 422, "bad_volume", "not"),
        ("nrrd raw truncated", _nrrd("", raw[:-10]), 422, "bad_volume", LIES),
        ("nrrd raw too long", _nrrd("", raw + b"\0" * 10), 422, "bad_volume", LIES),
        ("nrrd ascii too short", _nrrd("", b"1 2 3", encoding="ascii"), 422, "bad_volume", LIES),
        ("nrrd hex too short", _nrrd("", b"00ff", encoding="hex"), 422, "bad_volume", LIES),
        ("nrrd NaN spacing", _nrrd("spacings: nan 1 1\n", raw), 422, "bad_volume", NON_FINITE),
        ("nrrd inf direction", _nrrd("space: left-posterior-superior\nspace directions: (inf,0,0) (0,1,0) (0,0,1)\n",
                                     raw), 422, "bad_volume", NON_FINITE),
        ("nrrd NaN origin", _nrrd("space: left-posterior-superior\nspace origin: (0,nan,0)\n", raw), 422,
         "bad_volume", NON_FINITE),
        ("nrrd byte skip", _nrrd("byte skip: -1\n", raw), 422, "bad_volume", "skip"),
        ("nrrd endless header", b"NRRD0004\n" + b"# padding\n" * 8000, 422, "bad_volume", "header longer"),
        ("nrrd field twice", _nrrd("sizes: 1024 1024 1024\n", raw), 422, "bad_volume", "twice"),
        ("nrrd long field twice", _nrrd(("X" * 300 + ": 1\n") * 2, raw), 422, "bad_volume", "twice"),
        ("nrrd unknown encoding", _nrrd("", raw, encoding="zrl"), 422, "bad_volume", "encoding"),
        ("nrrd zero size", _nrrd("", b"", sizes="0 4 4"), 422, "bad_volume", "invalid"),
        ("nrrd 2D", b"NRRD0004\ntype: short\ndimension: 2\nsizes: 8 8\nencoding: raw\nendian: little\n\n" + raw,
         422, "bad_volume", "2D image"),
        # -- MetaImage ------------------------------------------------------------------------------
        ("mha data file absolute", _meta(f"ElementDataFile = {s}\n"), 422, "bad_volume", DETACHED),
        ("mha data file relative", _meta("ElementDataFile = ../secret.raw\n"), 422, "bad_volume", DETACHED),
        ("mha data file LIST", _meta("ElementDataFile = LIST\n") + f"{s}\n".encode() * 4, 422, "bad_volume",
         DETACHED),
        ("mha data file /dev/ptmx", _meta("ElementDataFile = /dev/ptmx\n"), 422, "bad_volume", DETACHED),
        ("mha data file pattern", _meta(f"ElementDataFile = {s}%03d.raw 1 4 1\n"), 422, "bad_volume", DETACHED),
        ("mha data file behind a NUL", _meta(f"ElementDataFile:{s}\0=x\nElementDataFile = LOCAL\n", raw), 422,
         "bad_volume", "control characters"),
        ("mha data file LoCaL", _meta("ElementDataFile = LoCaL\n", raw), 422, "bad_volume", DETACHED),
        ("mha colon separator", _meta(f"ElementDataFile: {s}\nElementDataFile = LOCAL\n", raw), 422, "bad_volume",
         "no '='"),
        ("mha data file lowercase key", _meta(f"elementdatafile = {s}\n"), 422, "bad_volume", DETACHED),
        ("mha data file a FIFO", _meta(f"ElementDataFile = {f}\n"), 422, "bad_volume", DETACHED),
        ("mha NaN spacing", _meta("ElementSpacing = nan 1 1\nElementDataFile = LOCAL\n", raw), 422, "bad_volume",
         NON_FINITE),
        ("mha inf offset", _meta("Offset = 0 inf 0\nElementDataFile = LOCAL\n", raw), 422, "bad_volume", NON_FINITE),
        ("mha claims 2 GB", _meta("ElementDataFile = LOCAL\n", raw, dims="1024 1024 1024"), 422, "volume_too_large",
         TOO_LARGE),
        ("mha compressed claims 2 GB", _meta("CompressedData = True\nElementDataFile = LOCAL\n", b"x" * 64,
                                             dims="1024 1024 1024"), 422, "volume_too_large", TOO_LARGE),
        ("mha no data line", _meta(""), 422, "bad_volume", "ElementDataFile"),
        ("mha header size", _meta("HeaderSize = -1\nElementDataFile = LOCAL\n", raw), 422, "bad_volume", "HeaderSize"),
        ("mha truncated", _meta("ElementDataFile = LOCAL\n", raw[:-2]), 422, "bad_volume", LIES),
        ("mha ascii too short", _meta("BinaryData = False\nElementDataFile = LOCAL\n", b"1 2"), 422, "bad_volume",
         LIES),
        # -- NIfTI ----------------------------------------------------------------------------------
        ("nifti two-file header", _patched(nifti, 344, "4s", b"ni1\0"), 422, "bad_volume", DETACHED),
        ("nifti gz two-file header", gzip.compress(_patched(nifti, 344, "4s", b"ni1\0")), 422, "bad_volume",
         DETACHED),
        ("nifti NaN voxel size", _patched(nifti, 80, "<f", nan32), 422, "bad_volume", NON_FINITE),
        ("nifti NaN sform", _patched(_patched(nifti, 254, "<h", 1), 280, "<f", nan32), 422, "bad_volume",
         NON_FINITE),
        ("nifti offset past the end", _patched(nifti, 108, "<f", 1e6), 422, "bad_volume", LIES),
        ("nifti claims 2 GB", _patched(nifti, 40, "<4h", 3, 1024, 1024, 1024), 422, "volume_too_large", TOO_LARGE),
        ("nifti gz claims 2 GB", gzip.compress(_patched(nifti, 40, "<4h", 3, 1024, 1024, 1024)), 422,
         "volume_too_large", TOO_LARGE),
        ("nifti 4D", _patched(nifti, 40, "<5h", 4, 6, 5, 2, 2), 422, "bad_volume", "4D image"),
        ("gzip of garbage", gzip.compress(b"not a volume at all " * 50), 422, "bad_volume", "not a NIfTI"),
        # -- zips -----------------------------------------------------------------------------------
        ("zip path traversal", _zip([("../../etc/x.dcm", b"x" * 10)]), 422, "bad_volume", "outside"),
        ("zip absolute name", _zip([("/etc/x.dcm", b"x" * 10)]), 422, "bad_volume", "outside"),
        ("zip symlink", _zip_with_symlink(), 422, "bad_volume", "symbolic link"),
        ("zip lying sizes", _zip_lying_size(), 422, "bad_volume", ZIP_DAMAGED),
        ("zip CRC mismatch", _zip_crc_mismatch(), 422, "bad_volume", ZIP_DAMAGED),
        ("zip local name differs", _zip_local_name_differs(), 422, "bad_volume", ZIP_DAMAGED),
        ("zip truncated", _zip([("a.dcm", b"x" * 5000)])[:-30], 422, "bad_volume", ZIP_DAMAGED),
        ("zip encrypted", _encrypted_zip(), 422, "bad_volume", "encrypted"),
        ("zip bzip2", _bzip2_zip(), 422, "bad_volume", "compression"),
        ("zip bomb", _zip_bomb(), 422, "bad_volume", "expands beyond"),
        ("zip many directory entries", _zip_many_directories(), 422, "bad_volume", "6001 entries"),
        ("zip too many files", _zip([(f"{i}.dcm", b"") for i in range(5001)], zipfile.ZIP_STORED), 422, "bad_volume",
         "5001 entries"),
        # -- not volumes ----------------------------------------------------------------------------
        ("a PNG", b"\x89PNG\r\n\x1a\n" + b"\0" * 64, 415, "unsupported_file", "PNG"),
        ("a lone DICOM file", b"\0" * 128 + b"DICM" + b"\0" * 300, 415, "unsupported_file", "DICOM"),
        ("an empty file", b"", 400, "empty_file", "empty"),
    ]
