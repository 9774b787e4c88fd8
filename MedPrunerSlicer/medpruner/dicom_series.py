"""DICOM series with geometry a radiologist can trust: judged slice by slice, refused rather than guessed.

Image readers build one grid from a series by averaging: a 202.5 mm gap, a tilted subset, a
localizer mixed in or slices of different sizes silently become a wrong grid, and every heatmap
voxel would then sit away from the anatomy the model saw. So the series is judged here first, from
every file's own header (pydicom), the way Slicer's DICOM importer judges one:

* the folder is searched recursively (notes for the report never carry UIDs or descriptions: only counts
  and modalities); files are grouped by SeriesInstanceUID; objects that are not
  images of the patient (RTDOSE, RTSTRUCT, SEG, SR, presentation states...) are left out and named;
  images typed LOCALIZER, and a lone image of another orientation and size (a scout), are left out
  with a note;
* every slice must be parallel (ImageOrientationPatient), of one size and pixel spacing, at its own
  position, with positions on one line along the slice normal (no gantry tilt) and evenly spaced
  (within `SPACING_TOLERANCE_MM` or `SPACING_TOLERANCE_FRACTION` of the spacing);
* enhanced multi-frame objects are judged the same way from their per-frame functional groups;
* a multi-frame image without any geometry is read with an assumed 1 mm grid, and says so.

The voxels are read by SimpleITK (GDCM: every transfer syntax, rescale slope/intercept) in the
order of the slices along their normal, and the geometry is set from the headers as judged here.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import VolumeError

SPACING_TOLERANCE_MM = 0.01
SPACING_TOLERANCE_FRACTION = 0.01
ORIENTATION_TOLERANCE = 1e-4          # largest difference of direction cosines between "parallel" slices
MAX_FILES = 20000

# Modalities of DICOM objects that are not an image of the patient's anatomy.
NOT_ANATOMY = {
    "RTDOSE": "a radiotherapy dose grid", "RTSTRUCT": "radiotherapy structures", "RTPLAN": "a radiotherapy plan",
    "RTRECORD": "a radiotherapy record", "SEG": "a segmentation", "SR": "a structured report",
    "PR": "a presentation state", "KO": "a key-object selection", "REG": "a registration", "RWV": "real-world values",
    "DOC": "a document", "ECG": "a waveform", "AU": "audio", "PLAN": "a plan", "FID": "fiducials",
}
_EXPORT_HINT = ("Export the series again from the scanner or PACS (one complete reconstruction), or resample it "
                "onto a regular grid first (e.g. 3D Slicer's DICOM import with acquisition geometry regularization, "
                "then save as NRRD).")


@dataclass
class Instance:
    """One DICOM file's header, as far as the geometry and the choice of series need it."""

    path: Path
    series_uid: str
    modality: str
    description: str
    image_type: tuple[str, ...]
    rows: int
    columns: int
    frames: int
    has_pixels: bool
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, ...] | None
    rescale: tuple[float, float]
    bits_allocated: int = 16
    instance_number: int | None = None
    enhanced: bool = False
    frame_rescales: list | None = None             # enhanced: (slope, intercept) per frame
    mixed_frame_spacing: bool = False
    frame_positions: list | None = None          # enhanced: one position per frame
    frame_orientations: list | None = None


@dataclass
class SeriesGeometry:
    """Judged geometry: the files (or frames) in slice order, and the grid they make."""

    order: list[int]                 # file indices (classic) or frame indices (multi-frame), along the normal
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]     # 9 values, row-major; columns are row, column and slice directions
    assumed: bool = False
    notes: list[str] = field(default_factory=list)


