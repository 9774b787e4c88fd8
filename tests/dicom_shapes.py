"""Real DICOM files no one here made (pydicom's and pydicom-data's test files), shaped into the series that
exports really produce: regular, with a gap, tilted, mixed sizes, a localizer mixed in, nested, several series."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

CANARY = "Canary^Secret"


def pydicom_file(name: str) -> Path:
    return Path(pydicom.__file__).parent / "data" / "test_files" / name


def pydicom_data_file(name: str) -> Path:
    import data_store   # the pydicom-data package

    return Path(data_store.__file__).parent / "data" / name


def ct_slice():
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.PatientName = CANARY
    return ds


def write_series(folder: Path, positions, orientation=(1, 0, 0, 0, 1, 0), series_uid: str | None = None,
                 description: str = "abdomen", edit=None) -> list[Path]:
    """One CT_small-based file per position; `edit(index, dataset)` shapes single files. Pixel data differ per
    slice (a ramp added), so every slice is its own image."""
    folder.mkdir(parents=True, exist_ok=True)
    template = ct_slice()
    series_uid = series_uid or generate_uid()
    base = template.pixel_array.astype(np.int16)
    paths = []
    for index, position in enumerate(positions):
        ds = copy.deepcopy(template)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesDescription = description
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.PixelData = (base + np.int16(7 * index)).tobytes()
        if edit is not None:
            edit(index, ds)
        path = folder / f"{series_uid[-8:]}_{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def line(count: int, step: float = 1.25, start=(-158.135803, -179.035797, -75.7), direction=(0, 0, 1)):
    return [tuple(np.asarray(start) + k * step * np.asarray(direction, dtype=float)) for k in range(count)]


def tilted(orientation, degrees: float):
    """The orientation rotated about the row direction (x) by `degrees`."""
    a = np.radians(degrees)
    row = np.asarray(orientation[:3], dtype=float)
    col = np.asarray(orientation[3:], dtype=float)
    rotation = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    return tuple(rotation @ row) + tuple(rotation @ col)


def all_bytes_under(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def independent_geometry(paths):
    """Origin, spacing and direction from pydicom alone, for checking what the engine did."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    iop = np.asarray(headers[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    positions = sorted((np.asarray(h.ImagePositionPatient, dtype=float) for h in headers), key=lambda p: p @ normal)
    gaps = np.diff([p @ normal for p in positions])
    spacing = (float(headers[0].PixelSpacing[1]), float(headers[0].PixelSpacing[0]), float(np.median(gaps)))
    direction = np.column_stack([iop[:3], iop[3:], normal])
    return positions, spacing, direction


__all__ = ["CANARY", "all_bytes_under", "ct_slice", "independent_geometry", "line", "pydicom_data_file",
           "pydicom_file", "tilted", "write_series"]
