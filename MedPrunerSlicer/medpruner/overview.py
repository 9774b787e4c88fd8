"""`overview.png`: one sheet a radiologist can read, with every decision over the anatomy.

The sheet: the question and the answer on top; one tile per model slice with its orientation
letters, its number and tokens kept above it, and the voxel slice and its position in mm (RAS, as
Slicer shows it) below it; a legend that names every mark; and a bar chart of the tokens kept per
slice. On a kept slice the anatomy stays as it is: only tokens whose nucleus probability is above
the uniform share (1/tokens) are tinted, more strongly the higher it is; contextual tokens are
outlined in cyan; pruned tokens (merged into a contextual token) are dimmed. A slice the slice
filter dropped is washed out light grey and labelled "dropped".

Everything is placed in pixels by `overview_layout`, so titles and labels never overlap whatever
the number of slices (2 to 256 and more) or the slice shape (very wide or very tall), and the sheet
stays within `MAX_SHEET_WIDTH` pixels. Rendered with a bare `Figure` (Agg): no pyplot, no display.
"""
from __future__ import annotations

import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PatchCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure  # used without pyplot: renders with Agg, no display, no global state
from matplotlib.patches import Patch, Rectangle

from medpruner.atomic import write_atomic

__all__ = ["ORIENTATION_LETTERS", "OverviewLayout", "build_overview_figure", "overview_layout", "render_overview",
           "slice_captions"]

_CMAP = "viridis"
DPI = 100
MAX_SHEET_WIDTH = 1800
MAX_TILE = 200           # largest tile side, px
MIN_TILE_SIDE = 24       # a very wide or tall slice keeps at least this many pixels on its short side
MARGIN = 40
LABEL_H = 14             # one line of 7 pt text
LABEL_MIN_W = 104        # room for a caption such as "k 123 · S -123.4 mm"
GAP = 8
HEADER_LINE_H = 18
LEGEND_H = 26
CHART_H = 170
COLORBAR_W = 70
PRUNED_DIM = 0.45        # alpha of the black veil over pruned tokens
MAX_TINT = 0.65          # alpha of the tint at the highest nucleus probability

# Radiological display (medpruner.slicing): what lies at the left, right, top and bottom of a tile.
ORIENTATION_LETTERS = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"), "sagittal": ("A", "P", "S", "I")}


@dataclass(frozen=True)
class OverviewLayout:
    """Pixel boxes (x, y, width, height; y from the top) of everything on the sheet."""

    width: int
    height: int
    columns: int
    tiles: list[tuple[int, int, int, int]]
    titles: list[tuple[int, int, int, int]]
    captions: list[tuple[int, int, int, int]]
    header: tuple[int, int, int, int]
    legend: tuple[int, int, int, int]
    chart: tuple[int, int, int, int]
    colorbar: tuple[int, int, int, int]


