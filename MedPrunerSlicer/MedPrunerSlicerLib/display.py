"""Heatmaps over the input in the slice views, without taking the user's views over.

Which views: the ones the caller names, else those that show the input (as background or
foreground), else, when none does, every slice view (with the input put in its background). Before
a view is first changed, what it showed is remembered in the scene, on its slice composite node:
the background, foreground and label volumes as node references (``MedPruner.Saved*``), their
opacities, the compositing mode and the slice node's label-outline flag in the ``MedPruner.Overlay``
attribute (JSON). It survives a module reload and a saved scene (.mrb). `hide_result` (and mode
"none") puts it back exactly; showing another result over an overlaid view keeps the first state
remembered. A layer the user has since filled with a volume of their own is left alone. Views not
used are never changed, nor is the layout.

Modes: ``attention``, ``decisions``, ``both``, ``none``. Styles:

* ``outline`` (the default): the anatomy stays readable. The background keeps the input as it is.
  The label layer shows the decisions through a table in which only kept (nucleus) and contextual
  tokens are visible, with the slice node's label outline on: only their borders are drawn (in views
  parallel to the model's slices; across them a token is a one-voxel band, so no outlines there).
  The foreground shows a "veil", a code volume derived from both heatmaps (one byte per voxel, see
  `colors.OVERLAY_CODES`): a dark wash over slices never sent, slices dropped and tokens pruned
  (decisions, both) and a tint where a token's attention is above the uniform share 1/tokens of its
  slice (attention, both); clear elsewhere, so the image inside kept tokens is untouched.
* ``filled``: the attention heatmap itself in the foreground and the decisions labelmap filled with
  the report's colours in the label layer.

The veil and outline volumes are display helpers: hidden from editors, never saved with the scene
(made again when shown), found again through their references to the heatmaps, which several answers
may share and which are only read here (never renamed, never removed). The outline volume shares the
decisions' image data; one veil image per heatmap pair serves the veil node of every mode.
"""
from __future__ import annotations

import json

import numpy as np

from .colors import OVERLAY_CODES, TINT_LEVELS, outline_color_node, veil_color_node
from .result_nodes import ResultNodes, kept_slice_centres_ras
from .scene_utils import nodes_by_class

__all__ = ["DEFAULT_STYLE", "MODES", "STYLES", "best_slice_node", "hide_result", "jump_to_kept_slice",
           "overlaid_views", "set_opacity", "show_result", "veil_codes"]

MODES = ("attention", "decisions", "both", "none")
STYLES = ("outline", "filled")
DEFAULT_STYLE = "outline"
# Outlines are thin: they reach full strength at half the opacity slider, where a fill would hide the image.
OUTLINE_OPACITY_GAIN = 2.0

STATE = "MedPruner.Overlay"          # composite node attribute: JSON, see the module docstring
SAVED_REF = "MedPruner.Saved"        # + layer name: the volume the view showed before the overlay
SHOWN_REF = "MedPruner.Shown"        # + Input / Attention / Decisions: what the overlay shows now
HELPER = "MedPruner.OverlayHelper"   # helper volume attribute: "outline" or "veil <mode>"
HELPER_SOURCE = "MedPruner.OverlaySource"   # veil attribute: modification stamps of the heatmaps it was made from
HEATMAP_REF = "MedPruner.OverlayOf"  # + Attention / Decisions: helper -> heatmap node references
LAYERS = ("Background", "Foreground", "Label")
_NUMPY_AXIS = {"K": 0, "J": 1, "I": 2}   # slice axis (report["input"]["slice_axis_ijk"]) -> numpy axis (k, j, i)


# -- public ---------------------------------------------------------------------------------------
def show_result(scene, result: ResultNodes, mode: str = "both", opacity: float = 0.6, composite_nodes=None,
                *, style: str = DEFAULT_STYLE) -> list:
    """Show `result` in `mode` and `style` over the input; returns the slice composite nodes used.

    `composite_nodes`: the views to use; None: the views showing the input, or every slice view when
    none does. Mode "none" is `hide_result` on those views. Each view's own state is remembered first.
    """
    if mode not in MODES:
        raise ValueError(f"Unknown overlay mode {mode!r}; one of {MODES}.")
    if style not in STYLES:
        raise ValueError(f"Unknown overlay style {style!r}; one of {STYLES}.")
    if mode == "none":
        hide_result(scene, result, composite_nodes)
        return []
    opacity = _clamp(opacity)
    views = _target_views(scene, result, composite_nodes)
    if style == "filled":
        layers = {"Foreground": result.attention if mode in ("attention", "both") else None,
                  "Label": result.decisions if mode in ("decisions", "both") else None}
    else:
        layers = {"Foreground": _veil_node(scene, result, mode),
                  "Label": _outline_node(scene, result) if mode in ("decisions", "both") else None}
    direction = _slice_axis_ras(result)
    for composite in views:
        view_layers = layers
        if style == "outline" and not _parallel_to_slices(_slice_node_of(scene, composite), direction):
            # across the model's slices a token is a 1-voxel band: outlines would only stripe the image
            view_layers = dict(layers, Label=None)
        _show_in_view(scene, composite, result, mode, style, opacity, view_layers)
    _drop_helpers(scene)
    return views


