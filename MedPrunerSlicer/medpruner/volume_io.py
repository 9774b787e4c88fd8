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

Before any SimpleITK reader sees a file, `medpruner.volume_header` parses its header: it refuses
headers that name other files (except, for a user's own files, one regular data file beside the
header), non-regular files, NaN/Inf geometry that readers would silently turn into 1, a decoded size
over the caller's limit, and data shorter or longer than the header says (which SimpleITK pads or
ignores for some formats). The reader is then forced to the format the bytes say.
The pixel type is kept as read; conversion to float happens later, only where needed.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medpruner.errors import VolumeError, VolumeTooLarge
from medpruner.volume_header import inspect_volume_file

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


_IMAGE_IO = {"nrrd": "NrrdImageIO", "metaimage": "MetaImageIO", "nifti": "NiftiImageIO", "nifti_gz": "NiftiImageIO"}


def load_volume(path: str | os.PathLike, series_uid: str | None = None, *, allow_detached: bool = True,
                max_decoded_bytes: int | None = None, name: str | None = None, reveal_ids: bool = True) -> sitk.Image:
    """Read a volume file or DICOM series directory and validate it (see module docstring).

    The header is checked by `medpruner.volume_header` before any reader opens the file: a file is
    read only if it is a regular file whose voxel data is attached or (with `allow_detached`, for a
    user's own files) lies in one regular file beside it, and whose decoded size is within
    `max_decoded_bytes`. For a directory the DICOM series with the most files is read;
    `series_uid` picks one explicitly. `name` is what messages call the volume (the server never
    shows its own paths); `reveal_ids=False` keeps DICOM UIDs out of messages. Raises
    `VolumeError` for anything that is not a usable 3D scalar volume.
    """
    p = Path(path)
    label = name or p.name
    if not p.exists():
        raise VolumeError(f"Volume not found: {name or p}", "Check the path; give a volume file or a DICOM series folder.")
    if p.is_dir() or _is_dicom_file(p):
        from .dicom_series import read_dicom

        dicom_label = name or (str(p) if p.is_dir() else p.name)
        image = read_dicom(p, series_uid, dicom_label, reveal_ids, max_decoded_bytes, _check_sizes)
        validate_volume(image, name=dicom_label)
        return image
    if series_uid is not None:
        raise VolumeError(
            f"A series UID was given but {label} is a file, not a DICOM folder.",
            "Give the folder that holds the DICOM series, or leave the series UID out.",
        )
    facts = inspect_volume_file(p, allow_detached=allow_detached, max_decoded_bytes=max_decoded_bytes, name=label,
                                check_sizes=_check_sizes)
    reader = sitk.ImageFileReader()
    reader.SetImageIO(_IMAGE_IO[facts.kind])   # never let another reader guess at the bytes
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise VolumeError(f"Cannot read {label}: not a readable image file ({_first_line(exc, p, label)}).",
                          _FORMATS_HINT) from None
    _check_header(
        reader.GetDimension(), reader.GetSize(), reader.GetSpacing(), reader.GetDirection(),
        reader.GetNumberOfComponents(), reader.GetPixelID(), label,
    )
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        _raise_if_out_of_memory(exc, label)
        raise VolumeError(
            f"Cannot read the voxels of {label}: the file is truncated or corrupt ({_first_line(exc, p, label)}).",
            "Export or copy the volume again; the file is incomplete.",
        ) from None
    validate_volume(image, name=label)
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
    check_shape(dim, size, ncomp, pixel_id in _COMPLEX_IDS, name)
    sp = np.asarray(spacing, dtype=float)
    if not (np.all(np.isfinite(sp)) and np.all(sp > 0)):
        raise VolumeError(f"{name} has a non-positive or invalid voxel spacing {tuple(sp.tolist())}.", "Fix the spacing in the file header (every value must be > 0 mm).")
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(d)) or abs(np.linalg.det(d)) < 1e-6:
        raise VolumeError(f"{name} has a degenerate direction matrix {tuple(d.ravel().tolist())}.", "Fix the orientation (direction cosines) in the file header.")


def check_shape(dim: int, size, ncomp: int, complex_voxels: bool, name: str) -> None:
    """Dimension, components and axis sizes: what a file's header alone can settle (used before reading)."""
    if dim == 2:
        raise VolumeError(f"{name} is a 2D image {tuple(size)}, not a 3D volume.", "Give a 3D volume (CT or MR series).")
    if dim != 3:
        raise VolumeError(
            f"{name} is a {dim}D image {tuple(size)}; only 3D volumes are supported.",
            "Extract a single 3D frame (e.g. one time point) and save it as its own volume.",
        )
    if ncomp != 1 or complex_voxels:
        kind = "complex" if complex_voxels else f"{ncomp}-component (e.g. RGB or vector)"
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
    _check_sizes(size, name)


def check_declared_shape(facts, name: str) -> None:
    """`check_shape` on what a header makes certain (medpruner.volume_header.HeaderFacts); the rest waits for the reader."""
    if facts.reader_dimension is None or facts.reader_components is None:
        return
    vector_axis = facts.kind == "nrrd" and facts.reader_dimension < facts.dimension   # NRRD components: axis 0
    check_shape(facts.reader_dimension, facts.size[1:] if vector_axis else facts.size, facts.reader_components,
                False, name)


def _check_sizes(size, name: str) -> None:
    """The axis and total voxel limits: what the header alone must satisfy before anything is read."""
    size = tuple(int(s) for s in size)
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


def _is_dicom_file(p: Path) -> bool:
    """A regular file with the DICOM preamble (never opens a device or a pipe: they may block forever)."""
    try:
        if not p.is_file():
            return False
        with open(p, "rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _raise_if_out_of_memory(exc: RuntimeError, label: str) -> None:
    """ITK reports a failed allocation as a RuntimeError: say it is memory, not a damaged file."""
    if "allocate" in str(exc).lower() or "bad_alloc" in str(exc):
        raise VolumeTooLarge(f"Reading {label} needs more memory than this process may use.",
                             "Crop or downsample the volume, or free memory, then try again.") from None


def _first_line(exc: BaseException, path: Path | None = None, label: str = "") -> str:
    """SimpleITK errors are multi-line with C++ file paths; keep the most telling line, short, and call the
    file by its label (the server's own paths never reach a message)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not re.match(r"^(Exception thrown in SimpleITK|/.*\.(cxx|h|hxx):\d+:?$)", ln)]
    text = (useful or lines or ["unknown error"])[0]
    text = re.sub(r"^(itk::|ITK |sitk::)ERROR:\s*(\w+\(0x[0-9a-fA-F]+\):\s*)?", "", text)
    if path is not None:
        for place in (str(path), str(path.parent)):
            text = text.replace(place, label)
    return text[:200]
