"""sRGB -> CIE Lab conversion and colour differences (CIE ΔE76 and ΔE2000), in numpy.

Shared by the world (to check that its palette is well separated) and by the evaluator
(to measure colour drift); the Lab conversion itself is colour matching's (``cliploom.colour``).
Inputs are sRGB in 0..255, any leading shape ``[..., 3]``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..colour import srgb_to_lab as _srgb_to_lab


def srgb_to_lab(rgb) -> np.ndarray:
    """Convert sRGB values in 0..255 (shape ``[..., 3]``) to CIE L*a*b* (D65), float64 (the
    conversion colour matching uses, ``cliploom.colour.srgb_to_lab``)."""
    return _srgb_to_lab(torch.as_tensor(np.asarray(rgb, dtype=np.float64))).numpy()


def delta_e76(rgb1, rgb2) -> np.ndarray:
    """Euclidean distance in Lab (CIE 1976) between two sRGB colours (0..255)."""
    return np.linalg.norm(srgb_to_lab(rgb1) - srgb_to_lab(rgb2), axis=-1)


def delta_e2000(rgb1, rgb2) -> np.ndarray:
    """CIEDE2000 colour difference between two sRGB colours (0..255), kL = kC = kH = 1."""
    return delta_e2000_lab(srgb_to_lab(rgb1), srgb_to_lab(rgb2))


def delta_e2000_lab(lab1, lab2) -> np.ndarray:
    """CIEDE2000 difference between two Lab colours ``[..., 3]`` (Sharma, Wu & Dalal 2005)."""
    L1, a1, b1 = np.moveaxis(np.asarray(lab1, dtype=np.float64), -1, 0)
    L2, a2, b2 = np.moveaxis(np.asarray(lab2, dtype=np.float64), -1, 0)
    C1 = np.hypot(a1, b1)
    C2 = np.hypot(a2, b2)
    C_bar7 = ((C1 + C2) / 2.0) ** 7
    G = 0.5 * (1.0 - np.sqrt(C_bar7 / (C_bar7 + 25.0**7)))
    a1p, a2p = (1.0 + G) * a1, (1.0 + G) * a2
    C1p, C2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p = np.degrees(np.arctan2(b1, a1p)) % 360.0
    h2p = np.degrees(np.arctan2(b2, a2p)) % 360.0

    dLp = L2 - L1
    dCp = C2p - C1p
    dh = h2p - h1p
    dh = np.where(dh > 180.0, dh - 360.0, np.where(dh < -180.0, dh + 360.0, dh))
    dh = np.where(C1p * C2p == 0, 0.0, dh)
    dHp = 2.0 * np.sqrt(C1p * C2p) * np.sin(np.radians(dh) / 2.0)

    Lbp = (L1 + L2) / 2.0
    Cbp = (C1p + C2p) / 2.0
    hsum = h1p + h2p
    hbp = np.where(
        np.abs(h1p - h2p) > 180.0,
        np.where(hsum < 360.0, (hsum + 360.0) / 2.0, (hsum - 360.0) / 2.0),
        hsum / 2.0,
    )
    hbp = np.where(C1p * C2p == 0, hsum, hbp)
    T = (
        1.0
        - 0.17 * np.cos(np.radians(hbp - 30.0))
        + 0.24 * np.cos(np.radians(2.0 * hbp))
        + 0.32 * np.cos(np.radians(3.0 * hbp + 6.0))
        - 0.20 * np.cos(np.radians(4.0 * hbp - 63.0))
    )
    d_theta = 30.0 * np.exp(-(((hbp - 275.0) / 25.0) ** 2))
    Cbp7 = Cbp**7
    R_C = 2.0 * np.sqrt(Cbp7 / (Cbp7 + 25.0**7))
    S_L = 1.0 + 0.015 * (Lbp - 50.0) ** 2 / np.sqrt(20.0 + (Lbp - 50.0) ** 2)
    S_C = 1.0 + 0.045 * Cbp
    S_H = 1.0 + 0.015 * Cbp * T
    R_T = -np.sin(np.radians(2.0 * d_theta)) * R_C
    return np.sqrt(
        (dLp / S_L) ** 2 + (dCp / S_C) ** 2 + (dHp / S_H) ** 2 + R_T * (dCp / S_C) * (dHp / S_H)
    )
