"""Colour tables of the heatmaps.

* Attention: a perceptual ramp (dark violet -> red -> orange -> pale yellow, monotonic in lightness,
  readable by colour-blind users), 256 entries, entry 0 fully transparent so that voxels with no
  attention (not sent, dropped, or zero) never tint the image. The heatmap's display node also
  thresholds out zeros, so both the table and the threshold keep them transparent.
* Decisions: one entry per label of the report (``report["labels"]``: value -> name, RGBA), so the
  names and colours always match what the server wrote; label 0 ("not sent to the model") is
  transparent.

Colour nodes are shared by every result in the scene (one per kind, found again by name and the
``MedPruner.ColorTable`` attribute) and saved with the scene.
"""
from __future__ import annotations

import numpy as np

from .scene_utils import nodes_by_class

__all__ = ["ATTENTION_ANCHORS", "attention_color_node", "attention_ramp", "decision_color_node"]

# (position, R, G, B): control points of the attention ramp, lightness increasing with position.
ATTENTION_ANCHORS = (
    (0.00, 0.17, 0.04, 0.38),
    (0.25, 0.47, 0.11, 0.43),
    (0.50, 0.78, 0.22, 0.30),
    (0.75, 0.97, 0.52, 0.09),
    (1.00, 0.99, 0.96, 0.55),
)
ATTENTION_COLORS = 256


def attention_ramp(n: int = ATTENTION_COLORS) -> np.ndarray:
    """(n, 4) RGBA in 0..1: entry 0 transparent, entries 1..n-1 along ATTENTION_ANCHORS, opaque."""
    anchors = np.array(ATTENTION_ANCHORS)
    t = np.linspace(0.0, 1.0, n - 1)
    rgb = np.stack([np.interp(t, anchors[:, 0], anchors[:, c]) for c in (1, 2, 3)], axis=1)
    ramp = np.zeros((n, 4))
    ramp[1:, :3] = rgb
    ramp[1:, 3] = 1.0
    return ramp


def _find(scene, kind: str, signature: str | None = None):
    for node in nodes_by_class(scene, "vtkMRMLColorTableNode"):
        if node.GetAttribute("MedPruner.ColorTable") == kind and (
                signature is None or node.GetAttribute("MedPruner.Labels") == signature):
            return node
    return None


def _new_table(scene, name: str, kind: str, n: int):
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    node.SetTypeToUser()
    node.SetNumberOfColors(n)
    node.SetAttribute("MedPruner.ColorTable", kind)
    node.SetAttribute("Category", "MedPruner")
    node.HideFromEditorsOff()
    return node


def attention_color_node(scene):
    """The shared attention colour table (created on first use)."""
    name = "MedPruner attention"
    node = _find(scene, "attention")
    if node is None:
        node = _new_table(scene, name, "attention", ATTENTION_COLORS)
        for i, (r, g, b, a) in enumerate(attention_ramp()):
            node.SetColor(i, "" if i == 0 else f"{i}", r, g, b, a)
    return node


def decision_color_node(scene, labels: dict):
    """The decision colour table for `labels` ({"0": {"name", "rgba"}, ...} as in report.json)."""
    entries = sorted((int(k), v) for k, v in labels.items())
    if not entries or entries[0][0] != 0 or [k for k, _ in entries] != list(range(len(entries))):
        from .errors import ResultError

        raise ResultError("The server's heatmap labels are not numbered 0, 1, 2, ...",
                          "Update the MedPruner server and the Slicer extension to matching versions.")
    signature = repr([(k, v["name"], [round(float(c), 6) for c in v["rgba"]]) for k, v in entries])
    node = _find(scene, "decisions", signature)
    if node is not None:
        return node
    # A label set not seen yet (first result, or another server version): a table of its own.
    count = sum(1 for n in nodes_by_class(scene, "vtkMRMLColorTableNode")
                if n.GetAttribute("MedPruner.ColorTable") == "decisions")
    name = "MedPruner decisions" + (f" {count + 1}" if count else "")
    node = _new_table(scene, name, "decisions", len(entries))
    node.SetAttribute("MedPruner.Labels", signature)
    for value, entry in entries:
        r, g, b, a = (float(c) for c in entry["rgba"])
        node.SetColor(value, entry["name"], r, g, b, 0.0 if value == 0 else a)
    return node