def overview_layout(n: int, slice_h: int, slice_w: int, header_lines: int = 3) -> OverviewLayout:
    """Where each part of a sheet for `n` slices of `slice_h` x `slice_w` pixels goes."""
    aspect = slice_w / max(slice_h, 1)
    usable = MAX_SHEET_WIDTH - 2 * MARGIN - COLORBAR_W - GAP
    best = None
    for columns in range(1, min(n, 32) + 1):   # the column count whose sheet is closest to 4:3
        tile_w = min(MAX_TILE, (usable - (columns - 1) * GAP) / columns, MAX_TILE * aspect)
        tile_h = tile_w / aspect
        too_small = min(tile_h, tile_w) < MIN_TILE_SIDE or \
            columns * max(tile_w, LABEL_MIN_W) + (columns - 1) * GAP > usable
        if too_small and best is not None:
            break
        rows = math.ceil(n / columns)
        sheet_w = columns * (max(tile_w, LABEL_MIN_W) + GAP)
        sheet_h = rows * (tile_h + 2 * LABEL_H + GAP)
        score = abs(math.log(max(sheet_w, 1) / max(sheet_h, 1) / 1.33))
        if best is None or score < best[0]:
            best = (score, columns, tile_w, tile_h)
    _, columns, tile_w, tile_h = best
    tile_w, tile_h = max(1, int(tile_w)), max(1, int(tile_h))
    cell_w = max(tile_w, LABEL_MIN_W) + GAP   # a label line needs room whatever the tile
    rows = math.ceil(n / columns)
    cell_h = LABEL_H + tile_h + LABEL_H + GAP
    width = max(2 * MARGIN + columns * cell_w + COLORBAR_W, 640)
    header_h = header_lines * HEADER_LINE_H + GAP
    top = MARGIN // 2 + header_h
    tiles, titles, captions = [], [], []
    for s in range(n):
        r, c = divmod(s, columns)
        x = MARGIN + c * cell_w + (cell_w - GAP - tile_w) // 2
        y = top + r * cell_h
        titles.append((MARGIN + c * cell_w, y, cell_w - GAP, LABEL_H))
        tiles.append((x, y + LABEL_H, tile_w, tile_h))
        captions.append((MARGIN + c * cell_w, y + LABEL_H + tile_h, cell_w - GAP, LABEL_H))
    grid_bottom = top + rows * cell_h
    legend = (MARGIN, grid_bottom + GAP, width - 2 * MARGIN, LEGEND_H)
    chart = (MARGIN + 20, legend[1] + LEGEND_H + GAP + 10, width - 2 * MARGIN - 20 - COLORBAR_W, CHART_H)
    height = chart[1] + CHART_H + 45
    colorbar = (width - MARGIN - 20, top + LABEL_H, 12, max(60, min(grid_bottom - top - 2 * LABEL_H, 300)))
    return OverviewLayout(width=int(width), height=int(height), columns=columns, tiles=tiles, titles=titles,
                          captions=captions, header=(MARGIN, MARGIN // 2, width - 2 * MARGIN, header_h),
                          legend=legend, chart=chart, colorbar=colorbar)


def slice_captions(mapping: Any) -> list[str]:
    """'k 12 · S 34.5 mm' for each model slice: the voxel slice it was taken from and where that slice's centre
    lies along the viewing direction, in RAS millimetres as Slicer shows them."""
    axis_name = {"axial": ("S", 2, 1.0), "coronal": ("A", 1, -1.0), "sagittal": ("R", 0, -1.0)}
    letter, lps_component, ras_sign = axis_name.get(mapping.axis, ("S", 2, 1.0))
    voxel_axis = 2 - int(mapping.input_axis)          # numpy (z, y, x) -> ITK (i, j, k)
    size = np.asarray(mapping.input_size, dtype=float)
    spacing = np.asarray(mapping.input_spacing, dtype=float)
    direction = np.asarray(mapping.input_direction, dtype=float).reshape(3, 3)
    origin = np.asarray(mapping.input_origin, dtype=float)
    captions = []
    for index in mapping.input_index:
        centre = (size - 1) / 2
        centre[voxel_axis] = index
        point = origin + direction @ (spacing * centre)
        position = ras_sign * point[lps_component]
        captions.append(f"{'ijk'[voxel_axis]} {int(index)} · {letter} {position:.1f} mm")
    return captions


def build_overview_figure(images: np.ndarray, result: Any, title: str = "", answer: str = "", axis: str = "axial",
                          captions: list[str] | None = None) -> tuple[Figure, OverviewLayout]:
    """The overview sheet as a matplotlib Figure and the layout it follows (see module docstring)."""
    images = np.asarray(images)
    n = images.shape[0]
    kept = np.asarray(result.slice_kept, dtype=bool).reshape(-1)
    if kept.shape[0] != n:
        raise ValueError(f"{n} images but the result covers {kept.shape[0]} slices.")
    if captions is not None and len(captions) != n:
        raise ValueError(f"{n} images but {len(captions)} captions.")
    h_img, w_img = images.shape[1:3]
    width = overview_layout(n, h_img, w_img).width   # the sheet's width does not depend on the header
    header = _header_lines(title, answer, result, kept, chars=int((width - 2 * MARGIN) / 7))
    layout = overview_layout(n, h_img, w_img, header_lines=len(header))
    fig = Figure(figsize=(layout.width / DPI, layout.height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    norm = Normalize(0.0, _max_score(result, kept))
    cmap = matplotlib.colormaps[_CMAP]
    letters = ORIENTATION_LETTERS.get(axis, ORIENTATION_LETTERS["axial"])
    n_nucleus = np.zeros(n, dtype=int)
    n_context = np.zeros(n, dtype=int)
    for s in range(n):
        ax = fig.add_axes(_box(layout.tiles[s], layout))
        ax.set_axis_off()
        extent = (-0.5, w_img - 0.5, h_img - 0.5, -0.5)
        if not kept[s]:
            grey = images[s].mean(axis=-1)
            ax.imshow(0.35 * grey + 0.65 * 200, cmap="gray", vmin=0, vmax=255, extent=extent, interpolation="nearest",
                      aspect="auto")
            ax.text(0.5, 0.5, "dropped", transform=ax.transAxes, ha="center", va="center", fontsize=8, color="0.2",
                    weight="bold", clip_on=True)
            title_text = f"{s}: dropped"
        else:
            role = np.asarray(result.token_role[s])
            score = np.asarray(result.token_scores[s], dtype=np.float32)
            n_nucleus[s] = int((role == 2).sum())
            n_context[s] = int((role == 1).sum())
            ax.imshow(images[s], extent=extent, interpolation="nearest", aspect="auto")
            ax.imshow(_veil(role, score, norm, cmap), extent=extent, interpolation="nearest", aspect="auto")
            rr, cc = np.nonzero(role == 1)
            if rr.size:
                th, tw = h_img / role.shape[0], w_img / role.shape[1]
                boxes = [Rectangle((c * tw - 0.5, r * th - 0.5), tw, th) for r, c in zip(rr, cc)]
                ax.add_collection(PatchCollection(boxes, facecolor="none", edgecolor="cyan", linewidth=0.8))
            title_text = f"{s}: {n_nucleus[s] + n_context[s]}/{role.size} kept"
        _letters(ax, letters, layout.tiles[s])
        _label(fig, layout, layout.titles[s], title_text, color="0.1" if kept[s] else "0.45")
        if captions is not None:
            _label(fig, layout, layout.captions[s], captions[s], color="0.3")
    _header(fig, layout, header)
    _legend(fig, layout, cmap)
    _chart(fig, layout, n_nucleus, n_context, kept, cmap)
    cax = fig.add_axes(_box(layout.colorbar, layout))
    from matplotlib.cm import ScalarMappable

    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax).set_label("nucleus probability", fontsize=7)
    cax.tick_params(labelsize=6)
    return fig, layout


def render_overview(images: np.ndarray, result: Any, path: str | os.PathLike, title: str = "", answer: str = "",
                    axis: str = "axial", captions: list[str] | None = None) -> Path:
    """Render the sheet of `result`'s decisions over `images` (S, H, W, 3) to a PNG at `path`.

    `result` needs `slice_kept`, `token_grid`, `token_role`, `token_scores` (see heatmaps.py).
    Written to a temporary file beside `path` and moved into place with os.replace().
    """
    fig, _ = build_overview_figure(images, result, title=title, answer=answer, axis=axis, captions=captions)
    return write_atomic(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=DPI), suffix=".png")


# -- pieces ------------------------------------------------------------------------------------------
def _box(box: tuple[int, int, int, int], layout: OverviewLayout) -> tuple[float, float, float, float]:
    """Pixel box (y from the top) -> figure fraction (left, bottom, width, height)."""
    x, y, w, h = box
    return x / layout.width, 1 - (y + h) / layout.height, w / layout.width, h / layout.height


def _veil(role: np.ndarray, score: np.ndarray, norm: Normalize, cmap) -> np.ndarray:
    """RGBA per token: nucleus tinted only above the uniform share, pruned dimmed, contextual clear."""
    uniform = 1.0 / max(role.size, 1)
    top = max(float(norm.vmax), uniform * 1.0001)
    strength = np.clip((score - uniform) / (top - uniform), 0.0, 1.0)
    veil = cmap(norm(score))
    veil[..., 3] = np.where(role == 2, MAX_TINT * strength, 0.0)
    veil[role == 0] = (0.0, 0.0, 0.0, PRUNED_DIM)
    return veil


def _letters(ax, letters: tuple[str, str, str, str], tile: tuple[int, int, int, int]) -> None:
    if min(tile[2], tile[3]) < 40:   # too small to carry letters without hiding the slice
        return
    style = {"transform": ax.transAxes, "fontsize": 7, "color": "yellow", "weight": "bold", "clip_on": True}
    left, right, top, bottom = letters
    ax.text(0.03, 0.5, left, ha="left", va="center", **style)
    ax.text(0.97, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.97, top, ha="center", va="top", **style)
    ax.text(0.5, 0.03, bottom, ha="center", va="bottom", **style)


def _label(fig: Figure, layout: OverviewLayout, box, text: str, color: str) -> None:
    x, y, w, h = box
    limit = max(8, int(w / 5.2))   # about 5 px per character at 7 pt
    shown = text if len(text) <= limit else text[:limit - 1] + "…"
    fig.text((x + w / 2) / layout.width, 1 - (y + h / 2) / layout.height, shown, ha="center", va="center",
             fontsize=7, color=color)


def _header_lines(title: str, answer: str, result: Any, kept: np.ndarray, chars: int) -> list[str]:
    total = sum(int(np.prod(g)) for g in result.token_grid)
    kept_tokens = sum(int((np.asarray(result.token_role[s]) > 0).sum()) for s in np.flatnonzero(kept)
                      if result.token_role[s] is not None)
    summary = (f"{int(kept.sum())}/{kept.size} slices kept, {kept_tokens}/{total} visual tokens kept "
               f"({100.0 * kept_tokens / max(total, 1):.1f}%)")
    lines = []
    if title:
        lines += _wrapped("Q: " + title, 2, chars)
    if answer:
        lines += _wrapped("A: " + answer, 3, chars)
    return lines + [summary]


def _wrapped(text: str, max_lines: int, chars: int) -> list[str]:
    """At most `max_lines` lines of at most `chars` characters; what does not fit ends in an ellipsis."""
    text = "".join(c if c.isprintable() else " " for c in text)
    lines = textwrap.wrap(" ".join(text.split()), width=max(chars, 20)) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][:max(chars, 20) - 2] + " …"
    return lines


