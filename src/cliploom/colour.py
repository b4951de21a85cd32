"""Colour matching at the seams: each new clip's colours moved to a target's.

Long chains drift in colour (a cast that grows clip after clip: users blame the VAE round trip
at every join). ``color_match`` in a story matches every decoded clip to the anchor image
(``anchor``) or to the end of the clip before it (``previous``); in pixel modes the corrected
frames are also what the next clip continues from. ``color_match_method`` says how, per RGB
channel: ``mean_std`` moves the clip's mean and spread to the target's (removes global casts; it
cannot restore a colour the model changed in one small object, whose pixels barely move the
statistics), ``histogram`` maps each channel's distribution onto the target's (histogram
matching, as ComfyUI's colour-match nodes offer: a small subject's tail of the distribution is
matched too, at the price of following the target's proportions of colours).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MODES = ("none", "anchor", "previous")
METHODS = ("mean_std", "histogram")
MIN_STD = 1.0  # 0..255 levels: a flat channel is shifted, never stretched


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


@dataclass
class ColourTarget:
    """What clips are matched to: per-channel mean and spread, and (for ``histogram``) the
    cumulative distribution of each channel."""

    mean: torch.Tensor
    std: torch.Tensor
    cdf: np.ndarray | None = None

    @classmethod
    def of(cls, frames: torch.Tensor) -> "ColourTarget":
        """The target made from uint8 ``[..., 3]`` frames (an image ``[H, W, 3]`` or a clip's end)."""
        mean, std = colour_stats(frames)
        return cls(mean, std, _cdf(frames))


def match_colour(frames: torch.Tensor, target: ColourTarget | tuple, strength: float = 1.0,
                 method: str = "mean_std") -> torch.Tensor:
    """uint8 ``[F, H, W, 3]`` frames moved ``strength`` of the way to ``target``: per channel in
    mean and spread (``mean_std``; ``target`` may be a ``(mean, std)`` pair) or in distribution
    (``histogram``: every level mapped to the target's level at the same quantile, one table per
    channel for the whole clip, so its frames stay consistent with each other)."""
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
