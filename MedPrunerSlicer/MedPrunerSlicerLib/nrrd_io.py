"""NRRD bytes <-> (numpy voxel array, IJK-to-RAS matrix), in pure Python + numpy.

Conventions (the only place the RAS/LPS flip happens on the Slicer side):

* Slicer stores geometry as a 4x4 IJK-to-RAS matrix: column a (a = I, J, K) is the step in RAS mm
  of one voxel along axis a (direction times spacing), column 3 is the RAS position of voxel (0,0,0).
* We write NRRD with ``space: left-posterior-superior`` (what SimpleITK / the server read natively):
  LPS = diag(-1, -1, 1) @ RAS for every direction vector and for the origin. Reading accepts LPS and
  RAS spaces and converts back.
* The numpy array is indexed [k, j, i] (the order of `slicer.util.arrayFromVolume`); NRRD stores
  the fastest axis (i) first, so the array's C-order bytes are the NRRD data as is.

Numbers are written with `repr` (shortest text that reads back to the same double), so a
write/read round trip is exact. Nothing but voxels and geometry is written: no names, no
key/value fields, no comments that could carry identifying text.
"""
from __future__ import annotations

import gzip
import re
import zlib

import numpy as np

__all__ = ["LPS_FROM_RAS", "NrrdFormatError", "decode_nrrd", "encode_nrrd"]

#: diag(-1, -1, 1): maps RAS coordinates to LPS and back (it is its own inverse).
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])

_TYPE_NAMES = {
    np.dtype(np.int8): "int8", np.dtype(np.uint8): "uint8",
    np.dtype(np.int16): "int16", np.dtype(np.uint16): "uint16",
    np.dtype(np.int32): "int32", np.dtype(np.uint32): "uint32",
    np.dtype(np.int64): "int64", np.dtype(np.uint64): "uint64",
    np.dtype(np.float32): "float", np.dtype(np.float64): "double",
}
_TYPE_ALIASES = {
    "signed char": "int8", "int8": "int8", "int8_t": "int8",
    "uchar": "uint8", "unsigned char": "uint8", "uint8": "uint8", "uint8_t": "uint8",
    "short": "int16", "short int": "int16", "signed short": "int16", "signed short int": "int16",
    "int16": "int16", "int16_t": "int16",
    "ushort": "uint16", "unsigned short": "uint16", "unsigned short int": "uint16", "uint16": "uint16",
    "uint16_t": "uint16",
    "int": "int32", "signed int": "int32", "int32": "int32", "int32_t": "int32",
    "uint": "uint32", "unsigned int": "uint32", "uint32": "uint32", "uint32_t": "uint32",
    "longlong": "int64", "long long": "int64", "long long int": "int64", "signed long long": "int64",
    "signed long long int": "int64", "int64": "int64", "int64_t": "int64",
    "ulonglong": "uint64", "unsigned long long": "uint64", "unsigned long long int": "uint64",
    "uint64": "uint64", "uint64_t": "uint64",
    "float": "float32", "double": "float64",
}
_SPACE_FLIP = {
    "left-posterior-superior": LPS_FROM_RAS, "lps": LPS_FROM_RAS,
    "right-anterior-superior": np.eye(3), "ras": np.eye(3),
}


class NrrdFormatError(ValueError):
    """The bytes are not a NRRD this module can read (or are truncated)."""


def _vec(v) -> str:
    return "(" + ",".join(repr(float(x)) for x in v) + ")"


def encode_nrrd(array: np.ndarray, ijk_to_ras: np.ndarray, compress: bool = True, level: int = 1) -> bytes:
    """A 3D scalar array [k, j, i] + its 4x4 IJK-to-RAS matrix -> NRRD file bytes (LPS space)."""
    arr = np.asarray(array)
    if arr.ndim != 3:
        raise ValueError(f"encode_nrrd needs a 3D array [k, j, i], got shape {arr.shape}.")
    dtype = arr.dtype.newbyteorder("<") if arr.dtype.itemsize > 1 else arr.dtype
    name = _TYPE_NAMES.get(np.dtype(dtype.newbyteorder("=")))
    if name is None:
        raise ValueError(f"Voxel type {arr.dtype} cannot be written to NRRD here.")
    m = np.asarray(ijk_to_ras, dtype=float)
    if m.shape != (4, 4):
        raise ValueError(f"ijk_to_ras must be 4x4, got {m.shape}.")
    directions = LPS_FROM_RAS @ m[:3, :3]   # column a: LPS step of one voxel along axis a
    origin = LPS_FROM_RAS @ m[:3, 3]
    nk, nj, ni = arr.shape
    header = [
        "NRRD0004",
        f"type: {name}",
        "dimension: 3",
        "space: left-posterior-superior",
        f"sizes: {ni} {nj} {nk}",
        "space directions: " + " ".join(_vec(directions[:, a]) for a in range(3)),
        "kinds: domain domain domain",
    ]
    if arr.dtype.itemsize > 1:
        header.append("endian: little")
    header += [f"encoding: {'gzip' if compress else 'raw'}", f"space origin: {_vec(origin)}"]
    data = np.ascontiguousarray(arr, dtype=dtype).tobytes()
    if compress:
        data = gzip.compress(data, compresslevel=level, mtime=0)
    return ("\n".join(header) + "\n\n").encode("ascii") + data