def _header(fig: Figure, layout: OverviewLayout, lines: list[str]) -> None:
    x, y, _, _ = layout.header
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        fig.text(x / layout.width, 1 - (y + (i + 0.5) * HEADER_LINE_H) / layout.height, line, ha="left", va="center",
                 fontsize=9 if not last else 8, color="0.1" if not last else "0.35", weight="bold" if i == 0 else None)


def _legend(fig: Figure, layout: OverviewLayout, cmap) -> None:
    handles = [Patch(facecolor=cmap(0.7), alpha=MAX_TINT, label="kept (nucleus): tinted where attention is above "
                     "uniform, clear below"),
               Patch(facecolor="none", edgecolor="cyan", label="contextual token (kept, absorbs pruned ones)"),
               Patch(facecolor="black", alpha=PRUNED_DIM, label="pruned: merged into a contextual token"),
               Patch(facecolor="0.8", label="slice dropped by the slice filter")]
    ax = fig.add_axes(_box(layout.legend, layout))
    ax.set_axis_off()
    ax.legend(handles=handles, loc="center left", ncol=2, fontsize=7, frameon=False, handlelength=1.5,
              columnspacing=1.5, borderaxespad=0)


def _chart(fig: Figure, layout: OverviewLayout, n_nucleus, n_context, kept, cmap) -> None:
    n = kept.size
    bar = fig.add_axes(_box(layout.chart, layout))
    xs = np.arange(n)
    bar.bar(xs, n_nucleus, color=cmap(0.55), width=0.85)
    bar.bar(xs, n_context, bottom=n_nucleus, color="cyan", edgecolor="teal", linewidth=0.3 if n > 64 else 0.5,
            width=0.85)
    if (~kept).any():
        bar.plot(xs[~kept], np.zeros((~kept).sum()), "x", color="red", markersize=4 if n > 64 else 6)
    bar.set_xlim(-0.6, n - 0.4)
    from matplotlib.ticker import MaxNLocator

    bar.xaxis.set_major_locator(MaxNLocator(nbins=min(n, 16), integer=True))
    bar.set_xlabel("model slice (x: dropped)", fontsize=8)
    bar.set_ylabel("tokens kept", fontsize=8)
    bar.tick_params(labelsize=7)


def _max_score(result: Any, kept: np.ndarray) -> float:
    best = 0.0
    for s in np.flatnonzero(kept):
        if result.token_scores[s] is not None and np.size(result.token_scores[s]):
            best = max(best, float(np.max(result.token_scores[s])))
    return best if best > 0 else 1.0
