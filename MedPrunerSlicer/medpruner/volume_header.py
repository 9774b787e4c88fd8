"""Read a volume file's header ourselves, before any image reader sees the file.

A header is input too: NRRD (`data file:`) and MetaImage (`ElementDataFile =`) headers can name
other files, which the image libraries then open; a few bytes of header can claim gigabytes of
voxels. So every volume file is inspected here first, with plain Python on at most
`MAX_HEADER_BYTES`, and refused unless:

* the file itself is a regular file (never a device, FIFO or socket);
* its voxel data is attached (`allow_detached=False`, as for uploads), or, for a user's own
  files on the command line, lies in ONE regular file in the header's own folder;
* every spacing, direction and origin value it states is finite (readers silently turn NaN into 1);
* the decoded size (voxels x components x bytes) is within `max_decoded_bytes`;
* the data it holds is at least what the header claims, where that is cheap to know
  (raw: exact length; gzip: the trailer; ASCII/hex: a lower bound on the characters).

`inspect_volume_file` returns what it found (`HeaderFacts`) so the caller can budget the read.
Dimension, component and axis-size rules stay in `volume_io`, which applies them to what the
image reader reports; this module only guards what the reader must never be handed.
"""
from __future__ import annotations

import gzip
import math
import os
import re
import stat
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import VolumeError, VolumeTooLarge

__all__ = ["HeaderFacts", "MAX_HEADER_BYTES", "inspect_volume_file", "sniff_kind", "write_self_contained"]

MAX_HEADER_BYTES = 65536
_FORMATS_HINT = "Save the volume as NRRD (.nrrd), NIfTI (.nii/.nii.gz), MetaImage (.mha/.mhd) or give a DICOM series folder."
_ATTACHED_HINT = ("Send a self-contained file: NRRD with its data attached (.nrrd, not .nhdr), MetaImage with "
                  "ElementDataFile = LOCAL (.mha), or single-file NIfTI (.nii/.nii.gz).")

# Bytes per component of each NRRD type name (teem's spellings).
NRRD_TYPE_BYTES = {
    "signed char": 1, "int8": 1, "int8_t": 1, "uchar": 1, "unsigned char": 1, "uint8": 1, "uint8_t": 1,
    "short": 2, "short int": 2, "signed short": 2, "signed short int": 2, "int16": 2, "int16_t": 2,
    "ushort": 2, "unsigned short": 2, "unsigned short int": 2, "uint16": 2, "uint16_t": 2,
    "int": 4, "signed int": 4, "int32": 4, "int32_t": 4, "uint": 4, "unsigned int": 4, "uint32": 4, "uint32_t": 4,
    "longlong": 8, "long long": 8, "long long int": 8, "signed long long": 8, "signed long long int": 8,
    "int64": 8, "int64_t": 8, "ulonglong": 8, "unsigned long long": 8, "unsigned long long int": 8,
    "uint64": 8, "uint64_t": 8, "float": 4, "double": 8,
}
# MetaIO element types; MET_LONG/ULONG are 4 bytes in MetaIO but 8 is charged, so the budget never undercounts.
_META_TYPE_BYTES = {
    "met_char": 1, "met_uchar": 1, "met_short": 2, "met_ushort": 2, "met_int": 4, "met_uint": 4,
    "met_long": 8, "met_ulong": 8, "met_long_long": 8, "met_ulong_long": 8, "met_float": 4, "met_double": 8,
}
_META_EXACT = {"met_char", "met_uchar", "met_short", "met_ushort", "met_int", "met_uint", "met_long_long",
               "met_ulong_long", "met_float", "met_double"}
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")   # what teem and MetaIO accept as line ends
# C readers stop a header line at a NUL: text after it would be seen by us but not by them (or the reverse).
_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_WORD = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class HeaderFacts:
    """What a header says, once it has passed the checks of this module."""

    kind: str                      # nrrd, metaimage, nifti, nifti_gz
    dimension: int
    size: tuple[int, ...]          # voxels along each axis the header lists
    components: int
    bytes_per_component: int
    data_file: Path | None         # detached voxel data (command line only), else None
    # What an image reader will report, where the header makes it certain (None: only the reader can tell).
    reader_dimension: int | None = None
    reader_components: int | None = None
    # NRRD/MetaImage with attached data: a header rebuilt from the fields this module understood, and where
    # the data starts; `write_self_contained` pairs them, so a reader sees only what was checked here.
    clean_header: bytes | None = None
    data_offset: int | None = None

    @property
    def decoded_bytes(self) -> int:
        return math.prod(self.size) * self.components * self.bytes_per_component


