"""One pair of heatmap volumes per prepared volume (slicer-core, real MRML nodes).

A follow-up the server answered from the prepared volume of an earlier answer (report `prefix_reused`,
same `volume_id`) has exactly that answer's heatmaps: it points at them instead of storing another
~390 MB copy, and the Ask path does not even download them. The first tests build results from a
synthetic report (fast, every case by hand); the last ones go through a real `medpruner serve`.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core (pip install slicer-core) runs the Slicer scene tests")

from MedPrunerSlicerLib.ask import AskSession
from MedPrunerSlicerLib.client import MedPrunerClient, build_params
from MedPrunerSlicerLib.errors import ResultError
from MedPrunerSlicerLib.nrrd_io import decode_nrrd
from MedPrunerSlicerLib.result_nodes import (
    GEOMETRY_TOLERANCE_MM,
    HEATMAPS_FOLDER,
    create_result_nodes,
    find_heatmaps,
    find_results,
    heatmap_volume_ids,
    remove_result,
    result_from_answer_node,
)
from MedPrunerSlicerLib.scene_utils import nodes_by_class, place_in_folder, subject_hierarchy
from MedPrunerSlicerLib.volume_export import ijk_to_ras_array
from slicer_helpers import SERVER_TOKEN, add_volume, make_scene

SHAPE = (6, 8, 10)                     # k, j, i
OBLIQUE = np.eye(4)
OBLIQUE[:3, :3] = np.array([[0.0, 0.96, 0.28], [-1.0, 0.0, 0.0], [0.0, -0.28, 0.96]]) @ np.diag([0.9, 1.3, 2.5])
OBLIQUE[:3, 3] = (12.5, -40.25, 101.0)
SERVER = "http://127.0.0.1:8765"
VOLUME_A, VOLUME_B = "a" * 32, "b" * 32


def _report(question: str, volume_id: str = VOLUME_A, reused: bool = False) -> dict:
    """A report with every field the scene logic reads, for a SHAPE volume sliced along K."""
    from medpruner.heatmaps import KEPT_LABELS

    rows = [{"model_index": k, "voxel_index": k, "slab": [k, k + 1], "kept": k % 2 == 0,
             "l1_to_anchor": None if k == 0 else 0.1 * k, "tokens_total": 4, "tokens_kept": 2 if k % 2 == 0 else 0,
             "retention": 0.5 if k % 2 == 0 else 0.0} for k in range(SHAPE[0])]
    return {
        "question": question, "answer": f"answer to {question}", "model_id": "tiny", "model_family": "qwen3_vl",
        "config": {"enabled": True, "gamma": 0.05, "tau": 0.9}, "input": {"slice_axis_ijk": "K", "notes": []},
        "slices": {"total": SHAPE[0], "sent": SHAPE[0], "kept": 3, "kept_voxel_indices": [0, 2, 4],
                   "per_slice": rows},
        "tokens": {"total_visual": 24, "kept_visual": 6, "retention": 0.25},
        "labels": {str(k): {"name": v["name"], "rgba": list(v["rgba"])} for k, v in KEPT_LABELS.items()},
        "volume_id": volume_id, "prefix_reused": reused, "prepare_s": 1.5,
    }


def _heatmaps(matrix=OBLIQUE, seed: int = 0):
    """(kept, attention) as the client decodes them: (array, IJK-to-RAS) each."""
    rng = np.random.default_rng(seed)
    kept = rng.integers(0, 5, size=SHAPE).astype(np.uint8)
    attention = np.where(kept >= 3, rng.random(SHAPE), 0.0).astype(np.float32)
    return (kept, np.array(matrix, dtype=float)), (attention, np.array(matrix, dtype=float))


def _scene():
    scene = make_scene()
    volume = add_volume(scene, np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE), OBLIQUE, "CT chest")
    return scene, volume


def _answer(scene, volume, question: str, volume_id: str = VOLUME_A, reused: bool = False, download: bool = True,
            seed: int = 0, server: str = SERVER):
    kept, attention = _heatmaps(seed=seed) if download else (None, None)
    return create_result_nodes(scene, volume, _report(question, volume_id, reused), kept, attention, "job",
                               server)


def _volume_count(scene) -> int:
    return len(nodes_by_class(scene, "vtkMRMLScalarVolumeNode"))   # labelmaps included (a subclass)


def _children(sh, item: int) -> list[int]:
    import vtk

    ids = vtk.vtkIdList()
    sh.GetItemChildren(item, ids)
    return [ids.GetId(i) for i in range(ids.GetNumberOfIds())]


def _heatmap_folders(scene) -> list[int]:
    import vtk

    sh = subject_hierarchy(scene)
    ids = vtk.vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), ids, True)
    return [ids.GetId(i) for i in range(ids.GetNumberOfIds()) if sh.GetItemName(ids.GetId(i)) == HEATMAPS_FOLDER]


def _node_count(scene) -> int:
    """Nodes in the scene, less the colour tables every result shares (made once, kept)."""
    nodes = (scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes()))
    return sum(1 for node in nodes if not node.GetAttribute("MedPruner.ColorTable"))


# -- sharing ----------------------------------------------------------------------------------------
def test_a_follow_up_from_the_same_prepared_volume_points_at_the_same_heatmaps():
    import slicer

    scene, volume = _scene()
    first = _answer(scene, volume, "Is there a lesion?")
    assert _volume_count(scene) == 3
    follow = _answer(scene, volume, "Where is it?", reused=True, download=False)
    again = _answer(scene, volume, "How large is it?", reused=True)   # downloaded anyway: still shared
    assert _volume_count(scene) == 3
    assert follow.attention is first.attention and follow.decisions is first.decisions
    assert again.attention is first.attention and again.decisions is first.decisions
    # each answer keeps its own text, report, table and charts
    own = [r.own_nodes() for r in (first, follow, again)]
    assert len({n.GetID() for nodes in own for n in nodes}) == 3 * len(own[0])
    assert [r.question for r in find_results(scene)] == ["Is there a lesion?", "Where is it?", "How large is it?"]
    assert json.loads(follow.report_node.GetText())["question"] == "Where is it?"
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(follow.decisions), _heatmaps()[0][0])

    # named after the input, recorded by volume_id, in one folder beside the input (not in an answer's folder)
    assert (first.attention.GetName(), first.decisions.GetName()) == ("CT chest attention", "CT chest decisions")
    for node in (first.attention, first.decisions):
        assert node.GetAttribute("MedPruner.VolumeId") == VOLUME_A
    sh = subject_hierarchy(scene)
    folders = _heatmap_folders(scene)
    assert len(folders) == 1 and sh.GetItemParent(folders[0]) == sh.GetSceneItemID()
    for node in (first.attention, first.decisions):
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == folders[0]
    for result in (first, follow, again):
        assert all(sh.GetItemParent(sh.GetItemByDataNode(n)) == result.folder_item for n in result.own_nodes())
    assert heatmap_volume_ids(scene, volume, SERVER) == frozenset([VOLUME_A])
    assert find_heatmaps(scene, volume, VOLUME_A, SERVER) == (first.attention, first.decisions)


def test_other_prepared_volumes_inputs_or_servers_get_their_own_pair():
    scene, volume = _scene()
    first = _answer(scene, volume, "Is there a lesion?")
    other_settings = _answer(scene, volume, "Is there a lesion?", volume_id=VOLUME_B, reused=False, seed=1)
    assert other_settings.attention is not first.attention
    assert other_settings.attention.GetName() == "CT chest attention 2"
    assert other_settings.decisions.GetName() == "CT chest decisions 2"
    # the server prepared the same volume_id again (it had forgotten it): a new pair, and later follow-ups
    # share the newest, the one its cache holds now
    prepared_again = _answer(scene, volume, "Again?", reused=False, seed=2)
    assert prepared_again.attention is not first.attention
    follow = _answer(scene, volume, "Where?", reused=True, download=False)
    assert follow.attention is prepared_again.attention
    # another node with the same voxels, or another server, never shares
    twin = add_volume(scene, np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE), OBLIQUE, "twin")
    with pytest.raises(ResultError, match="Ask again"):
        _answer(scene, twin, "Twin?", reused=True, download=False)
    twin_result = _answer(scene, twin, "Twin?", reused=True)
    assert twin_result.attention not in (first.attention, prepared_again.attention)
    assert twin_result.attention.GetName() == "twin attention"
    with pytest.raises(ResultError, match="Ask again"):
        _answer(scene, volume, "Elsewhere?", reused=True, download=False, server="http://10.0.0.2:8765")
    assert _volume_count(scene) == 2 + 2 * 4


def test_missing_shared_heatmaps_fail_with_ask_again_and_leave_nothing_behind():
    scene, volume = _scene()
    sh = subject_hierarchy(scene)
    nodes, items = _node_count(scene), _children(sh, sh.GetSceneItemID())
    with pytest.raises(ResultError, match="Ask again") as info:
        _answer(scene, volume, "Where?", reused=True, download=False)
    assert "removed" in info.value.message and "next question downloads them" in info.value.hint
    assert _node_count(scene) == nodes and _children(sh, sh.GetSceneItemID()) == items

    first = _answer(scene, volume, "Is there a lesion?")
    nodes, items = _node_count(scene), _children(sh, sh.GetSceneItemID())
    # a pair that no longer has the input's grid is not the input's any more
    first.decisions.GetImageData().SetDimensions(1, 1, 1)
    assert heatmap_volume_ids(scene, volume, SERVER) == frozenset()
    with pytest.raises(ResultError, match="Ask again"):
        _answer(scene, volume, "Where?", reused=True, download=False)
    assert _node_count(scene) == nodes and _children(sh, sh.GetSceneItemID()) == items


def test_a_failed_new_pair_leaves_nothing_behind_not_even_its_folder():
    scene, volume = _scene()
    sh = subject_hierarchy(scene)
    nodes = _node_count(scene)
    report = _report("q")
    report["slices"]["per_slice"][0].pop("tokens_kept")    # fails after the heatmaps were made
    kept, attention = _heatmaps()
    with pytest.raises(KeyError):
        create_result_nodes(scene, volume, report, kept, attention, "job", SERVER)
    assert _node_count(scene) == nodes and not _heatmap_folders(scene)
    assert _children(sh, sh.GetSceneItemID()) == []


# -- mutation gaps: exact input geometry and parent transform ---------------------------------------
def test_heatmaps_carry_exactly_the_inputs_matrix_when_the_servers_differs_within_tolerance():
    scene, volume = _scene()
    server_matrix = OBLIQUE.copy()
    server_matrix[:3, 3] += 4e-4                 # within GEOMETRY_TOLERANCE_MM, not equal
    server_matrix[0, 1] += 1e-7                  # a direction cosine off in the 7th digit
    assert not np.array_equal(server_matrix, OBLIQUE) and 4e-4 < GEOMETRY_TOLERANCE_MM
    kept, attention = _heatmaps(server_matrix)
    result = create_result_nodes(scene, volume, _report("q"), kept, attention, "job", SERVER)
    for node in (result.attention, result.decisions):
        assert np.array_equal(ijk_to_ras_array(node), ijk_to_ras_array(volume)), node.GetName()


def test_heatmaps_follow_the_inputs_parent_transform_shared_ones_included():
    import vtk

    scene, volume = _scene()
    shift = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 25.0)
    shift.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(shift.GetID())
    first = _answer(scene, volume, "Is there a lesion?")
    follow = _answer(scene, volume, "Where is it?", reused=True, download=False)
    assert follow.attention is first.attention
    for node in (first.attention, first.decisions):
        assert node.GetTransformNodeID() == shift.GetID()
    # the input moved to another transform since: the shared pair follows it, a new pair starts there
    other = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "another registration")
    volume.SetAndObserveTransformNodeID(other.GetID())
    again = _answer(scene, volume, "How large?", reused=True, download=False)
    fresh = _answer(scene, volume, "Other settings?", volume_id=VOLUME_B)
    for node in (again.attention, again.decisions, fresh.attention, fresh.decisions):
        assert node.GetTransformNodeID() == other.GetID(), node.GetName()


# -- removing answers -------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["oldest first", "newest first"])
def test_removing_answers_keeps_shared_heatmaps_until_the_last_one_goes(order):
    scene, volume = _scene()
    sh = subject_hierarchy(scene)
    nodes_before, items_before = _node_count(scene), _children(sh, sh.GetSceneItemID())
    first = _answer(scene, volume, "Is there a lesion?")
    second = _answer(scene, volume, "Where is it?", reused=True, download=False)
    other = _answer(scene, volume, "Other settings?", volume_id=VOLUME_B, seed=3)
    kept_by_user = scene.AddNewNodeByClass("vtkMRMLTextNode", "my note")
    place_in_folder(scene, kept_by_user, first.folder_item)
    pair = (first.attention, first.decisions)

    gone, stays = (first, second) if order == "oldest first" else (second, first)
    remove_result(scene, gone.answer)
    assert all(n.GetScene() is None for n in gone.own_nodes())
    assert all(n.GetScene() is scene for n in pair)          # the other answer still shows them
    assert result_from_answer_node(stays.answer) is not None
    assert find_heatmaps(scene, volume, VOLUME_A, SERVER) == pair
    assert [r.question for r in find_results(scene)] == [stays.question, other.question]
    assert not sh.GetItemByDataNode(gone.answer)

    remove_result(scene, stays.answer)
    assert all(n.GetScene() is None for n in (*pair, *stays.own_nodes()))
    assert other.attention.GetScene() is scene and result_from_answer_node(other.answer) is not None
    remove_result(scene, other.answer)
    assert find_results(scene) == [] and _volume_count(scene) == 1
    assert not _heatmap_folders(scene)
    # the user's own node was moved out of the answer's folder, not deleted
    assert kept_by_user.GetScene() is scene
    assert sh.GetItemParent(sh.GetItemByDataNode(kept_by_user)) == sh.GetSceneItemID()
    sh.RemoveItem(sh.GetItemByDataNode(kept_by_user), False, False)
    scene.RemoveNode(kept_by_user)
    assert _node_count(scene) == nodes_before and _children(sh, sh.GetSceneItemID()) == items_before


def test_heatmaps_deleted_by_hand_leave_incomplete_results_that_never_crash():
    scene, volume = _scene()
    first = _answer(scene, volume, "Is there a lesion?")
    second = _answer(scene, volume, "Where is it?", reused=True, download=False)
    decisions = first.decisions
    scene.RemoveNode(first.attention)
    assert result_from_answer_node(first.answer) is None and result_from_answer_node(second.answer) is None
    assert find_results(scene) == []
    assert heatmap_volume_ids(scene, volume, SERVER) == frozenset()
    remove_result(scene, first.answer)
    assert decisions.GetScene() is scene                       # the second answer still points at it
    remove_result(scene, second.answer)
    assert decisions.GetScene() is None and _volume_count(scene) == 1
    with pytest.raises(ValueError):
        remove_result(scene, volume)


# -- .mrb ---------------------------------------------------------------------------------------------
def _class_counts(scene) -> dict[str, int]:
    counts: dict[str, int] = {}
    for i in range(scene.GetNumberOfNodes()):
        name = scene.GetNthNode(i).GetClassName()
        counts[name] = counts.get(name, 0) + 1
    return counts


def test_mrb_round_trip_keeps_one_shared_pair(tmp_path):
    import slicer

    scene, volume = _scene()
    first = _answer(scene, volume, "Is there a lesion?")
    _answer(scene, volume, "Where is it?", reused=True, download=False)
    _answer(scene, volume, "Other settings?", volume_id=VOLUME_B, seed=4)
    path = tmp_path / "shared.mrb"
    assert scene.WriteToMRB(str(path))
    fresh = make_scene()
    assert fresh.ReadFromMRB(str(path))
    assert _class_counts(fresh) == _class_counts(scene)
    results = find_results(fresh)
    assert [r.question for r in results] == ["Is there a lesion?", "Where is it?", "Other settings?"]
    assert results[0].attention is results[1].attention and results[0].decisions is results[1].decisions
    assert results[2].attention is not results[0].attention
    assert len(_heatmap_folders(fresh)) == 1
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(results[1].decisions),
                                  slicer.util.arrayFromVolume(first.decisions))
    # found again by volume_id after the reload: the next follow-up shares the pair too
    loaded = results[0].input_volume
    assert heatmap_volume_ids(fresh, loaded, SERVER) == frozenset([VOLUME_A, VOLUME_B])
    follow = _answer(fresh, loaded, "And now?", reused=True, download=False)
    assert follow.attention is results[0].attention
    remove_result(fresh, results[0].answer)
    remove_result(fresh, results[1].answer)
    assert follow.attention.GetScene() is fresh


# -- the Ask path ------------------------------------------------------------------------------------
class ReportOnlyClient:
    """Answers one job with `report`, and counts the heatmaps asked for."""

    def __init__(self, report: dict) -> None:
        self.report = report
        self.asked: list = []

    def result(self, job_id: str, progress=None, cancelled=None) -> dict:
        return self.report

    def heatmap(self, job_id: str, name: str, progress=None, cancelled=None) -> bytes:
        from MedPrunerSlicerLib.nrrd_io import encode_nrrd

        self.asked.append(name)
        kept, attention = _heatmaps()
        return encode_nrrd(*(kept if name == "kept" else attention))


@pytest.mark.parametrize("reused, volume_id, downloaded", [
    (True, VOLUME_A, False),     # the scene has this prepared volume's heatmaps: skip them
    (False, VOLUME_A, True),     # same id but prepared again (the server forgot it): they may differ
    (True, VOLUME_B, True),      # another prepared volume
])
def test_the_worker_skips_only_heatmaps_the_scene_has_for_the_prepared_volume_used(reused, volume_id, downloaded):
    import queue
    import threading

    from MedPrunerSlicerLib.ask import _download
    from MedPrunerSlicerLib.job_runner import JobContext

    ctx = JobContext(queue.Queue(), threading.Event())
    ctx.shared_volume_ids = frozenset([VOLUME_A])
    client = ReportOnlyClient(_report("q", volume_id, reused))
    outcome = _download(ctx, client, "job")
    assert sorted(client.asked) == (["attention", "kept"] if downloaded else [])
    assert (outcome.kept is not None and outcome.attention is not None) == downloaded


# -- the Ask path, against a real server -------------------------------------------------------------
class CountingClient(MedPrunerClient):
    """A client that counts the heatmaps it downloads."""

    downloads: list = []

    def heatmap(self, job_id: str, name: str, **transfer) -> bytes:
        CountingClient.downloads.append((job_id, name))
        return super().heatmap(job_id, name, **transfer)


class Asker:
    def __init__(self, scene, url: str) -> None:
        self.done, self.errors = [], []
        self.session = AskSession(scene, lambda: CountingClient(url, SERVER_TOKEN), on_done=self.done.append,
                                  on_error=self.errors.append, poll_interval=0.05)

    def start(self, volume, question: str, **settings) -> None:
        CountingClient.downloads = []
        self.errors.clear()
        self.session.start(volume, build_params(question, max_new_tokens=3, **settings))

    def ask(self, volume, question: str, **settings):
        self.start(volume, question, **settings)
        self.session.wait(120)
        assert not self.errors, self.errors
        return self.done[-1]


@pytest.fixture()
def ct(request):
    """A phantom CT whose voxels differ from test to test (the tests share one server and its cache)."""
    import zlib

    from medpruner.phantom import phantom_ct_array

    scene = make_scene()
    voxels = phantom_ct_array((10, 48, 48))
    voxels[0, 0, :8] += np.int16(1 + zlib.crc32(request.node.name.encode()) % 100)
    matrix = np.diag([-0.8, -0.8, 2.5, 1.0])
    matrix[:3, 3] = (5.0, 7.0, -40.0)
    return scene, add_volume(scene, voxels, matrix, "phantom")


def test_follow_up_shares_the_heatmaps_without_downloading_them(real_server, ct):
    import slicer

    scene, volume = ct
    asker = Asker(scene, real_server)
    first = asker.ask(volume, "Is there a liver lesion?")
    assert sorted(name for _, name in CountingClient.downloads) == ["attention", "kept"]
    volumes = _volume_count(scene)

    follow = asker.ask(volume, "Where is it?")
    assert follow.report["prefix_reused"] and follow.report["volume_id"] == first.report["volume_id"]
    assert CountingClient.downloads == []                        # not downloaded
    assert _volume_count(scene) == volumes                        # not copied
    assert follow.attention is first.attention and follow.decisions is first.decisions
    assert follow.answer is not first.answer and follow.table is not first.table
    # what was not downloaded is what the server has for the follow-up: the same heatmaps
    client = MedPrunerClient(real_server, SERVER_TOKEN)
    job = follow.answer.GetAttribute("MedPruner.JobId")
    for name, node in (("kept", follow.decisions), ("attention", follow.attention)):
        array, _matrix = decode_nrrd(client.heatmap(job, name))
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), array)

    other = asker.ask(volume, "Is there a liver lesion?", gamma=0.2)
    assert not other.report["prefix_reused"] and len(CountingClient.downloads) == 2
    assert other.attention is not first.attention and _volume_count(scene) == volumes + 2

    voxels = slicer.util.arrayFromVolume(volume)
    voxels[4:6] += 300
    slicer.util.arrayFromVolumeModified(volume)
    edited = asker.ask(volume, "Is there a liver lesion?")
    assert len(CountingClient.downloads) == 2 and edited.attention not in (first.attention, other.attention)
    assert _volume_count(scene) == volumes + 4

    remove_result(scene, first.answer)
    assert follow.attention.GetScene() is scene
    remove_result(scene, follow.answer)
    assert first.attention.GetScene() is None and first.decisions.GetScene() is None


def test_heatmaps_removed_while_asking_fail_with_ask_again_and_the_next_ask_downloads(real_server, ct):
    scene, volume = ct
    asker = Asker(scene, real_server)
    first = asker.ask(volume, "Is there a liver lesion?")
    asker.start(volume, "Where is it?")
    remove_result(scene, first.answer)                          # while the server answers
    asker.session.wait(120)
    assert len(asker.errors) == 1 and isinstance(asker.errors[0], ResultError)
    assert "Ask again" in asker.errors[0].hint and CountingClient.downloads == []
    assert find_results(scene) == [] and _volume_count(scene) == 1

    again = asker.ask(volume, "Where is it?")
    assert again.report["prefix_reused"] and len(CountingClient.downloads) == 2
    assert _volume_count(scene) == 3 and result_from_answer_node(again.answer) is not None
