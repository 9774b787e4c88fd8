"""Read and validate a 3D scalar volume (NRRD, NIfTI, MHA/MHD, or a DICOM series directory).

Everything downstream (slicing, heatmaps) assumes a finite, non-constant, 3D, single-component
image with positive spacing and an invertible direction matrix, so every other input is refused
here, early, with a `VolumeError(message, hint)` the CLI and the server show as is.

Limits (checked from the file header BEFORE the voxels are read, so a huge file is refused fast):

* ``MIN_AXIS_VOXELS`` = 2: at least 2 voxels along every axis. A volume with a single slice
  (size 1 on any axis) is really a 2D image: there is no through-plane direction to browse and
  the slice filter has nothing to compare, so it is refused like a 2D file.
* ``MAX_AXIS_VOXELS`` = 2048 voxels along any axis.
* ``MAX_TOTAL_VOXELS`` = 2**30 voxels in total (1 Gi voxels; 2 GiB as int16).

SimpleITK reports truncated files for most formats, but silently accepts a few (a NIfTI file or a
raw/gzip NRRD whose data is shorter or longer than its header says: it pads or ignores). So the
byte count of attached data is also checked against the header for those formats.
The pixel type is kept as read; conversion to float happens later, only where needed.
"""
from __future__ import annotations

import gzip
import os
import re
import struct
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medpruner.errors import VolumeError

__all__ = [
    "MIN_AXIS_VOXELS",
    "MAX_AXIS_VOXELS",
    "MAX_TOTAL_VOXELS",
    "load_volume",
    "validate_volume",
]

MIN_AXIS_VOXELS = 2
MAX_AXIS_VOXELS = 2048
MAX_TOTAL_VOXELS = 2**30

_FORMATS_HINT = "Save the volume as NRRD (.nrrd), NIfTI (.nii/.nii.gz), MetaImage (.mha/.mhd) or give a DICOM series folder."
_COMPLEX_IDS = {sitk.sitkComplexFloat32, sitk.sitkComplexFloat64}


def load_volume(path: str | os.PathLike, series_uid: str | None = None) -> sitk.Image:
    """Read a volume file or DICOM series directory and validate it (see module docstring).

    For a directory the DICOM series with the most files is read; `series_uid` picks one
    explicitly. Raises `VolumeError` for anything that is not a usable 3D scalar volume.
    """
    p = Path(path)
    if not p.exists():
        raise VolumeError(f"Volume not found: {p}", "Check the path; give a volume file or a DICOM series folder.")
    if p.is_dir():
        return _load_dicom_series(p, series_uid)
    if series_uid is not None:
        raise VolumeError(
            f"A series UID was given but {p.name} is a file, not a DICOM folder.",
            "Give the folder that holds the DICOM series, or leave the series UID out.",
        )
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise VolumeError(f"Cannot read {p.name}: not a readable image file ({_first_line(exc)}).", _FORMATS_HINT) from None
    _check_header(
        reader.GetDimension(), reader.GetSize(), reader.GetSpacing(), reader.GetDirection(),
        reader.GetNumberOfComponents(), reader.GetPixelID(), p.name,
    )
    _check_attached_data_length(p, reader)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise VolumeError(
            f"Cannot read the voxels of {p.name}: the file is truncated or corrupt ({_first_line(exc)}).",
            "Export or copy the volume again; the file is incomplete.",
        ) from None
    validate_volume(image, name=p.name)
    return image


def validate_volume(img: sitk.Image, name: str = "the volume") -> sitk.Image:
    """Check an in-memory image against every rule of this module; return it unchanged.

    Used by `load_volume` and by callers that build an image themselves (the server, tests).
    """
    _check_header(
        img.GetDimension(), img.GetSize(), img.GetSpacing(), img.GetDirection(),
        img.GetNumberOfComponentsPerPixel(), img.GetPixelID(), name,
    )
    arr = sitk.GetArrayViewFromImage(img)
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        if not finite.all():
            n_nan = int(np.isnan(arr).sum())
            n_inf = int(arr.size - finite.sum()) - n_nan
            raise VolumeError(
                f"{name} contains non-finite voxels ({n_nan} NaN, {n_inf} Inf).",
                "Replace NaN/Inf voxels with a real value (e.g. the background) before asking.",
            )
    lo, hi = arr.min(), arr.max()
    if lo == hi:
        raise VolumeError(
            f"{name} is constant (every voxel is {lo.item()}): there is nothing to see.",
            "Check that the right volume was chosen and that it was exported with its voxel data.",
        )
    return img


