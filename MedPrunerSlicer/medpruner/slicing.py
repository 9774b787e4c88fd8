"""Volume -> model slice stack, with an exact map back to the input's voxels.

Conventions (fixed here, relied on by heatmaps.py and the Slicer side):

Canonical orientation, without resampling through rotations.
    SimpleITK geometry is LPS: patient axis 0 = L (x grows towards the patient's left),
    1 = P (towards posterior), 2 = S (towards superior). For each voxel axis the closest patient
    axis is found from the direction cosines (greedy on the largest absolute cosine, so the result
    is always a proper permutation) together with its sign; the numpy view is then transposed and
    flipped (views only, no copy) so that it reads as if the direction were the LPS identity.
    The same anatomy saved with any axis-permuted or flipped direction matrix (LPS or RAS-like)
    therefore gives bit-identical model slices. Oblique volumes (e.g. a gantry tilt) are shown in
    their closest canonical orientation: their slices are the acquired planes, not re-cut planes;
    `SliceMapping.obliquity_deg` says by how much.

Slice order (model slice 0 first) and in-plane display (radiological convention):
    axial     inferior -> superior;  image right = patient left, image up = anterior
    coronal   posterior -> anterior; image right = patient left, image up = superior
    sagittal  right -> left;         image left = anterior,      image up = superior

Window ("auto" rule): CT if the voxels are integer-valued (integer dtype, or float values that are
    whole numbers on a regular subsample) and -3100 <= min <= -500 and max <= 32767 (Hounsfield
    units: air near -1000, scanner padding down to -3024); then the soft-tissue window W400/L40.
    Anything else is MR: a 0.5-99.5 percentile stretch computed once over the whole volume
    (over a regular subsample of about 2**24 voxels for larger volumes). CT presets: soft_tissue
    W400/L40, lung W1500/L-600, bone W1800/L400, brain W80/L40, mediastinum W350/L50, or an
    explicit "W/L" string such as "350/50". Grey = rint(clip((v - (L - W/2)) / W, 0, 1) * 255).

In-plane coordinate convention (one convention, forward and inverse):
    continuous coordinates along an axis put voxel i on [i, i+1) (centre i + 0.5) and model pixel
    p on [p, p+1) (centre p + 0.5). The resized image maps voxel coordinate u to pixel coordinate
    u * scale + pad, with ONE physical pixel size for both axes (pixel_mm = the longer physical
    extent / size), so scale = spacing / pixel_mm and the physical aspect ratio is exact (spacings
    are first rounded to 6 significant digits, so float32 headers such as NIfTI's give the same pixels).
    The resized extent is ceil(n * scale) pixels (so every voxel centre falls inside it); the
    canvas is padded with grey 0 to the next multiple of `multiple`, the image centred in it.
    Forward, "nearest": pixel p shows the voxel containing its centre, floor((p + 0.5 - pad) / scale);
    "linear": separable linear interpolation at voxel-centre coordinate (p + 0.5 - pad) / scale - 0.5,
    clamped to the edge voxels. Inverse: voxel i's centre lies in pixel floor((i + 0.5) * scale + pad).

Through-plane: with more slices than `max_slices`, model slices are the voxel slices
    rint(linspace(0, n - 1, max_slices)); each also owns the slab [start, stop) of voxel slices
    nearest to it (ties go to the lower slice). Slabs partition the axis; they are bookkeeping only.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import SimpleITK as sitk

from medpruner.errors import InputError
from medpruner.volume_io import validate_volume

__all__ = [
    "AXES",
    "CT_PRESETS",
    "MR_PERCENTILES",
    "SliceMapping",
    "SliceStack",
    "canonical_orientation",
    "parse_window",
    "prepare_slices",
    "resample_to_model",
    "select_slices",
]

AXES = ("axial", "coronal", "sagittal")
#: name -> (width, level) in Hounsfield units.
CT_PRESETS: dict[str, tuple[float, float]] = {
    "soft_tissue": (400.0, 40.0),
    "lung": (1500.0, -600.0),
    "bone": (1800.0, 400.0),
    "brain": (80.0, 40.0),
    "mediastinum": (350.0, 50.0),
}
MR_PERCENTILES = (0.5, 99.5)
_MR_SAMPLE_VOXELS = 2**24
_INTEGRALITY_SAMPLE_VOXELS = 2**20

# Canonical array (axes S, P, L) -> display stack (slice, row, col): transpose, then flips.
_DISPLAY = {
    "axial": ((0, 1, 2), (False, False, False)),
    "coronal": ((1, 0, 2), (True, True, False)),
    "sagittal": ((2, 0, 1), (False, True, False)),
}
_W_L = re.compile(r"^\s*(-?\d+(?:\.\d*)?)\s*/\s*(-?\d+(?:\.\d*)?)\s*$")


@dataclass(frozen=True)
class SliceMapping:
    """Exact geometry linking model pixels to input voxels; JSON-ready via `to_dict`.

    The display stack is ``flip(transpose(input_array, axes), flips)`` where input_array is the
    input's numpy layout (z, y, x); its shape is `display_shape` = (slices, rows, cols).
    """

    input_size: tuple[int, int, int]  # SimpleITK order (x, y, z)
    input_spacing: tuple[float, float, float]
    input_origin: tuple[float, float, float]
    input_direction: tuple[float, ...]  # 9 values, row-major, LPS
    axis: str
    patient_axis: tuple[int, int, int]  # per voxel axis (x, y, z): 0 L, 1 P, 2 S
    patient_sign: tuple[int, int, int]  # +1 if the voxel axis runs along +L/+P/+S
    obliquity_deg: float
    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    display_shape: tuple[int, int, int]
    slice_spacing: float
    inplane_spacing: tuple[float, float]  # (row, col) mm
    voxel_index: tuple[int, ...]  # per model slice, index along the display stack's slice axis
    input_axis: int  # numpy axis of the input array (0 z, 1 y, 2 x) the slices are taken along
    input_index: tuple[int, ...]  # per model slice, index along input_axis of the input array
    slabs: tuple[tuple[int, int], ...]  # per model slice, [start, stop) in display order
    input_slabs: tuple[tuple[int, int], ...]  # the same voxel slices as [start, stop) along input_axis
    image_size: tuple[int, int]  # (H, W) of the model images
    resized_size: tuple[int, int]  # (h, w) of the picture inside the padded canvas
    pad: tuple[int, int]  # (top, left) offset of the picture in the canvas
    scale: tuple[float, float]  # model pixels per voxel, (row, col)
    pixel_mm: float
    interpolation: str = "linear"

    # --- array layout -------------------------------------------------------------------------
    def to_display(self, input_array: np.ndarray) -> np.ndarray:
        """View of an array in the input's numpy layout (z, y, x) as the display stack."""
        _check_shape(input_array, tuple(reversed(self.input_size)), "input layout (z, y, x)")
        return _flip(np.transpose(input_array, self.axes), self.flips)

    def to_input_volume(self, canonical_array: np.ndarray) -> np.ndarray:
        """View of a display-stack array (slices, rows, cols) in the input's numpy layout (z, y, x)."""
        _check_shape(canonical_array, self.display_shape, "display stack (slices, rows, cols)")
        return np.transpose(_flip(canonical_array, self.flips), np.argsort(self.axes))

    # --- in-plane map -------------------------------------------------------------------------
    def pixel_of_voxel_centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Model pixel row of each display voxel row's centre, and column of each column's centre."""
        out = []
        for n, s, p, r in zip(self.display_shape[1:], self.scale, self.pad, self.resized_size):
            pix = np.floor((np.arange(n) + 0.5) * s).astype(np.int64)
            out.append(np.clip(pix, 0, r - 1) + p)
        return out[0], out[1]

    def token_index_map(self, token_pixels: int) -> np.ndarray:
        """(rows, cols) int64: raster index r * W_tok + c of the LLM token covering each voxel centre."""
        tp = _positive_int(token_pixels, "token_pixels")
        h, w = self.image_size
        if h % tp or w % tp:
            raise InputError(
                f"Model image size {h}x{w} is not a multiple of the token size {tp} pixels.",
                "Prepare the slices with `multiple` a multiple of the model's token size.",
            )
        rows, cols = self.pixel_of_voxel_centres()
        return (rows // tp)[:, None] * (w // tp) + (cols // tp)[None, :]

    def model_axis_sampling(self) -> tuple[np.ndarray, np.ndarray]:
        """For the nearest convention: display voxel row (col) shown by each picture pixel row (col)."""
        out = []
        for n, s, r in zip(self.display_shape[1:], self.scale, self.resized_size):
            out.append(np.clip(np.floor((np.arange(r) + 0.5) / s).astype(np.int64), 0, n - 1))
        return out[0], out[1]

    # --- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (lists, ints, floats, strs)."""
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SliceMapping":
        """Inverse of `to_dict`."""
        kwargs = {f.name: _tuplify(data[f.name]) for f in fields(cls) if f.name in data}
        return cls(**kwargs)


