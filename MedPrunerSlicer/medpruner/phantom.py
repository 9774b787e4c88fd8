"""A deterministic synthetic abdomen/chest CT for tests and the demo (no patient data needed).

Hounsfield units: air -1000 outside the body, subcutaneous fat -100, soft tissue 40, lungs -850
in the upper (superior) third, spine (bone 700) posterior in the midline, liver 60 in the lower
part on the patient's right (low x in LPS, so the image's left in radiological display) with a
hypodense lesion of 10 HU, contrast-enhanced kidneys (150) and aorta (180), a heart (45) in the
chest, bowel gas and ribs that move from slice to slice, and seeded noise (sigma 12 HU) in the body. Two stretches of
slices repeat the same slice exactly, so the slice filter (gamma 0.05) has redundant slices to drop.
Int16 pixels, LPS identity direction, a non-zero origin centred on the body.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import SimpleITK as sitk

__all__ = ["make_phantom_ct", "phantom_ct_array"]


def make_phantom_ct(
    shape: tuple[int, int, int] = (64, 160, 160),
    spacing: tuple[float, float, float] = (0.8, 0.8, 2.5),
    seed: int = 0,
) -> "sitk.Image":
    """Phantom of numpy shape (Z, Y, X), spacing in SimpleITK order (x, y, z) mm; same seed, same voxels."""
    import SimpleITK as sitk

    nz, ny, nx = (int(s) for s in shape)
    arr = phantom_ct_array(shape, seed)
    img = sitk.GetImageFromArray(arr)
    sp = tuple(float(s) for s in spacing)
    img.SetSpacing(sp)
    img.SetOrigin((-(nx - 1) * sp[0] / 2, -(ny - 1) * sp[1] / 2 + 12.5, -150.0))
    img.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return img


def phantom_ct_array(shape: tuple[int, int, int] = (64, 160, 160), seed: int = 0) -> np.ndarray:
    """The phantom's Hounsfield units as an int16 array (Z, Y, X), inferior slice first (no SimpleITK needed)."""
    nz, ny, nx = (int(s) for s in shape)
    if min(nz, ny, nx) < 2:
        raise ValueError(f"Phantom shape {shape} needs at least 2 voxels along every axis.")
    # Anatomy position t in [0, 1] per slice (0 inferior, 1 superior); two stretches are held
    # constant, so those slices repeat one slice exactly (noise included).
    t = np.linspace(0.0, 1.0, nz)
    for a, b in ((0.15, 0.30), (0.55, 0.70)):
        hold = (t >= a) & (t < b)
        t[hold] = t[hold][0] if hold.any() else 0.0
    uniq, inverse = np.unique(t, return_inverse=True)

    z = uniq[:, None, None]
    y = np.linspace(-1.0, 1.0, ny)[None, :, None]  # -1 anterior, +1 posterior
    x = np.linspace(-1.0, 1.0, nx)[None, None, :]  # -1 patient right, +1 patient left
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2
    inner = (x / 0.78) ** 2 + (y / 0.58) ** 2
    vol = np.full((uniq.size, ny, nx), -1000.0, dtype=np.float32)
    vol = np.where(body <= 1.0, -100.0, vol)  # fat ring
    vol = np.where(inner <= 1.0, 40.0, vol)  # soft tissue
    upper = z > 0.62
    lungs = (((np.abs(x) - 0.38) / 0.28) ** 2 + ((y + 0.05) / 0.42) ** 2 <= 1.0) & upper
    vol = np.where(lungs, -850.0, vol)
    liver_size = np.clip(1.0 - np.abs(z - 0.3) / 0.32, 0.0, 1.0)
    liver = ((x + 0.35) / (0.36 * liver_size + 1e-6)) ** 2 + ((y + 0.05) / (0.38 * liver_size + 1e-6)) ** 2 <= 1.0
    vol = np.where(liver, 60.0, vol)
    lesion = ((x + 0.38) ** 2 + (y + 0.10) ** 2) / 0.11**2 + ((z - 0.3) / 0.08) ** 2 <= 1.0
    vol = np.where(lesion & liver, 10.0, vol)
    kidney_size = np.clip(1.0 - np.abs(z - 0.22) / 0.2, 0.0, 1.0)
    kidneys = ((np.abs(x) - 0.45) / (0.11 * kidney_size + 1e-6)) ** 2 + ((y - 0.22) / (0.17 * kidney_size + 1e-6)) ** 2 <= 1.0
    vol = np.where(kidneys, 150.0, vol)  # contrast-enhanced cortex
    heart_size = np.clip((z - 0.68) / 0.12, 0.0, 1.0) * np.clip((1.02 - z) / 0.1, 0.0, 1.0)
    heart = ((x - 0.12) / (0.3 * heart_size + 1e-6)) ** 2 + ((y + 0.12) / (0.26 * heart_size + 1e-6)) ** 2 <= 1.0
    vol = np.where(heart, 45.0, vol)
    aorta = ((x - 0.06) / 0.06) ** 2 + ((y - 0.24) / 0.06) ** 2 <= 1.0
    vol = np.where(aorta, 180.0, vol)
    spine = (x / 0.10) ** 2 + ((y - 0.42) / 0.10) ** 2 <= 1.0
    vol = np.where(spine, 700.0, vol)

    rng = np.random.default_rng(seed)
    # Bowel gas in the anterior lower abdomen and ribs in the chest wall: they move from slice to
    # slice as in a real scan, so neighbouring slices differ by more than noise.
    for k, position in enumerate(uniq):
        plane = vol[k]
        if position < 0.5:
            for bx, by, br in zip(rng.uniform(-0.35, 0.5, 8), rng.uniform(-0.45, 0.0, 8), rng.uniform(0.04, 0.09, 8)):
                gas = ((x[0] - bx) ** 2 + (y[0] - by) ** 2 <= br**2) & (inner[0] <= 1.0) & ~liver[k]
                plane[gas] = -1000.0
        if position > 0.45:
            angles = np.linspace(0.0, 2 * np.pi, 14, endpoint=False) + 6.0 * position
            for angle in angles:
                rx, ry = 0.8 * np.cos(angle), 0.6 * np.sin(angle)
                plane[((x[0] - rx) ** 2 + (y[0] - ry) ** 2) <= 0.035**2] = 600.0
    noise = rng.normal(0.0, 12.0, size=vol.shape).astype(np.float32)
    vol = np.where(body <= 1.0, vol + noise, vol)
    return np.clip(np.rint(vol), -1024, 3071).astype(np.int16)[inverse]  # the 12-bit CT range
