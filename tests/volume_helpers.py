"""Helpers shared by the volume-layer tests: fake engine results, index volumes, DICOM writing."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk


@dataclass
class FakeResult:
    """The fields of the engine's AskResult that the volume layer reads."""

    slice_kept: np.ndarray
    token_grid: list
    token_role: list
    token_scores: list
    extra: dict = field(default_factory=dict)


def random_result(n_slices: int, grid: tuple[int, int], kept: np.ndarray | None = None, seed: int = 0) -> FakeResult:
    """Random but plausible decisions: ~20% nucleus, ~5% contextual, scores summing to 1 per slice."""
    rng = np.random.default_rng(seed)
    if kept is None:
        kept = rng.random(n_slices) > 0.3
        kept[0] = True
    roles, scores = [], []
    for s in range(n_slices):
        if not kept[s]:
            roles.append(None)
            scores.append(None)
            continue
        u = rng.random(grid)
        role = np.where(u < 0.2, 2, np.where(u < 0.25, 1, 0)).astype(np.uint8)
        score = rng.random(grid).astype(np.float32) ** 4
        roles.append(role)
        scores.append((score / score.sum()).astype(np.float32))
    return FakeResult(np.asarray(kept, dtype=bool), [tuple(grid)] * n_slices, roles, scores)


def index_image(size_xyz, spacing, direction, origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    """int32 image whose voxel value is its own flat index in the numpy (z, y, x) layout."""
    shape = tuple(reversed(size_xyz))
    arr = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetDirection(tuple(float(d) for d in np.asarray(direction, dtype=float).ravel()))
    img.SetOrigin(tuple(float(o) for o in origin))
    return img


def write_dicom_series(image: sitk.Image, folder: Path, series_uid: str, study_uid: str = "1.2.826.0.1.3680043.2.1125.1") -> list[Path]:
    """One CT file per z slice with the tags GDCM needs to rebuild the geometry (int16, slope 1)."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.Cast(image, sitk.sitkInt16)
    direction = image.GetDirection()
    orientation = "\\".join(f"{v:.6f}" for v in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7]))
    sx, sy, sz = image.GetSpacing()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": study_uid,
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{p:.6f}" for p in position),
            "0020|0037": orientation,
            "0028|0030": f"{sy:.6f}\\{sx:.6f}",
            "0018|0050": f"{sz:.6f}",
            "0028|1052": "0",
            "0028|1053": "1",
        }
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        path = folder / f"{series_uid[-6:]}_{k:04d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(sl)
        paths.append(path)
    return paths
