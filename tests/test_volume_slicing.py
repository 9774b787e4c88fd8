"""slicing: exact geometry round trip, canonical orientation, windows, subsampling, validation."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from medpruner.errors import InputError
from medpruner.heatmaps import build_heatmaps
from medpruner.phantom import make_phantom_ct
from medpruner.slicing import (
    AXES,
    SliceMapping,
    canonical_orientation,
    parse_window,
    prepare_slices,
    resample_to_model,
    select_slices,
)
from medpruner.volume_io import load_volume
from volume_helpers import index_image, random_result

TP = 8  # token pixels in these tests


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


PERM_FLIP = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=float)  # columns: x->+P, y->-S, z->-L
DIRECTIONS = {
    "identity": np.eye(3),
    "ras_like": np.diag([-1.0, -1.0, 1.0]),
    "permuted_flipped": PERM_FLIP,
    "oblique": _rotation(0, 25.0) @ _rotation(2, -17.0) @ PERM_FLIP,
}


def _round_trip_checks(img: sitk.Image, axis: str, size: int, max_slices, upsampling: bool) -> None:
    """Index volume -> nearest model slices; every voxel centre's pixel shows that voxel; heatmaps land on it."""
    arr = sitk.GetArrayViewFromImage(img)
    shape = arr.shape
    stack = prepare_slices(img, axis=axis, window="soft_tissue", size=size, multiple=TP, max_slices=max_slices, interpolation="nearest")
    m = stack.mapping
    H, W = m.image_size
    assert H % TP == 0 and W % TP == 0 and H <= size and W <= size
    shown = resample_to_model(arr, m, "nearest", fill=-1)  # flat input index shown by each model pixel
    assert shown.shape == (len(m.voxel_index), H, W)
    disp = m.to_display(arr)  # flat input indices in display layout
    rows, cols = m.pixel_of_voxel_centres()
    tokmap = m.token_index_map(TP)
    assert tokmap.shape == disp.shape[1:]
    result = random_result(len(m.voxel_index), (H // TP, W // TP), seed=len(m.voxel_index) + H)
    kept_img, att_img = build_heatmaps(m, result, TP)
    for img_out in (kept_img, att_img):
        assert img_out.GetSize() == img.GetSize()
        np.testing.assert_allclose(img_out.GetSpacing(), img.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(img_out.GetOrigin(), img.GetOrigin(), atol=1e-6)
        np.testing.assert_allclose(img_out.GetDirection(), img.GetDirection(), atol=1e-6)
    labels = sitk.GetArrayFromImage(kept_img)
    attention = sitk.GetArrayFromImage(att_img)
    pixel_token = (np.arange(H) // TP)[:, None] * (W // TP) + (np.arange(W) // TP)[None, :]
    lut = np.array([2, 3, 4])
    for s, v in enumerate(m.voxel_index):
        voxels = disp[v]  # (rows, cols) flat input indices of this voxel slice
        # The slice came from input index input_index[s] along input_axis.
        assert np.all(np.unravel_index(voxels, shape)[m.input_axis] == m.input_index[s])
        picture = shown[s]
        inside = picture >= 0
        assert np.isin(picture[inside], voxels).all()
        at_centres = picture[rows][:, cols]
        zz, yy, xx = np.unravel_index(voxels, shape)
        if upsampling:
            # Exact inverse: the pixel holding each voxel centre shows that voxel, and the token that
            # covers the voxel is the token of that pixel.
            np.testing.assert_array_equal(at_centres, voxels)
            codes = pixel_token[inside] * arr.size + picture[inside]
            assert np.isin(tokmap * arr.size + voxels, codes).all()
        else:
            # Downsampling: the pixel holding a voxel centre shows a voxel at most this far away.
            tol = [math.floor(0.5 / sc + 0.5) for sc in m.scale]
            pos = {int(val): rc for rc, val in np.ndenumerate(voxels)}
            for (r, c), val in np.ndenumerate(at_centres):
                pr, pc = pos[int(val)]
                assert abs(pr - r) <= tol[0] and abs(pc - c) <= tol[1]
        # Heatmaps, read back in the INPUT layout through the index volume's own values.
        if result.slice_kept[s]:
            role = result.token_role[s].ravel()[tokmap]
            np.testing.assert_array_equal(labels[zz, yy, xx], lut[role])
            np.testing.assert_array_equal(attention[zz, yy, xx], result.token_scores[s].ravel()[tokmap])
        else:
            assert np.all(labels[zz, yy, xx] == 1) and np.all(attention[zz, yy, xx] == 0)
    # Voxel slices that were not sampled are 0 ("not sent").
    unsent = np.setdiff1d(np.arange(shape[m.input_axis]), m.input_index)
    assert np.all(np.take(labels, unsent, axis=m.input_axis) == 0)
    assert np.all(np.take(attention, unsent, axis=m.input_axis) == 0)


@pytest.mark.parametrize("direction", list(DIRECTIONS))
@pytest.mark.parametrize("axis", AXES)
def test_geometry_round_trip_upsampling(direction, axis):
    img = index_image((7, 9, 11), (0.7, 1.3, 2.9), DIRECTIONS[direction], origin=(-5.5, 12.25, 80.0))
    _round_trip_checks(img, axis, size=64, max_slices=5, upsampling=True)


@pytest.mark.parametrize("direction", ["identity", "oblique"])
@pytest.mark.parametrize("axis", AXES)
def test_geometry_round_trip_downsampling(direction, axis):
    img = index_image((61, 47, 53), (0.9, 0.6, 1.1), DIRECTIONS[direction], origin=(1.0, 2.0, 3.0))
    _round_trip_checks(img, axis, size=16, max_slices=None, upsampling=False)


@settings(max_examples=20, deadline=None)
@given(
    size=st.tuples(st.integers(2, 9), st.integers(2, 9), st.integers(2, 9)),
    spacing=st.tuples(*[st.floats(0.3, 3.0)] * 3),
    perm=st.permutations([0, 1, 2]),
    signs=st.tuples(*[st.sampled_from([-1.0, 1.0])] * 3),
    axis=st.sampled_from(AXES),
    max_slices=st.one_of(st.none(), st.integers(1, 6)),
)
def test_geometry_round_trip_property(size, spacing, perm, signs, axis, max_slices):
    direction = np.zeros((3, 3))
    for j, (p, s) in enumerate(zip(perm, signs)):
        direction[p, j] = s
    img = index_image(size, spacing, direction, origin=(3.0, -4.0, 5.0))
    m = prepare_slices(img, axis=axis, window="bone", size=128, multiple=TP, max_slices=max_slices, interpolation="nearest").mapping
    _round_trip_checks(img, axis, size=128, max_slices=max_slices, upsampling=min(m.scale) >= 1.0)


def test_canonical_orientation_is_a_proper_permutation_for_oblique():
    patient, sign, obliquity = canonical_orientation(DIRECTIONS["oblique"].ravel())
    assert sorted(patient) == [0, 1, 2]
    assert patient == (1, 2, 0) and sign == (1, -1, -1)
    assert 15 < obliquity < 40
    # A 45-degree tie still gives a permutation.
    patient, _, obliquity = canonical_orientation(_rotation(2, 45.0).ravel())
    assert sorted(patient) == [0, 1, 2] and abs(obliquity - 45.0) < 1e-9


def _reoriented(img: sitk.Image, order, flips) -> sitk.Image:
    """Same anatomy (same physical voxel positions), different voxel axes order / direction."""
    out = sitk.PermuteAxes(img, order)
    return sitk.Flip(out, flips)


@pytest.mark.parametrize("axis", AXES)
def test_same_anatomy_any_direction_gives_identical_slices(tmp_path, axis):
    base = make_phantom_ct(shape=(12, 40, 36), spacing=(0.8, 0.9, 2.5), seed=1)
    variants = {
        "lps.nrrd": base,
        "ras.nrrd": _reoriented(base, [0, 1, 2], [True, True, False]),
        "perm.nrrd": _reoriented(base, [2, 0, 1], [False, True, True]),
        "perm2.mha": _reoriented(base, [1, 2, 0], [True, False, True]),
        "ras.nii.gz": base,  # NIfTI stores RAS; SimpleITK converts back to LPS
    }
    stacks = []
    for name, img in variants.items():
        sitk.WriteImage(img, str(tmp_path / name))
        loaded = load_volume(tmp_path / name)
        stacks.append(prepare_slices(loaded, axis=axis, max_slices=5, size=96, multiple=32))
    for other in stacks[1:]:
        assert other.images.shape == stacks[0].images.shape
        np.testing.assert_array_equal(other.images, stacks[0].images)
    assert len({tuple(s.mapping.axes) for s in stacks}) > 1  # the layouts really differed


def test_display_orientation_with_markers():
    """Axial: patient left on image right, anterior up; coronal: left on right, superior up;
    sagittal: anterior on image left, superior up; slice order inferior->superior etc."""
    arr = np.full((20, 30, 40), -1000, np.int16)  # z, y, x; LPS identity: +x left, +y posterior, +z superior
    arr[2:-2, 3:-3, 4:-4] = 40
    arr[14:18, 3:8, 30:36] = 1000  # marker: patient left, anterior, superior
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 1.0, 1.0))

    def marker_centre(axis):
        stack = prepare_slices(img, axis=axis, max_slices=None, size=64, multiple=8, interpolation="nearest")
        bright = stack.images[..., 0] == 255
        s, r, c = (np.mean(ix) for ix in np.nonzero(bright))
        n, h, w = bright.shape
        return s / n, r / h, c / w

    s, r, c = marker_centre("axial")
    assert s > 0.6 and r < 0.4 and c > 0.6  # superior slices; anterior up; left on the right
    s, r, c = marker_centre("coronal")
    assert s > 0.6 and r < 0.4 and c > 0.6  # posterior->anterior: anterior marker late; superior up; left right
    s, r, c = marker_centre("sagittal")
    assert s > 0.6 and r < 0.4 and c < 0.4  # right->left: left marker late; superior up; anterior left


def test_aspect_ratio_and_padding():
    img = index_image((50, 20, 6), (0.5, 2.0, 3.0), np.eye(3))  # 25 mm wide, 40 mm tall in the axial plane
    m = prepare_slices(img, window="bone", size=64, multiple=16).mapping
    assert m.resized_size == (64, 40) and m.image_size == (64, 48)
    assert m.pad == (0, 4)
    assert m.scale[0] == pytest.approx(2.0 / m.pixel_mm) and m.scale[1] == pytest.approx(0.5 / m.pixel_mm)
    np.testing.assert_allclose(m.resized_size[0] * m.pixel_mm, 40.0)
    stack = prepare_slices(img, window="bone", size=64, multiple=16)
    assert np.all(stack.images[:, :, :4] == 0) and np.all(stack.images[:, :, 44:] == 0)


# --- windows ---------------------------------------------------------------------------------
def _ct_box():
    arr = np.full((6, 40, 40), -1000, np.int16)
    arr[:, 10:30, 10:30] = 40
    arr[:, 15:25, 15:25] = 2000
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 1.0, 1.0))
    return img