# -- reading headers --------------------------------------------------------------------------------
def _floats(value, count: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        value = [value]
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(numbers) != count or not all(math.isfinite(v) for v in numbers):
        return None
    return numbers


def _item(sequence, index: int = 0):
    try:
        return sequence[index]
    except (TypeError, IndexError):
        return None


class DamagedFile(Exception):
    """A file with the DICOM preamble whose header cannot be read."""


def has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def read_instance(path: Path) -> Instance | None:
    """The header of one regular file; None when it is not a DICOM file; DamagedFile when it says it is one but its
    header cannot be read."""
    try:
        return _read_instance(path)
    except DamagedFile:
        raise
    except Exception as exc:   # noqa: BLE001 - any unreadable value in a header is damage, named by file
        if has_dicom_preamble(path):
            raise DamagedFile(path.name) from exc
        return None


def _read_instance(path: Path) -> Instance | None:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, TypeError, KeyError, AttributeError, EOFError) as exc:
        if has_dicom_preamble(path):
            raise DamagedFile(path.name) from exc
        return None
    if "SeriesInstanceUID" not in ds:
        if has_dicom_preamble(path) and "SOPClassUID" not in ds:   # a DICOM file cut short inside its header
            raise DamagedFile(path.name)
        return None
    has_pixels = any(tag in ds for tag in ("Rows", "NumberOfFrames")) and int(ds.get("Rows", 0) or 0) > 0
    shared = _item(ds.get("SharedFunctionalGroupsSequence"))
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    instance = Instance(
        path=path, series_uid=str(ds.get("SeriesInstanceUID", "")), modality=str(ds.get("Modality", "") or ""),
        description=str(ds.get("SeriesDescription", "") or ""),
        image_type=tuple(str(v).strip().upper() for v in (ds.get("ImageType") or ())),
        rows=int(ds.get("Rows", 0) or 0), columns=int(ds.get("Columns", 0) or 0),
        frames=int(ds.get("NumberOfFrames", 1) or 1), has_pixels=has_pixels,
        position=_floats(ds.get("ImagePositionPatient"), 3), orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        pixel_spacing=_floats(ds.get("PixelSpacing"), 2),
        rescale=(float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)),
        bits_allocated=int(ds.get("BitsAllocated", 16) or 16),
        instance_number=_int_or_none(ds.get("InstanceNumber")),
    )
    if per_frame is not None or shared is not None:
        instance.enhanced = True
        _read_functional_groups(instance, shared, per_frame)
    return instance


