"""phantom: deterministic, realistic HU, fast, with redundant slices for the slice filter."""
from __future__ import annotations

import time

import numpy as np
import SimpleITK as sitk

from medpruner.phantom import make_phantom_ct
from medpruner.slicing import prepare_slices


def test_deterministic_and_seeded():
    a = sitk.GetArrayFromImage(make_phantom_ct(seed=0))
    b = sitk.GetArrayFromImage(make_phantom_ct(seed=0))
    c = sitk.GetArrayFromImage(make_phantom_ct(seed=1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_geometry_and_type():
    img = make_phantom_ct()
    assert img.GetSize() == (160, 160, 64)
    assert img.GetSpacing() == (0.8, 0.8, 2.5)
    assert img.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert any(o != 0 for o in img.GetOrigin())
    assert img.GetPixelID() == sitk.sitkInt16
    small = make_phantom_ct(shape=(10, 30, 40), spacing=(1.0, 1.5, 3.0))
    assert small.GetSize() == (40, 30, 10) and small.GetSpacing() == (1.0, 1.5, 3.0)


def test_fast():
    start = time.perf_counter()
    make_phantom_ct()
    assert time.perf_counter() - start < 1.0


def test_hounsfield_units_and_anatomy():
    arr = sitk.GetArrayFromImage(make_phantom_ct())  # (z, y, x); x grows to patient left
    nz, ny, nx = arr.shape
    assert arr[:, 0, 0].tolist() == [-1000] * nz  # air outside the body
    centre = arr[nz // 2, ny // 2 - 10 : ny // 2 + 10, nx // 2 - 10 : nx // 2 + 10]
    assert 25 < centre.mean() < 55  # soft tissue
    assert (arr > 500).sum() > 1000  # spine
    midline = arr[nz // 2, :, nx // 2 - 3 : nx // 2 + 3]  # ribs are lateral; the spine is in the midline
    spine_y = np.nonzero(midline > 500)[0].mean()
    assert spine_y > ny * 0.6  # posterior
    upper, lower = arr[int(nz * 0.8)], arr[int(nz * 0.25)]
    assert ((upper > -950) & (upper < -750)).sum() > 2000  # lungs superiorly
    assert ((lower > -950) & (lower < -750)).sum() < 20  # no lungs (bowel gas is air, -1000)
    liver = (lower > 50) & (lower < 75)
    ys, xs = np.nonzero(liver)
    assert xs.size > 500 and xs.mean() < nx / 2  # liver on the patient's right (low x)
    assert arr.min() >= -1024  # scanners clip air noise at -1024
    # Hypodense lesion (10 HU) inside the liver (60 HU) on the liver's mid slice.
    z = int(np.argmin(np.abs(np.linspace(0, 1, nz) - 0.3)))
    assert abs(np.median(arr[z, 66:76, 44:54]) - 10) < 6 and abs(np.median(arr[z, 66:76, 27:35]) - 60) < 8


def test_redundant_slices_for_the_slice_filter():
    arr = sitk.GetArrayFromImage(make_phantom_ct())
    same = np.all(arr[1:] == arr[:-1], axis=(1, 2))
    assert same.sum() >= 10  # two stretches of exactly repeated slices
    # A MedPruner-style anchor filter on the windowed slices (gamma 0.05 on [0, 1] grey) drops some.
    g = prepare_slices(make_phantom_ct(), max_slices=None, size=160, multiple=32).images[..., 0] / 255.0
    anchor, kept = g[0], 1
    for s in g[1:]:
        if np.abs(s - anchor).mean() > 0.05:
            anchor, kept = s, kept + 1
    assert kept < g.shape[0]
