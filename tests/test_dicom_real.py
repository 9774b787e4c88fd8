"""DICOM as scanners and PACS export it, on real files: regular series load with exactly their geometry;
irregular, tilted, mixed and non-image input is refused with a message that says what and where."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from dicom_shapes import (CANARY, all_bytes_under, independent_geometry, line, pydicom_data_file, pydicom_file,
                          tilted, write_series)
from medpruner.cli import main
from medpruner.errors import VolumeError
from medpruner.volume_io import load_volume

AXIAL = (1, 0, 0, 0, 1, 0)


def _refused(path, *words, **kwargs) -> VolumeError:
    with pytest.raises(VolumeError) as err:
        load_volume(path, **kwargs)
    for word in words:
        assert word in err.value.message, err.value.message
    assert err.value.hint
    return err.value


def _notes(image) -> str:
    return image.GetMetaData("medpruner.notes") if image.HasMetaDataKey("medpruner.notes") else ""


def test_regular_series_has_exactly_its_headers_geometry(tmp_path):
    paths = write_series(tmp_path / "s", line(12, 1.25)[::-1])   # files stored top to bottom
    image = load_volume(tmp_path / "s")
    positions, spacing, direction = independent_geometry(paths)
    assert image.GetSize() == (128, 128, 12)
    np.testing.assert_allclose(image.GetSpacing(), spacing, atol=1e-9)
    np.testing.assert_allclose(image.GetOrigin(), positions[0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(image.GetDirection()).reshape(3, 3), direction, atol=1e-9)
    for k, position in enumerate(positions):   # every slice sits where its own header says
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((0, 0, k)), position, atol=1e-5)
    voxels = sitk.GetArrayViewFromImage(image)
    import pydicom

    by_position = sorted((pydicom.dcmread(p) for p in paths), key=lambda d: float(d.ImagePositionPatient[2]))
    for k, ds in enumerate(by_position):
        np.testing.assert_array_equal(voxels[k], ds.pixel_array.astype(np.int32) - 1024)
    assert image.GetMetaData("medpruner.geometry_assumed") == "0"


def test_a_gap_is_refused_and_located(tmp_path):
    positions = line(1, 1.0) + line(11, 1.25, start=(-158.135803, -179.035797, -75.7 + 202.5))
    write_series(tmp_path / "s", positions)
    error = _refused(tmp_path / "s", "not evenly spaced", "slices 1-2 are 202.5 mm apart", "the others 1.25 mm")
    assert "Export the series again" in error.hint


def test_a_tilted_subset_is_refused(tmp_path):
    write_series(tmp_path / "s", line(10, 1.25), edit=lambda i, ds: setattr(
        ds, "ImageOrientationPatient", [f"{v:.6f}" for v in tilted(AXIAL, 5.0)]) if i in (6, 7, 8) else None)
    _refused(tmp_path / "s", "3 of 10 slices", "7-9", "turned by up to 5 degrees")


def test_gantry_tilt_is_refused(tmp_path):
    positions = [(-158.1 + 0.0, -179.0 + 0.4 * k, -75.7 + 1.25 * k) for k in range(10)]
    write_series(tmp_path / "s", positions)
    _refused(tmp_path / "s", "shifted sideways", "gantry tilt")


def test_mixed_sizes_are_refused(tmp_path):
    def smaller(index, ds):
        if index >= 8:
            crop = ds.pixel_array[:64, :64].copy()
            ds.Rows = ds.Columns = 64
            ds.PixelData = crop.tobytes()

    write_series(tmp_path / "s", line(10), edit=smaller)
    _refused(tmp_path / "s", "mixes image sizes", "8 of 128x128", "2 of 64x64")


def test_duplicate_positions_are_a_4d_series(tmp_path):
    write_series(tmp_path / "s", line(6) + line(6))
    _refused(tmp_path / "s", "repeat the position", "4D")


def test_a_localizer_mixed_in_is_left_out_and_said(tmp_path):
    def localizer(index, ds):
        if index == 0:
            ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
            ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]

    write_series(tmp_path / "typed", line(9), edit=localizer)
    image = load_volume(tmp_path / "typed")
    assert image.GetSize()[2] == 8 and "left out 1 localizer" in _notes(image)

    def scout(index, ds):   # not typed LOCALIZER: a lone image across the others
        if index == 9:
            ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]

    write_series(tmp_path / "untyped", line(9) + [(-150.0, -100.0, 20.0)], edit=scout)
    image = load_volume(tmp_path / "untyped")
    assert image.GetSize()[2] == 9 and "another orientation" in _notes(image)


def test_nested_folders_are_searched(tmp_path):
    write_series(tmp_path / "export" / "patient" / "study" / "series", line(5))
    (tmp_path / "export" / "README.txt").write_text("not dicom")
    assert load_volume(tmp_path / "export").GetSize() == (128, 128, 5)


def test_several_series_are_listed_with_the_real_option(tmp_path, capsys):
    a = write_series(tmp_path / "s", line(4), description="arterial")[0]
    write_series(tmp_path / "s", line(4), description="venous")
    error = _refused(tmp_path / "s", "several DICOM series", "'arterial', 4 images", "'venous', 4 images")
    assert "--series UID" in error.hint and "--series-uid" not in error.hint
    import pydicom

    uid = str(pydicom.dcmread(a).SeriesInstanceUID)
    assert uid in error.message
    assert load_volume(tmp_path / "s", series_uid=uid).GetSize()[2] == 4
    assert main(["ask", str(tmp_path / "s"), "Q?", "--model", "x", "--series", "1.2.3"]) == 2
    assert "--series UID" in capsys.readouterr().err


def test_one_file_of_a_series_says_to_give_the_folder(tmp_path):
    paths = write_series(tmp_path / "s", line(6))
    error = _refused(paths[2], "one file of a DICOM series of 6 files")
    assert str(tmp_path / "s") in error.hint
    lonely = tmp_path / "alone"
    lonely.mkdir()
    shutil.copy(paths[0], lonely / "only.dcm")
    _refused(lonely / "only.dcm", "single DICOM image", "2D")


def test_missing_geometry_in_some_files_is_refused_in_all_assumed_and_said(tmp_path):
    def drop(index, ds):
        if index in (2, 3):
            del ds.ImagePositionPatient

    write_series(tmp_path / "some", line(6), edit=drop)
    _refused(tmp_path / "some", "2 of 6 slices", "3-4", "no position")

    def drop_all(index, ds):
        del ds.ImagePositionPatient
        del ds.ImageOrientationPatient

    write_series(tmp_path / "none", line(6), edit=drop_all)
    image = load_volume(tmp_path / "none")
    assert image.GetMetaData("medpruner.geometry_assumed") == "1" and "GEOMETRY ASSUMED" in _notes(image)


def test_enhanced_multiframe_ct_is_read_from_its_functional_groups():
    """pydicom-data's enhanced CT: two frames 10 mm apart, stored against the slice normal (row x column)."""
    import pydicom

    path = pydicom_data_file("eCT_Supplemental.dcm")
    image = load_volume(path)
    ds = pydicom.dcmread(path)
    iop = np.asarray(ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    frames = [np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, float)
              for f in ds.PerFrameFunctionalGroupsSequence]
    order = np.argsort([p @ normal for p in frames])
    spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert image.GetSize() == (512, 512, 2)
    np.testing.assert_allclose(image.GetSpacing(), (float(spacing[1]), float(spacing[0]), 10.0), atol=1e-9)
    for k, frame in enumerate(order):
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((0, 0, k)), frames[frame], atol=1e-5)
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image)[k],
                                      ds.pixel_array[frame].astype(np.int32) - 1024)
    assert image.GetMetaData("medpruner.geometry_assumed") == "0"


