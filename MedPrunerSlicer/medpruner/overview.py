"""`overview.png`: one picture of every decision, readable at a glance.

A montage of the model slices: dropped slices greyed out and labelled "dropped"; on kept slices,
nucleus tokens tinted by their score (viridis, semi-transparent), contextual tokens outlined in
cyan, pruned tokens dimmed. Below, a bar chart of the tokens kept per slice (nucleus + contextual),
with a red cross for dropped slices. Rendered with a bare `Figure` (Agg canvas): no pyplot, no display.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.collections import PatchCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure  # used without pyplot: renders with Agg, no display, no global state
from matplotlib.patches import Rectangle

from medpruner.atomic import write_atomic

__all__ = ["render_overview"]

_CMAP = "viridis"  # perceptual; its low end stays visible over dimmed (pruned) tokens


def render_overview(images: np.ndarray, result: Any, path: str | os.PathLike, title: str = "") -> Path:
    """Render the montage + bar chart of `result`'s decisions over `images` (S, H, W, 3) to a PNG.

    `result` needs `slice_kept`, `token_grid`, `token_role`, `token_scores` (see heatmaps.py).
    Written to a temporary file beside `path` and moved into place with os.replace().
    """
    images = np.asarray(images)
    n = images.shape[0]
    kept = np.asarray(result.slice_kept, dtype=bool).reshape(-1)
    if kept.shape[0] != n:
        raise ValueError(f"{n} images but the result covers {kept.shape[0]} slices.")
    h_img, w_img = images.shape[1:3]
    ncols = max(1, min(8, math.ceil(math.sqrt(n * 1.4))))
    nrows = math.ceil(n / ncols)
    thumb = 1.6
    fig = Figure(figsize=(ncols * thumb * max(w_img / h_img, 0.5), nrows * thumb + 2.2), dpi=100)
    grid = fig.add_gridspec(nrows + 1, ncols, height_ratios=[1] * nrows + [1.1], hspace=0.25, wspace=0.05)
    norm = Normalize(0.0, _max_score(result, kept))
    cmap = matplotlib.colormaps[_CMAP]
    n_nucleus = np.zeros(n, dtype=int)
    n_context = np.zeros(n, dtype=int)
    for s in range(n):  # one thumbnail per slice (tokens are drawn as whole images, not in a loop)
        ax = fig.add_subplot(grid[s // ncols, s % ncols])
        ax.set_axis_off()
        extent = (-0.5, w_img - 0.5, h_img - 0.5, -0.5)
        if not kept[s]:
            grey = images[s].mean(axis=-1)
            ax.imshow(0.35 * grey + 0.65 * 200, cmap="gray", vmin=0, vmax=255, extent=extent, interpolation="nearest")
            ax.text(0.5, 0.5, "dropped", transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.25", weight="bold")
            ax.set_title(f"{s}", fontsize=7, color="0.5", pad=2)
            continue
        role = np.asarray(result.token_role[s])
        score = np.asarray(result.token_scores[s], dtype=np.float32)
        n_nucleus[s] = int((role == 2).sum())
        n_context[s] = int((role == 1).sum())
        ax.imshow(images[s], extent=extent, interpolation="nearest")
        overlay = cmap(norm(score))
        overlay[..., 3] = np.where(role == 2, 0.6, 0.0)
        overlay[role == 0] = (0.0, 0.0, 0.0, 0.5)  # pruned: dimmed
        ax.imshow(overlay, extent=extent, interpolation="nearest")
        rr, cc = np.nonzero(role == 1)
        if rr.size:
            th, tw = h_img / role.shape[0], w_img / role.shape[1]
            boxes = [Rectangle((c * tw - 0.5, r * th - 0.5), tw, th) for r, c in zip(rr, cc)]
            ax.add_collection(PatchCollection(boxes, facecolor="none", edgecolor="cyan", linewidth=0.8))
        ax.set_title(f"{s}: {n_nucleus[s] + n_context[s]}/{role.size}", fontsize=7, pad=2)

    bar = fig.add_subplot(grid[nrows, :])
    xs = np.arange(n)
    bar.bar(xs, n_nucleus, color=cmap(0.55), label="nucleus (kept)")
    bar.bar(xs, n_context, bottom=n_nucleus, color="cyan", edgecolor="teal", linewidth=0.5, label="contextual")
    if (~kept).any():
        bar.plot(xs[~kept], np.zeros((~kept).sum()), "x", color="red", markersize=6, label="slice dropped")
    bar.set_xlim(-0.6, n - 0.4)
    bar.xaxis.get_major_locator().set_params(integer=True)
    bar.set_xlabel("model slice")
    bar.set_ylabel("tokens kept")
    bar.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=3, frameon=False)
    bar.tick_params(labelsize=7)
    total_tokens = sum(int(np.prod(g)) for g in result.token_grid)
    kept_tokens = int(n_nucleus.sum() + n_context.sum())
    summary = f"{int(kept.sum())}/{n} slices kept, {kept_tokens}/{total_tokens} tokens kept ({100.0 * kept_tokens / max(total_tokens, 1):.1f}%)"
    fig.suptitle(f"{title}\n{summary}" if title else summary, fontsize=10)
    sm = ScalarMappable(norm=norm, cmap=cmap)
    cax = fig.add_axes((0.92, 0.35, 0.012, 0.5))
    fig.colorbar(sm, cax=cax).set_label("nucleus probability", fontsize=7)
    cax.tick_params(labelsize=6)
    fig.subplots_adjust(left=0.08, right=0.9, top=0.9, bottom=0.07)
    return _save_atomic(fig, Path(path))


def _max_score(result: Any, kept: np.ndarray) -> float:
    best = 0.0
    for s in np.flatnonzero(kept):
        if result.token_scores[s] is not None and np.size(result.token_scores[s]):
            best = max(best, float(np.max(result.token_scores[s])))
    return best if best > 0 else 1.0


def _save_atomic(fig: Figure, path: Path) -> Path:
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"), suffix=".png")
