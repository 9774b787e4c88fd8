"""The overlay in the slice views (slicer-core, real MRML nodes, Slicer's own slice pipeline on the CPU).

The user's views are theirs: the overlay goes only where the input is shown, remembers what each view
showed and gives it back exactly; the outline style leaves the anatomy inside kept tokens untouched.
View-state tests use results built from a report written by hand (fast, every label where we want it);
render tests use the demo phantom answered by the real pipeline through the stand-in server.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core (pip install slicer-core) runs the Slicer scene tests")

from MedPrunerSlicerLib import colors, display
from MedPrunerSlicerLib.result_nodes import create_result_nodes
from MedPrunerSlicerLib.scene_utils import nodes_by_class
from MedPrunerSlicerLib.volume_export import ijk_to_ras_array
from slicer_helpers import SliceRenderer, add_volume, ask_once, make_scene

# -- a result written by hand ---------------------------------------------------------------------
SHAPE = (6, 16, 16)   # k, j, i: 6 axial slices of 16 x 16 voxels; tokens of 4 x 4 voxels (16 per slice)
AXIAL = np.diag([-1.0, -1.0, 2.0, 1.0])
AXIAL[:3, 3] = (7.5, 7.5, -5.0)
KEPT_SLICES, DROPPED_SLICES, NOT_SENT = (0, 2, 4), (1, 3), (5,)
# decision label per token of a kept slice (4 kept, 3 contextual, 2 pruned) and its nucleus probability
ROLES = np.array([[4, 4, 2, 2],
                  [4, 4, 2, 3],
                  [2, 2, 2, 2],
                  [3, 2, 2, 2]], dtype=np.uint8)
PROBS = np.where(ROLES == 4, 0.15, np.where(ROLES == 3, 0.05, 0.03))
PROBS[2, 0] = 0.07   # one pruned token above the uniform share 1/16
PROBS = PROBS / PROBS.sum()
VOLUME_ID = "c" * 32


def _hand_heatmaps(shape=SHAPE):
    labels = np.zeros(shape, dtype=np.uint8)
    attention = np.zeros(shape, dtype=np.float32)
    block = np.ones((shape[1] // 4, shape[2] // 4))
    for k in KEPT_SLICES:
        labels[k] = np.kron(ROLES, block)
        attention[k] = np.kron(PROBS, block)
    for k in DROPPED_SLICES:
        labels[k] = 1
    return labels, attention


def _hand_report(question: str, axis: str = "K", reused: bool = False) -> dict:
    from medpruner.heatmaps import KEPT_LABELS

    rows = [{"model_index": m, "voxel_index": k, "slab": [k, k + 1], "kept": k in KEPT_SLICES,
             "l1_to_anchor": None if m == 0 else 0.1, "tokens_total": ROLES.size,
             "tokens_kept": int((ROLES >= 3).sum()) if k in KEPT_SLICES else 0,
             "retention": float((ROLES >= 3).mean()) if k in KEPT_SLICES else 0.0}
            for m, k in enumerate(sorted(KEPT_SLICES + DROPPED_SLICES))]
    return {
        "question": question, "answer": f"answer to {question}", "model_id": "tiny", "model_family": "qwen3_vl",
        "config": {"enabled": True, "gamma": 0.05, "tau": 0.9}, "input": {"slice_axis_ijk": axis, "notes": []},
        "slices": {"total": SHAPE[0], "sent": len(rows), "kept": len(KEPT_SLICES),
                   "kept_voxel_indices": list(KEPT_SLICES), "per_slice": rows},
        "tokens": {"total_visual": ROLES.size * len(KEPT_SLICES), "kept_visual": 18, "retention": 0.375},
        "labels": {str(k): {"name": v["name"], "rgba": list(v["rgba"])} for k, v in KEPT_LABELS.items()},
        "volume_id": VOLUME_ID, "prefix_reused": reused, "prepare_s": 1.0,
    }


def _hand_answer(scene, volume, question: str, follow_up: bool = False):
    """A result; a follow-up shares the first answer's heatmap nodes (as the server's prepared volume does)."""
    if follow_up:
        return create_result_nodes(scene, volume, _hand_report(question, reused=True), None, None, "job", "srv")
    labels, attention = _hand_heatmaps()
    matrix = ijk_to_ras_array(volume)
    return create_result_nodes(scene, volume, _hand_report(question), (labels, matrix), (attention, matrix),
                               "job", "srv")


def _desk():
    """A radiologist's desk: the CT to ask about, a prior study, a PET fused over it, their own segmentation,
    three slice views, each showing something of its own, and a layout."""
    import slicer

    scene = make_scene()
    volume = add_volume(scene, np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE), AXIAL, "CT")
    prior = add_volume(scene, np.ones(SHAPE, dtype=np.int16), AXIAL, "prior CT")
    pet = add_volume(scene, np.ones(SHAPE, dtype=np.float32), AXIAL, "PET")
    seg = add_volume(scene, np.ones(SHAPE, dtype=np.uint8), AXIAL, "my segmentation", "vtkMRMLLabelMapVolumeNode")
    layout = slicer.vtkMRMLLayoutNode()
    scene.AddNode(layout)
    layout.SetViewArrangement(3)
    views = {name: SliceRenderer(scene, name, orientation, 64)
             for name, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal"))}
    red, yellow, green = (views[n].composite for n in ("Red", "Yellow", "Green"))
    red.SetBackgroundVolumeID(volume.GetID())          # the CT with the user's segmentation
    red.SetLabelVolumeID(seg.GetID())
    red.SetLabelOpacity(0.8)
    yellow.SetBackgroundVolumeID(prior.GetID())        # the prior study with the PET fused over it
    yellow.SetForegroundVolumeID(pet.GetID())
    yellow.SetForegroundOpacity(0.35)
    views["Yellow"].slice_node.SetUseLabelOutline(True)
    green.SetBackgroundVolumeID(pet.GetID())           # the CT as the foreground over the PET
    green.SetForegroundVolumeID(volume.GetID())
    green.SetForegroundOpacity(0.5)
    green.SetCompositing(green.Add)
    return scene, volume, views, layout, {"prior": prior, "pet": pet, "seg": seg}


def _view_state(view) -> dict:
    c, s = view.composite, view.slice_node
    return {"background": c.GetBackgroundVolumeID(), "foreground": c.GetForegroundVolumeID(),
            "label": c.GetLabelVolumeID(), "foreground opacity": c.GetForegroundOpacity(),
            "label opacity": c.GetLabelOpacity(), "compositing": c.GetCompositing(),
            "label outline": s.GetUseLabelOutline(), "overlay attribute": c.GetAttribute(display.STATE),
            "references": sorted(c.GetNthNodeReferenceRole(i) for i in range(c.GetNumberOfNodeReferenceRoles())
                                 if c.GetNumberOfNodeReferences(c.GetNthNodeReferenceRole(i)))}


def _helper_role(scene, node_id):
    node = scene.GetNodeByID(node_id) if node_id else None
    return node.GetAttribute(display.HELPER) if node is not None else None


def _helpers(scene) -> list:
    return [n for n in nodes_by_class(scene, "vtkMRMLVolumeNode") if n.GetAttribute(display.HELPER)]


# -- the user's views -----------------------------------------------------------------------------
def test_overlay_goes_only_where_the_input_is_and_hiding_gives_every_view_back_exactly():
    scene, volume, views, layout, user = _desk()
    first = _hand_answer(scene, volume, "Is there a lesion?")
    follow_up = _hand_answer(scene, volume, "Where is it?", follow_up=True)
    assert follow_up.attention is first.attention   # shared heatmaps: hiding one must not break the other
    other = _hand_answer(scene, volume, "Any fracture?")
    before = {name: _view_state(v) for name, v in views.items()}
    yellow_mtimes = (views["Yellow"].composite.GetMTime(), views["Yellow"].slice_node.GetMTime())
    layout_state = (layout.GetViewArrangement(), layout.GetMTime())
    names = [(n.GetID(), n.GetName()) for n in (first.attention, first.decisions)]

    used = display.show_result(scene, first)                       # defaults: both, outline
    assert {c.GetLayoutName() for c in used} == {"Red", "Green"}   # the views showing the CT (background or foreground)
    for name in ("Red", "Green"):
        c = views[name].composite
        assert c.GetBackgroundVolumeID() == volume.GetID()
        assert _helper_role(scene, c.GetForegroundVolumeID()) == "veil both"
        assert c.GetCompositing() == c.Alpha
    # outlines in the axial view (parallel to the model's slices); none across them (coronal)
    assert _helper_role(scene, views["Red"].composite.GetLabelVolumeID()) == "outline"
    assert views["Red"].slice_node.GetUseLabelOutline()
    assert views["Green"].composite.GetLabelVolumeID() is None
    assert not views["Green"].slice_node.GetUseLabelOutline()
    assert (views["Yellow"].composite.GetMTime(), views["Yellow"].slice_node.GetMTime()) == yellow_mtimes
    assert _view_state(views["Yellow"]) == before["Yellow"]

    # another result, another mode and style over the overlaid views: the ORIGINAL state stays remembered
    display.show_result(scene, follow_up, "decisions", 0.3, style="filled")
    display.show_result(scene, other, "attention", 0.9)
    assert views["Red"].composite.GetLabelVolumeID() == user["seg"].GetID()   # attention needs no label layer
    display.show_result(scene, follow_up, "decisions", 0.6)                   # outlines on again, then hide
    assert views["Red"].slice_node.GetUseLabelOutline()
    display.hide_result(scene)
    for name, view in views.items():
        assert _view_state(view) == before[name], name
    assert (views["Yellow"].composite.GetMTime(), views["Yellow"].slice_node.GetMTime()) == yellow_mtimes
    assert (layout.GetViewArrangement(), layout.GetMTime()) == layout_state   # the layout is never touched
    assert [(n.GetID(), n.GetName()) for n in (first.attention, first.decisions)] == names
    assert all(n.GetScene() is scene for n in (first.attention, first.decisions))


def test_mode_none_and_hide_result_of_one_result_restore_only_its_views():
    scene, volume, views, _layout, _user = _desk()
    first = _hand_answer(scene, volume, "Is there a lesion?")
    other = _hand_answer(scene, volume, "Any fracture?")
    before = {name: _view_state(v) for name, v in views.items()}
    display.show_result(scene, first, "both", 0.6, [views["Red"].composite])
    display.show_result(scene, other, "decisions", 0.6, [views["Green"].composite])
    assert _view_state(views["Yellow"]) == before["Yellow"]
    display.show_result(scene, first, "none")   # mode none: the views showing `first` only
    assert _view_state(views["Red"]) == before["Red"]
    assert _helper_role(scene, views["Green"].composite.GetForegroundVolumeID()) == "veil decisions"
    display.hide_result(scene, other)
    assert _view_state(views["Green"]) == before["Green"]
    assert not _helpers(scene), "hide_result(result) leaves no display helper of its heatmaps behind"


def test_a_layer_the_user_changed_meanwhile_is_kept_the_rest_restored():
    scene, volume, views, _layout, user = _desk()
    result = _hand_answer(scene, volume, "Is there a lesion?")
    before = _view_state(views["Red"])
    display.show_result(scene, result, "both", 0.6, [views["Red"].composite])
    views["Red"].composite.SetForegroundVolumeID(user["pet"].GetID())   # the user fuses the PET meanwhile
    views["Red"].composite.SetForegroundOpacity(0.25)
    display.hide_result(scene)
    after = _view_state(views["Red"])
    assert (after["foreground"], after["foreground opacity"]) == (user["pet"].GetID(), 0.25)
    for key in ("background", "label", "label opacity", "label outline", "compositing", "overlay attribute"):
        assert after[key] == before[key], key


def test_when_no_view_shows_the_input_every_slice_view_gets_it_and_gets_its_own_back():
    scene, volume, views, layout, user = _desk()
    for view in views.values():
        view.composite.SetBackgroundVolumeID(user["prior"].GetID())
        view.composite.SetForegroundVolumeID(None)
    result = _hand_answer(scene, volume, "Is there a lesion?")
    before = {name: _view_state(v) for name, v in views.items()}
    arrangement = layout.GetViewArrangement()
    assert len(display.show_result(scene, result, "decisions")) == 3
    assert all(v.composite.GetBackgroundVolumeID() == volume.GetID() for v in views.values())
    assert layout.GetViewArrangement() == arrangement
    display.hide_result(scene)
    assert {name: _view_state(v) for name, v in views.items()} == before


def test_styles_and_modes_use_only_the_layers_they_need():
    scene, volume, views, _layout, user = _desk()
    result = _hand_answer(scene, volume, "Is there a lesion?")

    def shown(view):
        c = view.composite
        return tuple(_helper_role(scene, i) or i for i in (c.GetForegroundVolumeID(), c.GetLabelVolumeID())) + (
            bool(view.slice_node.GetUseLabelOutline()),)

    seg, attention, decisions = user["seg"].GetID(), result.attention.GetID(), result.decisions.GetID()
    expected = {   # (style, mode) -> (foreground, label, label outline) in the axial view (the CT, the user's labels)
        ("filled", "attention"): (attention, seg, False),
        ("filled", "decisions"): (None, decisions, False),
        ("filled", "both"): (attention, decisions, False),
        ("outline", "attention"): ("veil attention", seg, False),
        ("outline", "decisions"): ("veil decisions", "outline", True),
        ("outline", "both"): ("veil both", "outline", True),
    }
    for (style, mode), want in expected.items():
        display.show_result(scene, result, mode, 0.5, [views["Red"].composite], style=style)
        assert shown(views["Red"]) == want, (style, mode)
    # across the model's slices (coronal) the outline style only veils; the CT in the foreground moves back
    green = views["Green"]
    display.show_result(scene, result, "decisions", 0.5, [green.composite], style="outline")
    assert shown(green) == ("veil decisions", None, False)
    assert green.composite.GetBackgroundVolumeID() == volume.GetID()
    display.show_result(scene, result, "decisions", 0.5, [green.composite], style="filled")
    assert shown(green) == (volume.GetID(), decisions, False)   # filled needs no foreground: the user's is back
    display.hide_result(scene)
    assert green.composite.GetForegroundVolumeID() == volume.GetID()
    assert green.composite.GetBackgroundVolumeID() == user["pet"].GetID()
    with pytest.raises(ValueError):
        display.show_result(scene, result, "decisions", style="hatched")
    with pytest.raises(ValueError):
        display.show_result(scene, result, "everything")


def test_opacity_changes_only_the_overlay_layers_of_overlaid_views():
    scene, volume, views, _layout, user = _desk()
    result = _hand_answer(scene, volume, "Is there a lesion?")
    red, green = views["Red"].composite, views["Green"].composite
    display.show_result(scene, result, "both", 0.6, [red])
    display.show_result(scene, result, "decisions", 0.6, [green], style="filled")
    green.SetForegroundVolumeID(user["pet"].GetID())   # not ours: its opacity is the user's
    green.SetForegroundOpacity(0.45)
    yellow = _view_state(views["Yellow"])
    yellow_mtime = views["Yellow"].composite.GetMTime()
    assert {c.GetID() for c in display.set_opacity(scene, 0.3)} == {red.GetID(), green.GetID()}
    assert red.GetForegroundOpacity() == pytest.approx(0.3)
    assert red.GetLabelOpacity() == pytest.approx(min(1.0, display.OUTLINE_OPACITY_GAIN * 0.3))   # outlines
    assert green.GetLabelOpacity() == pytest.approx(0.3)                                        # filled labels
    assert green.GetForegroundOpacity() == pytest.approx(0.45)
    assert _view_state(views["Yellow"]) == yellow and views["Yellow"].composite.GetMTime() == yellow_mtime
    assert json.loads(red.GetAttribute(display.STATE))["opacity"] == pytest.approx(0.3)


def test_the_remembered_views_survive_a_saved_scene_and_helpers_are_not_saved(tmp_path):
    scene, volume, views, _layout, _user = _desk()
    result = _hand_answer(scene, volume, "Is there a lesion?")
    before = {name: _view_state(v) for name, v in views.items()}
    display.show_result(scene, result)
    helpers = _helpers(scene)
    assert helpers and all(h.GetHideFromEditors() and not h.GetSaveWithScene() for h in helpers)
    path = tmp_path / "scene.mrb"
    assert scene.WriteToMRB(str(path))
    fresh = make_scene()
    assert fresh.ReadFromMRB(str(path))
    assert not _helpers(fresh)
    from types import SimpleNamespace

    def node_of(class_name, name):
        return next(n for n in nodes_by_class(fresh, class_name) if n.GetLayoutName() == name)

    # the views as the reloaded scene has them (a new slice logic would reset its slice node)
    again = {name: SimpleNamespace(composite=node_of("vtkMRMLSliceCompositeNode", name),
                                   slice_node=node_of("vtkMRMLSliceNode", name)) for name in views}
    assert again["Red"].composite.GetAttribute(display.STATE)
    display.hide_result(fresh)
    for name, view in again.items():
        assert _view_state(view) == before[name], name


def test_one_veil_image_per_heatmap_pair_made_again_only_when_the_heatmaps_change():
    import slicer

    scene, volume, views, _layout, _user = _desk()
    result = _hand_answer(scene, volume, "Is there a lesion?")
    red = views["Red"].composite

    def veil():
        return scene.GetNodeByID(red.GetForegroundVolumeID())

    display.show_result(scene, result, "both")
    first = veil()
    image = first.GetImageData()
    views["Red"].render()
    display.show_result(scene, result, "decisions")
    assert veil() is not first and veil().GetImageData() is image   # another mode's table, the same codes
    display.hide_result(scene)
    display.show_result(scene, result, "both")
    assert veil() is first and first.GetImageData() is image        # kept between shows, not recomputed
    labels = slicer.util.arrayFromVolume(result.decisions)
    slicer.util.updateVolumeFromArray(result.decisions, np.where(labels == 2, 4, labels).astype(np.uint8))
    display.show_result(scene, result, "both")
    assert veil() is first and first.GetImageData() is not image    # the heatmap changed: codes made again
    assert colors.OVERLAY_CODES["pruned"] not in slicer.util.arrayFromVolume(first)


def test_veil_codes_wash_what_the_model_did_not_see_and_tint_above_the_uniform_share():
    labels, attention = _hand_heatmaps()
    report = _hand_report("q")
    codes = display.veil_codes(labels, attention, report)
    code = colors.OVERLAY_CODES
    assert (codes[list(DROPPED_SLICES)] == code["dropped"]).all()
    assert (codes[list(NOT_SENT)] == code["not sent"]).all()
    block = codes[0][::4, ::4]   # one voxel per token of a kept slice
    uniform = 1.0 / ROLES.size
    seen = (ROLES >= 3) & (PROBS > uniform)
    assert (block[(ROLES >= 3) & ~seen] == code["clear"]).all()
    assert (block[(ROLES == 2) & (PROBS <= uniform)] == code["pruned"]).all()
    assert ((block[seen] >= code["seen tint"]) & (block[seen] < code["seen tint"] + colors.TINT_LEVELS)).all()
    # the highest ratio to the uniform share gets the top tint; a lower ratio a lower one
    assert block[0, 0] == code["seen tint"] + colors.TINT_LEVELS - 1
    assert code["pruned tint"] <= block[2, 0] < code["pruned tint"] + colors.TINT_LEVELS - 1
    # the same volume sliced along I (numpy's last axis): the same codes, moved with the axis
    moved = display.veil_codes(labels.transpose(1, 2, 0), attention.transpose(1, 2, 0), _hand_report("q", "I"))
    np.testing.assert_array_equal(moved, codes.transpose(1, 2, 0))
    # in the decisions veil kept and contextual tokens stay clear, whatever their attention
    table = colors.veil_colors("decisions")
    assert table[codes[0][labels[0] >= 3], 3].max() == 0.0
    assert table[codes[0][labels[0] == 2], 3].min() > 0.3


# -- rendering ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rendered(stub):
    """The demo phantom (full size), answered, in an offscreen axial slice view that shows it."""
    import SimpleITK as sitk
    from medpruner.phantom import make_phantom_ct

    image = make_phantom_ct((32, 128, 128))
    array = sitk.GetArrayFromImage(image)
    spacing, origin = image.GetSpacing(), image.GetOrigin()
    ijk_to_ras = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    ijk_to_ras[:3, 3] = (-origin[0], -origin[1], origin[2])
    scene = make_scene()
    volume = add_volume(scene, array, ijk_to_ras, "phantom")
    volume.GetDisplayNode().AutoWindowLevelOff()
    volume.GetDisplayNode().SetWindowLevel(400, 40)
    result = ask_once(scene, volume, stub.url, "Is there a liver lesion?")
    view = SliceRenderer(scene)
    view.composite.SetBackgroundVolumeID(volume.GetID())
    view.fit()
    return scene, volume, result, view


def _go_to(view, volume, k) -> None:
    view.logic.SetSliceOffset((ijk_to_ras_array(volume) @ np.array([0, 0, k, 1.0]))[2])


def _render(view, result, volume, k, mode, style, opacity=0.6):
    """(plain, overlaid) renders of voxel slice k; the view is given back afterwards."""
    scene = view.composite.GetScene()
    _go_to(view, volume, k)
    plain = view.render()
    display.show_result(scene, result, mode, opacity, [view.composite], style=style)
    try:
        overlaid = view.render()
    finally:
        display.hide_result(scene)
    assert np.array_equal(view.render(), plain), "hiding the overlay gives the plain view back"
    return plain.astype(float), overlaid.astype(float)


def _labels_on_view(view, volume, labels):
    """The decision label under every rendered pixel (-1 far outside the volume, -2 at its very edge)."""
    ras_to_ijk = np.linalg.inv(ijk_to_ras_array(volume))
    xy_to_ras = view.slice_node.GetXYToRAS()
    m = np.array([[xy_to_ras.GetElement(r, c) for c in range(4)] for r in range(4)])
    size = view.size
    yy, xx = np.mgrid[0:size, 0:size]
    xy = np.stack([xx.ravel(), (size - 1 - yy).ravel(), np.zeros(size * size), np.ones(size * size)])
    continuous = (ras_to_ijk @ m @ xy)[:3]
    ijk = np.rint(continuous).astype(int)
    dims = np.array(labels.shape[::-1])[:, None]
    inside = np.all((ijk >= 0) & (ijk < dims), axis=0)
    far_outside = np.any((continuous < -1.5) | (continuous > dims + 0.5), axis=0)
    out = np.full(size * size, -2)
    out[far_outside] = -1
    out[inside] = labels[ijk[2, inside], ijk[1, inside], ijk[0, inside]]
    return out.reshape(size, size)


def _all_within(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels whose whole (2 radius + 1)^2 neighbourhood is in `mask` (and in the picture)."""
    padded = np.pad(mask, radius, constant_values=False)
    out = mask.copy()
    h, w = mask.shape
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out &= padded[dy:dy + h, dx:dx + w]
    return out