def hide_result(scene, result: ResultNodes | None = None, composite_nodes=None) -> list:
    """Give the views back: every view showing an overlay (of `result`'s heatmaps only, when given;
    among `composite_nodes`, when given) shows again exactly what it showed before. Returns them.

    Call it before removing a result: with `result`, the display helpers made for its heatmaps
    go too (they are made again if another answer sharing the heatmaps is shown). Without, they
    stay (hidden, not saved) for the next show, so switching modes does not recompute the veil."""
    views = overlaid_views(scene, result, composite_nodes)
    for composite in views:
        _restore(scene, composite)
    if result is not None:
        _drop_helpers(scene, {result.attention, result.decisions})
    else:
        _drop_helpers(scene)
    return views


def set_opacity(scene, opacity: float, composite_nodes=None) -> list:
    """Opacity of the overlay (0 transparent .. 1 opaque) in the views showing one; returns them.

    Other views and layers the overlay does not hold are never changed."""
    opacity = _clamp(opacity)
    views = overlaid_views(scene, None, composite_nodes)
    for composite in views:
        state = _state(composite)
        for layer in ("Foreground", "Label"):
            if _is_overlay_node(scene, _layer_id(composite, layer)):
                _set_opacity(composite, layer, _layer_opacity(state.get("style"), layer, opacity))
        state["opacity"] = opacity
        composite.SetAttribute(STATE, json.dumps(state))
    return views


def overlaid_views(scene, result: ResultNodes | None = None, composite_nodes=None) -> list:
    """Slice composite nodes the overlay holds (showing `result`'s heatmaps, when given)."""
    candidates = composite_nodes if composite_nodes is not None else nodes_by_class(scene, "vtkMRMLSliceCompositeNode")
    views = [c for c in candidates if c.GetAttribute(STATE)]
    if result is None:
        return views
    mine = {n.GetID() for n in (result.attention, result.decisions) if n is not None}
    kept = []
    for composite in views:
        shown = {composite.GetNodeReferenceID(SHOWN_REF + role) for role in ("Attention", "Decisions")}
        if shown & mine or shown == {None}:   # None: its heatmaps are gone, nothing left worth showing
            kept.append(composite)
    return kept


def best_slice_node(result: ResultNodes, slice_nodes) -> object | None:
    """Of `slice_nodes`, the one whose normal is closest to the result's slice axis (None if empty):
    there, next/previous kept slice steps from one kept slice to the next."""
    slice_nodes = list(slice_nodes)
    if not slice_nodes:
        return None
    direction = _slice_axis_ras(result)
    return max(slice_nodes, key=lambda slice_node: _alignment(slice_node, direction))


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


# -- views ----------------------------------------------------------------------------------------
def _target_views(scene, result: ResultNodes, composite_nodes) -> list:
    if composite_nodes is not None:
        return list(composite_nodes)
    composites = nodes_by_class(scene, "vtkMRMLSliceCompositeNode")
    if result.input_volume is not None:
        input_id = result.input_volume.GetID()
        showing = [c for c in composites if input_id in (c.GetBackgroundVolumeID(), c.GetForegroundVolumeID())]
    else:   # the input was removed: stay where this result is shown
        showing = overlaid_views(scene, result)
    return showing or composites


