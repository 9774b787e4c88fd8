"""The command line as a user meets it: the demo end to end, `ask`, and every bad input refused cleanly."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from medpruner.cli import main
from medpruner.phantom import make_phantom_ct
from medpruner.pipeline import OUTPUT_FILES


def _geometry(image: sitk.Image):
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def _assert_same_geometry(a: sitk.Image, b: sitk.Image):
    assert a.GetSize() == b.GetSize()
    for x, y in zip(_geometry(a)[1:], _geometry(b)[1:]):
        np.testing.assert_allclose(x, y, atol=1e-6)


def run_main(argv: list[str]) -> int:
    """main()'s exit code, including argparse's own refusals (SystemExit)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory):
    path = tmp_path_factory.mktemp("vol") / "ct.nrrd"
    sitk.WriteImage(make_phantom_ct(shape=(20, 72, 64)), str(path))
    return path


def test_demo_runs_end_to_end_as_a_fresh_user_would(tmp_path):
    env = {**os.environ, "MEDPRUNER_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "medpruner", "demo", "--out", str(out), "--max-new-tokens", "8"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "meaningless" in proc.stdout and "visual tokens kept" in proc.stdout
    for stage in ("[load]", "[preprocess]", "[vision]", "[prune]", "[answer]", "[write]"):
        assert stage in proc.stderr
    for name in (*OUTPUT_FILES, "sample_ct.nrrd"):
        assert (out / name).stat().st_size > 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temporary files may remain"
    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == "medpruner.report/1"
    assert report["demo_model"] is True and "DEMO MODEL" in proc.stdout   # random weights are said, every time
    sample = sitk.ReadImage(str(out / "sample_ct.nrrd"))
    kept = sitk.ReadImage(str(out / "heatmap_kept.nrrd"))
    attention = sitk.ReadImage(str(out / "heatmap_attention.nrrd"))
    _assert_same_geometry(kept, sample)
    _assert_same_geometry(attention, sample)
    assert kept.GetPixelID() == sitk.sitkUInt8 and attention.GetPixelID() == sitk.sitkFloat32
    labels = np.unique(sitk.GetArrayViewFromImage(kept))
    assert {1, 4} <= set(labels.tolist()), "the demo must show dropped slices and kept tokens"
    # Second run reuses the cached model instead of building it again.
    again = subprocess.run(
        [sys.executable, "-m", "medpruner", "demo", "--out", str(out), "--max-new-tokens", "8"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert again.returncode == 0 and "building" not in again.stderr and "from the cache" in again.stderr
    assert "building the tiny demo model" in proc.stderr


def test_ask_writes_a_consistent_report(tiny_qwen3_vl, small_ct, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["ask", str(small_ct), "Is the spleen normal?", "--model", str(tiny_qwen3_vl), "--out", str(out),
                 "--max-new-tokens", "4", "--tau", "0.8", "--compare", "--json", "--dtype", "float32"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((out / "report.json").read_text())
    assert report["question"] == "Is the spleen normal?"
    assert report["config"]["tau"] == 0.8
    slices, tokens = report["slices"], report["tokens"]
    assert slices["total"] == 20 and slices["sent"] == 20
    assert slices["kept"] == len(slices["kept_voxel_indices"]) == sum(s["kept"] for s in slices["per_slice"])
    assert tokens["kept_visual"] == sum(tokens["per_slice_kept"])
    assert 0 < tokens["retention"] <= 1
    assert report["unpruned"]["counts"]["visual_tokens_kept"] == tokens["total_visual"]
    assert set(report["labels"]) == {"0", "1", "2", "3", "4"}
    text = json.dumps(report)
    assert str(small_ct) not in text, "no file names or identifiers may leave in the report"
    # Every kept slice's voxel slice carries labels >= 2 in heatmap_kept, every dropped one is 1.
    kept = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "heatmap_kept.nrrd")))
    for entry in slices["per_slice"]:
        plane = kept[entry["voxel_index"]]
        if entry["kept"]:
            assert plane.min() >= 2 and int((plane == 4).any()) == 1
        else:
            assert (plane == 1).all()


def test_max_slices_subsamples_and_marks_unsent_slices(tiny_qwen3_vl, small_ct, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["ask", str(small_ct), "Where?", "--model", str(tiny_qwen3_vl), "--out", str(out),
                 "--max-slices", "6", "--max-new-tokens", "2", "--no-prune", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    sent = report["slices"]["sent_voxel_indices"]
    assert report["slices"]["sent"] == 6 and sent == sorted(sent) and sent[0] == 0 and sent[-1] == 19
    assert report["tokens"]["retention"] == 1.0
    kept = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "heatmap_kept.nrrd")))
    unsent = sorted(set(range(20)) - set(sent))
    assert (kept[unsent] == 0).all() and (kept[sent] == 4).all()


def _write(path, array, spacing=None, vector=False):
    image = sitk.GetImageFromArray(array, isVector=vector)
    if spacing:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def _bad_volumes(tmp_path):
    rng = np.random.default_rng(0)
    nan = rng.normal(size=(8, 16, 16)).astype(np.float32)
    nan[3, 4, 5] = np.nan
    inf = rng.normal(size=(8, 16, 16)).astype(np.float32)
    inf[1, 1, 1] = np.inf
    truncated = tmp_path / "truncated.nrrd"
    _write(truncated, rng.integers(-1000, 1000, (8, 32, 32)).astype(np.int16))
    truncated.write_bytes(truncated.read_bytes()[:-500])
    junk = tmp_path / "junk.nrrd"
    junk.write_bytes(b"this is not an image at all")
    return {
        "2D image": (_write(tmp_path / "flat.nrrd", rng.integers(0, 100, (32, 32)).astype(np.int16)), "2D"),
        "4D image": (_write(tmp_path / "four.nii.gz", rng.integers(0, 100, (3, 4, 8, 8)).astype(np.int16)), "4D"),
        "RGB volume": (_write(tmp_path / "rgb.nrrd", rng.integers(0, 255, (6, 8, 8, 3)).astype(np.uint8), vector=True),
                       "component"),
        "constant": (_write(tmp_path / "const.nrrd", np.full((6, 8, 8), 7, np.int16)), "constant"),
        "all zeros": (_write(tmp_path / "zeros.mha", np.zeros((6, 8, 8), np.int16)), "constant"),
        "NaN": (_write(tmp_path / "nan.nrrd", nan), "NaN"),
        "Inf": (_write(tmp_path / "inf.nrrd", inf), "Inf"),
        "truncated": (truncated, "truncated"),
        "junk": (junk, ""),
        "missing": (tmp_path / "nope.nrrd", "not found"),
    }


@pytest.mark.parametrize("case", ["2D image", "4D image", "RGB volume", "constant", "all zeros", "NaN", "Inf",
                                  "truncated", "junk", "missing"])
def test_bad_volumes_exit_2_with_one_clear_line_and_no_outputs(case, tmp_path, capsys):
    path, words = _bad_volumes(tmp_path)[case]
    out = tmp_path / "out"
    code = main(["ask", str(path), "Is there a lesion?", "--model", str(tmp_path / "never-loaded"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("medpruner: error:")]
    assert len(lines) == 1 and words.lower() in lines[0].lower(), err
    assert " -- " in lines[0], "the message must say what to do"
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--tau", "2"], "--tau=2.0 is out of range"),
        (["--gamma", "-1"], "--gamma=-1.0 is out of range"),
        (["--max-slices", "0"], "--max-slices: 0 is out of range: give a whole number from 1 to 1024"),
        (["--max-new-tokens", "0"], "--max-new-tokens: 0 is out of range"),
        (["--max-slices", "ten"], "--max-slices: 'ten' is not a whole number"),
        (["--window", "purple"], "Unknown window 'purple'"),
        (["--window", "0/40"], "width must be greater than 0"),
    ],
)
def test_bad_options_exit_2_and_write_nothing(tiny_qwen3_vl, small_ct, tmp_path, capsys, extra, words):
    out = tmp_path / "out"
    assert run_main(["ask", str(small_ct), "Is there a lesion?", "--model", str(tiny_qwen3_vl), "--out", str(out),
                     *extra]) == 2
    assert words in capsys.readouterr().err
    assert not out.exists()


def test_out_that_is_a_file_is_refused_before_the_model_runs(small_ct, tmp_path, capsys):
    taken = tmp_path / "notes.txt"
    taken.write_text("keep me")
    # the model does not even exist: the --out check comes first, so nothing is loaded or computed
    assert main(["ask", str(small_ct), "Where?", "--model", str(tmp_path / "no-model"), "--out", str(taken)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and taken.read_text() == "keep me"
    assert main(["demo", "--out", str(taken)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_tiny_is_the_demo_model_by_name(small_ct, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDPRUNER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["ask", str(small_ct), "Where?", "--model", "tiny", "--out", str(out), "--max-new-tokens", "2",
                 "--device", "cpu"]) == 0
    assert "tiny demo model" in capsys.readouterr().err
    assert json.loads((out / "report.json").read_text())["model_family"] == "qwen3_vl"


def test_empty_question_and_unknown_model(small_ct, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["ask", str(small_ct), "  ", "--model", "x", "--out", str(out)]) == 2
    assert "question is empty" in capsys.readouterr().err
    assert main(["ask", str(small_ct), "Where?", "--model", str(tmp_path / "no-model"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "No checkpoint folder at" in err and "does not exist" in err and not out.exists()
    assert main(["ask", str(small_ct), "Where?", "--model", str(small_ct), "--out", str(out)]) == 2
    assert "a checkpoint is a folder" in capsys.readouterr().err
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    assert main(["ask", str(small_ct), "Where?", "--model", str(empty), "--out", str(out)]) == 2
    assert "Cannot load a model config" in capsys.readouterr().err and not out.exists()


def test_oversized_header_is_refused_before_reading_voxels(tmp_path, capsys):
    header = tmp_path / "huge.nhdr"
    header.write_text(
        "NRRD0004\ntype: short\ndimension: 3\nsizes: 4096 4096 4096\nencoding: raw\n"
        "endian: little\nspace: left-posterior-superior\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n"
        "space origin: (0,0,0)\ndata file: huge.raw\n"
    )
    (tmp_path / "huge.raw").write_bytes(b"\0" * 1024)
    assert main(["ask", str(header), "Where?", "--model", "x", "--out", str(tmp_path / "out")]) == 2
    assert "4096" in capsys.readouterr().err


def test_a_real_checkpoint_is_not_flagged_as_the_demo_model(tiny_qwen3_vl, tmp_path):
    """Only the checkpoint medpruner.tiny built (it carries MEDPRUNER_TINY.txt) is called the demo model."""
    import shutil

    from medpruner import MedPruner

    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_qwen3_vl, copy)
    (copy / "MEDPRUNER_TINY.txt").unlink()
    assert MedPruner.from_pretrained(tiny_qwen3_vl).is_demo_model is True
    assert MedPruner.from_pretrained(copy).is_demo_model is False
