"""Heatmaps over the input in the slice views: which heatmap, opacity, next/previous kept slice.

Works on the scene's slice composite and slice nodes, so it drives the views of the Slicer app
and any slice logic made headless on `slicer-core` alike.

Modes: ``attention`` (the attention heatmap in the foreground layer), ``decisions`` (the decision
labelmap in the label layer: kept / contextual / pruned tokens, dropped slices), ``both``, ``none``.
"""
from __future__ import annotations

import numpy as np

from .result_nodes import ResultNodes, kept_slice_centres_ras
from .scene_utils import nodes_by_class

__all__ = ["MODES", "jump_to_kept_slice", "set_opacity", "show_result"]

MODES = ("attention", "decisions", "both", "none")


def show_result(scene, result: ResultNodes, mode: str = "both", opacity: float = 0.6,
                composite_nodes=None) -> None:
    """Show the input in the background and the chosen heatmap(s) over it in every slice view."""
    if mode not in MODES:
        raise ValueError(f"Unknown overlay mode {mode!r}; one of {MODES}.")
    composites = composite_nodes if composite_nodes is not None else nodes_by_class(scene, "vtkMRMLSliceCompositeNode")
    foreground = result.attention.GetID() if mode in ("attention", "both") else None
    label = result.decisions.GetID() if mode in ("decisions", "both") else None
    for composite in composites:
        if result.input_volume is not None:
            composite.SetBackgroundVolumeID(result.input_volume.GetID())
        composite.SetForegroundVolumeID(foreground)
        composite.SetLabelVolumeID(label)
        composite.SetForegroundOpacity(float(opacity))
        composite.SetLabelOpacity(float(opacity))


def set_opacity(scene, opacity: float, composite_nodes=None) -> None:
    """Opacity of both overlay layers (0 transparent .. 1 opaque) in every slice view."""
    opacity = min(max(float(opacity), 0.0), 1.0)
    composites = composite_nodes if composite_nodes is not None else nodes_by_class(scene, "vtkMRMLSliceCompositeNode")
    for composite in composites:
        composite.SetForegroundOpacity(opacity)
        composite.SetLabelOpacity(opacity)


def _slice_to_ras(slice_node) -> np.ndarray:
    m = slice_node.GetSliceToRAS()
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def jump_to_kept_slice(result: ResultNodes, slice_node, direction: int) -> int | None:
    """Move `slice_node` to the next (direction +1) or previous (-1) kept slice along its normal.

    Returns the index (in report["slices"]["kept_voxel_indices"]) of the slice jumped to, or None
    when there is no kept slice further in that direction.
    """
    centres = kept_slice_centres_ras(result)
    if centres.size == 0:
        return None
    m = _slice_to_ras(slice_node)
    normal, position = m[:3, 2], m[:3, 3]
    normal = normal / (np.linalg.norm(normal) or 1.0)
    offsets = (centres - position) @ normal
    spacing = min(result.attention.GetSpacing())
    eps = 0.25 * spacing
    if direction > 0:
        candidates = np.flatnonzero(offsets > eps)
        if not candidates.size:
            return None
        index = int(candidates[np.argmin(offsets[candidates])])
    else:
        candidates = np.flatnonzero(offsets < -eps)
        if not candidates.size:
            return None
        index = int(candidates[np.argmax(offsets[candidates])])
    x, y, z = (float(v) for v in centres[index])
    slice_node.JumpSliceByOffsetting(x, y, z)
    return index
