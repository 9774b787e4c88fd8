"""Scene logic on real MRML nodes (slicer-core): export geometry, result nodes, .mrb (display: test_slicer_display.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core (pip install slicer-core) runs the Slicer scene tests")

from MedPrunerSlicerLib import display
from MedPrunerSlicerLib.ask import AskSession
from MedPrunerSlicerLib.client import MedPrunerClient, build_params
from MedPrunerSlicerLib.errors import ResultError, VolumeExportError
from MedPrunerSlicerLib.nrrd_io import decode_nrrd, encode_nrrd
from MedPrunerSlicerLib.result_nodes import create_result_nodes, find_results
from MedPrunerSlicerLib.volume_export import (
    ijk_to_ras_array,
    snapshot_volume,
    volume_fingerprint,
)
from slicer_helpers import SliceRenderer, add_volume, ask_once, make_scene

# An oblique, anisotropic, axis-permuted and flipped geometry: RAS columns for I, J, K, origin.
_R = np.array([[0.0, 0.96, 0.28], [-1.0, 0.0, 0.0], [0.0, -0.28, 0.96]])
OBLIQUE = np.eye(4)
OBLIQUE[:3, :3] = _R @ np.diag([0.9, 1.3, 2.5])
OBLIQUE[:3, 3] = (12.5, -40.25, 101.0)
AXIAL = np.diag([-0.8, -0.8, 2.5, 1.0])   # LPS identity direction, as the phantom
AXIAL[:3, 3] = (63.6, 51.1, -150.0)


def _phantom(shape=(24, 64, 64)):
    from medpruner.phantom import phantom_ct_array

    return phantom_ct_array(shape)


@pytest.fixture(scope="module")
def asked(stub):
    """One question answered through the stand-in server over HTTP, with its scene."""
    scene = make_scene()
    volume = add_volume(scene, _phantom(), OBLIQUE, "oblique phantom")
    before = volume_fingerprint(volume)
    result = ask_once(scene, volume, stub.url, compare=True)
    job = stub.jobs[result.answer.GetAttribute("MedPruner.JobId")]
    return scene, volume, before, result, job


# -- export ---------------------------------------------------------------------------------------
def test_export_roundtrip_exact_in_simpleitk_and_slicer(tmp_path):
    import SimpleITK as sitk
    import slicer

    scene = make_scene()
    array = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7) - 100
    volume = add_volume(scene, array, OBLIQUE)
    data = snapshot_volume(volume).to_nrrd()
    # our reader: exact
    back, matrix = decode_nrrd(data)
    np.testing.assert_array_equal(back, array)
    np.testing.assert_array_equal(matrix, OBLIQUE)
    # SimpleITK (what the server reads): LPS = diag(-1, -1, 1) RAS
    path = tmp_path / "v.nrrd"
    path.write_bytes(data)
    image = sitk.ReadImage(str(path))
    flip = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)
    np.testing.assert_allclose(image.GetOrigin(), flip @ OBLIQUE[:3, 3], atol=1e-12)
    np.testing.assert_allclose(image.GetSpacing(), np.linalg.norm(OBLIQUE[:3, :3], axis=0), atol=1e-12)
    np.testing.assert_allclose(np.array(image.GetDirection()).reshape(3, 3), flip @ _R, atol=1e-12)
    # voxel (i, j, k) lands on the same physical point in both worlds
    for ijk in [(0, 0, 0), (6, 5, 4), (3, 1, 2)]:
        lps = image.TransformIndexToPhysicalPoint(ijk)
        ras = OBLIQUE @ np.array([*ijk, 1.0])
        np.testing.assert_allclose(flip @ np.array(lps), ras[:3], atol=1e-9)
    # Slicer's own NRRD reader gives the node's geometry back
    reloaded = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "reloaded")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(reloaded)
    np.testing.assert_allclose(ijk_to_ras_array(reloaded), OBLIQUE, atol=1e-9)
    # and a SimpleITK-written file (the server's heatmaps) decodes to the same geometry
    sitk.WriteImage(image, str(tmp_path / "w.nrrd"), useCompression=True)
    back2, matrix2 = decode_nrrd((tmp_path / "w.nrrd").read_bytes())
    np.testing.assert_array_equal(back2, array)
    np.testing.assert_allclose(matrix2, OBLIQUE, atol=1e-12)


def test_nrrd_ras_space_and_types():
    for dtype in (np.uint8, np.int8, np.uint16, np.int32, np.float32, np.float64):
        array = (np.arange(2 * 3 * 4) % 7).astype(dtype).reshape(2, 3, 4)
        back, matrix = decode_nrrd(encode_nrrd(array, OBLIQUE, compress=dtype != np.float64))
        assert back.dtype == dtype
        np.testing.assert_array_equal(back, array)
        np.testing.assert_array_equal(matrix, OBLIQUE)
    text = (b"NRRD0004\ntype: uchar\ndimension: 3\nspace: right-anterior-superior\nsizes: 2 2 2\n"
            b"space directions: (2,0,0) (0,3,0) (0,0,4)\nencoding: raw\nspace origin: (1,2,3)\n\n" + bytes(range(8)))
    _, matrix = decode_nrrd(text)
    np.testing.assert_array_equal(matrix, [[2, 0, 0, 1], [0, 3, 0, 2], [0, 0, 4, 3], [0, 0, 0, 1]])


def test_export_sends_only_voxels_and_geometry():
    scene = make_scene()
    volume = add_volume(scene, _phantom((4, 8, 8)), AXIAL, "Doe^John 1234")
    volume.SetAttribute("DICOM.PatientName", "Doe^John")
    header = snapshot_volume(volume).to_nrrd().split(b"\n\n", 1)[0].decode()
    assert "Doe" not in header and "1234" not in header
    keys = {line.split(":")[0] for line in header.splitlines()[1:]}
    assert keys == {"type", "dimension", "space", "sizes", "space directions", "kinds", "endian", "encoding",
                    "space origin"}


@pytest.mark.parametrize("case", ["none", "empty", "vector", "single_slice", "constant", "nan", "too_large",
                                  "multivolume", "sequence"])
def test_export_refuses_unusable_volumes(case):
    import slicer

    scene = make_scene()
    arr = _phantom((4, 8, 8))
    node = None
    if case == "empty":
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    elif case == "vector":
        node = add_volume(scene, np.stack([arr, arr, arr], axis=-1), AXIAL, class_name="vtkMRMLVectorVolumeNode")
    elif case == "single_slice":
        node = add_volume(scene, arr[:1], AXIAL)
    elif case == "constant":
        node = add_volume(scene, np.zeros_like(arr), AXIAL)
    elif case == "nan":
        bad = arr.astype(np.float32)
        bad[0, 0, 0] = np.nan
        node = add_volume(scene, bad, AXIAL)
    elif case == "too_large":
        node = add_volume(scene, np.arange(2049 * 4, dtype=np.uint8).reshape(2, 2, 2049), AXIAL)
    elif case == "multivolume":
        node = add_volume(scene, arr, AXIAL)
        node.SetAttribute("MultiVolume.NumberOfFrames", "10")
    elif case == "sequence":
        node = add_volume(scene, arr, AXIAL)
        browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode")
        sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode")
        (getattr(browser, "SetAndObservePrimarySequenceNodeID", None)
         or browser.SetAndObserveMasterSequenceNodeID)(sequence.GetID())
        browser.AddProxyNode(node, sequence, False)
        assert browser.IsProxyNodeID(node.GetID())
    with pytest.raises(VolumeExportError) as info:
        snapshot_volume(node)
    assert info.value.message and info.value.hint
    words = {"none": "No input", "empty": "empty", "vector": "VectorVolume", "single_slice": "2D",
             "constant": "constant", "nan": "NaN", "too_large": "too large", "multivolume": "4D", "sequence": "4D"}
    assert words[case] in info.value.message
    del slicer


# -- result nodes ---------------------------------------------------------------------------------
def test_result_heatmaps_have_the_input_geometry_and_the_servers_voxels(asked):
    scene, volume, before, result, job = asked
    for node, name in ((result.attention, "attention"), (result.decisions, "kept")):
        np.testing.assert_array_equal(ijk_to_ras_array(node), ijk_to_ras_array(volume))
        server_array, server_matrix = decode_nrrd((job["out"] / f"heatmap_{name}.nrrd").read_bytes())
        np.testing.assert_allclose(server_matrix, OBLIQUE, atol=1e-9)
        import slicer

        np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), server_array)
    assert result.decisions.IsA("vtkMRMLLabelMapVolumeNode")
    assert volume_fingerprint(volume) == before   # the input was only read


def test_colour_tables_match_the_report_and_hide_zeros(asked):
    _scene, _volume, _before, result, job = asked
    report = job["report"]
    colors = result.decisions.GetDisplayNode().GetColorNode()
    assert colors.GetNumberOfColors() == len(report["labels"])
    for key, entry in report["labels"].items():
        rgba = [0.0] * 4
        colors.GetColor(int(key), rgba)
        assert colors.GetColorName(int(key)) == entry["name"]
        expected = list(entry["rgba"])
        if int(key) == 0:
            expected[3] = 0.0
        np.testing.assert_allclose(rgba, expected, atol=0.51 / 255)   # stored as 8-bit colours
    att_display = result.attention.GetDisplayNode()
    ramp = att_display.GetColorNode()
    rgba = [1.0] * 4
    ramp.GetColor(0, rgba)
    assert rgba[3] == 0.0
    assert ramp.GetNumberOfColors() == 256
    lum = []
    for i in range(1, 256):
        ramp.GetColor(i, rgba)
        assert rgba[3] == 1.0
        lum.append(0.2126 * rgba[0] + 0.7152 * rgba[1] + 0.0722 * rgba[2])
    assert np.all(np.diff(lum) > 0), "the attention ramp must brighten monotonically"
    import slicer

    att = slicer.util.arrayFromVolume(result.attention)
    positive = att[att > 0]
    assert att_display.GetApplyThreshold()
    assert 0 < att_display.GetLowerThreshold() <= positive.min()
    assert att_display.GetUpperThreshold() >= positive.max()
    # every positive value maps to a colour entry >= 1 (entry 0 is the transparent one)
    lo, hi = att_display.GetWindowLevelMin(), att_display.GetWindowLevelMax()
    assert (positive.min() - lo) / (hi - lo) * 255 >= 1.0 - 1e-6


def test_table_chart_and_text_contents(asked):
    import slicer

    _scene, _volume, _before, result, job = asked
    report = job["report"]
    rows = report["slices"]["per_slice"]
    table = result.table
    assert table.GetNumberOfRows() == len(rows)
    col = lambda name: slicer.util.arrayFromTableColumn(table, name)
    np.testing.assert_array_equal(col("model slice"), [r["model_index"] for r in rows])
    np.testing.assert_array_equal(col("voxel slice"), [r["voxel_index"] for r in rows])
    np.testing.assert_array_equal(col("kept"), [int(r["kept"]) for r in rows])
    np.testing.assert_array_equal(col("tokens kept"), [r["tokens_kept"] for r in rows])
    np.testing.assert_array_equal(col("tokens total"), [r["tokens_total"] for r in rows])
    np.testing.assert_allclose(col("retention"), [r["retention"] for r in rows])
    l1 = [np.nan if r["l1_to_anchor"] is None else r["l1_to_anchor"] for r in rows]
    np.testing.assert_allclose(col("L1 to anchor"), l1, equal_nan=True)
    np.testing.assert_allclose(col("gamma"), report["config"]["gamma"])

    tokens_series = [result.tokens_chart.GetNthPlotSeriesNode(i)
                     for i in range(result.tokens_chart.GetNumberOfPlotSeriesNodes())]
    assert [(s.GetXColumnName(), s.GetYColumnName()) for s in tokens_series] == [("voxel slice", "tokens kept")]
    filter_series = [result.filter_chart.GetNthPlotSeriesNode(i)
                     for i in range(result.filter_chart.GetNumberOfPlotSeriesNodes())]
    assert [s.GetYColumnName() for s in filter_series] == ["L1 to anchor", "gamma"]
    assert all(s.GetTableNode() is table for s in tokens_series + filter_series)

    text = result.answer.GetText()
    for piece in (report["question"], report["answer"], report["model_id"], "Slices kept", "Visual tokens kept",
                  "gamma 0.05", "Unpruned answer", report["unpruned"]["answer"]):
        assert piece in text
    assert json.loads(result.report_node.GetText()) == report

    from MedPrunerSlicerLib.scene_utils import subject_hierarchy

    sh = subject_hierarchy(result.answer.GetScene())
    assert sh.GetItemName(result.folder_item) == report["question"]
    assert sh.GetItemAttribute(result.folder_item, "MedPruner.Result") == "1"
    for node in result.own_nodes():
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == result.folder_item
    # the heatmaps, which follow-ups may share, are beside the answers' folders, named after the input
    heatmaps_folder = sh.GetItemParent(sh.GetItemByDataNode(result.attention))
    assert sh.GetItemName(heatmaps_folder) == "MedPruner heatmaps"
    assert sh.GetItemParent(heatmaps_folder) == sh.GetItemParent(result.folder_item)
    assert sh.GetItemParent(sh.GetItemByDataNode(result.decisions)) == heatmaps_folder
    assert result.attention.GetName() == "oblique phantom attention"


def test_a_result_that_does_not_fit_the_input_leaves_nothing_behind(asked):
    scene, volume, _before, result, job = asked
    count = scene.GetNumberOfNodes()
    kept = decode_nrrd((job["out"] / "heatmap_kept.nrrd").read_bytes())
    attention = decode_nrrd((job["out"] / "heatmap_attention.nrrd").read_bytes())
    shifted = (attention[0], attention[1].copy())
    shifted[1][0, 3] += 5.0
    with pytest.raises(ResultError, match="geometry"):
        create_result_nodes(scene, volume, job["report"], kept, shifted)
    with pytest.raises(ResultError, match="voxels"):
        create_result_nodes(scene, volume, job["report"], (kept[0][:-1], kept[1]), attention)
    broken = dict(job["report"], labels={"1": {"name": "x", "rgba": [0, 0, 0, 1]}})
    with pytest.raises(ResultError):
        create_result_nodes(scene, volume, broken, kept, attention)
    assert scene.GetNumberOfNodes() == count
    assert len(find_results(scene)) == 1


def test_mrb_save_and_reload_keeps_every_result_node(asked, tmp_path):
    import slicer

    scene, volume, _before, result, job = asked
    path = tmp_path / "scene.mrb"
    assert scene.WriteToMRB(str(path))
    fresh = make_scene()
    assert fresh.ReadFromMRB(str(path))
    results = find_results(fresh)
    assert len(results) == 1
    again = results[0]
    assert again.question == result.question
    assert again.input_volume is not None and again.input_volume.GetName() == volume.GetName()
    for a, b in ((again.attention, result.attention), (again.decisions, result.decisions)):
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(a), slicer.util.arrayFromVolume(b))
        np.testing.assert_allclose(ijk_to_ras_array(a), ijk_to_ras_array(b), atol=1e-9)
    assert again.decisions.IsA("vtkMRMLLabelMapVolumeNode")
    assert again.decisions.GetDisplayNode().GetColorNode().GetColorName(4) == job["report"]["labels"]["4"]["name"]
    att = again.attention.GetDisplayNode()
    assert att.GetApplyThreshold() and att.GetLowerThreshold() > 0 and not att.GetInterpolate()
    rgba = [1.0] * 4
    att.GetColorNode().GetColor(0, rgba)
    assert rgba[3] == 0.0
    np.testing.assert_array_equal(slicer.util.arrayFromTableColumn(again.table, "tokens kept"),
                                  slicer.util.arrayFromTableColumn(result.table, "tokens kept"))
    assert again.tokens_chart.GetNthPlotSeriesNode(0).GetTableNode() is again.table
    assert again.answer.GetText() == result.answer.GetText()
    assert json.loads(again.report_node.GetText()) == job["report"]
    assert again.answer.GetAttribute("MedPruner.JobId") == result.answer.GetAttribute("MedPruner.JobId")
    from MedPrunerSlicerLib.scene_utils import subject_hierarchy

    sh = subject_hierarchy(fresh)
    assert sh.GetItemName(again.folder_item) == result.question
    assert sh.GetItemAttribute(again.folder_item, "MedPruner.Result") == "1"


def test_past_questions_stay_and_show_again(stub):
    scene = make_scene()
    volume = add_volume(scene, _phantom((8, 32, 32)), AXIAL, "phantom")
    first = ask_once(scene, volume, stub.url, "First question?")
    second = ask_once(scene, volume, stub.url, "Second question?", enabled=False)
    assert [r.question for r in find_results(scene)] == ["First question?", "Second question?"]
    view = SliceRenderer(scene)
    display.show_result(scene, first, "both", 0.5, style="filled")
    assert view.composite.GetForegroundVolumeID() == first.attention.GetID()
    assert view.composite.GetLabelVolumeID() == first.decisions.GetID()
    assert view.composite.GetBackgroundVolumeID() == volume.GetID()
    display.show_result(scene, second, "decisions", 0.3, style="filled")
    assert view.composite.GetForegroundVolumeID() is None
    assert view.composite.GetLabelVolumeID() == second.decisions.GetID()
    assert view.composite.GetLabelOpacity() == pytest.approx(0.3)
    display.set_opacity(scene, 0.8)
    assert view.composite.GetLabelOpacity() == pytest.approx(0.8)
    assert second.report["config"]["enabled"] is False


def test_heatmap_downloads_show_bytes_and_rate(stub):
    """The heatmaps come in chunks with the same progress as the upload (a slow link shows it moving)."""
    import re

    scene = make_scene()
    volume = add_volume(scene, _phantom(), AXIAL)
    stages, done, errors = [], [], []
    session = AskSession(scene, lambda: MedPrunerClient(stub.url), on_done=done.append, on_error=errors.append,
                         on_progress=lambda *event: stages.append(event), poll_interval=0.02)
    session.start(volume, build_params("Where?", max_new_tokens=2))
    session.wait(60)
    assert not errors and len(done) == 1
    receiving = [(fraction, text) for stage, fraction, text in stages if text.startswith("Receiving the heatmaps:")]
    assert len(receiving) >= 2, stages     # at least the end of each of the two heatmaps
    assert all(re.fullmatch(r"Receiving the heatmaps: \d+\.\d / \d+\.\d MB \(\d+\.\d MB/s\)", t) for _f, t in receiving)
    assert receiving[-1][0] == 1.0