def test_ct_soft_tissue_window_values():
    stack = prepare_slices(_ct_box(), size=40, multiple=8)
    assert stack.window == {"kind": "CT", "name": "soft_tissue", "width": 400.0, "level": 40.0, "auto": True}
    g = stack.images[..., 0]
    assert g[0, 0, 0] == 0  # air
    assert g[0, 12, 12] == 128  # 40 HU at level 40 -> mid grey (127.5 rounds to 128)
    assert g[0, 20, 20] == 255  # bone saturates
    assert np.array_equal(stack.images[..., 0], stack.images[..., 2])


@pytest.mark.parametrize("window,expected", [("lung", round((40 + 1350) / 1500 * 255)), ("350/50", round((40 - 50 + 175) / 350 * 255)), ("brain", 128)])
def test_ct_presets_and_explicit(window, expected):
    stack = prepare_slices(_ct_box(), window=window, size=40, multiple=8)
    assert stack.images[0, 12, 12, 0] == expected


def test_mr_percentile_stretch():
    rng = np.random.default_rng(0)
    arr = rng.uniform(0, 1000, (10, 32, 32)).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    stack = prepare_slices(img, size=32, multiple=8, interpolation="nearest", max_slices=None)
    w = stack.window
    assert w["kind"] == "MR" and w["percentiles"] == [0.5, 99.5] and w["auto"] is True
    lo, hi = np.percentile(arr, [0.5, 99.5])
    np.testing.assert_allclose(w["values"], [lo, hi], rtol=1e-6)
    expected = np.rint(np.clip((arr - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(stack.images[..., 0], expected)


@pytest.mark.parametrize(
    "arr,kind",
    [
        (np.array([-1000, 40, 700], np.int16), "CT"),
        (np.array([-1000.0, 40.0, 700.0], np.float32), "CT"),
        (np.array([-1000.5, 40.0, 700.0], np.float32), "MR"),  # not integer-valued
        (np.array([0, 400, 1200], np.uint16), "MR"),  # no air
        (np.array([-200, 40, 700], np.int16), "MR"),  # min above -500
    ],
)
def test_auto_window_rule(arr, kind):
    vol = np.resize(arr, (4, 5, 6))
    assert parse_window("auto", vol)["kind"] == kind


@pytest.mark.parametrize("window", ["sharp", "0/40", "-400/40", "400", "400/", "W400/L40"])
def test_bad_window_strings(window):
    with pytest.raises(InputError) as err:
        prepare_slices(_ct_box(), window=window, size=40, multiple=8)
    assert repr(window) in err.value.message
    if "/" in window and window[0] in "-0":
        assert "width must be greater than 0" in err.value.message and "400/40" in err.value.hint
    else:
        assert "Unknown window" in err.value.message and "350/50" in err.value.hint and "soft-tissue" in err.value.hint


def test_window_not_a_string():
    with pytest.raises(InputError, match="Window must be a string"):
        prepare_slices(_ct_box(), window=400, size=40, multiple=8)


@pytest.mark.parametrize(
    "kwargs,text",
    [
        ({"size": 450, "multiple": 32}, "size 450 is not a multiple of multiple 32"),
        ({"size": 0}, "size must be a positive integer"),
        ({"size": 64, "multiple": 0}, "multiple must be a positive integer"),
        ({"size": 64.0}, "size must be a positive integer"),
        ({"max_slices": 0}, "max_slices must be a positive integer"),
        ({"axis": "oblique"}, "Unknown slice axis 'oblique'"),
        ({"interpolation": "cubic"}, "Unknown interpolation 'cubic'"),
    ],
)
def test_bad_parameters(kwargs, text):
    with pytest.raises(InputError) as err:
        prepare_slices(_ct_box(), **kwargs)
    assert text in err.value.message


def test_token_pixels_must_divide_image():
    m = prepare_slices(_ct_box(), size=40, multiple=8).mapping
    with pytest.raises(InputError, match="not a multiple of the token size 16"):
        m.token_index_map(16)


# --- through-plane subsampling -----------------------------------------------------------------
def test_max_slices_subsampling_and_slabs():
    img = index_image((5, 6, 10), (1.0, 1.0, 1.0), np.eye(3))
    m = prepare_slices(img, window="bone", size=32, multiple=8, max_slices=4).mapping
    assert m.voxel_index == (0, 3, 6, 9)
    assert m.slabs == ((0, 2), (2, 5), (5, 8), (8, 10))
    # Coronal runs posterior -> anterior, i.e. against the input's y index.
    m = prepare_slices(img, axis="coronal", window="bone", size=32, multiple=8, max_slices=3).mapping
    assert m.voxel_index == (0, 2, 5) and m.input_axis == 1 and m.input_index == (5, 3, 0)
    assert m.slabs == ((0, 2), (2, 4), (4, 6))
    assert m.input_slabs == ((4, 6), (2, 4), (0, 2))


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 600), max_slices=st.one_of(st.none(), st.integers(1, 80)))
def test_select_slices_properties(n, max_slices):
    idx, starts, stops = select_slices(n, max_slices)
    assert len(idx) == (n if max_slices is None else min(n, max_slices))
    assert idx[0] == 0 and np.all(np.diff(idx) > 0) and idx[-1] <= n - 1
    if len(idx) > 1:
        assert idx[-1] == n - 1
    assert starts[0] == 0 and stops[-1] == n and np.all(starts[1:] == stops[:-1])  # a partition
    assert np.all((starts <= idx) & (idx < stops))
    k = np.arange(n)
    owner = np.searchsorted(stops, k, side="right")
    dist = np.abs(k[:, None] - idx[None, :])
    assert np.all(dist[k, owner] == dist.min(axis=1))  # every voxel slice is in its nearest slice's slab


def test_mapping_json_round_trip():
    img = index_image((7, 9, 11), (0.7, 1.3, 2.9), DIRECTIONS["oblique"], origin=(1.5, 2.5, 3.5))
    m = prepare_slices(img, axis="sagittal", window="bone", size=64, multiple=8, max_slices=4).mapping
    d = json.loads(json.dumps(m.to_dict()))
    assert d["axis"] == "sagittal" and d["image_size"] == list(m.image_size)
    assert SliceMapping.from_dict(d) == m


def test_only_chosen_slices_are_resampled_and_input_untouched():
    img = make_phantom_ct(shape=(40, 64, 64), seed=2)
    before = sitk.GetArrayFromImage(img)
    stack = prepare_slices(img, max_slices=8, size=64, multiple=32)
    assert stack.images.shape == (8, 64, 64, 3) and stack.images.dtype == np.uint8
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(img), before)
    assert img.GetPixelID() == sitk.sitkInt16