def _slices(result):
    rows = result.report["slices"]["per_slice"]
    kept_k = next(r["voxel_index"] for r in rows if r["kept"] and r["tokens_kept"] < r["tokens_total"])
    dropped = [r["voxel_index"] for r in rows if not r["kept"]]
    assert dropped, "the phantom has repeated slices the filter must drop"
    return kept_k, dropped[0]


def test_outline_style_leaves_the_anatomy_and_darkens_what_the_model_did_not_see(rendered, tmp_path):
    import slicer
    from PIL import Image

    scene, volume, result, view = rendered
    kept_k, dropped_k = _slices(result)
    labels = slicer.util.arrayFromVolume(result.decisions)
    plain, img = _render(view, result, volume, kept_k, "decisions", "outline")
    Image.fromarray(img.astype(np.uint8)).save(tmp_path / "outline_kept.png")
    on_view = _labels_on_view(view, volume, labels)
    kept = on_view == colors.KEPT
    assert kept.sum() > 500
    # inside kept tokens, away from their outline, the image is the plain image
    inside = _all_within(kept, 4)
    assert inside.sum() > 200
    assert np.abs(img - plain)[inside].max() <= 2
    # pruned tokens are darker (the wash), where there is anatomy to darken
    pruned = _all_within(on_view == 2, 4) & (plain.mean(axis=2) > 40)
    assert pruned.sum() > 200
    assert (img[pruned].mean(axis=1) < 0.8 * plain[pruned].mean(axis=1)).mean() > 0.95
    # the kept tokens' borders carry the outline colour (the report's kept colour, opaque at this opacity)
    kept_rgb = np.array(result.report["labels"][str(colors.KEPT)]["rgba"][:3]) * 255
    border = kept & ~_all_within(kept, 1) & _all_within(on_view >= 0, 3)
    near = np.abs(img - kept_rgb).max(axis=2) <= 3
    assert border.sum() > 50
    assert near[border].mean() > 0.6, near[border].mean()
    assert near[inside].mean() == 0.0
    # well outside the volume the overlay changes nothing
    assert np.array_equal(img[on_view == -1], plain[on_view == -1])

    plain_d, img_d = _render(view, result, volume, dropped_k, "decisions", "outline")
    Image.fromarray(img_d.astype(np.uint8)).save(tmp_path / "outline_dropped.png")
    on_dropped = _labels_on_view(view, volume, labels)
    assert (on_dropped == 1).mean() > 0.5
    body = (on_dropped == 1) & (plain_d.mean(axis=2) > 40)
    assert (img_d[body].mean(axis=1) < 0.7 * plain_d[body].mean(axis=1)).mean() > 0.95
    assert np.abs(img_d - np.round(img_d.mean(axis=2, keepdims=True)))[body].max() <= 2, "a wash, not a colour"


