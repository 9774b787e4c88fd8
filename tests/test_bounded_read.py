"""The limited reader process: voxels and geometry come back exactly; memory, time and cancel are enforced,
and no reader process outlives its read."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk

from medpruner.errors import Cancelled, VolumeError, VolumeTooLarge
from medpruner.phantom import make_phantom_ct
from medpruner.server.bounded_read import ReadLimits, read_upload
from server_helpers import reader_processes


def _oblique(image: sitk.Image) -> sitk.Image:
    c, s = np.cos(0.3), np.sin(0.3)
    image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    image.SetOrigin((-12.5, 30.25, 101.0))
    return image


@pytest.mark.parametrize("name,compress", [("v.nrrd", True), ("v.nrrd", False), ("v.nii.gz", True), ("v.mha", False),
                                           ("v.mha", True)])
def test_voxels_and_geometry_come_back_exactly(tmp_path, name, compress):
    image = _oblique(make_phantom_ct(shape=(9, 40, 36), spacing=(0.7, 0.8, 2.5)))
    path = tmp_path / name
    sitk.WriteImage(image, str(path), compress)
    kind = {"v.nrrd": "nrrd", "v.nii.gz": "nifti_gz", "v.mha": "metaimage"}[name]
    reference = sitk.ReadImage(str(path))
    read = read_upload(path, kind, ReadLimits(max_decoded_bytes=2**26))   # reads a rebuilt header, then deletes
    assert np.array_equal(sitk.GetArrayViewFromImage(read), sitk.GetArrayViewFromImage(reference))
    assert read.GetPixelID() == reference.GetPixelID()
    assert (read.GetSize(), read.GetSpacing(), read.GetOrigin(), read.GetDirection()) == \
        (reference.GetSize(), reference.GetSpacing(), reference.GetOrigin(), reference.GetDirection())
    assert reader_processes() == []


def _child_base_address_space() -> int:
    code = ("import medpruner.volume_io, medpruner.server.read_child, numpy, SimpleITK;"
            "print([l for l in open('/proc/self/status') if l.startswith('VmPeak')][0].split()[1])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1", "OMP_NUM_THREADS": "1"})
    return int(out.stdout.strip()) * 1024


def test_a_read_over_its_memory_budget_fails_cleanly(tmp_path):
    """128 MB of voxels, a reader allowed 64 MB over what its libraries take: a clear error, no reader left."""
    arr = np.zeros((64, 1024, 1024), np.int16)
    arr[:, ::7, ::5] = 1
    path = tmp_path / "big.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path), True)
    del arr
    limits = ReadLimits(max_decoded_bytes=2**30, address_space_bytes=_child_base_address_space() + 64 * 2**20)
    with pytest.raises(VolumeTooLarge) as err:
        read_upload(path, "nrrd", limits)
    assert "memory" in err.value.message and err.value.hint
    assert reader_processes() == []


def test_a_read_past_its_deadline_is_stopped(tmp_path):
    path = tmp_path / "v.nrrd"
    sitk.WriteImage(make_phantom_ct(shape=(8, 32, 32)), str(path), True)
    with pytest.raises(VolumeError, match="took longer than"):
        read_upload(path, "nrrd", ReadLimits(max_decoded_bytes=2**26, timeout_s=0.001))
    assert reader_processes() == []


def test_cancel_stops_the_reader(tmp_path):
    path = tmp_path / "v.nrrd"
    sitk.WriteImage(make_phantom_ct(shape=(8, 32, 32)), str(path), True)
    cancel = threading.Event()
    cancel.set()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        read_upload(path, "nrrd", ReadLimits(max_decoded_bytes=2**26), cancel.is_set)
    assert time.monotonic() - started < 5 and reader_processes() == []


def test_the_reader_refuses_what_the_header_check_refuses(tmp_path, ):
    """Defence in depth: even if a file reached the reader unchecked, a detached header is refused there."""
    secret = tmp_path / "secret.raw"
    secret.write_bytes(np.arange(64, dtype=np.int16).tobytes())
    header = tmp_path / "v.nrrd"
    header.write_text(f"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 4\nencoding: raw\nendian: little\n"
                      f"data file: {secret}\n")
    with pytest.raises(VolumeError, match="does not hold its own voxel data") as err:
        read_upload(header, "nrrd", ReadLimits(max_decoded_bytes=2**26))
    assert str(tmp_path) not in err.value.message
    limits = ReadLimits(max_decoded_bytes=100)
    sitk.WriteImage(make_phantom_ct(shape=(8, 32, 32)), str(tmp_path / "ok.nrrd"), True)
    with pytest.raises(VolumeTooLarge):
        read_upload(tmp_path / "ok.nrrd", "nrrd", limits)


def test_the_reader_sees_only_the_rebuilt_header(tmp_path):
    """Fields the checks do not use (comments, key/value pairs, other fields) never reach the image reader: it
    reads a header rebuilt from the parsed values, with the uploaded data after it."""
    from medpruner.volume_header import inspect_volume_file, write_self_contained

    data = np.arange(60, dtype=np.int16).tobytes()
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"\x7f" * 120)
    header = ("NRRD0005\n# data file: {s}\ntype: signed short\ndimension: 3\nsizes: 5 4 3\nencoding: raw\n"
              "endian: little\ncontent: data file {s}\ndata file:= {s}\nspace: left-posterior-superior\n"
              "space directions: (0.5,0,0) (0,0.75,0) (0,0,2.5)\nspace origin: (1,-2,3.25)\n"
              "measurement frame: (1,0,0) (0,1,0) (0,0,1)\n\n").format(s=secret)
    path = tmp_path / "v.nrrd"
    path.write_bytes(header.encode() + data)
    facts = inspect_volume_file(path, allow_detached=False)
    clean = facts.clean_header.decode()
    assert str(secret) not in clean and "content" not in clean and "#" not in clean and "measurement" not in clean
    assert "space directions: (0.5,0.0,0.0) (0.0,0.75,0.0) (0.0,0.0,2.5)" in clean
    checked = write_self_contained(path, facts, tmp_path / "checked.nrrd")
    image = read_upload(path, "nrrd", ReadLimits(max_decoded_bytes=2**20))
    reference = sitk.ReadImage(str(checked))
    assert np.array_equal(sitk.GetArrayViewFromImage(image), np.arange(60, dtype=np.int16).reshape(3, 4, 5))
    assert image.GetSpacing() == (0.5, 0.75, 2.5) and image.GetOrigin() == (1.0, -2.0, 3.25)
    assert image.GetSpacing() == reference.GetSpacing()