def sniff_kind(head: bytes) -> str | None:
    """The volume format from a file's first 540 bytes: nrrd, nifti, nifti_gz, metaimage, zip, dicom, or None."""
    if head.startswith(b"NRRD"):
        return "nrrd"
    if head.startswith(b"\x1f\x8b"):
        return "nifti_gz"
    if len(head) >= 348 and head[344:348] in (b"n+1\0", b"ni1\0"):
        return "nifti"
    if len(head) >= 12 and head[4:8] in (b"n+2\0", b"ni2\0"):
        return "nifti"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.lstrip().startswith((b"ObjectType", b"NDims")):
        return "metaimage"
    return None


def inspect_volume_file(path: str | os.PathLike, *, allow_detached: bool, max_decoded_bytes: int | None = None,
                        name: str | None = None,
                        check_sizes: Callable[[tuple[int, ...], str], None] | None = None) -> HeaderFacts:
    """Check a volume file's header (see module docstring); `name` is what messages call the file.

    `check_sizes(sizes, name)` runs on the declared sizes as soon as they are parsed, before the
    cost and data-length checks, so a volume too large to use is refused for that reason first.
    """
    p = Path(path)
    label = name or p.name
    _require_regular(p, label, what="The volume")
    with open(p, "rb") as handle:
        head = handle.read(MAX_HEADER_BYTES)
    kind = sniff_kind(head[:540])
    def admit(facts: HeaderFacts) -> None:
        """Size rules, then the cost, before anything that depends on the data."""
        if check_sizes is not None:
            check_sizes(facts.size, label)
        if max_decoded_bytes is not None and facts.decoded_bytes > max_decoded_bytes:
            raise VolumeTooLarge(
                f"{label} claims {' x '.join(map(str, facts.size))} voxels of "
                f"{facts.components * facts.bytes_per_component} bytes: {_mib(facts.decoded_bytes)} once decoded, "
                f"over the limit of {_mib(max_decoded_bytes)}.",
                "Crop or downsample the volume, or store it with a smaller voxel type (e.g. int16 for CT).",
            )

    if kind == "nrrd":
        facts = _inspect_nrrd(p, head, label, allow_detached, admit)
    elif kind == "metaimage":
        facts = _inspect_metaimage(p, head, label, allow_detached, admit)
    elif kind in ("nifti", "nifti_gz"):
        facts = _inspect_nifti(p, head, label, allow_detached, admit, gz=kind == "nifti_gz")
    else:
        what = "a PNG image" if head.startswith(b"\x89PNG") else "a JPEG image" if head.startswith(b"\xff\xd8") \
            else "a DICOM file" if kind == "dicom" else "a zip archive" if kind == "zip" else "not a volume file"
        hint = ("Give the folder that holds the DICOM series." if kind == "dicom" else _FORMATS_HINT)
        raise VolumeError(f"Cannot read {label}: not a readable image file ({what}).", hint)
    return facts


# -- shared checks ---------------------------------------------------------------------------------
def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n} bytes"


def _require_regular(p: Path, label: str, what: str) -> os.stat_result:
    try:
        info = os.stat(p)
    except OSError as exc:
        raise VolumeError(f"{what} {label} cannot be opened ({exc.strerror}).",
                          "Check the path and that the file is readable.") from None
    if not stat.S_ISREG(info.st_mode):
        kind = ("a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else
                "a FIFO (named pipe)" if stat.S_ISFIFO(info.st_mode) else
                "a socket" if stat.S_ISSOCK(info.st_mode) else "a folder" if stat.S_ISDIR(info.st_mode) else
                "not a regular file")
        raise VolumeError(f"{what} {label} is {kind}; MedPruner reads volumes only from regular files.",
                          "Give a regular volume file (a copy on disk), not a device, pipe or socket.")
    return info


def _numbers(text: str, label: str, field: str) -> list[float]:
    """Every number in a header value (vectors like '(1,0,0) (0,1,0)' included); 'none' entries are skipped."""
    values = []
    for token in re.findall(r"[^\s(),]+", text):
        if token.lower() == "none":
            continue
        try:
            values.append(float(token))
        except ValueError:
            raise VolumeError(f"{label} has an unreadable {field} value {token[:32]!r} in its header.",
                              "Fix or re-export the file's header.") from None
    return values