def _check_header(dim: int, size, spacing, direction, ncomp: int, pixel_id: int, name: str) -> None:
    """Rules that need only the header: dimension, components, sizes, spacing, direction."""
    if dim == 2:
        raise VolumeError(f"{name} is a 2D image {tuple(size)}, not a 3D volume.", "Give a 3D volume (CT or MR series).")
    if dim != 3:
        raise VolumeError(
            f"{name} is a {dim}D image {tuple(size)}; only 3D volumes are supported.",
            "Extract a single 3D frame (e.g. one time point) and save it as its own volume.",
        )
    if ncomp != 1 or pixel_id in _COMPLEX_IDS:
        kind = "complex" if pixel_id in _COMPLEX_IDS else f"{ncomp}-component (e.g. RGB or vector)"
        raise VolumeError(
            f"{name} has {kind} voxels; a scalar (grey-level) volume is needed.",
            "Convert it to a single-channel scalar volume (e.g. the CT/MR intensities) first.",
        )
    size = tuple(int(s) for s in size)
    if min(size) < MIN_AXIS_VOXELS:
        raise VolumeError(
            f"{name} has size {size}: fewer than {MIN_AXIS_VOXELS} voxels along an axis (a single slice is a 2D image).",
            f"Give a volume with at least {MIN_AXIS_VOXELS} voxels along every axis.",
        )
    if max(size) > MAX_AXIS_VOXELS:
        raise VolumeError(
            f"{name} has size {size}: more than {MAX_AXIS_VOXELS} voxels along an axis.",
            "Crop or downsample the volume before asking.",
        )
    total = int(np.prod(size, dtype=np.int64))
    if total > MAX_TOTAL_VOXELS:
        raise VolumeError(
            f"{name} has {total} voxels, more than the limit of {MAX_TOTAL_VOXELS}.",
            "Crop or downsample the volume before asking.",
        )
    sp = np.asarray(spacing, dtype=float)
    if not (np.all(np.isfinite(sp)) and np.all(sp > 0)):
        raise VolumeError(f"{name} has a non-positive or invalid voxel spacing {tuple(sp.tolist())}.", "Fix the spacing in the file header (every value must be > 0 mm).")
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(d)) or abs(np.linalg.det(d)) < 1e-6:
        raise VolumeError(f"{name} has a degenerate direction matrix {tuple(d.ravel().tolist())}.", "Fix the orientation (direction cosines) in the file header.")


_NRRD_TYPES = {
    "signed char": 1, "int8": 1, "int8_t": 1, "uchar": 1, "unsigned char": 1, "uint8": 1, "uint8_t": 1,
    "short": 2, "short int": 2, "signed short": 2, "signed short int": 2, "int16": 2, "int16_t": 2,
    "ushort": 2, "unsigned short": 2, "unsigned short int": 2, "uint16": 2, "uint16_t": 2,
    "int": 4, "signed int": 4, "int32": 4, "int32_t": 4, "uint": 4, "unsigned int": 4, "uint32": 4, "uint32_t": 4,
    "longlong": 8, "long long": 8, "long long int": 8, "signed long long": 8, "signed long long int": 8,
    "int64": 8, "int64_t": 8, "ulonglong": 8, "unsigned long long": 8, "unsigned long long int": 8,
    "uint64": 8, "uint64_t": 8, "float": 4, "double": 8,
}


def _check_attached_data_length(p: Path, reader: sitk.ImageFileReader) -> None:
    """Refuse NRRD/NIfTI files whose attached data length disagrees with the header.

    Only cheap checks: the file size for raw data, the gzip trailer (uncompressed size mod 2**32)
    for gzip data. Other encodings and detached data are left to SimpleITK.
    """
    name = p.name.lower()
    try:
        if name.endswith(".nrrd"):
            got = _nrrd_expected_and_actual(p)
        elif name.endswith(".nii") or name.endswith(".nii.gz"):
            got = _nifti_expected_and_actual(p, gz=name.endswith(".gz"))
        else:
            return
    except (OSError, ValueError, struct.error, EOFError, gzip.BadGzipFile):
        got = None
    if got is None:
        return
    expected, actual, gz = got
    if expected != actual:
        if gz:   # the gzip trailer only holds the size mod 2**32: say what is wrong, not that number
            detail = f"its compressed data does not decompress to the {expected} bytes the header's sizes say"
        else:
            what = "shorter" if actual < expected else "longer"
            detail = f"the voxel data is {what} than the header's sizes say ({actual} bytes instead of {expected})"
        raise VolumeError(
            f"{p.name} is truncated or its header lies: {detail}.",
            "Export or copy the volume again; the file is incomplete or its header does not match its data.",
        )


