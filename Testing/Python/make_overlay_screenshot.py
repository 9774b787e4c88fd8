"""Render Resources/Screenshots/slicer-overlay.png headless (slicer-core, CPU, no display).

The demo phantom goes through the module's scene logic exactly as in Slicer: volume node -> NRRD ->
HTTP (the test suite's stand-in server over the real pipeline and the tiny model) -> result nodes
-> slice views rendered by Slicer's own vtkMRMLSliceLogic. Three views side by side: the decisions
on a kept axial slice, the attention on the same slice, and a coronal view where the dropped axial
slices show as grey bands.

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
    from medpruner import MedPruner
    from medpruner.phantom import make_phantom_ct
    from medpruner.tiny import ensure_tiny_checkpoint
    from MedPrunerSlicerLib import display
    from MedPrunerSlicerLib.ask import AskSession
    from MedPrunerSlicerLib.client import MedPrunerClient, build_params
    from MedPrunerSlicerLib.volume_export import ijk_to_ras_array
    from PIL import Image, ImageDraw, ImageFont

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
        done = []
        session = AskSession(scene, lambda: MedPrunerClient(server.url), on_done=done.append,
                             on_error=lambda exc: (_ for _ in ()).throw(exc), poll_interval=0.02)
        session.start(volume, build_params("Is there a liver lesion?", max_new_tokens=8))
        session.wait(120)
        result = done[0]
    finally:
        server.close()

    report = result.report
    rows = report["slices"]["per_slice"]
    size = 420
    panels, captions = [], []
    kept_k = max((r for r in rows if r["kept"]), key=lambda r: r["tokens_total"] - r["tokens_kept"])["voxel_index"]
    z = (ijk_to_ras_array(volume) @ np.array([0, 0, kept_k, 1.0]))[2]
    for name, mode, caption in (("Red", "decisions", f"Decisions, axial slice {kept_k}"),
                                ("Yellow", "attention", "Attention (nucleus probability)")):
        view = SliceRenderer(scene, name, "Axial", size)
        display.show_result(scene, result, mode, 0.55, [view.composite])
        view.fit()
        view.logic.SetSliceOffset(z)
        panels.append(view.render())
        captions.append(caption)
    view = SliceRenderer(scene, "Green", "Coronal", size)
    display.show_result(scene, result, "decisions", 0.55, [view.composite])
    view.fit()
    panels.append(view.render())
    captions.append("Decisions, coronal: dropped slices grey")

    labels = report["labels"]
    legend = [(labels[k]["name"], labels[k]["rgba"]) for k in ("4", "3", "2", "1")]
    pad, header, footer = 8, 30, 34
    canvas = Image.new("RGB", (len(panels) * (size + pad) + pad, size + header + footer + pad), (24, 24, 28))
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.truetype("DejaVuSans.ttf", 15)
        small = ImageFont.truetype("DejaVuSans.ttf", 13)
    except OSError:
        font = small = ImageFont.load_default()
    for i, (panel, caption) in enumerate(zip(panels, captions)):
        x = pad + i * (size + pad)
        canvas.paste(Image.fromarray(panel), (x, header))
        draw.text((x + 4, 7), caption, fill=(235, 235, 235), font=font)
    x = pad
    y = header + size + 10
    for name, rgba in legend:
        colour = tuple(int(round(255 * c)) for c in rgba[:3])
        draw.rectangle([x, y + 2, x + 14, y + 16], fill=colour)
        draw.text((x + 20, y + 1), name, fill=(225, 225, 225), font=small)
        x += 24 + int(draw.textlength(name, font=small)) + 18
    tokens = report["tokens"]
    summary = (f"{report['slices']['kept']}/{report['slices']['sent']} slices, "
               f"{100 * tokens['retention']:.0f}% of visual tokens kept")
    draw.text((canvas.width - pad - int(draw.textlength(summary, font=small)), y + 1), summary,
              fill=(225, 225, 225), font=small)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, optimize=True)
    print(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "Resources" / "Screenshots" / "slicer-overlay.png")