def _show_in_view(scene, composite, result: ResultNodes, mode: str, style: str, opacity: float,
                  layers: dict) -> None:
    _remember(scene, composite)
    state = _state(composite)
    if result.input_volume is not None and composite.GetBackgroundVolumeID() != result.input_volume.GetID():
        composite.SetBackgroundVolumeID(result.input_volume.GetID())
    for layer in ("Foreground", "Label"):
        node = layers[layer]
        if node is None:
            _release(scene, composite, layer, state)
        else:
            if _layer_id(composite, layer) != node.GetID():
                _set_layer(composite, layer, node.GetID())
            _set_opacity(composite, layer, _layer_opacity(style, layer, opacity))
    if composite.GetCompositing() != composite.Alpha:
        composite.SetCompositing(composite.Alpha)
    slice_node = _slice_node_of(scene, composite)
    if slice_node is not None:
        # outlines for the outline style's label layer, fills for the filled one; the user's own flag otherwise
        wanted = style == "outline" if layers["Label"] is not None else bool(state["saved"]["label_outline"])
        if bool(slice_node.GetUseLabelOutline()) != wanted:
            slice_node.SetUseLabelOutline(wanted)
    for role, node in (("Input", result.input_volume), ("Attention", result.attention),
                       ("Decisions", result.decisions)):
        composite.SetNodeReferenceID(SHOWN_REF + role, node.GetID() if node is not None else None)
    state.update(style=style, mode=mode, opacity=opacity)
    composite.SetAttribute(STATE, json.dumps(state))


def _remember(scene, composite) -> None:
    """What the view shows now, unless an overlay already remembered what it showed before."""
    if composite.GetAttribute(STATE):
        return
    slice_node = _slice_node_of(scene, composite)
    saved = {
        "foreground_opacity": composite.GetForegroundOpacity(),
        "label_opacity": composite.GetLabelOpacity(),
        "compositing": composite.GetCompositing(),
        "label_outline": None if slice_node is None else int(slice_node.GetUseLabelOutline()),
    }
    for layer in LAYERS:
        composite.SetNodeReferenceID(SAVED_REF + layer, _layer_id(composite, layer))
    composite.SetAttribute(STATE, json.dumps({"saved": saved}))


def _restore(scene, composite) -> None:
    state = _state(composite)
    for layer in LAYERS:
        _release(scene, composite, layer, state)
    saved = state.get("saved", {})
    if "compositing" in saved and composite.GetCompositing() != saved["compositing"]:
        composite.SetCompositing(int(saved["compositing"]))
    slice_node = _slice_node_of(scene, composite)
    if slice_node is not None and saved.get("label_outline") is not None:
        if int(slice_node.GetUseLabelOutline()) != int(saved["label_outline"]):
            slice_node.SetUseLabelOutline(bool(saved["label_outline"]))
    for role in [SAVED_REF + layer for layer in LAYERS] + [SHOWN_REF + r for r in ("Input", "Attention", "Decisions")]:
        composite.RemoveNodeReferenceIDs(role)
    composite.RemoveAttribute(STATE)


def _release(scene, composite, layer: str, state: dict) -> None:
    """Put back the remembered volume of `layer` if the overlay holds it, or holds nothing any more (the
    scene clears a removed node's ID, and a saved scene does not keep the helpers); a volume the user
    chose since stays."""
    current = _layer_id(composite, layer)
    if current is None:
        ours = True
    elif layer == "Background":
        ours = current == composite.GetNodeReferenceID(SHOWN_REF + "Input")
    else:
        ours = _is_overlay_node(scene, current)
    if not ours:
        return
    saved_id = composite.GetNodeReferenceID(SAVED_REF + layer)
    if current != saved_id:
        _set_layer(composite, layer, saved_id)
    saved_opacity = state.get("saved", {}).get(f"{layer.lower()}_opacity")
    if saved_opacity is not None:
        _set_opacity(composite, layer, saved_opacity)


def _is_overlay_node(scene, node_id) -> bool:
    """True for the heatmaps and the display helpers: what the overlay puts in a view."""
    node = scene.GetNodeByID(node_id) if node_id else None
    if node is None:
        return False
    return bool(node.GetAttribute(HELPER)) or node.GetAttribute("MedPruner.Role") in ("attention", "decisions")


def _state(composite) -> dict:
    text = composite.GetAttribute(STATE)
    try:
        state = json.loads(text) if text else {}
    except ValueError:
        state = {}
    if not isinstance(state, dict):
        state = {}
    state.setdefault("saved", {})
    state["saved"].setdefault("label_outline", None)
    return state


def _slice_node_of(scene, composite):
    name = composite.GetLayoutName()
    for slice_node in nodes_by_class(scene, "vtkMRMLSliceNode"):
        if slice_node.GetLayoutName() == name:
            return slice_node
    return None


def _layer_id(composite, layer: str):
    return getattr(composite, f"Get{layer}VolumeID")()


def _set_layer(composite, layer: str, node_id) -> None:
    getattr(composite, f"Set{layer}VolumeID")(node_id)


def _set_opacity(composite, layer: str, opacity: float) -> None:
    if layer == "Foreground":
        if composite.GetForegroundOpacity() != opacity:
            composite.SetForegroundOpacity(float(opacity))
    elif layer == "Label":
        if composite.GetLabelOpacity() != opacity:
            composite.SetLabelOpacity(float(opacity))


