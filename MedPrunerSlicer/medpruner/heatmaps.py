"""Per-token decisions -> label and attention volumes in the input's exact geometry.

The overlay must be a truthful picture of what the model saw, so only the voxel slice each model
slice was taken from is painted; voxel slices skipped because of `max_slices` stay 0 ("not sent"),
even though `SliceMapping.slabs` records which model slice is nearest to them. In-plane, every
voxel gets the decision of the LLM token whose footprint contains the voxel's centre
(`SliceMapping.token_index_map`), in the same coordinate convention as the forward resampling.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from medpruner.atomic import write_atomic
from medpruner.slicing import SliceMapping

__all__ = ["KEPT_LABELS", "build_heatmaps", "write_image_atomic"]

#: label value -> name and RGBA colour (0..1 floats) for `heatmap_kept`.
KEPT_LABELS: dict[int, dict[str, Any]] = {
    0: {"name": "not sent to the model", "rgba": (0.0, 0.0, 0.0, 0.0)},
    1: {"name": "slice dropped by the slice filter", "rgba": (0.55, 0.55, 0.55, 0.45)},
    2: {"name": "token pruned (merged into a contextual token)", "rgba": (0.15, 0.30, 0.80, 0.30)},
    3: {"name": "contextual token", "rgba": (1.00, 0.80, 0.10, 0.60)},
    4: {"name": "kept by the nucleus", "rgba": (0.90, 0.15, 0.10, 0.70)},
}
# token_role value (0 pruned, 1 contextual, 2 nucleus) -> label value.
_ROLE_TO_LABEL = np.array([2, 3, 4], dtype=np.uint8)


def build_heatmaps(mapping: SliceMapping, result: Any, token_pixels: int) -> tuple[sitk.Image, sitk.Image]:
    """(heatmap_kept uint8 labels, heatmap_attention float32) with the input's size and geometry.

    `result` needs `slice_kept` (S,), `token_grid` [(h, w)], `token_role` [(h, w) uint8 | None],
    `token_scores` [(h, w) float32 | None] (None only for slices the filter dropped).
    """
    n_model = len(mapping.voxel_index)
    kept = np.asarray(result.slice_kept, dtype=bool).reshape(-1)
    if kept.shape[0] != n_model or len(result.token_grid) != n_model:
        raise ValueError(f"The result covers {kept.shape[0]} slices but the mapping has {n_model} model slices.")
    tokmap = mapping.token_index_map(token_pixels)
    grid = (mapping.image_size[0] // token_pixels, mapping.image_size[1] // token_pixels)
    labels = np.zeros(mapping.display_shape, dtype=np.uint8)
    attention = np.zeros(mapping.display_shape, dtype=np.float32)
    where = np.asarray(mapping.voxel_index, dtype=np.int64)
    labels[where[~kept]] = 1
    kept_ids = np.flatnonzero(kept)
    if kept_ids.size:
        roles, scores = [], []
        for s in kept_ids:  # a loop over slices, only to check and stack the per-slice arrays
            role, score = result.token_role[s], result.token_scores[s]
            if tuple(result.token_grid[s]) != grid or role is None or score is None:
                raise ValueError(
                    f"Model slice {s} is kept but its token grid {tuple(result.token_grid[s])} / roles / scores "
                    f"do not match the expected grid {grid}."
                )
            roles.append(np.asarray(role).reshape(-1))
            scores.append(np.asarray(score, dtype=np.float32).reshape(-1))
        role_arr = np.stack(roles)
        if role_arr.size and (role_arr.min() < 0 or role_arr.max() > 2):
            raise ValueError("token_role values must be 0 (pruned), 1 (contextual) or 2 (nucleus).")
        labels[where[kept_ids]] = _ROLE_TO_LABEL[role_arr.astype(np.intp)[:, tokmap]]
        attention[where[kept_ids]] = np.stack(scores)[:, tokmap]
    return _as_input_image(labels, mapping), _as_input_image(attention, mapping)


def _as_input_image(display_array: np.ndarray, mapping: SliceMapping) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(mapping.to_input_volume(display_array)))
    img.SetSpacing(mapping.input_spacing)
    img.SetOrigin(mapping.input_origin)
    img.SetDirection(mapping.input_direction)
    return img


def write_image_atomic(image: sitk.Image, path: str | os.PathLike) -> Path:
    """Write with compression to a temporary file beside `path`, then os.replace() it into place.

    A reader (Slicer, the server) never sees a half-written file.
    """
    path = Path(path)
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix
    return write_atomic(path, lambda tmp: sitk.WriteImage(image, tmp, True), suffix=suffix)
