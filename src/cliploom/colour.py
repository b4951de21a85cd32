"""Colour matching at the seams: each new clip's colours moved to a target's.

Long chains drift in colour (a cast that grows clip after clip: users blame the VAE round trip
at every join). ``color_match`` in a story matches every decoded clip to the anchor image
(``anchor``) or to the end of the clip before it (``previous``); in pixel modes the corrected
frames are also what the next clip continues from. ``color_match_method`` says how, per RGB
channel: ``mean_std`` moves the clip's mean and spread to the target's (removes global casts; it
cannot restore a colour the model changed in one small object, whose pixels barely move the
statistics), ``histogram`` maps each channel's distribution onto the target's (histogram
matching, as ComfyUI's colour-match nodes offer: a small subject's tail of the distribution is
matched too, at the price of following the target's proportions of colours), ``histogram_lab`` does
the same in CIE Lab (lightness and two opponent-colour axes) with continuous quantiles instead of
256 levels: a subject whose colour shares an RGB channel's levels with its background (purple on
teal: green 70 against 85) is a tail of its own on Lab's colour axes, so its cast is removed where
an RGB channel's table mixes it with the background's. Its price is the same as ``histogram``'s, and
steeper: where the subject's share of the frame exceeds the anchor's, the pixels beyond that share
take the background's chroma and keep their lightness (a cyan circle on black turns pale; measured in
docs/benchmarks.md), so it is an option, not the built-in model's default.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MODES = ("none", "anchor", "previous")
METHODS = ("mean_std", "histogram", "histogram_lab")
MIN_STD = 1.0  # 0..255 levels: a flat channel is shifted, never stretched
LAB_QUANTILES = 1024  # the target's Lab distribution, per channel, at this many quantiles
LAB_BIN = 0.05  # Lab units: the bin of a clip's own distribution (far below one ΔE)
LAB_RANGE = ((0.0, 100.0), (-128.0, 128.0), (-128.0, 128.0))
CHUNK_PIXELS = 1 << 21  # Lab work in pieces of this many pixels (a 480p 81-frame clip is 32 M)
RGB_TO_XYZ = torch.tensor([[0.4124564, 0.3575761, 0.1804375],
                           [0.2126729, 0.7151522, 0.0721750],
                           [0.0193339, 0.1191920, 0.9503041]], dtype=torch.float64)
D65_WHITE = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)
XYZ_TO_RGB = torch.linalg.inv(RGB_TO_XYZ)
_EPS = (6.0 / 29.0) ** 3


def srgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in 0..255 ``[..., 3]`` to CIE L*a*b* (D65), in ``rgb``'s floating dtype (float32 for
    integers) and on its device."""
    dtype = rgb.dtype if rgb.is_floating_point() else torch.float32
    c = rgb.to(dtype) / 255.0
    linear = torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ RGB_TO_XYZ.T.to(c) / D65_WHITE.to(c)
    f = torch.where(xyz > _EPS, xyz.clamp(min=0) ** (1.0 / 3.0), xyz / (3 * (6.0 / 29.0) ** 2) + 4.0 / 29.0)
    return torch.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], -1)


def lab_to_srgb(lab: torch.Tensor) -> torch.Tensor:
    """CIE L*a*b* (D65) ``[..., 3]`` back to sRGB in 0..255 (float; colours outside the sRGB cube
    clipped to it)."""
    fy = (lab[..., 0] + 16.0) / 116.0
    f = torch.stack([fy + lab[..., 1] / 500.0, fy, fy - lab[..., 2] / 200.0], -1)
    d = 6.0 / 29.0
    xyz = torch.where(f > d, f**3, 3 * d**2 * (f - 4.0 / 29.0)) * D65_WHITE.to(lab)
    linear = (xyz @ XYZ_TO_RGB.T.to(lab)).clamp(0.0, 1.0)
    return torch.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055) * 255.0