def _layer_opacity(style: str | None, layer: str, opacity: float) -> float:
    if style == "outline" and layer == "Label":
        return min(1.0, OUTLINE_OPACITY_GAIN * opacity)
    return opacity


def _clamp(opacity: float) -> float:
    return min(max(float(opacity), 0.0), 1.0)


# -- display helpers (outline and veil volumes) -----------------------------------------------------
def _helpers(scene) -> list:
    return [n for n in nodes_by_class(scene, "vtkMRMLLabelMapVolumeNode") if n.GetAttribute(HELPER)]


def _find_helper(scene, role: str, decisions, attention=None):
    for node in _helpers(scene):
        if (node.GetAttribute(HELPER) == role and node.GetNodeReference(HEATMAP_REF + "Decisions") is decisions
                and (attention is None or node.GetNodeReference(HEATMAP_REF + "Attention") is attention)):
            return node
    return None


def _new_helper(scene, name: str, role: str, result: ResultNodes, image, color_node):
    import slicer

    node = slicer.vtkMRMLLabelMapVolumeNode()
    node.SetName(name)
    node.HideFromEditorsOn()          # not a volume of the user: out of the Data module and node selectors
    node.SetSaveWithScene(False)      # derived from the heatmaps: made again on the next show
    node.SetAttribute(HELPER, role)
    scene.AddNode(node)
    node.SetNodeReferenceID(HEATMAP_REF + "Decisions", result.decisions.GetID())
    if role != "outline":
        node.SetNodeReferenceID(HEATMAP_REF + "Attention", result.attention.GetID())
    node.SetAndObserveImageData(image)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetSaveWithScene(False)
    display.SetAndObserveColorNodeID(color_node.GetID())
    return node


def _follow_geometry(node, source) -> None:
    """The helper sits exactly on its heatmap: same IJK-to-RAS, same parent transform."""
    import vtk

    matrix, current = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    source.GetIJKToRASMatrix(matrix)
    node.GetIJKToRASMatrix(current)
    if any(matrix.GetElement(r, c) != current.GetElement(r, c) for r in range(4) for c in range(4)):
        node.SetIJKToRASMatrix(matrix)
    if node.GetTransformNodeID() != source.GetTransformNodeID():
        node.SetAndObserveTransformNodeID(source.GetTransformNodeID())


def _outline_node(scene, result: ResultNodes):
    """Label-layer helper: the decisions' own image, coloured so that only kept and contextual show."""
    colors = outline_color_node(scene, result.report["labels"])
    node = _find_helper(scene, "outline", result.decisions)
    if node is None:
        node = _new_helper(scene, "MedPruner outlines (display)", "outline", result, result.decisions.GetImageData(),
                           colors)
    else:
        if node.GetImageData() is not result.decisions.GetImageData():
            node.SetAndObserveImageData(result.decisions.GetImageData())
        if node.GetDisplayNode().GetColorNodeID() != colors.GetID():
            node.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
    _follow_geometry(node, result.decisions)
    return node


def _source_stamp(result: ResultNodes) -> str:
    return f"{result.decisions.GetImageData().GetMTime()}:{result.attention.GetImageData().GetMTime()}"


def _veil_node(scene, result: ResultNodes, mode: str):
    """Foreground helper for `mode`: the veil codes of the heatmap pair through the veil table of `mode`."""
    stamp = _source_stamp(result)
    siblings = [n for n in _helpers(scene) if (n.GetAttribute(HELPER) or "").startswith("veil ")
                and n.GetNodeReference(HEATMAP_REF + "Decisions") is result.decisions
                and n.GetNodeReference(HEATMAP_REF + "Attention") is result.attention]
    fresh = [n for n in siblings if n.GetAttribute(HELPER_SOURCE) == stamp]
    if fresh:
        image = fresh[0].GetImageData()
    else:
        image = _veil_image(result)
    for node in siblings:   # every mode's veil of this pair shows the same, current, codes
        if node.GetImageData() is not image:
            node.SetAndObserveImageData(image)
            node.SetAttribute(HELPER_SOURCE, stamp)
    node = next((n for n in siblings if n.GetAttribute(HELPER) == f"veil {mode}"), None)
    if node is None:
        node = _new_helper(scene, f"MedPruner veil {mode} (display)", f"veil {mode}", result, image,
                           veil_color_node(scene, mode))
    node.SetAttribute(HELPER_SOURCE, stamp)
    _follow_geometry(node, result.decisions)
    return node


