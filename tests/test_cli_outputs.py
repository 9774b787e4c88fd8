"""The command line's outputs and local files: a whole set or nothing, a writable --out checked first, and a
user's own detached volume read only from a regular file beside its header."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import medpruner.pipeline as pipeline
from medpruner.cli import main
from medpruner.errors import VolumeError
from medpruner.phantom import make_phantom_ct
from medpruner.pipeline import OUTPUT_FILES
from medpruner.volume_io import load_volume


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory):
    path = tmp_path_factory.mktemp("vol") / "ct.nrrd"
    sitk.WriteImage(make_phantom_ct(shape=(12, 56, 56)), str(path))
    return path


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _ask(ct, model, out, question="Where?", *extra) -> int:
    return main(["ask", str(ct), question, "--model", str(model), "--out", str(out), "--max-new-tokens", "3",
                 "--dtype", "float32", *extra])


def test_interrupt_during_the_write_stage_keeps_the_old_set(tiny_qwen3_vl, small_ct, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert _ask(small_ct, tiny_qwen3_vl, out, "First question?") == 0
    before = _digest(out)
    assert set(before) == set(OUTPUT_FILES)

    def interrupted(*args, **kwargs):   # Ctrl-C arrives after both heatmaps are written, before the overview
        raise KeyboardInterrupt()

    monkeypatch.setattr("medpruner.overview.render_overview", interrupted)
    assert _ask(small_ct, tiny_qwen3_vl, out, "Second question?", "--tau", "0.5") == 130
    assert "no partial outputs" in capsys.readouterr().err
    assert _digest(out) == before, "the old set must stay whole: no new heatmaps beside the old report"
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "no staging folder may remain"


def test_interrupt_during_the_write_stage_of_a_first_run_leaves_nothing(tiny_qwen3_vl, small_ct, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setattr(pipeline, "write_json_atomic", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert _ask(small_ct, tiny_qwen3_vl, tmp_path / "new" / "out") == 130
    assert not (tmp_path / "new" / "out").exists()
    assert [p.name for p in (tmp_path / "new").iterdir()] == []


def test_sigterm_mid_run_exits_cleanly_and_writes_nothing(tiny_qwen3_vl, small_ct, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "medpruner", "ask", str(small_ct), "Where?", "--model",
                             str(tiny_qwen3_vl), "--out", str(out), "--max-new-tokens", "4096"],
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:   # wait until it is answering, then stop it the way `kill` does
        if "[answer]" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, rest
    assert "interrupted" in rest and not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("where", ["/proc/medpruner-out", "file/sub", "file"])
def test_an_unwritable_out_is_refused_before_the_model_loads(small_ct, tmp_path, capsys, where):
    (tmp_path / "file").write_text("keep")
    out = where if where.startswith("/") else str(tmp_path / where)
    started = time.monotonic()
    # the model does not exist: the --out check must come first
    assert main(["ask", str(small_ct), "Where?", "--model", str(tmp_path / "no-model"), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and ("not a folder" in err or "cannot create files" in err), err
    assert "Traceback" not in err and "checkpoint" not in err
    assert time.monotonic() - started < 5
    assert (tmp_path / "file").read_text() == "keep"


# -- a user's own detached volumes ------------------------------------------------------------------
def _nhdr(folder: Path, data_ref: str, sizes=(4, 5, 6)) -> Path:
    header = folder / "vol.nhdr"
    header.write_text(f"NRRD0004\ntype: short\ndimension: 3\nsizes: {' '.join(map(str, sizes))}\nencoding: raw\n"
                      "endian: little\nspace: left-posterior-superior\nspace directions: (1,0,0) (0,1,0) (0,0,2)\n"
                      f"space origin: (0,0,0)\ndata file: {data_ref}\n")
    return header


def test_a_header_with_its_data_file_beside_it_loads(tmp_path):
    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(6, 5, 4)
    (tmp_path / "vol.raw").write_bytes(arr.tobytes())
    image = load_volume(_nhdr(tmp_path, "vol.raw"))
    assert np.array_equal(sitk.GetArrayViewFromImage(image), arr) and image.GetSpacing() == (1.0, 1.0, 2.0)


def test_detached_data_elsewhere_devices_and_pipes_are_refused(tmp_path):
    arr = np.arange(4 * 5 * 6, dtype=np.int16)
    other = tmp_path / "other"
    other.mkdir()
    (other / "vol.raw").write_bytes(arr.tobytes())
    (tmp_path / "link.raw").symlink_to(other / "vol.raw")
    os.mkfifo(tmp_path / "pipe.raw")
    cases = {
        "other/vol.raw": "outside its own folder",
        str(other / "vol.raw"): "outside its own folder",
        "../vol.raw": "outside its own folder",
        "link.raw": "links outside its own folder",
        "pipe.raw": "FIFO",
        "/dev/zero": "outside its own folder",
        "LIST": "several files",
        "missing.raw": "cannot be opened",
    }
    for reference, words in cases.items():
        with pytest.raises(VolumeError) as err:
            load_volume(_nhdr(tmp_path, reference))
        assert words in err.value.message, (reference, err.value.message)
        assert err.value.hint
    with pytest.raises(VolumeError, match="not allowed|does not hold its own voxel data"):
        load_volume(_nhdr(tmp_path, "vol.raw"), allow_detached=False)


def test_a_device_or_pipe_given_as_the_volume_is_refused(tmp_path, capsys):
    fifo = tmp_path / "volume.nrrd"
    os.mkfifo(fifo)
    with pytest.raises(VolumeError, match="FIFO"):
        load_volume(fifo)
    with pytest.raises(VolumeError, match="a device"):
        load_volume("/dev/zero")
    assert main(["ask", "/dev/zero", "Where?", "--model", "x", "--out", str(tmp_path / "o")]) == 2
    assert "regular files" in capsys.readouterr().err


def test_nan_spacing_is_refused_not_read_as_one(tmp_path, capsys):
    path = tmp_path / "nan.nrrd"
    path.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 4\nspacings: nan 1 1\nencoding: raw\n"
                     b"endian: little\n\n" + np.arange(64, dtype=np.int16).tobytes())
    assert main(["ask", str(path), "Where?", "--model", "x", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "non-finite" in err and "spacings" in err
