"""overview: the montage renders, atomically, and shows dropped vs kept slices differently."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medpruner.overview import render_overview
from medpruner.phantom import make_phantom_ct
from medpruner.slicing import prepare_slices
from volume_helpers import random_result


@pytest.fixture(scope="module")
def stack():
    return prepare_slices(make_phantom_ct(shape=(24, 64, 64), seed=4), max_slices=6, size=64, multiple=16)


def _thumbnail_boxes(png: np.ndarray):
    """Bounding boxes of the thumbnails: columns/rows of the montage area that are not white."""
    top = png[: int(png.shape[0] * 0.62)]  # above the bar chart
    dark = (top[..., :3].astype(int).sum(-1) < 700)
    cols = np.flatnonzero(dark.mean(0) > 0.15)
    rows = np.flatnonzero(dark.mean(1) > 0.15)
    return rows, cols


def test_render_overview(tmp_path, stack):
    kept = np.array([True, False, True, True, False, True])
    result = random_result(6, (4, 4), kept=kept, seed=5)
    path = tmp_path / "overview.png"
    path.write_bytes(b"stale")
    assert render_overview(stack.images, result, path, title="Is there a lesion?") == path
    assert [p.name for p in tmp_path.iterdir()] == ["overview.png"]  # temp file replaced into place
    img = Image.open(path)
    assert img.format == "PNG" and img.width > 300 and img.height > 300
    assert path.stat().st_size > 10_000


def test_dropped_and_kept_thumbnails_differ(tmp_path, stack):
    # Same picture, once all kept (all tokens pruned -> dimmed), once all dropped (greyed out).
    n = stack.images.shape[0]
    role = np.zeros((4, 4), np.uint8)
    score = np.full((4, 4), 1 / 16, np.float32)
    grid = [(4, 4)] * n
    from volume_helpers import FakeResult

    kept = FakeResult(np.ones(n, bool), grid, [role] * n, [score] * n)
    dropped = FakeResult(np.zeros(n, bool), grid, [None] * n, [None] * n)
    a, b = tmp_path / "kept.png", tmp_path / "dropped.png"
    render_overview(stack.images, kept, a)
    render_overview(stack.images, dropped, b)
    pa = np.asarray(Image.open(a).convert("RGB")).astype(float)
    pb = np.asarray(Image.open(b).convert("RGB")).astype(float)
    assert pa.shape == pb.shape
    ra, ca = _thumbnail_boxes(pa)
    # Kept (all pruned, dimmed) thumbnails are dark; dropped ones are washed-out light grey.
    region_a = pa[ra.min() : ra.max() + 1, ca.min() : ca.max() + 1]
    region_b = pb[ra.min() : ra.max() + 1, ca.min() : ca.max() + 1]
    assert region_b.mean() > region_a.mean() + 60
    assert region_b.std() < region_a.std() + 40