def veil_codes(decisions: np.ndarray, attention: np.ndarray, report: dict) -> np.ndarray:
    """The overlay codes (colors.OVERLAY_CODES) of a heatmap pair, (k, j, i) arrays as in the volumes.

    Wash codes from the decisions; on kept slices, tokens whose attention (nucleus probability) is
    above the uniform share 1/tokens of their slice get a tint level, log-scaled up to the highest
    ratio to the uniform share in the volume."""
    codes = np.zeros(decisions.shape, dtype=np.uint8)
    for label, kind in ((0, "not sent"), (1, "dropped"), (2, "pruned")):
        codes[decisions == label] = OVERLAY_CODES[kind]
    axis = _NUMPY_AXIS[report["input"]["slice_axis_ijk"]]
    rows = [r for r in report["slices"]["per_slice"]
            if r.get("kept") and int(r.get("tokens_total") or 0) > 0 and 0 <= int(r["voxel_index"]) < codes.shape[axis]]

    def slab(array: np.ndarray, index: int) -> np.ndarray:   # a view: writing to it writes `array`
        where = [slice(None)] * array.ndim
        where[axis] = index
        return array[tuple(where)]

    ratios = [(int(r["voxel_index"]), slab(attention, int(r["voxel_index"])) * float(r["tokens_total"])) for r in rows]
    top = max((float(ratio.max()) for _, ratio in ratios if ratio.size), default=0.0)
    if top <= 1.0:
        return codes
    for index, ratio in ratios:
        labels = slab(decisions, index)
        above = (ratio > 1.0) & (labels >= 2)
        if not above.any():
            continue
        level = np.log(ratio[above].astype(np.float64)) / np.log(top)
        steps = np.clip(np.ceil(level * TINT_LEVELS) - 1, 0, TINT_LEVELS - 1).astype(np.uint8)
        first = np.where(labels[above] == 2, OVERLAY_CODES["pruned tint"], OVERLAY_CODES["seen tint"]).astype(np.uint8)
        slab(codes, index)[above] = first + steps
    return codes


def _array(node) -> np.ndarray:
    from vtk.util import numpy_support

    image = node.GetImageData()
    dims = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])


def _veil_image(result: ResultNodes):
    import vtk
    from vtk.util import numpy_support

    codes = veil_codes(_array(result.decisions), _array(result.attention), result.report)
    image = vtk.vtkImageData()
    image.SetDimensions(*codes.shape[::-1])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(codes.reshape(-1), deep=True))
    return image


def _drop_helpers(scene, heatmaps=None) -> None:
    """Remove helpers whose heatmaps are gone, and (with `heatmaps`) those made from them that no
    view shows."""
    shown = set()
    for composite in nodes_by_class(scene, "vtkMRMLSliceCompositeNode"):
        shown.update(_layer_id(composite, layer) for layer in ("Foreground", "Label"))
    for node in _helpers(scene):
        sources = [node.GetNodeReference(HEATMAP_REF + "Decisions")]
        if node.GetAttribute(HELPER) != "outline":
            sources.append(node.GetNodeReference(HEATMAP_REF + "Attention"))
        orphan = any(s is None for s in sources)
        released = heatmaps is not None and any(s in heatmaps for s in sources) and node.GetID() not in shown
        if orphan or released:
            display = node.GetDisplayNode()
            scene.RemoveNode(node)
            if display is not None and display.GetScene() is scene:
                scene.RemoveNode(display)


# -- geometry -------------------------------------------------------------------------------------
PARALLEL_COSINE = 0.9   # a view within about 25 degrees of the model's slices shows tokens as areas


def _slice_axis_ras(result: ResultNodes) -> np.ndarray:
    """Unit RAS direction of the input's slice axis (report["input"]["slice_axis_ijk"])."""
    axis = "IJK".index(result.report["input"]["slice_axis_ijk"])
    direction = _matrix(result.attention.GetIJKToRASMatrix)[:3, axis]
    return direction / (np.linalg.norm(direction) or 1.0)


def _alignment(slice_node, direction: np.ndarray) -> float:
    """|cos| of the angle between the view's normal and `direction`."""
    normal = _slice_to_ras(slice_node)[:3, 2]
    return abs(float(normal @ direction)) / (np.linalg.norm(normal) or 1.0)


def _parallel_to_slices(slice_node, direction: np.ndarray) -> bool:
    return slice_node is None or _alignment(slice_node, direction) >= PARALLEL_COSINE


def _matrix(getter) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    getter(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _slice_to_ras(slice_node) -> np.ndarray:
    m = slice_node.GetSliceToRAS()
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