def _int_or_none(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _natural_key(path: Path) -> list:
    """IM2 before IM10: digits compare as numbers."""
    import re

    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _group_value(frame, shared, sequence: str, keyword: str, count: int):
    for source in (frame, shared):
        item = _item(source.get(sequence)) if source is not None else None
        if item is not None and keyword in item:
            return _floats(item.get(keyword), count)
    return None


def _read_functional_groups(instance: Instance, shared, per_frame) -> None:
    frames = list(per_frame or [])
    instance.frame_positions = [_group_value(f, shared, "PlanePositionSequence", "ImagePositionPatient", 3)
                                for f in frames]
    instance.frame_orientations = [_group_value(f, shared, "PlaneOrientationSequence", "ImageOrientationPatient", 6)
                                   for f in frames]
    spacings = {_group_value(f, shared, "PixelMeasuresSequence", "PixelSpacing", 2) for f in frames} or \
        {_group_value(None, shared, "PixelMeasuresSequence", "PixelSpacing", 2)}
    instance.mixed_frame_spacing = len(spacings) > 1
    instance.pixel_spacing = spacings.pop() if len(spacings) == 1 else None
    instance.frame_rescales = [_frame_rescale(f, shared) for f in frames]


def _frame_rescale(frame, shared) -> tuple[float, float]:
    slope = _group_value(frame, shared, "PixelValueTransformationSequence", "RescaleSlope", 1)
    intercept = _group_value(frame, shared, "PixelValueTransformationSequence", "RescaleIntercept", 1)
    return (slope[0] if slope else 1.0, intercept[0] if intercept else 0.0)


def scan_folder(folder: Path) -> list[Instance]:
    """Every DICOM file below `folder` (recursively, regular files only, at most MAX_FILES visited)."""
    found: list[Instance] = []
    damaged: list[str] = []
    visited = 0
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            if name.upper() == "DICOMDIR" or not path.is_file() or path.is_symlink():
                continue
            visited += 1
            if visited > MAX_FILES:
                raise VolumeError(f"The folder holds more than {MAX_FILES} files.",
                                  "Give the folder of one DICOM series.")
            try:
                instance = read_instance(path)
            except DamagedFile as exc:
                damaged.append(str(exc))
                continue
            if instance is not None:
                found.append(instance)
    if damaged:
        raise VolumeError(f"{len(damaged)} file(s) in the folder look like DICOM but cannot be read (e.g. "
                          f"{damaged[0][:64]}): a series missing them would be read with a hole or one slice short.",
                          "Copy or export the series again; remove files that do not belong to it.")
    return found


# -- choosing the series -----------------------------------------------------------------------------
def _describe(instances: list[Instance]) -> str:
    kinds = Counter(i.modality or "unknown" for i in instances)
    return ", ".join(f"{m} ({NOT_ANATOMY.get(m, 'no image')}, {n} file{'s' * (n > 1)})" for m, n in kinds.items())


def image_instances(instances: list[Instance]) -> tuple[list[Instance], list[Instance]]:
    """(images of the patient, other objects)."""
    images, others = [], []
    for instance in instances:
        if instance.has_pixels and instance.modality.upper() not in NOT_ANATOMY:
            images.append(instance)
        else:
            others.append(instance)
    return images, others


def choose_series(instances: list[Instance], series_uid: str | None, label: str, reveal_ids: bool
                  ) -> tuple[list[Instance], list[str]]:
    """The files of one image series, and notes on what was left out."""
    images, others = image_instances(instances)
    notes = []
    if others:
        notes.append(f"left out {len(others)} DICOM object(s) that are not images of the patient: {_describe(others)}")
    if not images:
        if others:
            raise VolumeError(f"{label} holds no image series, only {_describe(others)}.",
                              "Give the folder of the CT or MR series itself.")
        raise VolumeError(f"No DICOM series found in {label}: there are no DICOM files in it or its subfolders.",
                          "Give a folder that holds one DICOM series (it is searched with its subfolders).")
    series: dict[str, list[Instance]] = {}
    for instance in images:
        series.setdefault(instance.series_uid, []).append(instance)

    def count(uid: str) -> int:
        return sum(i.frames for i in series[uid])

    ordered = sorted(series, key=lambda u: (-count(u), u))

    def listing() -> str:
        parts = []
        for uid in ordered:
            first = series[uid][0]
            what = f"{first.modality} {first.description!r}".strip() if first.description else first.modality
            parts.append((f"{uid}: " if reveal_ids else "") + f"{what}, {count(uid)} images")
        return "; ".join(parts)

    if series_uid is not None:
        if series_uid not in series:
            raise VolumeError(f"DICOM series {series_uid} is not in {label}; it holds: {listing()}.",
                              "Pick one of the series listed with --series UID.")
        return series[series_uid], notes
    if len(ordered) > 1:
        if count(ordered[0]) == count(ordered[1]):
            hint = ("Pick one with --series UID." if reveal_ids else "Send a zip that holds one series only.")
            raise VolumeError(f"{label} holds several DICOM series of the same size: {listing()}.", hint)
        others = ", ".join(str(count(uid)) for uid in ordered[1:])
        notes.append(f"the folder holds {len(ordered)} image series; the largest ({count(ordered[0])} images) was "
                     f"read, not the others ({others} images; pick one with --series UID)")
    return series[ordered[0]], notes


# -- judging the geometry ----------------------------------------------------------------------------
def _normal(orientation: tuple[float, ...]) -> np.ndarray:
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    return np.cross(row, col)


def _orientation_angle_deg(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """The largest angle between the row directions or the column directions of two orientations."""
    angles = []
    for x, y in ((a[:3], b[:3]), (a[3:], b[3:])):
        u, v = np.asarray(x, float), np.asarray(y, float)
        cos = float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))
        angles.append(math.degrees(math.acos(max(-1.0, min(1.0, cos)))))
    return max(angles)


