"""Colour tables of the heatmaps.

* Attention: a perceptual ramp (dark violet -> red -> orange -> pale yellow, monotonic in lightness,
  readable by colour-blind users), 256 entries, entry 0 fully transparent so that voxels with no
  attention (not sent, dropped, or zero) never tint the image. The heatmap's display node also
  thresholds out zeros, so both the table and the threshold keep them transparent.
* Decisions: one entry per label of the report (``report["labels"]``: value -> name, RGBA), so the
  names and colours always match what the server wrote; label 0 ("not sent to the model") is
  transparent.

* Outlines (overlay style "outline"): the decision labels again, but only kept (nucleus) and
  contextual tokens are visible, opaque: Slicer's label outline draws their borders only.
* Veil (overlay style "outline"): the colours of the overlay code volume that `display` derives from
  both heatmaps (see `OVERLAY_CODES`): a dark, semi-transparent wash over what the model did not see
  (slices never sent, slices dropped, tokens pruned), a tint over tokens whose attention is above the
  uniform share, clear everywhere else, so the anatomy under kept tokens stays as it is.

Colour nodes are shared by every result in the scene (one per kind, found again by name and the
``MedPruner.ColorTable`` attribute) and saved with the scene.
"""
from __future__ import annotations

import numpy as np

from .scene_utils import nodes_by_class

__all__ = ["ATTENTION_ANCHORS", "CONTEXTUAL", "KEPT", "OVERLAY_CODES", "TINT_LEVELS", "VEILS", "WASH_RGBA",
           "attention_color_node", "attention_ramp", "decision_color_node", "outline_color_node", "tint_ramp",
           "veil_color_node", "veil_colors"]

# (position, R, G, B): control points of the attention ramp, lightness increasing with position.
ATTENTION_ANCHORS = (
    (0.00, 0.17, 0.04, 0.38),
    (0.25, 0.47, 0.11, 0.43),
    (0.50, 0.78, 0.22, 0.30),
    (0.75, 0.97, 0.52, 0.09),
    (1.00, 0.99, 0.96, 0.55),
)
ATTENTION_COLORS = 256

# Decision labels (report["labels"], medpruner.heatmaps.KEPT_LABELS) the outline style draws.
CONTEXTUAL = 3
KEPT = 4

# Values of the overlay code volume (one byte per voxel) that `display` derives from the decisions and
# the attention, and that the veil tables colour: the wash kinds, then two runs of tint levels (how far
# a token's attention is above the uniform share 1/tokens of its slice, lowest first).
OVERLAY_CODES = {
    "clear": 0,            # kept or contextual token at or below the uniform share: left as it is
    "not sent": 1,         # slice the model never received (max_slices)
    "dropped": 2,          # slice the slice filter dropped
    "pruned": 3,           # token pruned (merged into a contextual token), at or below the uniform share
    "seen tint": 4,        # first of TINT_LEVELS: kept or contextual token above the uniform share
    "pruned tint": 130,    # first of TINT_LEVELS: pruned token above the uniform share
}
TINT_LEVELS = 126
# Dark wash over what the model did not see; slices it never saw darker than tokens merged into others.
WASH_RGBA = {"not sent": (0.0, 0.0, 0.0, 0.90), "dropped": (0.0, 0.0, 0.0, 0.90), "pruned": (0.0, 0.0, 0.0, 0.65)}
# Tint: the upper part of the attention ramp, more opaque the further above the uniform share.
TINT_RAMP = (0.6, 1.0)
TINT_ALPHA = (0.15, 0.70)
# overlay mode -> (wash, tint): what the veil shows.
VEILS = {"decisions": (True, False), "attention": (False, True), "both": (True, True)}


def attention_ramp(n: int = ATTENTION_COLORS) -> np.ndarray:
    """(n, 4) RGBA in 0..1: entry 0 transparent, entries 1..n-1 along ATTENTION_ANCHORS, opaque."""
    anchors = np.array(ATTENTION_ANCHORS)
    t = np.linspace(0.0, 1.0, n - 1)
    rgb = np.stack([np.interp(t, anchors[:, 0], anchors[:, c]) for c in (1, 2, 3)], axis=1)
    ramp = np.zeros((n, 4))
    ramp[1:, :3] = rgb
    ramp[1:, 3] = 1.0
    return ramp


