"""The whole Ask path headless against a real `python -m medpruner serve` on 127.0.0.1 (tiny model).

Volume node -> NRRD -> HTTP -> the real server -> poll -> report + heatmaps -> result nodes, on
slicer-core. Skipped until the server package (issue 5) is present.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core runs the Slicer scene tests")
if importlib.util.find_spec("medpruner.server") is None:
    pytest.skip("medpruner.server (issue 5) is not there yet", allow_module_level=True)

from MedPrunerSlicerLib.ask import AskSession
from MedPrunerSlicerLib.client import MedPrunerClient, build_params
from MedPrunerSlicerLib.errors import AuthenticationError
from MedPrunerSlicerLib.volume_export import ijk_to_ras_array, volume_fingerprint
from slicer_helpers import SERVER_TOKEN, add_volume, make_scene

TOKEN = SERVER_TOKEN


@pytest.fixture()
def server(real_server):
    return real_server


def test_ask_end_to_end_against_the_real_server(server):
    from medpruner.phantom import phantom_ct_array

    scene = make_scene()
    matrix = np.array([[0.0, 0.9, 0.0, 10.0], [-0.9, 0.0, 0.0, -20.0], [0.0, 0.0, 2.5, 30.0], [0, 0, 0, 1.0]])
    volume = add_volume(scene, phantom_ct_array((16, 64, 64)), matrix, "phantom")
    before = volume_fingerprint(volume)
    done, errors, stages = [], [], []
    session = AskSession(scene, lambda: MedPrunerClient(server, TOKEN), on_done=done.append, on_error=errors.append,
                         on_progress=lambda stage, fraction, text: stages.append(stage), poll_interval=0.05)
    session.start(volume, build_params("Is there a liver lesion?", max_new_tokens=4, compare=True))
    session.wait(120)
    assert not errors, errors
    result = done[0]
    np.testing.assert_array_equal(ijk_to_ras_array(result.attention), matrix)
    np.testing.assert_array_equal(ijk_to_ras_array(result.decisions), matrix)
    assert result.report["unpruned"]["answer"] is not None
    assert set(np.unique(__import__("slicer").util.arrayFromVolume(result.decisions))) <= {0, 1, 2, 3, 4}
    assert volume_fingerprint(volume) == before
    assert stages[0] == "upload"


def test_wrong_token_is_reported_by_test_connection(server):
    assert MedPrunerClient(server, TOKEN).check_token()["auth"] is True
    with pytest.raises(AuthenticationError, match="refused the token"):
        MedPrunerClient(server, "wrong").check_token()
    with pytest.raises(AuthenticationError, match="needs a token"):
        MedPrunerClient(server).check_token()


def test_bad_setting_names_the_field(server):
    from MedPrunerSlicerLib.errors import InvalidRequest
    from MedPrunerSlicerLib.volume_export import VolumeSnapshot

    snapshot = VolumeSnapshot(np.arange(4 * 8 * 8, dtype=np.int16).reshape(4, 8, 8), np.eye(4))
    with pytest.raises(InvalidRequest) as info:
        MedPrunerClient(server, TOKEN).submit(snapshot.to_nrrd(), build_params("q?", tau=2.0))
    assert "tau" in info.value.field and info.value.status == 422


def test_a_scene_closed_while_asking_gets_no_result_nodes(server):
    """After a close, node IDs restart: the answer must not attach to a new node that took the old ID."""
    from medpruner.phantom import phantom_ct_array
    from MedPrunerSlicerLib.errors import ResultError

    scene = make_scene()
    volume = add_volume(scene, phantom_ct_array((8, 48, 48)), np.eye(4), "phantom")
    old_id = volume.GetID()
    done, errors = [], []
    session = AskSession(scene, lambda: MedPrunerClient(server, TOKEN), on_done=done.append, on_error=errors.append,
                         poll_interval=0.05)
    session.start(volume, build_params("Is there a liver lesion?", max_new_tokens=2))
    scene.Clear(0)
    newcomer = add_volume(scene, phantom_ct_array((8, 48, 48)), np.eye(4), "another patient")
    assert newcomer.GetID() == old_id
    session.wait(120)
    assert not done and len(errors) == 1 and isinstance(errors[0], ResultError)
    assert "removed from the scene" in errors[0].message
    assert scene.GetNodesByClass("vtkMRMLTextNode").GetNumberOfItems() == 0


def test_slicer_flagged_irregular_series_is_said_in_the_answer(server):
    """Slicer's DICOM import puts an irregular series under a grid transform named '<volume> acquisition
    transform'; the answer says so, and a volume without one says nothing of the kind."""
    from medpruner.phantom import phantom_ct_array
    from MedPrunerSlicerLib.volume_export import acquisition_warning

    scene = make_scene()
    volume = add_volume(scene, phantom_ct_array((8, 48, 48)), np.eye(4), "CT")
    assert acquisition_warning(volume) is None
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "CT acquisition transform")
    volume.SetAndObserveTransformNodeID(grid.GetID())
    done, errors = [], []
    session = AskSession(scene, lambda: MedPrunerClient(server, TOKEN), on_done=done.append, on_error=errors.append,
                         poll_interval=0.05)
    session.start(volume, build_params("Is there a liver lesion?", max_new_tokens=2))
    session.wait(120)
    assert not errors, errors
    text = done[0].answer.GetText()
    assert "Slicer flagged this DICOM series as irregular" in text and "CT acquisition transform" in text
    assert done[0].attention.GetParentTransformNode().GetID() == grid.GetID()