def _angle_deg(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    na, nb = _normal(a), _normal(b)
    cos = abs(float(np.dot(na, nb)) / (np.linalg.norm(na) * np.linalg.norm(nb)))
    return math.degrees(math.acos(min(1.0, cos)))


def _ranges(indices: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7' (1-based for people)."""
    out, start, prev = [], None, None
    for i in sorted(indices):
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start + 1}-{prev + 1}" if prev > start else f"{start + 1}")
            start = prev = i
    if start is not None:
        out.append(f"{start + 1}-{prev + 1}" if prev > start else f"{start + 1}")
    return ", ".join(out)


def judge_slices(positions: list[tuple[float, ...] | None], orientations: list[tuple[float, ...] | None],
                 pixel_spacing: tuple[float, ...] | None, label: str, what: str = "slices") -> SeriesGeometry:
    """Geometry of slices given by position and orientation (one per slice), or a VolumeError saying what is
    wrong and where. `what` names the slices in messages ("slices", "frames")."""
    n = len(positions)
    missing = [i for i in range(n) if positions[i] is None or orientations[i] is None]
    if missing and len(missing) < n:
        raise VolumeError(f"{label}: {len(missing)} of {n} {what} ({_ranges(missing)}) have no position or "
                          "orientation, the others do.", _EXPORT_HINT)
    if missing:
        raise _NoGeometry()
    reference = orientations[0]
    tilted = [i for i in range(n) if max(abs(a - b) for a, b in zip(orientations[i], reference)) > ORIENTATION_TOLERANCE]
    if tilted:
        angle = max(_orientation_angle_deg(orientations[i], reference) for i in tilted)
        raise VolumeError(f"{label}: {len(tilted)} of {n} {what} ({_ranges(tilted)} in file order) are not in the "
                          f"orientation of the others (turned by up to {angle:.2g} degrees).",
                          "Give a series whose slices all share one orientation; " + _EXPORT_HINT)
    row, col = np.asarray(reference[:3]), np.asarray(reference[3:])
    normal = np.cross(row, col)
    if not (abs(np.linalg.norm(row) - 1) < 1e-3 and abs(np.linalg.norm(col) - 1) < 1e-3
            and abs(float(np.dot(row, col))) < 1e-3):
        raise VolumeError(f"{label} has an invalid orientation (ImageOrientationPatient {tuple(reference)}).",
                          _EXPORT_HINT)
    normal /= np.linalg.norm(normal)
    points = np.asarray(positions, dtype=float)
    along = points @ normal
    order = [int(i) for i in np.argsort(along, kind="stable")]
    sorted_along = along[order]
    gaps = np.diff(sorted_along)
    if n < 2:
        raise VolumeError(f"{label} has a single slice: it is a 2D image.", "Give a series of at least 2 slices.")
    duplicates = [k for k in range(n - 1) if abs(gaps[k]) < SPACING_TOLERANCE_MM]
    if duplicates:
        raise VolumeError(f"{label}: {len(duplicates)} of its {what} repeat the position of another (e.g. at "
                          f"{sorted_along[duplicates[0]]:.2f} mm along the slice normal): several echoes, phases or "
                          "time points in one series make a 4D series.",
                          "Give a series with one image per position (split the echoes or phases when exporting).")
    offsets = points[order] - points[order][0]
    sideways = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)
    if float(sideways.max()) > max(SPACING_TOLERANCE_MM, 1e-3 * float(abs(sorted_along[-1] - sorted_along[0]))):
        angle = math.degrees(math.atan2(float(sideways[-1]), float(abs(sorted_along[-1] - sorted_along[0]))))
        raise VolumeError(f"{label}: the {what} are shifted sideways along the stack (by {float(sideways.max()):.2f} mm, "
                          f"a gantry tilt of about {angle:.1f} degrees), so they do not form a rectangular grid.",
                          _EXPORT_HINT)
    # The grid runs from the first slice to the last; every slice must lie on it (a gap-by-gap check alone lets
    # small errors add up along a long series).
    spacing = float(sorted_along[-1] - sorted_along[0]) / (n - 1)
    tolerance = max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_FRACTION * spacing)
    typical = float(np.median(gaps))
    uneven = [k for k in range(n - 1) if abs(gaps[k] - typical) > tolerance]
    if uneven:
        shown = ", ".join(f"{what} {k + 1}-{k + 2} are {gaps[k]:.4g} mm apart" for k in uneven[:3])
        more = f" and {len(uneven) - 3} more gaps" if len(uneven) > 3 else ""
        raise VolumeError(f"{label} is not evenly spaced: {shown}{more}, the others {typical:.4g} mm (in order along "
                          "the slice normal). A regular grid would put those slices away from their anatomy.",
                          _EXPORT_HINT)
    off_grid = np.abs(sorted_along - (sorted_along[0] + spacing * np.arange(n)))
    worst = int(np.argmax(off_grid))
    if float(off_grid[worst]) > tolerance:
        raise VolumeError(f"{label} is not evenly spaced: its gaps vary ({float(gaps.min()):.4g} to "
                          f"{float(gaps.max()):.4g} mm), so {what[:-1]} {worst + 1} lies {float(off_grid[worst]):.2f} mm "
                          f"from where a regular grid of {spacing:.4g} mm puts it (in order along the slice normal).",
                          _EXPORT_HINT)
    direction = np.column_stack([row / np.linalg.norm(row), col / np.linalg.norm(col), normal])
    geometry = SeriesGeometry(order=order, origin=tuple(float(v) for v in points[order[0]]),
                              spacing=(float(pixel_spacing[1]), float(pixel_spacing[0]), spacing) if pixel_spacing
                              else (1.0, 1.0, spacing),
                              direction=tuple(float(v) for v in direction.ravel()))
    if pixel_spacing is None:
        geometry.assumed = True
        geometry.notes.append("GEOMETRY ASSUMED: the images state positions and orientation but no pixel spacing, so "
                              "1 x 1 mm pixels were assumed; in-plane sizes in mm are not the patient's")
    return geometry


