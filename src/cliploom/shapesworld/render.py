"""Anti-aliased rasterisation of ShapesWorld frames (numpy only).

Geometry is continuous: pixel ``(row i, column j)`` covers ``[j, j+1) x [i, i+1)`` and its
centre is ``(j + 0.5, i + 0.5)``. Shapes are drawn with per-pixel coverage measured by
``SUPERSAMPLE x SUPERSAMPLE`` sub-samples, so sub-pixel motion changes edge pixels smoothly.
"""

from __future__ import annotations

import math

import numpy as np

SUPERSAMPLE = 8
TRIANGLE_SCALE = 1.3  # a triangle's circumradius is this times the size, so it looks as big


def shape_extent(shape: str, radius: float) -> float:
    """How far the shape reaches from its centre along x or y (for keeping it in frame)."""
    if shape == "circle":
        return radius
    if shape == "square":
        return radius  # axis-aligned: the half-extent bounds both x and y
    if shape == "triangle":
        return radius * TRIANGLE_SCALE
    raise ValueError(f"unknown shape {shape!r}; valid: circle, square, triangle")


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Whether points at offset (dx, dy) from the centre lie inside the shape."""
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        return (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    if shape == "triangle":
        # Equilateral, pointing up, centroid at the centre; inside = on the inner side of 3 edges.
        R = radius * TRIANGLE_SCALE
        inside = np.ones(np.broadcast(dx, dy).shape, dtype=bool)
        for k in range(3):
            angle = math.radians(120.0 * k + 180.0)  # outward normal of the edge facing the k-th side
            nx, ny = math.sin(angle), -math.cos(angle)
            inside &= dx * nx + dy * ny <= R / 2.0
        return inside
    raise ValueError(f"unknown shape {shape!r}; valid: circle, square, triangle")


def coverage(shape: str, cx: float, cy: float, radius: float, height: int, width: int) -> np.ndarray:
    """Fraction of each pixel covered by the shape, float32 ``[height, width]`` in 0..1."""
    out = np.zeros((height, width), dtype=np.float32)
    ext = shape_extent(shape, radius) + 1.0
    x0, x1 = max(0, int(math.floor(cx - ext))), min(width, int(math.ceil(cx + ext)))
    y0, y1 = max(0, int(math.floor(cy - ext))), min(height, int(math.ceil(cy + ext)))
    if x0 >= x1 or y0 >= y1:
        return out
    s = SUPERSAMPLE
    offsets = (np.arange(s) + 0.5) / s
    xs = (np.arange(x0, x1)[:, None] + offsets[None, :]).reshape(-1)
    ys = (np.arange(y0, y1)[:, None] + offsets[None, :]).reshape(-1)
    inside = _inside(shape, xs[None, :] - cx, ys[:, None] - cy, radius)
    cov = inside.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))
    out[y0:y1, x0:x1] = cov
    return out


def stripes_coverage(height: int, width: int, period: float) -> np.ndarray:
    """Coverage ``[height, width]`` of vertical stripes: the second half of each period."""
    s = SUPERSAMPLE
    xs = (np.arange(width)[:, None] + (np.arange(s) + 0.5)[None, :] / s).reshape(-1)
    on = ((xs / period) % 1.0) >= 0.5
    col = on.reshape(width, s).mean(axis=1).astype(np.float32)
    return np.broadcast_to(col[None, :], (height, width)).copy()


def blend(image: np.ndarray, color, alpha: np.ndarray) -> np.ndarray:
    """Paint ``color`` over a float image ``[H, W, 3]`` with per-pixel coverage ``alpha``."""
    a = alpha[..., None]
    return image * (1.0 - a) + np.asarray(color, dtype=np.float32) * a


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