def test_outline_style_attention_tints_only_tokens_above_the_uniform_share(rendered):
    import slicer

    scene, volume, result, view = rendered
    kept_k, _ = _slices(result)
    plain, img = _render(view, result, volume, kept_k, "attention", "outline")
    attention = slicer.util.arrayFromVolume(result.attention)
    tokens = next(r["tokens_total"] for r in result.report["slices"]["per_slice"] if r["voxel_index"] == kept_k)
    ratio = _labels_on_view(view, volume, (attention * tokens * 1000).astype(np.int64)) / 1000.0
    low = _all_within((ratio > 0) & (ratio <= 0.999), 2)
    high = _all_within(ratio > 1.5, 2)
    assert low.sum() > 100 and high.sum() > 20
    assert np.abs(img - plain)[low].max() <= 2                        # at or below the uniform share: untouched
    assert (np.abs(img - plain)[high].max(axis=1) > 10).mean() > 0.9  # above it: tinted


def test_filled_style_shows_kept_tokens_and_dropped_slices_in_colour(rendered, tmp_path):
    import slicer
    from PIL import Image

    _scene, volume, result, view = rendered
    kept_k, dropped_k = _slices(result)
    labels = slicer.util.arrayFromVolume(result.decisions)
    plain_k, kept_img = _render(view, result, volume, kept_k, "decisions", "filled")
    Image.fromarray(kept_img.astype(np.uint8)).save(tmp_path / "kept.png")
    on_kept = _labels_on_view(view, volume, labels)
    plain_d, dropped_img = _render(view, result, volume, dropped_k, "decisions", "filled")
    on_dropped = _labels_on_view(view, volume, labels)
    assert (on_dropped == 1).mean() > 0.5
    tint_kept = (kept_img - plain_k)[on_kept == 4].mean(axis=0)
    tint_pruned = (kept_img - plain_k)[on_kept == 2].mean(axis=0)
    tint_dropped = (dropped_img - plain_d)[on_dropped == 1].mean(axis=0)
    # kept tokens are tinted red, pruned ones blue, a dropped slice grey (no hue)
    assert tint_kept[0] > tint_kept[1] + 20 and tint_kept[0] > tint_kept[2] + 20
    assert tint_pruned[2] > tint_pruned[0] + 10
    assert np.ptp(tint_dropped) < 0.25 * np.abs(tint_dropped).max() + 2
    assert np.linalg.norm(tint_kept - tint_dropped) > 40
    assert np.array_equal(kept_img[on_kept == -1], plain_k[on_kept == -1])
    # a slice that was not sent to the model (label 0) is left as it is
    original = labels.copy()
    slicer.util.updateVolumeFromArray(result.decisions, np.zeros_like(labels))
    try:
        plain, untouched = _render(view, result, volume, kept_k, "decisions", "filled")
    finally:
        slicer.util.updateVolumeFromArray(result.decisions, original)
    assert np.array_equal(untouched, plain)