class _NoGeometry(Exception):
    """No slice states a position and orientation: the grid can only be assumed."""


def classic_geometry(files: list[Instance], label: str) -> tuple[list[Instance], SeriesGeometry]:
    """Judge a series of single-frame files; returns the files kept (localizers left out) and the geometry."""
    notes = []
    localizers = [i for i in files if "LOCALIZER" in i.image_type]
    if localizers and len(localizers) < len(files):
        files = [i for i in files if "LOCALIZER" not in i.image_type]
        notes.append(f"left out {len(localizers)} localizer image(s) of the series")
    def rounded(orientation):   # header rounding must not make one orientation look like two
        return tuple(round(v, 3) for v in orientation)

    orientations = Counter(rounded(i.orientation) for i in files if i.orientation is not None)
    if len(files) > 2 and len(orientations) > 1:
        main, count = orientations.most_common(1)[0]
        if count == len(files) - 1:   # one image across the others: a scout filed with the series
            odd = next(i for i in files if i.orientation is None or rounded(i.orientation) != main)
            if odd.orientation is not None and _angle_deg(odd.orientation, main) > 10:
                files = [i for i in files if i is not odd]
                notes.append("left out 1 image in another orientation (a localizer) from the series")
    sizes = Counter((i.rows, i.columns) for i in files)
    if len(sizes) > 1:
        listing = ", ".join(f"{n} of {r}x{c}" for (r, c), n in sizes.most_common())
        raise VolumeError(f"{label} mixes image sizes: {listing} pixels.",
                          "Give a series whose images all have one size; " + _EXPORT_HINT)
    spacings = Counter(i.pixel_spacing for i in files)
    if len(spacings) > 1:
        listing = ", ".join(f"{n} at {s}" for s, n in spacings.most_common())
        raise VolumeError(f"{label} mixes pixel spacings: {listing} mm.", _EXPORT_HINT)
    try:
        geometry = judge_slices([i.position for i in files], [i.orientation for i in files],
                                files[0].pixel_spacing, label)
    except _NoGeometry:
        # No positions: the file order is all there is; take InstanceNumber, then the names in natural order.
        files = sorted(files, key=lambda i: (i.instance_number is None, i.instance_number or 0, _natural_key(i.path)))
        geometry = _assumed_geometry(files[0].pixel_spacing, len(files), label, "its images")
    geometry.notes[:0] = notes
    return files, geometry


