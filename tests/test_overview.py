"""overview.png: readable anatomy, named marks, orientation and position on every tile, the question and the
answer on the sheet, and a layout whose labels never overlap for 2 to 200 slices and any slice shape."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from medpruner.overview import MAX_SHEET_WIDTH, build_overview_figure, overview_layout, render_overview, slice_captions
from medpruner.phantom import make_phantom_ct
from medpruner.slicing import prepare_slices
from volume_helpers import FakeResult, random_result


@pytest.fixture(scope="module")
def stack():
    return prepare_slices(make_phantom_ct(shape=(24, 64, 64), seed=4), max_slices=6, size=64, multiple=16)


def _overlaps(a, b) -> bool:
    return not (a.x1 <= b.x0 + 0.5 or b.x1 <= a.x0 + 0.5 or a.y1 <= b.y0 + 0.5 or b.y1 <= a.y0 + 0.5)


def _text_boxes(fig):
    """Window extents of the sheet's own texts (headers, titles, captions) after drawing."""
    renderer = fig.canvas.get_renderer()
    return [(t.get_text(), t.get_window_extent(renderer)) for t in fig.texts if t.get_text()]


@pytest.mark.parametrize("n,shape", [(2, (64, 64)), (32, (64, 64)), (200, (48, 48)), (12, (32, 224)),
                                     (12, (224, 32))])
def test_layout_never_overlaps_and_stays_a_sane_size(n, shape, tmp_path):
    h, w = shape
    images = np.random.default_rng(0).integers(0, 255, (n, h, w, 3), dtype=np.uint8)
    result = random_result(n, (max(h // 16, 1), max(w // 16, 1)), seed=n)
    captions = [f"k {i} · S {-150.0 + 2.5 * i:.1f} mm" for i in range(n)]
    words = {"title": "Is there a liver lesion? " * 3, "answer": "A long answer. " * 40}
    fig, layout = build_overview_figure(images, result, captions=captions, **words)
    fig.canvas.draw()
    assert layout.width <= MAX_SHEET_WIDTH and layout.height <= 3600, (layout.width, layout.height)
    assert layout.height < 4 * layout.width and layout.width < 4 * layout.height
    renderer = fig.canvas.get_renderer()
    tiles = [ax.get_window_extent(renderer) for ax in fig.axes[:n]]
    texts = _text_boxes(fig)
    sheet = fig.bbox
    for (a_text, a), (b_text, b) in itertools.combinations(texts, 2):
        assert not _overlaps(a, b), (a_text, b_text)
    for text, box in texts:
        assert sheet.x0 - 0.5 <= box.x0 and box.x1 <= sheet.x1 + 0.5 and box.y0 >= -0.5 and box.y1 <= sheet.y1 + 0.5, text
        assert not any(_overlaps(box, tile) for tile in tiles), text
    for a, b in itertools.combinations(tiles, 2):
        assert not _overlaps(a, b)
    path = tmp_path / "overview.png"
    render_overview(images, result, path, captions=captions, **words)
    assert Image.open(path).size == (layout.width, layout.height)


def test_question_answer_and_legend_are_on_the_sheet(stack):
    result = random_result(6, (4, 4), kept=np.array([True, False, True, True, False, True]), seed=5)
    fig, _ = build_overview_figure(stack.images, result, title="Is there a lesion?", answer="No lesion is seen.")
    texts = [t.get_text() for t in fig.texts]
    assert "Q: Is there a lesion?" in texts and "A: No lesion is seen." in texts
    legend = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert any("pruned" in t for t in legend) and any("dropped" in t for t in legend)
    assert any("contextual" in t for t in legend) and any("nucleus" in t for t in legend)


@pytest.mark.parametrize("axis,letters", [("axial", "RLAP"), ("coronal", "RLSI"), ("sagittal", "APSI")])
def test_orientation_letters(stack, axis, letters):
    result = random_result(6, (4, 4), kept=np.ones(6, bool), seed=1)
    fig, _ = build_overview_figure(stack.images, result, axis=axis)
    tile_texts = "".join(t.get_text() for t in fig.axes[0].texts)
    assert tile_texts == letters


def _tile_pixels(png: np.ndarray, box, inset: int = 14) -> np.ndarray:
    x, y, w, h = box
    return png[y + inset:y + h - inset, x + inset:x + w - inset, :3].astype(float)


def test_anatomy_stays_visible_where_attention_is_ordinary(tmp_path, stack):
    """A kept slice whose tokens all hold the uniform share shows the image as it is; one token far above it is
    tinted; pruned tokens are dimmed; a dropped slice is washed out."""
    n = stack.images.shape[0]
    grid = (4, 4)
    nucleus = np.full(grid, 2, np.uint8)
    uniform = np.full(grid, 1 / 16, np.float32)
    peaked = uniform.copy()
    peaked[0, 0] = 0.5
    pruned = np.zeros(grid, np.uint8)
    roles = [nucleus, nucleus, pruned, None, nucleus, nucleus]
    scores = [uniform, peaked, uniform, None, uniform, uniform]
    kept = np.array([r is not None for r in roles])
    result = FakeResult(kept, [grid] * n, roles, scores)
    path = tmp_path / "o.png"
    render_overview(stack.images, result, path)
    png = np.asarray(Image.open(path).convert("RGB"))
    layout = overview_layout(n, *stack.images.shape[1:3], header_lines=1)
    as_is = _tile_pixels(png, layout.tiles[0])
    x, y, w, h = layout.tiles[0]
    original = np.asarray(Image.fromarray(stack.images[0]).resize((w, h), Image.NEAREST)).astype(float)[14:h - 14, 14:w - 14]
    assert np.abs(as_is - original).mean() < 6, "uniform attention must not veil the anatomy"
    x1, y1, w1, h1 = layout.tiles[1]
    corner = png[y1 + 2:y1 + h1 // 4 - 2, x1 + 2:x1 + w1 // 4 - 2, :3].astype(float)
    plain = np.asarray(Image.fromarray(stack.images[1]).resize((w1, h1), Image.NEAREST)).astype(float)[
        2:h1 // 4 - 2, 2:w1 // 4 - 2]
    assert np.abs(corner - plain).mean() > 20, "a token far above the uniform share is tinted"
    def original_mean(s: int) -> float:
        _, _, ws, hs = layout.tiles[s]
        resized = np.asarray(Image.fromarray(stack.images[s]).resize((ws, hs), Image.NEAREST)).astype(float)
        return float(resized[14:hs - 14, 14:ws - 14].mean())

    assert _tile_pixels(png, layout.tiles[2]).mean() < 0.7 * original_mean(2), "pruned tokens are dimmed"
    assert _tile_pixels(png, layout.tiles[3]).mean() > original_mean(3) + 40, "a dropped slice is washed out"


def test_captions_give_the_voxel_slice_and_its_position():
    image = make_phantom_ct(shape=(10, 32, 32), spacing=(0.8, 0.8, 2.5))
    image.SetOrigin((0.0, 0.0, -40.0))
    stack = prepare_slices(image, max_slices=10, size=32, multiple=16)
    captions = slice_captions(stack.mapping)
    assert captions[0] == "k 0 · S -40.0 mm" and captions[-1] == "k 9 · S -17.5 mm"
    coronal = prepare_slices(image, axis="coronal", max_slices=4, size=32, multiple=16)
    assert all(c.startswith("j ") and " · A " in c for c in slice_captions(coronal.mapping))