# -- next / previous kept slice -------------------------------------------------------------------
def test_jump_to_next_and_previous_kept_slice(rendered):
    _scene, volume, result, view = rendered
    kept = result.report["slices"]["kept_voxel_indices"]
    m = ijk_to_ras_array(volume)
    z_of = lambda k: (m @ np.array([0, 0, k, 1.0]))[2]
    view.logic.SetSliceOffset(z_of(0) - 10.0)
    visited = []
    while (index := display.jump_to_kept_slice(result, view.slice_node, +1)) is not None:
        visited.append(index)
        assert view.logic.GetSliceOffset() == pytest.approx(z_of(kept[index]), abs=1e-6)
    assert visited == list(range(len(kept)))
    assert display.jump_to_kept_slice(result, view.slice_node, -1) == len(kept) - 2


def test_jump_on_a_volume_whose_axial_slices_run_along_I(stub):
    """IJK-to-RAS permuted: I is superior (the slice axis), J right-left, K anterior-posterior."""
    from medpruner.phantom import phantom_ct_array

    zyx = phantom_ct_array((24, 48, 48))
    array = np.ascontiguousarray(zyx.transpose(1, 2, 0))   # (k, j, i) = (y, x, z)
    matrix = np.zeros((4, 4))
    matrix[:3, 0] = (0.0, 0.0, 2.5)     # I -> S
    matrix[:3, 1] = (-0.8, 0.0, 0.0)    # J -> L to R flipped, as LPS
    matrix[:3, 2] = (0.0, -0.8, 0.0)    # K -> P
    matrix[:3, 3] = (20.0, 30.0, -40.0)
    matrix[3, 3] = 1.0
    scene = make_scene()
    volume = add_volume(scene, array, matrix, "permuted phantom")
    result = ask_once(scene, volume, stub.url, "Is there a liver lesion?")
    report = result.report
    assert report["input"]["slice_axis_ijk"] == "I"
    kept = report["slices"]["kept_voxel_indices"]
    assert 1 < len(kept) < array.shape[2]
    views = {o: SliceRenderer(scene, n, o, 64) for n, o in (("Red", "Axial"), ("Yellow", "Sagittal"),
                                                           ("Green", "Coronal"))}
    assert display.best_slice_node(result, [v.slice_node for v in views.values()]) is views["Axial"].slice_node
    view = views["Axial"]
    view.composite.SetBackgroundVolumeID(volume.GetID())
    view.fit()
    centre = (np.array(array.shape[::-1]) - 1) / 2.0
    ras_of = lambda i: (matrix @ np.array([i, centre[1], centre[2], 1.0]))[:3]
    view.logic.SetSliceOffset(ras_of(0)[2] - 10.0)
    visited = []
    while (index := display.jump_to_kept_slice(result, view.slice_node, +1)) is not None:
        visited.append(index)
        assert view.logic.GetSliceOffset() == pytest.approx(ras_of(kept[index])[2], abs=1e-6)
        normal_offset = (view.slice_node.GetSliceToRAS().GetElement(2, 3))   # axial: the normal is S
        assert normal_offset == pytest.approx(ras_of(kept[index])[2], abs=1e-6)   # the kept slice's RAS centre
    assert visited == list(range(len(kept)))
    assert display.jump_to_kept_slice(result, view.slice_node, -1) == len(kept) - 2