def _parse_vector(text: str) -> list[float]:
    text = text.strip()
    if not (text.startswith("(") and text.endswith(")")):
        raise NrrdFormatError(f"Bad NRRD vector {text!r}.")
    return [float(x) for x in text[1:-1].split(",")]


def decode_nrrd(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """NRRD file bytes (3D, scalar, attached raw or gzip data) -> (array [k, j, i], 4x4 IJK-to-RAS)."""
    if not data.startswith(b"NRRD000"):
        raise NrrdFormatError("Not a NRRD file (no NRRD magic line).")
    end = data.find(b"\n\n")
    if end < 0:
        raise NrrdFormatError("Truncated NRRD header.")
    lines = data[:end].decode("latin-1").split("\n")[1:]
    fields: dict[str, str] = {}
    for line in lines:
        line = line.rstrip("\r")
        if not line or line.startswith("#") or ":=" in line:
            continue
        key, sep, value = line.partition(": ")
        if not sep:
            raise NrrdFormatError(f"Bad NRRD header line {line!r}.")
        fields[key.strip().lower()] = value.strip()
    if "data file" in fields or "datafile" in fields:
        raise NrrdFormatError("Detached NRRD data files are not supported.")
    if fields.get("dimension") != "3":
        raise NrrdFormatError(f"Expected a 3D NRRD, got dimension {fields.get('dimension')!r}.")
    type_name = _TYPE_ALIASES.get(fields.get("type", "").lower())
    if type_name is None:
        raise NrrdFormatError(f"Unsupported NRRD type {fields.get('type')!r}.")
    dtype = np.dtype(type_name)
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder(">" if fields.get("endian", "little").lower() == "big" else "<")
    sizes = [int(s) for s in fields.get("sizes", "").split()]
    if len(sizes) != 3:
        raise NrrdFormatError(f"Expected 3 sizes, got {fields.get('sizes')!r}.")
    space = fields.get("space", "").lower()
    if space not in _SPACE_FLIP:
        raise NrrdFormatError(f"Unsupported NRRD space {fields.get('space')!r} (LPS or RAS expected).")
    vectors = re.findall(r"\([^)]*\)|none", fields.get("space directions", ""))
    if len(vectors) != 3 or "none" in vectors:
        raise NrrdFormatError("Expected 3 spatial 'space directions'.")
    to_ras = _SPACE_FLIP[space]   # the flip is its own inverse
    m = np.eye(4)
    m[:3, :3] = to_ras @ np.array([_parse_vector(v) for v in vectors]).T
    m[:3, 3] = to_ras @ np.array(_parse_vector(fields.get("space origin", "(0,0,0)")))
    payload = data[end + 2:]
    encoding = fields.get("encoding", "raw").lower()
    if encoding in ("gzip", "gz"):
        try:
            payload = zlib.decompress(payload, wbits=47)   # gzip or zlib header, auto-detected
        except zlib.error as exc:
            raise NrrdFormatError(f"Corrupt gzip data in NRRD: {exc}.") from exc
    elif encoding != "raw":
        raise NrrdFormatError(f"Unsupported NRRD encoding {encoding!r} (raw or gzip expected).")
    expected = int(np.prod(sizes)) * dtype.itemsize
    if len(payload) != expected:
        raise NrrdFormatError(f"NRRD data has {len(payload)} bytes, {expected} expected.")
    array = np.frombuffer(payload, dtype=dtype).reshape(sizes[::-1]).astype(dtype.newbyteorder("="))
    return array, m