def _assumed_geometry(pixel_spacing, count: int, label: str, what: str) -> SeriesGeometry:
    spacing = (float(pixel_spacing[1]), float(pixel_spacing[0])) if pixel_spacing else (1.0, 1.0)
    geometry = SeriesGeometry(order=list(range(count)), origin=(0.0, 0.0, 0.0), spacing=(*spacing, 1.0),
                              direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), assumed=True)
    geometry.notes.append(f"GEOMETRY ASSUMED: {what} state no position or orientation, so a grid of "
                          f"{spacing[0]:g} x {spacing[1]:g} x 1 mm at the origin, axial, was assumed; heatmap positions "
                          "in mm are not the patient's")
    return geometry


def multiframe_geometry(instance: Instance, label: str) -> SeriesGeometry:
    """Judge the frames of one multi-frame file (enhanced: per-frame functional groups)."""
    if instance.enhanced and instance.frame_positions is not None:
        if len(instance.frame_positions) != instance.frames:
            raise VolumeError(f"{label} says it has {instance.frames} frames but describes {len(instance.frame_positions)}.",
                              _EXPORT_HINT)
        if instance.mixed_frame_spacing:
            raise VolumeError(f"{label} mixes pixel spacings between its frames.", _EXPORT_HINT)
        if len({r for r in instance.frame_rescales or []}) > 1:
            raise VolumeError(f"{label} scales its frames' values differently (per-frame rescale slope and intercept), "
                              "which this reader would apply as one.", "Export the series with one value scaling, "
                              "or as single-frame images.")
    if instance.enhanced and instance.frame_positions:
        try:
            return judge_slices(instance.frame_positions, instance.frame_orientations, instance.pixel_spacing, label,
                                what="frames")
        except _NoGeometry:
            pass
    return _assumed_geometry(instance.pixel_spacing, instance.frames, label, "its frames")