def _require_finite(values: list[float], label: str, field: str) -> None:
    if not all(math.isfinite(v) for v in values):
        raise VolumeError(f"{label} has a non-finite value in its header field {field[:32]!r} "
                          f"({' '.join(repr(v) for v in values)[:60]}): the geometry is unknown.",
                          "Fix the spacing, origin and orientation in the file's header (every value a finite number).")


def _check_length(label: str, expected: int, actual: int) -> None:
    if expected != actual:
        what = "shorter" if actual < expected else "longer"
        raise VolumeError(
            f"{label} is truncated or its header lies: the voxel data is {what} than the header's sizes say "
            f"({actual} bytes instead of {expected}).",
            "Export or copy the volume again; the file is incomplete or its header does not match its data.",
        )


def _check_gzip_trailer(label: str, expected: int, data_path: Path) -> None:
    """The gzip trailer holds the uncompressed size mod 2**32; a mismatch means truncation or a lie."""
    with open(data_path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() < 18:
            isize = -1
        else:
            handle.seek(-4, os.SEEK_END)
            isize = struct.unpack("<I", handle.read(4))[0]
    if isize != expected % 2**32:
        raise VolumeError(
            f"{label} is truncated or its header lies: its compressed data does not decompress to the "
            f"{expected} bytes the header's sizes say.",
            "Export or copy the volume again; the file is incomplete or its header does not match its data.",
        )


def _detached_file(p: Path, reference: str, label: str, allow_detached: bool, field: str) -> Path:
    """The one data file a header names, if it is a regular file in the header's own folder."""
    if not allow_detached:
        raise VolumeError(f"{label} does not hold its own voxel data: its header names another file ({field}).",
                          _ATTACHED_HINT)
    if reference.upper() == "LIST" or "%" in reference or len(reference.split()) > 1:
        raise VolumeError(f"{label} spreads its voxel data over several files ({field}: {reference[:64]}).",
                          "Save the volume as one file (NRRD .nrrd or MetaImage .mha) and give that.")
    target = Path(reference)
    if target.is_absolute() or target.name != reference or reference in (".", ".."):
        raise VolumeError(f"{label} names a data file outside its own folder ({reference[:64]!r}).",
                          "Keep the header and its data file side by side and name the data file without a path.")
    data = p.parent / target
    _require_regular(data, f"{data.name} (the voxel data {label} names)", what="The data file")
    if data.resolve().parent != p.resolve().parent:
        raise VolumeError(f"{label} names a data file that links outside its own folder ({reference[:64]!r}).",
                          "Keep the header and its data file side by side as ordinary files.")
    return data


def _refuse_control_bytes(block: bytes, label: str) -> None:
    if _CONTROL_BYTES.search(block):
        raise VolumeError(f"{label} has control characters (e.g. NUL) in its header, which image readers and this "
                          "check would read differently.", "Re-export the volume with a standard header.")


def _render_numbers(text: str, label: str, field: str) -> str:
    """A header value of numbers, vectors '(a,b,c)' and 'none', written again from its parsed numbers."""
    parts = []
    for vector, word in re.findall(r"\(([^)]*)\)|([^\s()]+)", text):
        if word:
            parts.append("none" if word.lower() == "none" else repr(_number(word, label, field)))
        else:
            parts.append("(" + ",".join(repr(_number(v, label, field)) for v in vector.split(",")) + ")")
    return " ".join(parts)


def _number(token: str, label: str, field: str) -> float:
    try:
        return float(token.strip())
    except ValueError:
        raise VolumeError(f"{label} has an unreadable {field} value {token.strip()[:32]!r} in its header.",
                          "Fix or re-export the file's header.") from None


def _words(text: str, label: str, field: str) -> str:
    words = text.split()
    if not all(_WORD.match(w) for w in words):
        raise VolumeError(f"{label} has an unreadable {field} value in its header.", "Fix or re-export the file's header.")
    return " ".join(words)


def write_self_contained(source: str | os.PathLike, facts: HeaderFacts, target: str | os.PathLike) -> Path:
    """`target` = the rebuilt header of `facts` + the attached data of `source` (for uploads, before any reader).

    Whatever a crafted header says beyond the fields checked here (a second data file hidden from this parser,
    a skip, a size) is not in the rebuilt header, so the image reader cannot act on it.
    """
    if facts.clean_header is None or facts.data_offset is None:
        raise ValueError("write_self_contained needs the facts of a NRRD or MetaImage file with attached data.")
    import shutil

    target = Path(target)
    with open(source, "rb") as data, open(target, "wb") as out:
        out.write(facts.clean_header)
        data.seek(facts.data_offset)
        shutil.copyfileobj(data, out, 1 << 20)
    return target


def _split_lines(block: bytes) -> list[str]:
    return [line.decode("latin-1") for line in _LINE_BREAK.split(block)]


# -- NRRD ------------------------------------------------------------------------------------------
def _inspect_nrrd(p: Path, head: bytes, label: str, allow_detached: bool, admit) -> HeaderFacts:
    end = _nrrd_header_end(head)
    if end is None:   # no blank line: a detached header (.nhdr) or a header longer than we read
        if p.stat().st_size > len(head):
            raise VolumeError(f"{label} has a NRRD header longer than {MAX_HEADER_BYTES} bytes.",
                              "Re-save the volume with a standard header.")
        block, data_start = head, None
    else:
        block, data_start = head[:end[0]], end[1]
    _refuse_control_bytes(block, label)
    fields: dict[str, str] = {}
    for line in _split_lines(block)[1:]:
        if not line.strip() or line.startswith("#") or ":=" in line or ":" not in line:
            continue
        key, value = line.split(":", 1)
        key = re.sub(r"\s+", "", key.lower())   # 'data file', 'datafile', 'Data  File' are one field
        if key in fields:
            raise VolumeError(f"{label} states the NRRD field {key[:32]!r} twice.", "Fix or re-export the file's header.")
        fields[key] = value.strip()
    data_file = None
    if "datafile" in fields:
        data_file = _detached_file(p, fields["datafile"], label, allow_detached, "data file")
    elif data_start is None:
        raise VolumeError(f"{label} is a NRRD header without data (no blank line after the header, no data file).",
                          _FORMATS_HINT)
    try:
        dimension = int(fields.get("dimension", ""))
        sizes = tuple(int(s) for s in fields.get("sizes", "").split())
    except ValueError:
        raise VolumeError(f"Cannot read {label}: its NRRD header has no valid dimension and sizes.", _FORMATS_HINT) from None
    nbytes = NRRD_TYPE_BYTES.get(re.sub(r"\s+", " ", fields.get("type", "").lower()))
    if nbytes is None or len(sizes) != dimension or not 1 <= dimension <= 16 or min(sizes, default=0) < 1:
        raise VolumeError(f"Cannot read {label}: its NRRD header's type, dimension or sizes are invalid.", _FORMATS_HINT)
    if dimension == 3:
        for key in ("spacings", "spacedirections", "spaceorigin", "axismins", "axismaxs"):
            if key in fields:
                _require_finite(_numbers(fields[key], label, key), label, key)
    kinds = fields.get("kinds", "").lower().split()
    non_domain = [i for i, k in enumerate(kinds) if k not in ("domain", "space", "time")]
    if not non_domain:
        shape = (dimension, 1)
    elif non_domain == [0] and dimension > 1:
        shape = (dimension - 1, sizes[0])
    else:
        shape = (None, None)
    clean = None if data_file else _clean_nrrd(fields, label)
    facts = HeaderFacts("nrrd", dimension, sizes, 1, nbytes, data_file, *shape, clean, data_start)
    admit(facts)
    skips = [fields.get(k, "0").strip() for k in ("byteskip", "lineskip")]
    if any(s != "0" for s in skips):
        if not allow_detached:
            raise VolumeError(f"{label} asks readers to skip bytes or lines of its data (byte/line skip).",
                              _ATTACHED_HINT)
        return facts   # a user's own file with skips: its length is left to the reader
    encoding = fields.get("encoding", "").lower()
    source = data_file or p
    start = 0 if data_file else data_start
    available = os.stat(source).st_size - start
    expected = facts.decoded_bytes
    if encoding == "raw":
        _check_length(label, expected, available)
    elif encoding in ("gzip", "gz"):
        _check_gzip_data(label, expected, source, start)
    elif encoding in ("ascii", "text", "txt"):
        if available < 2 * math.prod(sizes) - 1:   # at least one digit and one separator per value
            _truncated_text(label, math.prod(sizes), available)
    elif encoding == "hex":
        if available < 2 * expected:
            _truncated_text(label, math.prod(sizes), available)
    elif encoding not in ("bzip2", "bz2"):
        raise VolumeError(f"Cannot read {label}: unknown NRRD encoding {encoding[:32]!r}.", _FORMATS_HINT)
    return facts


_NRRD_NUMBERS = ("spacings", "spacedirections", "spaceorigin", "axismins", "axismaxs", "thicknesses")
_NRRD_WORDS = ("space", "kinds", "centerings", "endian", "encoding")
_NRRD_NAMES = {"spacedirections": "space directions", "spaceorigin": "space origin", "axismins": "axis mins",
               "axismaxs": "axis maxs", "spacedimension": "space dimension"}


def _clean_nrrd(fields: dict[str, str], label: str) -> bytes:
    """A NRRD header with only the fields understood here, each written again from its parsed value."""
    kind = re.sub(r"\s+", " ", fields["type"].lower())   # one of NRRD_TYPE_BYTES's names (checked before)
    lines = ["NRRD0004", f"type: {kind}", f"dimension: {int(fields['dimension'])}",
             "sizes: " + " ".join(str(int(v)) for v in fields["sizes"].split())]
    for key in ("spacedimension",):
        if key in fields:
            lines.append(f"{_NRRD_NAMES[key]}: {int(_number(fields[key], label, key))}")
    for key in _NRRD_WORDS:
        if key in fields:
            lines.append(f"{key}: {_words(fields[key], label, key)}")
    for key in _NRRD_NUMBERS:
        if key in fields:
            lines.append(f"{_NRRD_NAMES.get(key, key)}: {_render_numbers(fields[key], label, key)}")
    return ("\n".join(lines) + "\n\n").encode("ascii")


def _nrrd_header_end(head: bytes) -> tuple[int, int] | None:
    """(end of the header text, start of the attached data): the first empty line, as teem splits lines."""
    position = 0
    for match in _LINE_BREAK.finditer(head):
        if match.start() == position and position > 0:
            return position, match.end()
        position = match.end()
    return None


def _check_gzip_data(label: str, expected: int, p: Path, start: int) -> None:
    """gzip data (attached from `start`, or a whole data file): the gzip magic, then the trailer check."""
    with open(p, "rb") as handle:
        handle.seek(start)
        magic = handle.read(2)
    if magic != b"\x1f\x8b":
        raise VolumeError(f"{label} says its data is gzip-compressed, but it is not.",
                          "Export or copy the volume again.")
    _check_gzip_trailer(label, expected, p)


def _truncated_text(label: str, values: int, available: int) -> None:
    raise VolumeError(f"{label} is truncated or its header lies: {available} bytes of text cannot hold the "
                      f"{values} voxel values the header's sizes say.",
                      "Export the volume again (a binary encoding such as raw or gzip is also much smaller).")


# -- MetaImage -------------------------------------------------------------------------------------
def _inspect_metaimage(p: Path, head: bytes, label: str, allow_detached: bool, admit) -> HeaderFacts:
    fields: dict[str, str] = {}
    data_start = None
    position = 0
    for match in _LINE_BREAK.finditer(head):
        line = head[position:match.start()].decode("latin-1")
        position = match.end()
        if "=" not in line:
            if line.strip():
                raise VolumeError(f"Cannot read {label}: a MetaImage header line has no '=' ({line[:40]!r}).",
                                  _FORMATS_HINT)
            continue
        key, value = (part.strip() for part in line.split("=", 1))
        key = key.lower()
        if key in fields:
            raise VolumeError(f"{label} states the MetaImage field {key[:32]!r} twice.", "Fix or re-export the file's header.")
        fields[key] = value
        if key == "elementdatafile":
            data_start = position
            break
    if data_start is None:
        raise VolumeError(f"Cannot read {label}: its MetaImage header has no ElementDataFile line within "
                          f"{MAX_HEADER_BYTES} bytes.", _FORMATS_HINT)
    _refuse_control_bytes(head[:data_start], label)
    reference = fields["elementdatafile"]
    data_file = None if reference == "LOCAL" else \
        _detached_file(p, reference, label, allow_detached, "ElementDataFile")
    try:
        dimension = int(fields.get("ndims", ""))
        sizes = tuple(int(s) for s in fields.get("dimsize", "").split())
        components = int(fields.get("elementnumberofchannels", "1"))
    except ValueError:
        raise VolumeError(f"Cannot read {label}: its MetaImage header has no valid NDims and DimSize.", _FORMATS_HINT) from None
    element = fields.get("elementtype", "").lower()
    nbytes = _META_TYPE_BYTES.get(element.removesuffix("_array"))
    if nbytes is None or len(sizes) != dimension or not 1 <= dimension <= 16 or min(sizes, default=0) < 1 \
            or components < 1:
        raise VolumeError(f"Cannot read {label}: its MetaImage header's ElementType, NDims or DimSize are invalid.",
                          _FORMATS_HINT)
    if dimension == 3:
        for key in ("elementspacing", "elementsize", "offset", "position", "origin", "transformmatrix",
                    "rotation", "orientation"):
            if key in fields:
                _require_finite(_numbers(fields[key], label, key), label, key)
    clean = None if data_file else _clean_metaimage(fields, label)
    facts = HeaderFacts("metaimage", dimension, sizes, components, nbytes, data_file, dimension, components, clean,
                        data_start)
    admit(facts)
    header_size = fields.get("headersize", "0").strip()
    if header_size != "0":
        if not allow_detached:
            raise VolumeError(f"{label} asks readers to skip part of its data (HeaderSize).", _ATTACHED_HINT)
        return facts
    compressed = fields.get("compresseddata", "false").lower() == "true"
    binary = fields.get("binarydata", "true").lower() == "true"
    source, start = (data_file, 0) if data_file else (p, data_start)
    available = os.stat(source).st_size - start
    if compressed:
        declared = fields.get("compresseddatasize")
        if declared is not None and declared.isdigit() and int(declared) > available:
            _check_length(label, int(declared), available)
        if available < 8:
            _check_length(label, 8, available)
    elif not binary:
        if available < 2 * math.prod(sizes) * components - 1:
            _truncated_text(label, math.prod(sizes) * components, available)
    elif element.removesuffix("_array") in _META_EXACT:
        _check_length(label, facts.decoded_bytes, available)
    return facts


_META_SYNONYMS = {"offset": ("offset", "position", "origin"), "transformmatrix": ("transformmatrix", "rotation",
                                                                                  "orientation"),
                  "binarydatabyteordermsb": ("binarydatabyteordermsb", "elementbyteordermsb")}
_META_CASE = {"elementspacing": "ElementSpacing", "elementsize": "ElementSize", "offset": "Offset",
              "transformmatrix": "TransformMatrix", "binarydatabyteordermsb": "BinaryDataByteOrderMSB",
              "binarydata": "BinaryData", "compresseddata": "CompressedData"}


def _clean_metaimage(fields: dict[str, str], label: str) -> bytes:
    """A MetaImage header with only the fields understood here, each written again from its parsed value."""
    element = fields["elementtype"].upper()
    lines = ["ObjectType = Image", f"NDims = {int(fields['ndims'])}",
             "DimSize = " + " ".join(str(int(v)) for v in fields["dimsize"].split()),
             f"ElementType = {element if _WORD.match(element) else 'invalid'}",
             f"ElementNumberOfChannels = {int(fields.get('elementnumberofchannels', '1'))}"]
    for name, spellings in _META_SYNONYMS.items():
        present = [k for k in spellings if k in fields]
        if len(present) > 1:
            raise VolumeError(f"{label} states its {name} twice ({', '.join(present)}).",
                              "Fix or re-export the file's header.")
        if present:
            value = fields[present[0]]
            rendered = _render_numbers(value, label, name) if name != "binarydatabyteordermsb" else \
                ("True" if value.lower() == "true" else "False")
            lines.append(f"{_META_CASE[name]} = {rendered}")
    for key in ("elementspacing", "elementsize"):
        if key in fields:
            lines.append(f"{_META_CASE[key]} = {_render_numbers(fields[key], label, key)}")
    for key in ("binarydata", "compresseddata"):
        if key in fields:
            lines.append(f"{_META_CASE[key]} = {'True' if fields[key].lower() == 'true' else 'False'}")
    if fields.get("compresseddatasize", "").isdigit():
        lines.append(f"CompressedDataSize = {int(fields['compresseddatasize'])}")
    lines.append("ElementDataFile = LOCAL")
    return ("\n".join(lines) + "\n").encode("ascii")


# -- NIfTI -----------------------------------------------------------------------------------------
def _inspect_nifti(p: Path, head: bytes, label: str, allow_detached: bool, admit, gz: bool) -> HeaderFacts:
    if gz:
        try:
            with gzip.open(p, "rb") as handle:
                hdr = handle.read(540)
        except (OSError, EOFError, zlib.error):
            hdr = b""
    else:
        hdr = head[:540]
    parsed = _parse_nifti(hdr)
    if parsed is None:
        what = "gzip data that is not a NIfTI volume" if gz else "an unreadable NIfTI header"
        raise VolumeError(f"Cannot read {label}: not a readable image file ({what}).", _FORMATS_HINT)
    pair, dims, bitpix, vox_offset, geometry, datatype, intent = parsed
    if pair:
        if not allow_detached:
            raise VolumeError(f"{label} does not hold its own voxel data: it is a NIfTI header whose voxels are in a "
                              "separate .img file.", _ATTACHED_HINT)
        raise VolumeError(f"{label} is a two-file NIfTI (.hdr/.img), which is not read here.",
                          "Save the volume as a single-file NIfTI (.nii or .nii.gz).")
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0 or bitpix % 8 or min(dims[1:ndim + 1], default=0) < 1:
        raise VolumeError(f"Cannot read {label}: its NIfTI header's dimensions or bit depth are invalid.", _FORMATS_HINT)
    sizes = tuple(int(d) for d in dims[1:ndim + 1])
    spatial = [d for d in sizes[3:] if d > 1]
    if ndim >= 3 and not spatial:
        _require_finite(geometry, label, "voxel size or orientation")
    sure = ndim if ndim <= 3 else 4 if ndim == 4 and sizes[3] > 1 and intent not in (1007, 2003) else None
    facts = HeaderFacts("nifti_gz" if gz else "nifti", ndim, sizes, 1, bitpix // 8, None, sure,
                        1 if sure is not None and datatype not in (128, 2304, 32, 1792, 2048) else None)
    admit(facts)
    if vox_offset < 0 or vox_offset > 2**40:
        raise VolumeError(f"Cannot read {label}: its NIfTI header's data offset is invalid.", _FORMATS_HINT)
    expected = vox_offset + facts.decoded_bytes
    if gz:
        _check_gzip_trailer(label, expected, p)
    else:
        _check_length(label, expected, p.stat().st_size)
    return facts


def _parse_nifti(hdr: bytes):
    """(two-file?, dims, bitpix, vox_offset, [geometry numbers]) from a NIfTI-1 or -2 header; None if neither."""
    for endian in "<>":
        if len(hdr) >= 348 and struct.unpack(endian + "i", hdr[:4])[0] == 348:
            magic = hdr[344:348]
            if magic not in (b"n+1\0", b"ni1\0"):
                return None
            dims = struct.unpack(endian + "8h", hdr[40:56])
            intent, datatype, bitpix = struct.unpack(endian + "3h", hdr[68:74])
            pixdim = struct.unpack(endian + "8f", hdr[76:108])
            vox_offset = struct.unpack(endian + "f", hdr[108:112])[0]
            qform, sform = struct.unpack(endian + "2h", hdr[252:256])
            quatern = struct.unpack(endian + "6f", hdr[256:280])
            srow = struct.unpack(endian + "12f", hdr[280:328])
            break
        if len(hdr) >= 540 and struct.unpack(endian + "i", hdr[:4])[0] == 540:
            magic = hdr[4:8]
            if magic not in (b"n+2\0", b"ni2\0"):
                return None
            datatype, bitpix = struct.unpack(endian + "2h", hdr[12:16])
            dims = struct.unpack(endian + "8q", hdr[16:80])
            intent = struct.unpack(endian + "i", hdr[504:508])[0]
            pixdim = struct.unpack(endian + "8d", hdr[104:168])
            vox_offset = struct.unpack(endian + "q", hdr[168:176])[0]
            qform, sform = struct.unpack(endian + "2i", hdr[344:352])
            quatern = struct.unpack(endian + "6d", hdr[352:400])
            srow = struct.unpack(endian + "12d", hdr[400:496])
            break
    else:
        return None
    if not math.isfinite(vox_offset):
        return None
    geometry = list(pixdim[:4])
    if qform > 0:
        geometry += quatern
    if sform > 0:
        geometry += srow
    return magic.startswith(b"ni"), dims, bitpix, int(vox_offset), geometry, datatype, intent