def tint_ramp(n: int = TINT_LEVELS) -> np.ndarray:
    """(n, 4) RGBA: the attention ramp from TINT_RAMP[0] to its end, alpha rising along TINT_ALPHA."""
    anchors = np.array(ATTENTION_ANCHORS)
    t = np.linspace(0.0, 1.0, n)
    position = TINT_RAMP[0] + t * (TINT_RAMP[1] - TINT_RAMP[0])
    ramp = np.empty((n, 4))
    for c in (0, 1, 2):
        ramp[:, c] = np.interp(position, anchors[:, 0], anchors[:, c + 1])
    ramp[:, 3] = TINT_ALPHA[0] + t * (TINT_ALPHA[1] - TINT_ALPHA[0])
    return ramp


def veil_colors(mode: str) -> np.ndarray:
    """(256, 4) RGBA of the overlay codes for `mode` (a key of VEILS); unused codes transparent."""
    wash, tint = VEILS[mode]
    table = np.zeros((256, 4))
    seen, pruned = OVERLAY_CODES["seen tint"], OVERLAY_CODES["pruned tint"]
    if wash:
        for kind, rgba in WASH_RGBA.items():
            table[OVERLAY_CODES[kind]] = rgba
        table[pruned:pruned + TINT_LEVELS] = WASH_RGBA["pruned"]   # pruned stays dimmed, whatever its attention
    if tint:
        table[seen:seen + TINT_LEVELS] = tint_ramp()
        if not wash:
            table[pruned:pruned + TINT_LEVELS] = tint_ramp()
    return table


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
    entries = _label_entries(labels)
    signature = _labels_signature(entries)
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


def _label_entries(labels: dict) -> list:
    """[(value, entry)] sorted by value; refuses labels not numbered 0, 1, 2, ..."""
    entries = sorted(((int(k), v) for k, v in labels.items()), key=lambda kv: kv[0])
    if not entries or entries[0][0] != 0 or [k for k, _ in entries] != list(range(len(entries))):
        from .errors import ResultError

        raise ResultError("The server's heatmap labels are not numbered 0, 1, 2, ...",
                          "Update the MedPruner server and the Slicer extension to matching versions.")
    return entries


def _labels_signature(entries: list) -> str:
    return repr([(k, v["name"], [round(float(c), 6) for c in v["rgba"]]) for k, v in entries])


def outline_color_node(scene, labels: dict):
    """The outline table for `labels`: kept and contextual in their report colours, opaque; the rest clear.

    Shown in the label layer with the slice node's label outline on, it draws only the borders of
    the kept and contextual tokens."""
    entries = _label_entries(labels)
    signature = _labels_signature(entries)
    node = _find(scene, "outlines", signature)
    if node is not None:
        return node
    count = sum(1 for n in nodes_by_class(scene, "vtkMRMLColorTableNode")
                if n.GetAttribute("MedPruner.ColorTable") == "outlines")
    node = _new_table(scene, "MedPruner outlines" + (f" {count + 1}" if count else ""), "outlines", len(entries))
    node.SetAttribute("MedPruner.Labels", signature)
    for value, entry in entries:
        r, g, b, _a = (float(c) for c in entry["rgba"])
        node.SetColor(value, entry["name"], r, g, b, 1.0 if value in (KEPT, CONTEXTUAL) else 0.0)
    return node


def veil_color_node(scene, mode: str):
    """The shared veil table for overlay `mode` ("decisions", "attention" or "both"), see `veil_colors`."""
    kind = f"veil {mode}"
    node = _find(scene, kind)
    if node is None:
        node = _new_table(scene, f"MedPruner veil ({mode})", kind, 256)
        names = {v: k for k, v in OVERLAY_CODES.items()}
        for i, (r, g, b, a) in enumerate(veil_colors(mode)):
            node.SetColor(i, names.get(i, str(i)), r, g, b, a)
    return node