# -- the whole read -----------------------------------------------------------------------------------
def read_dicom(path: Path, series_uid: str | None, label: str, reveal_ids: bool, max_decoded_bytes: int | None,
               check_sizes) :
    """A SimpleITK image with judged geometry from a folder (or one multi-frame file), and notes for the report."""
    import SimpleITK as sitk

    if path.is_dir():
        files, notes = choose_series(scan_folder(path), series_uid, label, reveal_ids)
    else:
        try:
            instance = read_instance(path)
        except DamagedFile:
            raise VolumeError(f"Cannot read {label}: its DICOM header is damaged.", "Export the file again.") from None
        if instance is None:
            raise VolumeError(f"Cannot read {label}: not a DICOM file.", "Give a DICOM series folder.")
        files, notes = [instance], []
        if not instance.has_pixels or instance.modality.upper() in NOT_ANATOMY:
            raise VolumeError(f"{label} is a DICOM {instance.modality or 'object'} "
                              f"({NOT_ANATOMY.get(instance.modality.upper(), 'no image')}), not an image of the patient.",
                              "Give the folder of the CT or MR series itself.")
        if instance.frames == 1:
            beside = [p for p in sorted(path.parent.iterdir())[:MAX_FILES]
                      if p != path and p.is_file() and not p.is_symlink() and has_dicom_preamble(p)]
            siblings = []
            for other in beside:
                try:
                    found = read_instance(other)
                except DamagedFile:
                    continue
                if found is not None and found.series_uid == instance.series_uid:
                    siblings.append(found)
            if siblings:
                raise VolumeError(f"{label} is one file of a DICOM series of {len(siblings) + 1} files.",
                                  f"Give the folder that holds the series: {path.parent if reveal_ids else 'its folder'}.")
            raise VolumeError(f"{label} is a single DICOM image: a 2D image, not a volume.",
                              "Give the folder that holds the whole series.")
    sitk.ProcessObject.SetGlobalWarningDisplay(False)   # ITK's C++ warning blocks say nothing a user can act on
    multiframe = [i for i in files if i.frames > 1]
    if multiframe:
        if len(files) > 1:
            raise VolumeError(f"{label} mixes {len(multiframe)} multi-frame file(s) with other images in one series.",
                              "Give one multi-frame file, or a series of single-frame files.")
        instance = files[0]
        geometry = multiframe_geometry(instance, label)
        sizes = (instance.columns, instance.rows, instance.frames)
    else:
        files, geometry = classic_geometry(files, label)
        sizes = (files[0].columns, files[0].rows, len(files))
    check_sizes(sizes, label)
    rescaled = any(i.rescale != (1.0, 0.0) for i in files) or \
        any(r != (1.0, 0.0) for i in files for r in (i.frame_rescales or []))
    pixel_bytes = 4 if rescaled else max(1, files[0].bits_allocated // 8)   # GDCM widens the type to rescale
    if max_decoded_bytes is not None and math.prod(sizes) * pixel_bytes > max_decoded_bytes:
        from .errors import VolumeTooLarge

        raise VolumeTooLarge(f"{label} is {' x '.join(map(str, sizes))} voxels: "
                             f"{math.prod(sizes) * pixel_bytes / 2**20:.0f} MB once decoded, over the limit of "
                             f"{max_decoded_bytes / 2**20:.0f} MB.", "Send fewer slices or a smaller series.")
    image = _read_voxels(files, geometry, multiframe=bool(multiframe), label=label)
    image.SetMetaData("medpruner.notes", "\n".join(notes + geometry.notes))
    image.SetMetaData("medpruner.geometry_assumed", "1" if geometry.assumed else "0")
    return image


def _read_voxels(files: list[Instance], geometry: SeriesGeometry, multiframe: bool, label: str):
    import SimpleITK as sitk

    try:
        if multiframe:
            reader = sitk.ImageFileReader()
            reader.SetImageIO("GDCMImageIO")
            reader.SetFileName(str(files[0].path))
            read = reader.Execute()
        else:
            reader = sitk.ImageSeriesReader()
            reader.SetImageIO("GDCMImageIO")
            reader.SetFileNames([str(files[i].path) for i in geometry.order])
            if any(i.rescale != files[0].rescale for i in files):
                reader.SetOutputPixelType(sitk.sitkFloat32)   # per-slice rescale: no slice is cut to the first's type
            read = reader.Execute()
    except RuntimeError as exc:
        from .volume_io import _first_line, _raise_if_out_of_memory

        _raise_if_out_of_memory(exc, label)
        raise VolumeError(f"Cannot read the voxels of {label} ({_first_line(exc)}).",
                          "Export the series again; a file may be damaged or use an unsupported compression.") from None
    if read.GetNumberOfComponentsPerPixel() != 1 or read.GetDimension() != 3:
        return read   # refused by the caller's validation with the right message
    if multiframe and geometry.order != sorted(geometry.order):   # frames stored against the slice normal
        image = sitk.GetImageFromArray(sitk.GetArrayViewFromImage(read)[geometry.order])
    else:
        image = read   # the series reader read the files in slice order: set the judged geometry on it
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image
