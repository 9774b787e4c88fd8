"""heatmaps: labels and attention land on the right voxels, in the input's exact geometry."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from medpruner.heatmaps import KEPT_LABELS, build_heatmaps, write_image_atomic
from medpruner.slicing import prepare_slices
from volume_helpers import FakeResult


def _volume():
    # x: 16 voxels of 1 mm, y: 8 voxels of 2 mm -> 16 x 16 mm axial plane; 10 axial slices.
    rng = np.random.default_rng(0)
    arr = rng.integers(-1000, 1000, (10, 8, 16)).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 2.0, 3.0))
    img.SetOrigin((-7.0, 4.5, 100.0))
    img.SetDirection((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))  # x runs to patient RIGHT
    return img


def test_hand_made_result():
    img = _volume()
    stack = prepare_slices(img, size=32, multiple=16, max_slices=4)  # 32x32 px, 2 px per voxel
    m = stack.mapping
    assert m.voxel_index == (0, 3, 6, 9) and m.image_size == (32, 32) and m.scale == (4.0, 2.0)
    tp = 16  # a 2 x 2 token grid; token (r, c) covers display rows 4r..4r+3, cols 8c..8c+7
    role_a = np.array([[2, 1], [0, 0]], np.uint8)
    score_a = np.array([[0.7, 0.2], [0.05, 0.05]], np.float32)
    role_b = np.array([[0, 0], [1, 2]], np.uint8)
    score_b = np.array([[0.1, 0.1], [0.3, 0.5]], np.float32)
    result = FakeResult(
        slice_kept=np.array([True, False, True, False]),
        token_grid=[(2, 2)] * 4,
        token_role=[role_a, None, role_b, None],
        token_scores=[score_a, None, score_b, None],
    )
    kept_img, att_img = build_heatmaps(m, result, tp)
    assert kept_img.GetPixelID() == sitk.sitkUInt8 and att_img.GetPixelID() == sitk.sitkFloat32
    for out in (kept_img, att_img):
        assert out.GetSize() == img.GetSize()
        assert out.GetSpacing() == img.GetSpacing() and out.GetOrigin() == img.GetOrigin()
        assert out.GetDirection() == img.GetDirection()
    labels = sitk.GetArrayFromImage(kept_img)
    att = sitk.GetArrayFromImage(att_img)
    # Voxel slices never sent (1, 2, 4, 5, 7, 8) are 0, even inside a sent slice's slab.
    for z in (1, 2, 4, 5, 7, 8):
        assert not labels[z].any() and not att[z].any()
    # Dropped model slices (voxel slices 3 and 9) are 1 everywhere, attention 0.
    assert np.all(labels[3] == 1) and np.all(labels[9] == 1) and not att[3].any() and not att[9].any()
    # Kept slice 0: display col c covers input x = 15 - c (x runs to patient right, so it is flipped).
    # Token col 0 = display cols 0..7 = input x 8..15; token row 0 = display/input rows y 0..3.
    expected_a = np.empty((8, 16), np.uint8)
    expected_a[:4, 8:] = 4  # nucleus
    expected_a[:4, :8] = 3  # contextual
    expected_a[4:, :] = 2  # pruned
    np.testing.assert_array_equal(labels[0], expected_a)
    np.testing.assert_allclose(att[0][:4, 8:], 0.7)
    np.testing.assert_allclose(att[0][:4, :8], 0.2)
    np.testing.assert_allclose(att[0][4:], 0.05)
    expected_b = np.full((8, 16), 2, np.uint8)
    expected_b[4:, 8:] = 3
    expected_b[4:, :8] = 4
    np.testing.assert_array_equal(labels[6], expected_b)
    np.testing.assert_allclose(att[6][4:, :8], 0.5)


def test_inconsistent_results_are_refused():
    m = prepare_slices(_volume(), size=32, multiple=16, max_slices=2).mapping
    ok_role = np.zeros((2, 2), np.uint8)
    ok_score = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match="covers 3 slices"):
        build_heatmaps(m, FakeResult(np.ones(3, bool), [(2, 2)] * 3, [ok_role] * 3, [ok_score] * 3), 16)
    with pytest.raises(ValueError, match="do not match the expected grid"):
        build_heatmaps(m, FakeResult(np.ones(2, bool), [(2, 2), (4, 4)], [ok_role, np.zeros((4, 4), np.uint8)], [ok_score] * 2), 16)
    with pytest.raises(ValueError, match="is kept but"):
        build_heatmaps(m, FakeResult(np.ones(2, bool), [(2, 2)] * 2, [ok_role, None], [ok_score, None]), 16)
    with pytest.raises(ValueError, match="token_role values"):
        build_heatmaps(m, FakeResult(np.ones(2, bool), [(2, 2)] * 2, [ok_role, ok_role + 3], [ok_score] * 2), 16)


def test_kept_labels_table():
    assert sorted(KEPT_LABELS) == [0, 1, 2, 3, 4]
    assert KEPT_LABELS[0]["rgba"][3] == 0  # not sent: transparent
    assert all(len(v["rgba"]) == 4 and v["name"] for v in KEPT_LABELS.values())
    assert len({v["rgba"] for v in KEPT_LABELS.values()}) == 5


@pytest.mark.parametrize("name", ["heatmap_kept.nrrd", "h.nii.gz"])
def test_write_image_atomic(tmp_path, name):
    img = _volume()
    path = tmp_path / name
    path.write_bytes(b"old content")
    assert write_image_atomic(img, path) == path
    back = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(img))
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left behind
    if name.endswith(".nrrd"):
        assert b"encoding: gzip" in path.read_bytes()[:1000]


def test_write_image_atomic_cleans_up_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        write_image_atomic(_volume(), tmp_path / "x.unknownformat")
    assert list(tmp_path.iterdir()) == []