def _nrrd_expected_and_actual(p: Path) -> tuple[int, int, bool] | None:
    with open(p, "rb") as f:
        head = f.read(65536)
    end = head.find(b"\n\n")
    if not head.startswith(b"NRRD") or end < 0:
        return None
    fields: dict[str, str] = {}
    for line in head[:end].decode("latin-1").splitlines()[1:]:
        if line.startswith("#") or ":" not in line or ":=" in line:
            continue
        key, value = line.split(":", 1)
        fields[key.strip().lower()] = value.strip()
    if any(k in fields for k in ("data file", "datafile", "byte skip", "byteskip", "line skip", "lineskip")):
        return None
    nbytes = _NRRD_TYPES.get(fields.get("type", "").lower())
    sizes = fields.get("sizes", "").split()
    if nbytes is None or not sizes:
        return None
    expected = nbytes * int(np.prod([int(s) for s in sizes], dtype=np.int64))
    data_start = end + 2
    encoding = fields.get("encoding", "").lower()
    file_size = p.stat().st_size
    if encoding == "raw":
        return expected, file_size - data_start, False
    if encoding in ("gzip", "gz"):
        return expected % 2**32, _gzip_isize(p), True
    return None


def _nifti_expected_and_actual(p: Path, gz: bool) -> tuple[int, int, bool] | None:
    opener = gzip.open if gz else open
    with opener(p, "rb") as f:
        hdr = f.read(540)
    if len(hdr) < 348:
        return None
    for endian in "<>":
        sizeof_hdr = struct.unpack(endian + "i", hdr[:4])[0]
        if sizeof_hdr == 348:
            dims = struct.unpack(endian + "8h", hdr[40:56])
            bitpix = struct.unpack(endian + "h", hdr[72:74])[0]
            vox_offset = int(struct.unpack(endian + "f", hdr[108:112])[0])
            break
        if sizeof_hdr == 540 and len(hdr) >= 540:
            bitpix = struct.unpack(endian + "h", hdr[14:16])[0]
            dims = struct.unpack(endian + "8q", hdr[16:80])
            vox_offset = struct.unpack(endian + "q", hdr[168:176])[0]
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0 or bitpix % 8:
        return None
    expected = vox_offset + (bitpix // 8) * int(np.prod([max(int(d), 1) for d in dims[1 : ndim + 1]], dtype=np.int64))
    if gz:
        return expected % 2**32, _gzip_isize(p), True
    return expected, p.stat().st_size, False


def _gzip_isize(p: Path) -> int:
    """The gzip trailer's ISIZE field: the uncompressed length modulo 2**32 (garbage if truncated)."""
    with open(p, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return struct.unpack("<I", f.read(4))[0]


def _load_dicom_series(folder: Path, series_uid: str | None) -> sitk.Image:
    """Read one DICOM series from a folder: the largest, or `series_uid`; refuse ambiguity."""
    try:
        uids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError as exc:
        raise VolumeError(f"Cannot scan {folder} for DICOM files ({_first_line(exc)}).", _FORMATS_HINT) from None
    if not uids:
        raise VolumeError(f"No DICOM series found in the folder {folder}.", _FORMATS_HINT)
    files = {uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in uids}
    listing = ", ".join(f"{uid} ({len(files[uid])} files)" for uid in sorted(files, key=lambda u: (-len(files[u]), u)))
    if series_uid is not None:
        if series_uid not in files:
            raise VolumeError(
                f"DICOM series {series_uid} is not in {folder}; found: {listing}.",
                "Pick one of the series UIDs listed.",
            )
        chosen = series_uid
    else:
        most = max(len(f) for f in files.values())
        largest = [uid for uid in uids if len(files[uid]) == most]
        if len(largest) > 1:
            raise VolumeError(
                f"{folder} holds several DICOM series of the same largest size; found: {listing}.",
                "Pick one of the series UIDs listed (series_uid / --series-uid).",
            )
        chosen = largest[0]
    names = files[chosen]
    head = sitk.ImageFileReader()
    head.SetFileName(names[0])
    try:
        head.ReadImageInformation()
    except RuntimeError as exc:
        raise VolumeError(f"Cannot read the DICOM file {names[0]} ({_first_line(exc)}).", "Export the series again.") from None
    size = tuple(head.GetSize())
    size = (size[0], size[1], (size[2] if len(size) == 3 else 1) * len(names))
    n_comp = head.GetNumberOfComponents()
    # Direction and spacing of the series are only known after reading; check sizes now.
    _check_header(3, size, (1.0, 1.0, 1.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), n_comp, head.GetPixelID(), f"DICOM series {chosen}")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise VolumeError(f"Cannot read DICOM series {chosen} ({_first_line(exc)}).", "Export the series again; a file may be damaged.") from None
    validate_volume(image, name=f"DICOM series {chosen}")
    return image


def _first_line(exc: BaseException) -> str:
    """SimpleITK errors are multi-line with C++ file paths; keep the most telling line, short."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not re.match(r"^(Exception thrown in SimpleITK|/.*\.(cxx|h|hxx):\d+:?$)", ln)]
    text = (useful or lines or ["unknown error"])[0]
    text = re.sub(r"^(itk::|ITK |sitk::)ERROR:\s*(\w+\(0x[0-9a-fA-F]+\):\s*)?", "", text)
    return text[:200]
