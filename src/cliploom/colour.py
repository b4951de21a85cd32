"""Colour matching at the seams: each new clip's colour statistics moved to a target's.

Long chains drift in colour (a cast that grows clip after clip: users blame the VAE round trip
at every join). ``color_match`` in a story matches every decoded clip, per RGB channel, in mean
and spread, to the anchor image (``anchor``) or to the end of the clip before it (``previous``);
in pixel modes the corrected frames are also what the next clip continues from. It cannot
restore a colour the model changed in one object only; it removes global casts.
"""

from __future__ import annotations

import torch

MODES = ("none", "anchor", "previous")
MIN_STD = 1.0  # 0..255 levels: a flat channel is shifted, never stretched


def colour_stats(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of uint8 ``[..., 3]`` frames (float64)."""
    x = frames.reshape(-1, 3).to(torch.float64)
    return x.mean(dim=0), x.std(dim=0, unbiased=False)


def match_colour(frames: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor], strength: float = 1.0) -> torch.Tensor:
    """uint8 ``[F, H, W, 3]`` frames whose per-channel mean and spread move ``strength`` of the way
    to ``target`` (``colour_stats`` of the reference)."""
    mean, std = colour_stats(frames)
    t_mean, t_std = target
    want_mean = mean + strength * (t_mean - mean)
    want_std = std + strength * (t_std - std)
    scale = torch.where(std > MIN_STD, want_std / std.clamp(min=MIN_STD), torch.ones_like(std))
    out = (frames.to(torch.float64) - mean) * scale + want_mean
    return out.clamp(0, 255).round().to(torch.uint8)
