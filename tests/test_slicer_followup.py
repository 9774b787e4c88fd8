"""Follow-up questions from the Slicer side, against a real `medpruner serve` on 127.0.0.1 (tiny model).

Asking again about the same volume names the server's prepared volume instead of sending the voxels,
answers exactly as a fresh ask would, records the time saved, and falls back to sending the volume
when the server cannot reuse it; other voxels, settings or servers never share a prepared volume.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core runs the Slicer scene tests")

from MedPrunerSlicerLib.ask import RESEND_TEXT, AskSession
from MedPrunerSlicerLib.client import MedPrunerClient, build_params
from MedPrunerSlicerLib.conversation import (
    ATTRIBUTES,
    conversation,
    conversation_html,
    reuse_candidates,
    settings_key,
)
from MedPrunerSlicerLib.volume_export import snapshot_volume, volume_fingerprint
from slicer_helpers import SERVER_TOKEN, add_volume, make_scene

MATRIX = np.array([[-0.8, 0.0, 0.0, 5.0], [0.0, -0.8, 0.0, 7.0], [0.0, 0.0, 2.5, -40.0], [0, 0, 0, 1.0]])
MAX_NEW_TOKENS = 5


class Asker:
    """An AskSession on one scene that records every progress message; `ask` waits for the result."""

    def __init__(self, scene, url: str) -> None:
        self.done, self.errors, self.messages = [], [], []
        self.session = AskSession(scene, lambda: MedPrunerClient(url, SERVER_TOKEN), on_done=self.done.append,
                                  on_error=self.errors.append, poll_interval=0.05,
                                  on_progress=lambda stage, fraction, text: self.messages.append((stage, text)))

    def ask(self, volume, question: str, reuse: bool = True, **settings):
        self.messages.clear()
        self.session.start(volume, build_params(question, max_new_tokens=MAX_NEW_TOKENS, **settings), reuse=reuse)
        self.session.wait(120)
        assert not self.errors, self.errors
        return self.done[-1]


def attribute(result, name: str) -> str:
    return result.answer.GetAttribute(ATTRIBUTES[name]) or ""


@pytest.fixture()
def phantom_scene(request):
    """A phantom CT whose voxels differ from test to test: the tests share one server and its cache."""
    import zlib

    from medpruner.phantom import phantom_ct_array

    scene = make_scene()
    voxels = phantom_ct_array((12, 64, 64))
    voxels[0, 0, :8] += np.int16(1 + zlib.crc32(request.node.name.encode()) % 100)
    volume = add_volume(scene, voxels, MATRIX, "phantom")
    return scene, volume


def test_follow_up_reuses_the_prepared_volume_and_answers_like_a_fresh_ask(real_server, phantom_scene, engine,
                                                                            tmp_path):
    from medpruner.pipeline import AskRequest, run_ask

    scene, volume = phantom_scene
    asker = Asker(scene, real_server)
    first = asker.ask(volume, "Is there a liver lesion?")
    assert [stage for stage, _ in asker.messages][0] == "upload"
    assert attribute(first, "volume_sent") == "1" and float(attribute(first, "upload_s")) > 0
    assert re.fullmatch(r"[0-9a-f]{32}", attribute(first, "volume_id"))
    assert attribute(first, "fingerprint") == volume_fingerprint(volume)
    assert not first.report["prefix_reused"] and float(attribute(first, "saved_s")) == 0.0

    second = asker.ask(volume, "Where is it?")
    stages = [stage for stage, _ in asker.messages]
    assert stages[0] == "reuse" and "upload" not in stages          # the voxels were not sent again
    assert second.report["prefix_reused"] and second.report["volume_id"] == attribute(first, "volume_id")
    assert attribute(second, "volume_sent") == "0" and float(attribute(second, "upload_s")) == 0.0
    assert second.report["timings_s"]["vision"] == 0.0
    # time saved: the server's preparation of the first answer plus the upload this question skipped
    expected = first.report["prepare_s"] + float(attribute(first, "upload_s"))
    assert float(attribute(second, "saved_s")) == pytest.approx(expected, abs=1e-3)
    assert "reused from an earlier question" in second.answer.GetText()

    # exactly the answer of a fresh, uncached ask about the same voxels (the bytes the server got)
    path = tmp_path / "sent.nrrd"
    path.write_bytes(snapshot_volume(volume).to_nrrd())
    fresh = run_ask(engine, path, AskRequest("Where is it?", max_new_tokens=MAX_NEW_TOKENS), tmp_path / "fresh")
    assert not fresh["prefix_reused"]
    assert second.report["generated_token_ids"] == fresh["generated_token_ids"]
    assert second.report["answer"] == fresh["answer"]
    assert second.report["slices"]["kept_voxel_indices"] == fresh["slices"]["kept_voxel_indices"]

    # the heatmaps of a follow-up are those of the prepared volume, in the input's geometry
    import slicer

    np.testing.assert_array_equal(slicer.util.arrayFromVolume(second.decisions),
                                  slicer.util.arrayFromVolume(first.decisions))


def test_other_voxels_settings_or_servers_never_share_a_prepared_volume(real_server, phantom_scene):
    import slicer

    scene, volume = phantom_scene
    asker = Asker(scene, real_server)
    base = asker.ask(volume, "Is there a liver lesion?")

    other_settings = asker.ask(volume, "Is there a liver lesion?", gamma=0.2)
    assert attribute(other_settings, "volume_sent") == "1" and not other_settings.report["prefix_reused"]
    assert other_settings.report["volume_id"] != base.report["volume_id"]

    twin = add_volume(scene, slicer.util.arrayFromVolume(volume).copy(), MATRIX, "twin")
    twin_result = asker.ask(twin, "Is there a liver lesion?")
    # another node is never offered this node's volume_id, but the server knows the same voxels by their hash
    assert attribute(twin_result, "volume_sent") == "1" and twin_result.report["prefix_reused"]
    assert float(attribute(twin_result, "saved_s")) == pytest.approx(base.report["prepare_s"], abs=1e-3)

    voxels = slicer.util.arrayFromVolume(volume)
    voxels[5:7] += 300                     # an edit in place, e.g. a paint or a filter
    slicer.util.arrayFromVolumeModified(volume)
    edited = asker.ask(volume, "Is there a liver lesion?")
    assert attribute(edited, "volume_sent") == "1" and not edited.report["prefix_reused"]
    assert edited.report["volume_id"] not in (base.report["volume_id"], other_settings.report["volume_id"])
    assert attribute(edited, "fingerprint") != attribute(base, "fingerprint")

    key = settings_key(build_params("q", max_new_tokens=MAX_NEW_TOKENS))
    url = MedPrunerClient(real_server).url
    assert [c.volume_id for c in reuse_candidates(scene, volume, url, key)] == [edited.report["volume_id"],
                                                                               base.report["volume_id"]]
    assert reuse_candidates(scene, volume, "http://127.0.0.1:1", key) == []
    assert reuse_candidates(scene, volume, url, settings_key(build_params("q", tau=0.5))) == []


def test_a_volume_the_server_cannot_reuse_is_sent_again(real_server, phantom_scene):
    scene, volume = phantom_scene
    asker = Asker(scene, real_server)
    first = asker.ask(volume, "Is there a liver lesion?")

    # the server forgot it (restart, eviction): 404 unknown_volume, then the volume is sent
    first.answer.SetAttribute(ATTRIBUTES["volume_id"], "0" * 32)
    again = asker.ask(volume, "Where is it?")
    stages = [stage for stage, _ in asker.messages]
    assert stages[0] == "reuse" and (("upload", RESEND_TEXT) in asker.messages)
    assert attribute(again, "volume_sent") == "1" and again.report["prefix_reused"]
    assert again.report["volume_id"] == first.report["volume_id"]

    # the scene's record claims other settings than the server's (409 settings_mismatch): sent again too
    new_params = build_params("q", max_new_tokens=MAX_NEW_TOKENS, tau=0.6)
    again.answer.SetAttribute(ATTRIBUTES["settings_key"], settings_key(new_params))
    third = asker.ask(volume, "How large is it?", tau=0.6)
    assert ("upload", RESEND_TEXT) in asker.messages
    assert attribute(third, "volume_sent") == "1" and not third.report["prefix_reused"]

    # reuse=False always sends the voxels (the server still recognises them)
    fourth = asker.ask(volume, "How large is it?", reuse=False, tau=0.6)
    assert [stage for stage, _ in asker.messages][0] == "upload"
    assert attribute(fourth, "volume_sent") == "1" and fourth.report["prefix_reused"]


def test_conversation_lists_the_questions_about_a_volume_with_the_time_saved(real_server, phantom_scene):
    scene, volume = phantom_scene
    other = add_volume(scene, np.arange(6 * 32 * 32, dtype=np.int16).reshape(6, 32, 32), np.eye(4), "other")
    asker = Asker(scene, real_server)
    asker.ask(volume, "Is there a <b>lesion</b>?")
    asker.ask(other, "Anything here?")
    follow = asker.ask(volume, "How large is it?")

    turns = conversation(scene, volume)
    assert [t.question for t in turns] == ["Is there a <b>lesion</b>?", "How large is it?"]
    assert [t.prefix_reused for t in turns] == [False, True] and [t.volume_sent for t in turns] == [True, False]
    assert turns[1].saved_s > 0 and turns[0].saved_s == 0
    assert [t.question for t in conversation(scene, other)] == ["Anything here?"]

    page = conversation_html(turns, current_answer=follow.answer, volume_name="phantom")
    assert "&lt;b&gt;lesion&lt;/b&gt;" in page and "<b>lesion</b>" not in page   # questions are escaped
    assert f"{turns[1].saved_s:.1f} s saved" in page and "2 questions about <b>phantom</b>" in page
    assert f'href="result:{follow.answer.GetID()}"' in page
    assert "No question has been asked" in conversation_html([])