@dataclass
class SliceStack:
    """Model-ready slices and how they were made."""

    images: np.ndarray  # (S, H, W, 3) uint8
    mapping: SliceMapping
    window: dict[str, Any] = field(default_factory=dict)
    axis: str = "axial"
    geometry_assumed: bool = False        # the reader could not know the grid (e.g. DICOM without positions)
    input_notes: list[str] = field(default_factory=list)   # what reading the volume left out or assumed


def canonical_orientation(direction) -> tuple[tuple[int, int, int], tuple[int, int, int], float]:
    """Closest patient axis (0 L, 1 P, 2 S) and sign for each voxel axis (x, y, z), and the obliquity.

    Greedy on the largest absolute direction cosine, so oblique and tied cases still give a proper
    permutation; obliquity_deg is the largest angle between a voxel axis and its patient axis.
    """
    d = np.asarray(direction, dtype=float).reshape(3, 3)  # d[patient, voxel]
    a = np.abs(d)
    patient = [-1, -1, -1]
    sign = [1, 1, 1]
    used_p: set[int] = set()
    for _, j, p in sorted((-a[p, j], j, p) for p in range(3) for j in range(3)):
        if patient[j] < 0 and p not in used_p:
            patient[j] = p
            sign[j] = -1 if d[p, j] < 0 else 1
            used_p.add(p)
    norms = np.linalg.norm(d, axis=0)
    cosines = np.array([a[patient[j], j] / norms[j] for j in range(3)])
    obliquity = float(np.degrees(np.arccos(np.clip(cosines.min(), -1.0, 1.0))))
    return tuple(patient), tuple(sign), obliquity  # type: ignore[return-value]