def test_multiframe_without_geometry_is_read_with_an_assumed_grid():
    image = load_volume(pydicom_data_file("emri_small.dcm"))
    assert image.GetSize() == (64, 64, 10)
    assert image.GetMetaData("medpruner.geometry_assumed") == "1" and "GEOMETRY ASSUMED" in _notes(image)


@pytest.mark.parametrize("name,words", [("rtdose.dcm", "RTDOSE (a radiotherapy dose grid"),
                                        ("reportsi.dcm", "SR"), ("liver.dcm", "SEG (a segmentation")])
def test_non_image_objects_are_named(tmp_path, name, words):
    source = pydicom_data_file(name) if name == "liver.dcm" else pydicom_file(name)
    _refused(source, words.split(" (")[0])
    folder = tmp_path / "objects"
    folder.mkdir()
    shutil.copy(source, folder / name)
    _refused(folder, "holds no image series", words)
    write_series(folder / "ct", line(4))
    image = load_volume(folder)
    assert image.GetSize()[2] == 4 and "not images of the patient" in _notes(image)


def test_cli_reports_refusals_in_one_line_without_itk_warnings(tmp_path):
    write_series(tmp_path / "gap", line(3) + line(3, start=(-158.135803, -179.035797, -40.0)))
    proc = subprocess.run([sys.executable, "-m", "medpruner", "ask", str(tmp_path / "gap"), "Q?", "--model", "x",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "not evenly spaced" in proc.stderr and "WARNING" not in proc.stderr and "itk::" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_accepted_series_heatmaps_sit_on_the_headers_positions_and_no_name_leaks(tiny_qwen3_vl, tmp_path):
    paths = write_series(tmp_path / "s", line(10, 2.5)[::-1])
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "medpruner", "ask", str(tmp_path / "s"), "Where?", "--model",
                           str(tiny_qwen3_vl), "--out", str(out), "--max-new-tokens", "3", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    positions, spacing, direction = independent_geometry(paths)
    for name in ("heatmap_kept.nrrd", "heatmap_attention.nrrd"):
        heatmap = sitk.ReadImage(str(out / name))
        assert heatmap.GetSize() == (128, 128, 10)
        for k, position in enumerate(positions):
            np.testing.assert_allclose(heatmap.TransformIndexToPhysicalPoint((0, 0, k)), position, atol=1e-5)
        np.testing.assert_allclose(heatmap.GetSpacing(), spacing, atol=1e-9)
    report = json.loads((out / "report.json").read_text())
    assert report["input"]["geometry_assumed"] is False
    for text in (proc.stdout, proc.stderr):
        assert "Canary" not in text and "Secret" not in text
    assert b"Canary" not in all_bytes_under(out) and b"Secret" not in all_bytes_under(out)


def test_assumed_geometry_is_said_in_the_summary_and_report(tiny_qwen3_vl, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "medpruner", "ask", str(pydicom_data_file("emri_small.dcm")),
                           "Where?", "--model", str(tiny_qwen3_vl), "--out", str(out), "--max-new-tokens", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "GEOMETRY ASSUMED" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["input"]["geometry_assumed"] is True
    assert any("GEOMETRY ASSUMED" in note for note in report["input"]["notes"])
    assert CANARY not in json.dumps(report)


def test_notes_carry_no_uid_or_description(tmp_path):
    write_series(tmp_path / "s", line(6), description="Canary description")
    write_series(tmp_path / "s", line(3), description="Canary other")
    image = load_volume(tmp_path / "s")
    notes = _notes(image)
    assert "6 images" in notes and "3 images" in notes and "--series" in notes
    assert "Canary" not in notes and "1.2." not in notes


def test_small_errors_that_add_up_along_the_series_are_refused(tmp_path):
    """Every gap within 1 % of the typical one, but the last slice 3 mm away from the regular grid."""
    gaps = [1.25] * 100 + [1.262] * 99
    positions = [(-158.1, -179.0, -75.7 + float(np.sum(gaps[:k]))) for k in range(200)]
    write_series(tmp_path / "s", positions)
    _refused(tmp_path / "s", "not evenly spaced", "from where a regular grid")


def test_positions_rounded_in_the_header_are_accepted_with_the_true_spacing(tmp_path):
    positions = [(-158.1, -179.0, round(-75.7 + 0.625 * k, 2)) for k in range(40)]
    paths = write_series(tmp_path / "s", positions)
    image = load_volume(tmp_path / "s")
    assert abs(image.GetSpacing()[2] - 0.625) < 1e-3
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((0, 0, 39)), positions[-1], atol=0.01)
    assert len(paths) == 40


def test_without_positions_slices_follow_instance_numbers_not_file_names(tmp_path):
    def drop_all(index, ds):
        del ds.ImagePositionPatient
        del ds.ImageOrientationPatient

    folder = tmp_path / "s"
    paths = write_series(folder, line(12), edit=drop_all)
    for index, path in enumerate(paths):   # IM1 ... IM12: name order is 1, 10, 11, 12, 2, ...
        path.rename(folder / f"IM{index + 1}")
    image = load_volume(folder)
    import pydicom

    voxels = sitk.GetArrayViewFromImage(image)
    for k in range(12):
        ds = pydicom.dcmread(folder / f"IM{k + 1}")
        assert int(ds.InstanceNumber) == k + 1
        np.testing.assert_array_equal(voxels[k], ds.pixel_array.astype(np.int32) - 1024)


def test_missing_pixel_spacing_still_judges_positions(tmp_path):
    def no_spacing(index, ds):
        del ds.PixelSpacing

    write_series(tmp_path / "gap", line(3) + line(3, start=(-158.135803, -179.035797, 100.0)), edit=no_spacing)
    _refused(tmp_path / "gap", "not evenly spaced")
    write_series(tmp_path / "ok", line(5), edit=no_spacing)
    image = load_volume(tmp_path / "ok")
    assert image.GetMetaData("medpruner.geometry_assumed") == "1" and "no pixel spacing" in _notes(image)
    assert image.GetSpacing()[2] == pytest.approx(1.25)


def test_enhanced_frames_with_their_own_scaling_or_spacing_are_refused(tmp_path):
    import copy

    import pydicom
    from pydicom.sequence import Sequence

    source = pydicom_data_file("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(source)
    shared = ds.SharedFunctionalGroupsSequence[0]
    scaling = shared.PixelValueTransformationSequence[0]
    del shared.PixelValueTransformationSequence
    for k, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        item = copy.deepcopy(scaling)
        item.RescaleSlope, item.RescaleIntercept = ["1", "2"][k], ["-1024", "-2000"][k]
        frame.PixelValueTransformationSequence = Sequence([item])
    ds.save_as(tmp_path / "rescale.dcm")
    _refused(tmp_path / "rescale.dcm", "scales its frames' values differently")
    ds = pydicom.dcmread(source)
    measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    del ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence
    for k, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        item = copy.deepcopy(measures)
        item.PixelSpacing = [["0.5", "0.5"], ["0.8", "0.8"]][k]
        frame.PixelMeasuresSequence = Sequence([item])
    ds.save_as(tmp_path / "spacing.dcm")
    _refused(tmp_path / "spacing.dcm", "mixes pixel spacings")


def test_a_damaged_file_in_the_series_is_said_not_skipped(tmp_path):
    paths = write_series(tmp_path / "s", line(6))
    paths[-1].write_bytes(paths[-1].read_bytes()[:400])   # cut inside the header
    error = _refused(tmp_path / "s", "look like DICOM but cannot be read", paths[-1].name)
    assert "export" in error.hint.lower()

    def bad_slope(index, ds):
        if index == 2:
            del ds.RescaleSlope
            ds.add_new(0x00281053, "LO", "abc")   # a slope no number can be read from

    write_series(tmp_path / "slope", line(6), edit=bad_slope)
    _refused(tmp_path / "slope", "cannot be read")