def colour_stats(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of uint8 ``[..., 3]`` frames (float64)."""
    x = frames.reshape(-1, 3).to(torch.float64)
    return x.mean(dim=0), x.std(dim=0, unbiased=False)


def _cdf(frames: torch.Tensor) -> np.ndarray:
    """Per-channel cumulative distribution of uint8 ``[..., 3]`` frames at each level's centre, ``[3, 256]``."""
    x = frames.reshape(-1, 3).cpu().numpy()
    hist = np.stack([np.bincount(x[:, c], minlength=256) for c in range(3)]).astype(np.float64)
    hist /= hist.sum(axis=1, keepdims=True)
    return np.cumsum(hist, axis=1) - hist / 2


def _lab_quantiles(frames: torch.Tensor) -> np.ndarray:
    """Per-channel Lab quantile function of uint8 ``[..., 3]`` frames, ``[3, LAB_QUANTILES]``."""
    lab = srgb_to_lab(frames.reshape(-1, 3).to(torch.float64)).cpu().numpy()
    q = (np.arange(LAB_QUANTILES) + 0.5) / LAB_QUANTILES
    return np.stack([np.quantile(lab[:, c], q) for c in range(3)])


def _lerp_table(table: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``table`` (1-D) read at fractional indices ``pos``, linearly, clamped to its ends."""
    pos = pos.clamp(0, table.numel() - 1)
    i = pos.floor().long().clamp(max=table.numel() - 2)
    return table[i] + (pos - i) * (table[i + 1] - table[i])


def _match_lab(frames: torch.Tensor, target_q: np.ndarray, strength: float) -> torch.Tensor:
    """Histogram matching in Lab, on ``frames``' device in float32 and in pieces: each pixel's
    quantile in the clip (its bin of the clip's distribution, interpolated within the bin) mapped to
    the target's value at that quantile, per channel."""
    x = frames.reshape(-1, 3)
    pieces = range(0, x.shape[0], CHUNK_PIXELS)
    lo = torch.tensor([r[0] for r in LAB_RANGE], device=x.device)
    nbins = [round((hi - low) / LAB_BIN) for low, hi in LAB_RANGE]
    counts = [torch.zeros(n, dtype=torch.float64, device=x.device) for n in nbins]
    for start in pieces:  # pass 1: the clip's own distribution
        pos = (srgb_to_lab(x[start : start + CHUNK_PIXELS]) - lo) / LAB_BIN
        for c in range(3):
            counts[c] += torch.bincount(pos[:, c].floor().long().clamp(0, nbins[c] - 1), minlength=nbins[c])
    cdfs = [torch.cat([n.new_zeros(1), n.cumsum(0) / n.sum()]).float() for n in counts]  # at the bin edges
    targets = torch.from_numpy(target_q).float().to(x.device)
    out = torch.empty_like(x)
    for start in pieces:  # pass 2: map each pixel
        lab = srgb_to_lab(x[start : start + CHUNK_PIXELS])
        pos = (lab - lo) / LAB_BIN
        mapped = torch.stack([_lerp_table(targets[c], _lerp_table(cdfs[c], pos[:, c]) * LAB_QUANTILES - 0.5)
                              for c in range(3)], -1)
        rgb = lab_to_srgb(lab + strength * (mapped - lab))
        out[start : start + CHUNK_PIXELS] = rgb.clamp(0, 255).round().to(torch.uint8)
    return out.reshape(frames.shape)


@dataclass
class ColourTarget:
    """What clips are matched to: per-channel mean and spread, (for ``histogram``) the cumulative
    distribution of each channel and (for ``histogram_lab``) each Lab channel's quantiles."""

    mean: torch.Tensor
    std: torch.Tensor
    cdf: np.ndarray | None = None
    lab_quantiles: np.ndarray | None = None

    @classmethod
    def of(cls, frames: torch.Tensor, method: str | None = None) -> "ColourTarget":
        """The target made from uint8 ``[..., 3]`` frames (an image ``[H, W, 3]`` or a clip's end):
        what ``method`` needs (every method's statistics when it is ``None``)."""
        mean, std = colour_stats(frames)
        return cls(mean, std, _cdf(frames) if method in (None, "histogram") else None,
                   _lab_quantiles(frames) if method in (None, "histogram_lab") else None)


def match_colour(frames: torch.Tensor, target: ColourTarget | tuple, strength: float = 1.0,
                 method: str = "mean_std") -> torch.Tensor:
    """uint8 ``[F, H, W, 3]`` frames moved ``strength`` of the way to ``target``: per channel in
    mean and spread (``mean_std``; ``target`` may be a ``(mean, std)`` pair) or in distribution
    (``histogram``: every level mapped to the target's level at the same quantile, one table per
    channel for the whole clip, so its frames stay consistent with each other; ``histogram_lab``: the
    same in CIE Lab, one mapping per channel for the whole clip)."""
    if method == "histogram_lab":
        if not isinstance(target, ColourTarget) or target.lab_quantiles is None:
            raise ValueError("Lab histogram matching needs a ColourTarget made from frames (ColourTarget.of)")
        return _match_lab(frames, target.lab_quantiles, strength)
    if method == "histogram":
        if not isinstance(target, ColourTarget) or target.cdf is None:
            raise ValueError("histogram matching needs a ColourTarget made from frames (ColourTarget.of)")
        src = _cdf(frames)
        levels = np.arange(256, dtype=np.float64)
        table = np.stack([np.interp(src[c], target.cdf[c], levels) for c in range(3)])  # [3, 256]
        table = torch.from_numpy(levels + strength * (table - levels))  # [3, 256]
        x = frames.reshape(-1, 3).long()
        out = torch.stack([table[c][x[:, c]] for c in range(3)], dim=1).reshape(frames.shape)
        return out.clamp(0, 255).round().to(torch.uint8)
    t_mean, t_std = (target.mean, target.std) if isinstance(target, ColourTarget) else target
    mean, std = colour_stats(frames)
    want_mean = mean + strength * (t_mean - mean)
    want_std = std + strength * (t_std - std)
    scale = torch.where(std > MIN_STD, want_std / std.clamp(min=MIN_STD), torch.ones_like(std))
    out = (frames.to(torch.float64) - mean) * scale + want_mean
    return out.clamp(0, 255).round().to(torch.uint8)