def select_slices(n: int, max_slices: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Evenly spaced voxel slices (all if n <= max_slices) and their nearest-voxel slabs [start, stop)."""
    if max_slices is None or n <= max_slices:
        idx = np.arange(n, dtype=np.int64)
    else:
        idx = np.rint(np.linspace(0, n - 1, max_slices)).astype(np.int64)
    starts = np.empty_like(idx)
    starts[0] = 0
    starts[1:] = (idx[:-1] + idx[1:]) // 2 + 1
    stops = np.append(starts[1:], n)
    return idx, starts, stops


def parse_window(window: str, image_array: np.ndarray | None = None) -> dict[str, Any]:
    """Resolve a window name ("auto", "ct", "mr", a CT preset, or "W/L") to a description dict.

    "auto" and "mr" need the volume (`image_array`, any numpy view) to decide / take percentiles.
    """
    if not isinstance(window, str):
        raise InputError(f"Window must be a string, got {type(window).__name__}.", _window_hint())
    key = window.strip().lower().replace("-", "_").replace(" ", "_")
    if key == "auto":
        if image_array is None:
            raise InputError("Window 'auto' needs the volume to decide CT or MR.", _window_hint())
        key = "soft_tissue" if _looks_like_ct(image_array) else "mr"
        chosen = parse_window(key, image_array)
        chosen["auto"] = True
        return chosen
    if key == "ct":
        key = "soft_tissue"
    if key in CT_PRESETS:
        width, level = CT_PRESETS[key]
        return {"kind": "CT", "name": key, "width": width, "level": level, "auto": False}
    if key in ("mr", "percentile"):
        if image_array is None:
            raise InputError("Window 'mr' needs the volume to compute percentiles.", _window_hint())
        lo, hi = _percentiles(image_array)
        return {"kind": "MR", "name": "percentile", "percentiles": list(MR_PERCENTILES), "values": [lo, hi], "auto": False}
    m = _W_L.match(window)
    if m:
        width, level = float(m.group(1)), float(m.group(2))
        if width > 0:
            return {"kind": "CT", "name": "custom", "width": width, "level": level, "auto": False}
        raise InputError(f"Window {window!r} has width {width:g}: a window's width must be greater than 0.",
                         "Give it as WIDTH/LEVEL, e.g. 400/40 for soft tissue.")
    raise InputError(f"Unknown window {window!r}.", _window_hint())


def resample_to_model(input_array: np.ndarray, mapping: SliceMapping, interpolation: str = "nearest", fill: float = 0) -> np.ndarray:
    """Any array in the input's layout (z, y, x) -> (S, H, W) model grid, through `mapping`.

    The one code path that makes model pixels: `prepare_slices` calls it on the voxels, tests call
    it on index volumes. "nearest" keeps the dtype; "linear" returns float32. Padding gets `fill`.
    """
    if interpolation not in ("nearest", "linear"):
        raise InputError(f"Unknown interpolation {interpolation!r}.", "Use 'linear' or 'nearest'.")
    chosen = mapping.to_display(input_array)[np.asarray(mapping.voxel_index, dtype=np.int64)]
    n_rows, n_cols = mapping.display_shape[1:]
    (h, w), (top, left) = mapping.resized_size, mapping.pad
    if interpolation == "nearest":
        ri, ci = mapping.model_axis_sampling()
        picture = chosen[:, ri][:, :, ci]
    else:
        r0, r1, rw = _linear_weights(n_rows, mapping.scale[0], h)
        c0, c1, cw = _linear_weights(n_cols, mapping.scale[1], w)
        src = chosen.astype(np.float32, copy=False)
        rows = src[:, r0] * (1 - rw)[None, :, None] + src[:, r1] * rw[None, :, None]
        picture = rows[:, :, c0] * (1 - cw)[None, None, :] + rows[:, :, c1] * cw[None, None, :]
    canvas = np.full((picture.shape[0], *mapping.image_size), fill, dtype=picture.dtype)
    canvas[:, top : top + h, left : left + w] = picture
    return canvas


def prepare_slices(
    image: sitk.Image,
    *,
    axis: str = "axial",
    window: str = "auto",
    max_slices: int | None = 32,
    size: int = 448,
    multiple: int = 32,
    interpolation: str = "linear",
) -> SliceStack:
    """Validated 3D image -> (S, H, W, 3) uint8 model slices in canonical order + exact mapping.

    See the module docstring for every convention. Only the chosen slices are copied and resampled.
    """
    if axis not in AXES:
        raise InputError(f"Unknown slice axis {axis!r}.", f"Use one of {', '.join(AXES)}.")
    size = _positive_int(size, "size")
    multiple = _positive_int(multiple, "multiple")
    if size % multiple:
        raise InputError(f"size {size} is not a multiple of multiple {multiple}.", f"Use a size such as {max(multiple, size // multiple * multiple)}.")
    if max_slices is not None:
        max_slices = _positive_int(max_slices, "max_slices")
    if interpolation not in ("nearest", "linear"):
        raise InputError(f"Unknown interpolation {interpolation!r}.", "Use 'linear' or 'nearest'.")
    validate_volume(image)
    voxels = sitk.GetArrayViewFromImage(image)
    win = parse_window(window, voxels)
    mapping = _make_mapping(image, axis, max_slices, size, multiple, interpolation)
    values = resample_to_model(voxels, mapping, interpolation)
    grey = _apply_window(values, win)
    (h, w), (top, left) = mapping.resized_size, mapping.pad
    inside = np.zeros(mapping.image_size, dtype=bool)
    inside[top : top + h, left : left + w] = True
    grey[:, ~inside] = 0
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    return SliceStack(images=rgb, mapping=mapping, window=win, axis=axis)


# --- helpers -----------------------------------------------------------------------------------
def _make_mapping(image: sitk.Image, axis: str, max_slices: int | None, size: int, multiple: int, interpolation: str) -> SliceMapping:
    patient, sign, obliquity = canonical_orientation(image.GetDirection())
    # Canonical axis c (0 S, 1 P, 2 L) is patient axis 2 - c; find the voxel axis j on it.
    voxel_on = {patient[j]: j for j in range(3)}
    can_axes = [2 - voxel_on[2 - c] for c in range(3)]  # numpy axis of the input array
    can_flips = [sign[voxel_on[2 - c]] < 0 for c in range(3)]
    disp_axes, disp_flips = _DISPLAY[axis]
    axes = tuple(int(can_axes[disp_axes[k]]) for k in range(3))
    flips = tuple(bool(disp_flips[k] ^ can_flips[disp_axes[k]]) for k in range(3))
    spacing = image.GetSpacing()
    input_shape = tuple(reversed(image.GetSize()))
    shape = tuple(int(input_shape[a]) for a in axes)
    # numpy axis a <-> SimpleITK axis 2 - a. Spacings rounded to 6 significant digits for the fit, so
    # a header stored in float32 (NIfTI) gives the same pixels as the same geometry in float64.
    sp = tuple(float(f"{spacing[2 - a]:.6g}") for a in axes)
    pixel_mm = max(shape[1] * sp[1], shape[2] * sp[2]) / size
    scale = (sp[1] / pixel_mm, sp[2] / pixel_mm)
    resized = tuple(int(min(size, max(1, math.ceil(n * s - 1e-6)))) for n, s in zip(shape[1:], scale))
    padded = tuple(int(math.ceil(r / multiple) * multiple) for r in resized)
    pad = tuple((p - r) // 2 for p, r in zip(padded, resized))
    idx, starts, stops = select_slices(shape[0], max_slices)
    n = shape[0]
    if flips[0]:
        input_index = n - 1 - idx
        input_slabs = list(zip((n - stops).tolist(), (n - starts).tolist()))
    else:
        input_index = idx
        input_slabs = list(zip(starts.tolist(), stops.tolist()))
    return SliceMapping(
        input_size=tuple(int(s) for s in image.GetSize()),
        input_spacing=tuple(float(s) for s in spacing),
        input_origin=tuple(float(o) for o in image.GetOrigin()),
        input_direction=tuple(float(d) for d in image.GetDirection()),
        axis=axis,
        patient_axis=patient,
        patient_sign=sign,
        obliquity_deg=obliquity,
        axes=axes,
        flips=flips,
        display_shape=shape,
        slice_spacing=sp[0],
        inplane_spacing=(sp[1], sp[2]),
        voxel_index=tuple(idx.tolist()),
        input_axis=axes[0],
        input_index=tuple(int(i) for i in input_index),
        slabs=tuple(zip(starts.tolist(), stops.tolist())),
        input_slabs=tuple(input_slabs),
        image_size=padded,
        resized_size=resized,
        pad=pad,
        scale=scale,
        pixel_mm=float(pixel_mm),
        interpolation=interpolation,
    )


def _linear_weights(n_vox: int, scale: float, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.clip((np.arange(n_out) + 0.5) / scale - 0.5, 0.0, n_vox - 1)
    i0 = np.floor(x).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_vox - 1)
    return i0, i1, (x - i0).astype(np.float32)


def _apply_window(values: np.ndarray, win: dict[str, Any]) -> np.ndarray:
    if win["kind"] == "CT":
        low, width = win["level"] - win["width"] / 2, win["width"]
    else:
        low, high = win["values"]
        width = max(high - low, 1e-12)
    scaled = (values.astype(np.float32, copy=False) - np.float32(low)) * np.float32(255.0 / width)
    return np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)


def _looks_like_ct(arr: np.ndarray) -> bool:
    lo, hi = float(arr.min()), float(arr.max())
    if not (-3100 <= lo <= -500 and hi <= 32767):
        return False
    if arr.dtype.kind in "iu":
        return True
    sub = _subsample(arr, _INTEGRALITY_SAMPLE_VOXELS)
    return bool(np.all(sub == np.round(sub)))


def _percentiles(arr: np.ndarray) -> tuple[float, float]:
    sub = _subsample(arr, _MR_SAMPLE_VOXELS)
    lo, hi = (float(v) for v in np.percentile(sub, MR_PERCENTILES))
    if hi <= lo:  # mostly constant: fall back to the full range
        lo, hi = float(arr.min()), float(arr.max())
    return lo, hi


def _subsample(arr: np.ndarray, budget: int) -> np.ndarray:
    """A regular strided view with at most about `budget` voxels (the array itself if small)."""
    if arr.size <= budget:
        return arr
    step = math.ceil((arr.size / budget) ** (1 / arr.ndim))
    return arr[(slice(None, None, step),) * arr.ndim]


def _flip(arr: np.ndarray, flips) -> np.ndarray:
    return arr[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]


def _check_shape(arr: np.ndarray, shape: tuple[int, ...], what: str) -> None:
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"Array of shape {tuple(arr.shape)} does not match the {what} shape {tuple(shape)}.")


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}.", f"Give {name} as a whole number >= 1.")
    return int(value)


def _window_hint() -> str:
    return ("Use 'auto', 'ct' (soft tissue), 'mr' (percentile stretch), one of "
            + ", ".join(name.replace("_", "-") for name in CT_PRESETS) + ", or 'W/L' such as '350/50'.")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _tuplify(obj: Any) -> Any:
    if isinstance(obj, list):
        return tuple(_tuplify(v) for v in obj)
    return obj
