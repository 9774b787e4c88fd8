"""volume_io: every format loads with its geometry; every bad input is refused with a clear message."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from medpruner.errors import VolumeError
from medpruner.phantom import make_phantom_ct
from medpruner.volume_io import MAX_AXIS_VOXELS, MAX_TOTAL_VOXELS, load_volume, validate_volume
from volume_helpers import write_dicom_series


def _image(arr, spacing=(0.7, 0.9, 2.5), origin=(10.0, -20.0, 30.0), direction=None, vector=False):
    img = sitk.GetImageFromArray(arr, isVector=vector)
    img.SetSpacing(spacing[: img.GetDimension()])
    img.SetOrigin(origin[: img.GetDimension()])
    if direction is not None:
        img.SetDirection(direction)
    return img


def _assert_same_geometry(a: sitk.Image, b: sitk.Image, tol: float) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=tol)


def _nrrd_header(path, sizes, data=b"", typ="short", extra=""):
    text = f"NRRD0004\ntype: {typ}\ndimension: {len(sizes)}\nsizes: {' '.join(map(str, sizes))}\nendian: little\nencoding: raw\n{extra}\n"
    path.write_bytes(text.encode() + data)
    return path


@pytest.fixture(scope="module")
def phantom():
    return make_phantom_ct(shape=(8, 24, 28), spacing=(0.8, 0.9, 2.5), seed=3)


@pytest.mark.parametrize("ext", [".nrrd", ".nii", ".nii.gz", ".mha", ".mhd"])
def test_formats_round_trip(tmp_path, phantom, ext):
    # A rotated, flipped direction so NIfTI's RAS conversion is exercised too.
    direction = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    img = sitk.Image(phantom)
    img.SetDirection(direction)
    path = tmp_path / f"vol{ext}"
    sitk.WriteImage(img, str(path), ext != ".mhd")
    loaded = load_volume(path)
    _assert_same_geometry(loaded, img, 1e-4)
    assert loaded.GetPixelID() == sitk.sitkInt16  # kept as read
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(loaded), sitk.GetArrayViewFromImage(img))


def test_dicom_series_matches_nrrd(tmp_path, phantom):
    nrrd = tmp_path / "vol.nrrd"
    sitk.WriteImage(phantom, str(nrrd))
    write_dicom_series(phantom, tmp_path / "dicom", "1.2.826.0.1.3680043.2.1125.77.1")
    from_nrrd = load_volume(nrrd)
    from_dicom = load_volume(tmp_path / "dicom")
    _assert_same_geometry(from_dicom, from_nrrd, 1e-4)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(from_dicom), sitk.GetArrayViewFromImage(from_nrrd))


def test_dicom_series_choice(tmp_path, phantom):
    folder = tmp_path / "dicom"
    big, small = "1.2.826.0.1.3680043.2.1125.77.2", "1.2.826.0.1.3680043.2.1125.77.3"
    write_dicom_series(phantom, folder, big)
    write_dicom_series(phantom[:, :, :5], folder, small)
    assert load_volume(folder).GetSize() == phantom.GetSize()  # the largest series
    assert load_volume(folder, series_uid=small).GetSize()[2] == 5
    with pytest.raises(VolumeError) as err:
        load_volume(folder, series_uid="1.2.3.4")
    assert "1.2.3.4 is not in" in err.value.message
    assert f"{big}: CT, 8 images" in err.value.message and f"{small}: CT, 5 images" in err.value.message
    assert "--series" in err.value.hint


def test_dicom_ambiguous_series(tmp_path, phantom):
    folder = tmp_path / "dicom"
    uids = ["1.2.826.0.1.3680043.2.1125.77.4", "1.2.826.0.1.3680043.2.1125.77.5"]
    for uid in uids:
        write_dicom_series(phantom[:, :, :4], folder, uid)
    with pytest.raises(VolumeError) as err:
        load_volume(folder)
    msg = err.value.message
    assert "several DICOM series" in msg
    assert all(f"{uid}: CT, 4 images" in msg for uid in uids)
    assert "--series UID" in err.value.hint


def test_empty_folder_has_no_series(tmp_path):
    with pytest.raises(VolumeError, match="No DICOM series"):
        load_volume(tmp_path)


# --- rejections ------------------------------------------------------------------------------
def _write(tmp_path, img, name="bad.nrrd"):
    path = tmp_path / name
    sitk.WriteImage(img, str(path))
    return path


def test_missing_file(tmp_path):
    with pytest.raises(VolumeError) as err:
        load_volume(tmp_path / "nope.nrrd")
    assert "not found" in err.value.message and "nope.nrrd" in err.value.message
    assert err.value.hint


@pytest.mark.parametrize("name", ["junk.nrrd", "junk.txt", "junk.nii"])
def test_unreadable_junk(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(VolumeError) as err:
        load_volume(path)
    assert "Cannot read" in err.value.message and name in err.value.message
    assert "\n" not in err.value.message and "NRRD" in err.value.hint


def test_2d_image(tmp_path):
    with pytest.raises(VolumeError, match="is a 2D image"):
        load_volume(_write(tmp_path, _image(np.ones((5, 6), np.float32))))


def test_4d_image(tmp_path):
    frames = [_image(np.random.default_rng(i).random((3, 4, 5)).astype(np.float32)) for i in range(3)]
    with pytest.raises(VolumeError) as err:
        load_volume(_write(tmp_path, sitk.JoinSeries(frames)))
    assert "4D image" in err.value.message and "frame" in err.value.hint


def test_vector_pixels(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (4, 5, 6, 3)).astype(np.uint8)
    with pytest.raises(VolumeError) as err:
        load_volume(_write(tmp_path, _image(rgb, vector=True)))
    assert "3-component" in err.value.message and "scalar" in err.value.message


@pytest.mark.parametrize("shape", [(1, 10, 12), (10, 1, 12), (10, 12, 1)])
def test_single_slice_on_any_axis(tmp_path, shape):
    arr = np.random.default_rng(0).integers(-1000, 1000, shape).astype(np.int16)
    with pytest.raises(VolumeError) as err:
        load_volume(_write(tmp_path, _image(arr)))
    assert "fewer than 2 voxels" in err.value.message


@pytest.mark.parametrize("bad,word", [(np.nan, "1 NaN, 0 Inf"), (np.inf, "0 NaN, 1 Inf"), (-np.inf, "0 NaN, 1 Inf")])
def test_non_finite(tmp_path, bad, word):
    arr = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
    arr[2, 3, 4] = bad
    with pytest.raises(VolumeError) as err:
        load_volume(_write(tmp_path, _image(arr)))
    assert "non-finite" in err.value.message and word in err.value.message


@pytest.mark.parametrize("value", [0, 7])
def test_constant_volume(tmp_path, value):
    with pytest.raises(VolumeError) as err:
        load_volume(_write(tmp_path, _image(np.full((4, 5, 6), value, np.int16))))
    assert "constant" in err.value.message and f"every voxel is {value}" in err.value.message


def test_oversized_axis_refused_from_header(tmp_path):
    # The header claims a huge volume; only 100 bytes of data: refused before any voxel is read.
    path = _nrrd_header(tmp_path / "huge.nrrd", [MAX_AXIS_VOXELS + 1, 4, 4], b"\0" * 100)
    with pytest.raises(VolumeError) as err:
        load_volume(path)
    assert f"more than {MAX_AXIS_VOXELS} voxels along an axis" in err.value.message


def test_oversized_total_refused_from_header(tmp_path):
    path = _nrrd_header(tmp_path / "huge.nrrd", [2000, 2000, 300], b"\0" * 100)
    with pytest.raises(VolumeError) as err:
        load_volume(path)
    assert f"more than the limit of {MAX_TOTAL_VOXELS}" in err.value.message


@pytest.mark.parametrize("extra", ["spacings: 1 1 -2\n", "space: left-posterior-superior\nspace directions: (1,0,0) (0,1,0) (0,0,0)\n"])
def test_non_positive_spacing(tmp_path, extra):
    path = _nrrd_header(tmp_path / "sp.nrrd", [4, 4, 4], np.arange(64, dtype=np.int16).tobytes(), extra=extra)
    with pytest.raises(VolumeError, match="non-positive or invalid voxel spacing"):
        load_volume(path)


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_nrrd(tmp_path, phantom, compress):
    path = tmp_path / "t.nrrd"
    sitk.WriteImage(phantom, str(path), compress)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    with pytest.raises(VolumeError) as err:
        load_volume(path)
    assert "truncated" in err.value.message and "t.nrrd" in err.value.message


@pytest.mark.parametrize("ext", [".nii", ".nii.gz", ".mha"])
def test_truncated_other_formats(tmp_path, phantom, ext):
    path = tmp_path / f"t{ext}"
    sitk.WriteImage(phantom, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    with pytest.raises(VolumeError, match="truncated"):
        load_volume(path)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("claimed", ["6 5 2", "6 5 9"])
def test_lying_nrrd_header(tmp_path, compress, claimed):
    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    path = tmp_path / "lie.nrrd"
    sitk.WriteImage(_image(arr), str(path), compress)
    data = path.read_bytes()
    assert b"sizes: 6 5 4" in data
    path.write_bytes(data.replace(b"sizes: 6 5 4", f"sizes: {claimed}".encode()))
    with pytest.raises(VolumeError) as err:
        load_volume(path)
    assert "truncated or its header lies" in err.value.message or "truncated or corrupt" in err.value.message


def test_validate_volume_in_memory():
    good = _image(np.arange(24, dtype=np.int16).reshape(2, 3, 4))
    assert validate_volume(good) is good
    with pytest.raises(VolumeError, match="constant"):
        validate_volume(_image(np.zeros((2, 3, 4), np.float32)))
    with pytest.raises(VolumeError, match="1 NaN"):
        validate_volume(_image(np.where(np.arange(24) == 5, np.nan, 1.0).reshape(2, 3, 4)))


def test_series_uid_on_a_file(tmp_path, phantom):
    path = tmp_path / "v.nrrd"
    sitk.WriteImage(phantom, str(path))
    with pytest.raises(VolumeError, match="not a DICOM folder"):
        load_volume(path, series_uid="1.2.3")
