"""Render Resources/Screenshots/slicer-overlay.png headless (slicer-core, CPU, no display).

The demo phantom goes through the module's scene logic exactly as in Slicer: volume node -> NRRD ->
HTTP (the test suite's stand-in server over the real pipeline and the tiny model) -> result nodes
-> slice views rendered by Slicer's own vtkMRMLSliceLogic. Top row, the default "outline" style: a
kept axial slice with the decisions (outlines of kept and contextual tokens, pruned tokens dimmed),
the same slice with the attention tint added, and a coronal view where the slices the model never
saw are dark bands. Bottom row, the "filled" style of the same views for comparison.

    python Testing/Python/make_overlay_screenshot.py [OUT.png]
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

import numpy as np
from slicer_helpers import SliceRenderer, StubServer, add_volume, make_scene


def main(out: Path) -> None:
    import SimpleITK as sitk
    import slicer
    from medpruner import MedPruner
    from medpruner.phantom import make_phantom_ct
    from medpruner.tiny import ensure_tiny_checkpoint
    from MedPrunerSlicerLib import display
    from MedPrunerSlicerLib.ask import AskSession
    from MedPrunerSlicerLib.client import MedPrunerClient, build_params
    from MedPrunerSlicerLib.volume_export import ijk_to_ras_array

    engine = MedPruner.from_pretrained(ensure_tiny_checkpoint(), device="cpu", dtype="float32")
    server = StubServer(engine)
    try:
        image = make_phantom_ct()
        spacing, origin = image.GetSpacing(), image.GetOrigin()
        ijk_to_ras = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
        ijk_to_ras[:3, 3] = (-origin[0], -origin[1], origin[2])
        scene = make_scene()
        volume = add_volume(scene, sitk.GetArrayFromImage(image), ijk_to_ras, "CT phantom")
        volume.GetDisplayNode().AutoWindowLevelOff()
        volume.GetDisplayNode().SetWindowLevel(400, 40)
        done, errors = [], []
        session = AskSession(scene, lambda: MedPrunerClient(server.url), on_done=done.append,
                             on_error=errors.append, poll_interval=0.02)
        session.start(volume, build_params("Is there a liver lesion?", max_new_tokens=8))
        session.wait(120)
        if errors or not done:
            raise RuntimeError(f"the question was not answered: {errors}")
        result = done[0]
    finally:
        server.close()

    report = result.report
    rows = report["slices"]["per_slice"]
    # the kept slice where most pruned tokens lie over the body (not air), to show every mark
    ct, labels = slicer.util.arrayFromVolume(volume), slicer.util.arrayFromVolume(result.decisions)
    kept_k = max((r["voxel_index"] for r in rows if r["kept"]),
                 key=lambda k: int(((labels[k] == 2) & (ct[k] > -500)).sum()))
    z = (ijk_to_ras_array(volume) @ np.array([0, 0, kept_k, 1.0]))[2]
    size = 400
    tiles = (   # (style, mode, orientation, caption)
        ("outline", "decisions", "Axial", f"Axial slice {kept_k}: decisions"),
        ("outline", "both", "Axial", "Same slice: decisions + attention"),
        ("outline", "decisions", "Coronal", "Coronal: slices not seen are dark"),
        ("filled", "decisions", "Axial", f"Axial slice {kept_k}: decisions"),
        ("filled", "attention", "Axial", "Same slice: attention"),
        ("filled", "decisions", "Coronal", "Coronal: dropped slices grey"),
    )
    panels = []
    for i, (style, mode, orientation, _caption) in enumerate(tiles):
        view = SliceRenderer(scene, f"View{i}", orientation, size)
        view.composite.SetBackgroundVolumeID(volume.GetID())   # the user's view of the CT
        view.fit()
        if orientation == "Axial":
            view.logic.SetSliceOffset(z)
        display.show_result(scene, result, mode, 0.6, [view.composite], style=style)
        panels.append(view.render())
    draw_figure(panels, [t[3] for t in tiles], report, size, out)


def draw_figure(panels, captions, report, size: int, out: Path) -> None:
    """Two rows of three views, a title above each row, a legend below each, a caption on each tile."""
    from MedPrunerSlicerLib import colors
    from PIL import Image, ImageDraw, ImageFont

    pad, title_h, caption_h, legend_h = 10, 30, 24, 30
    row_h = title_h + caption_h + size + legend_h
    canvas = Image.new("RGB", (3 * (size + pad) + pad, 2 * row_h + pad), (24, 24, 28))
    draw = ImageDraw.Draw(canvas)
    try:
        big = ImageFont.truetype("DejaVuSans-Bold.ttf", 16)
        font = ImageFont.truetype("DejaVuSans.ttf", 14)
        small = ImageFont.truetype("DejaVuSans.ttf", 13)
    except OSError:
        big = font = small = ImageFont.load_default()
    labels = report["labels"]
    rgb = lambda rgba: tuple(int(round(255 * c)) for c in rgba[:3])
    grey = (225, 225, 225)
    wash = lambda alpha: tuple(int(round(150 * (1 - 0.6 * alpha))) for _ in range(3))   # the wash over mid-grey
    tint = colors.tint_ramp(5)
    legends = (
        [("line", rgb(labels[str(colors.KEPT)]["rgba"]), "kept (nucleus)"),
         ("line", rgb(labels[str(colors.CONTEXTUAL)]["rgba"]), "contextual"),
         ("box", wash(colors.WASH_RGBA["pruned"][3]), "pruned (merged)"),
         ("box", wash(colors.WASH_RGBA["dropped"][3]), "slice dropped or not sent"),
         ("ramp", [rgb(c) for c in tint[1:]], "attention above 1/tokens")],
        [("box", rgb(labels[k]["rgba"]), labels[k]["name"].split(" (")[0]) for k in ("4", "3", "2", "1")],
    )
    titles = ("Outline style (default): the anatomy under kept tokens is untouched",
              "Filled style, for comparison")
    tokens = report["tokens"]
    summary = (f"{report['slices']['kept']}/{report['slices']['sent']} slices kept, "
               f"{100 * tokens['retention']:.0f}% of visual tokens")
    for row in range(2):
        top = pad + row * row_h
        draw.text((pad, top + 6), titles[row], fill=(245, 245, 245), font=big)
        if row == 0:
            draw.text((canvas.width - pad - int(draw.textlength(summary, font=font)), top + 7), summary,
                      fill=grey, font=font)
        for col in range(3):
            i = 3 * row + col
            x = pad + col * (size + pad)
            draw.text((x + 2, top + title_h + 3), captions[i], fill=grey, font=font)
            canvas.paste(Image.fromarray(panels[i]), (x, top + title_h + caption_h))
        x, y = pad, top + title_h + caption_h + size + 8
        for kind, colour, name in legends[row]:
            if kind == "line":
                draw.rectangle([x, y + 2, x + 16, y + 16], outline=colour, width=2)
            elif kind == "box":
                draw.rectangle([x, y + 2, x + 16, y + 16], fill=colour)
            else:
                for j, c in enumerate(colour):
                    draw.rectangle([x + 4 * j, y + 2, x + 4 * j + 3, y + 16], fill=c)
            draw.text((x + 22, y + 1), name, fill=grey, font=small)
            x += 22 + int(draw.textlength(name, font=small)) + 20
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, optimize=True)
    print(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "Resources" / "Screenshots" / "slicer-overlay.png")
