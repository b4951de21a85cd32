"""A training clip, conditioned exactly as the clip loop (``loom``) will condition it.

The condition is built by the engine's own functions (:func:`cliploom.conditioning.latent_condition`,
:func:`~cliploom.conditioning.pixel_motion_video`, :func:`~cliploom.conditioning.pixel_condition`),
so training and inference cannot disagree. What plays the previous clip's part:

* **latent mode** (SVI 2.0 Pro): ``y = [anchor, motion, zeros]`` with the anchor the latent of a
  random frame of the clip (the reference image) and the motion the clip's first ``K`` 4-frame
  latents (latent frames ``1..K``), in the positions where inference puts the previous clip's
  last ``K`` latents; inference then drops those positions' frames (``1 + 4K``), as here the
  model learns to re-create them and continue.
* **pixel mode** (SVI 1.0 / 2.0): the conditioning video is the clip's first ``N`` frames followed
  by ``ref_pad`` padding made from a random frame of the clip, VAE-encoded into ``y``.
* **no motion** (a first clip): the anchor / reference is the clip's first frame and there is no
  motion memory, as for clip 0 at inference.

With ``motion_source: previous_clip`` the latent-mode motion is instead the last ``K`` latents of
the ``F`` frames that end where the motion ends, encoded as one clip (``DataClip.history`` plus
the motion frames): what inference hands on, since a causal VAE encodes the same frames
differently deep in a clip than right after its first frame.

With ``anchor_far_prob`` a sample with motion memory takes its anchor / reference from anywhere
in the clip's source instead (``DataClip.anchor``), as at inference, where the anchor is the
story's first frame while the motion memory is wherever the last clip ended. With ``anchor_from:
past`` every such sample does, from a frame at or before the clip's last motion frame: never one
the clip has yet to reach, as no anchor at inference is; with ``anchor_from: motion`` from that
last motion frame itself, the frame a re-anchored clip (``anchor: last_frame``) is anchored on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .. import conditioning as C
from ..conditioning import ClipCondition
from ..models.components import Components, frames_to_tensor
from .config import TrainConfig
from .data import DataClip


@dataclass
class Choice:
    """How one sample is conditioned (drawn before its clip, so data can align to it)."""

    mode: str  # "latent" or "pixel"
    motion: int  # K latents (latent mode) or N frames (pixel mode); 0: no motion memory
    ref_pad: int = -1
    ref_index: int = 0  # the clip frame used as anchor / reference
    far_anchor: bool = False  # take the anchor / reference from the clip's source instead (DataClip.anchor)
    end_frame: bool = False  # the clip's true last frame is given as a keyframe (end-frame control)
    context_noise: int = 0  # route df: the timestep the context latents are noised to
    noise_seed: int = 0  # route df: seeds that noise
    closed_loop: int = 0  # clips the LoRA rolled out before this one (cliploom.train.closed_loop); 0: none
    anchor_error: bool = False  # latent mode: y errors start at the anchor latent (config y_error_on_anchor)

    @property
    def motion_pixels(self) -> int:
        """Leading pixel frames of the clip that stand for the previous clip."""
        if self.motion == 0:
            return 1
        return 1 + C.TEMPORAL * self.motion if self.mode == "latent" else self.motion

    def describe(self) -> str:
        end = " + end frame" if self.end_frame else ""
        if self.motion == 0:
            return f"{self.mode} first-clip{end}"
        if self.mode == "latent":
            loop = f" after {self.closed_loop} generated" if self.closed_loop else ""
            return f"latent K={self.motion}{loop}{end}"
        return f"pixel N={self.motion} pad={self.ref_pad}{end}"


def draw_choice(cfg: TrainConfig, frames: int, generator: torch.Generator) -> Choice:
    u = torch.rand(2, generator=generator).tolist()
    mode = "latent" if u[0] < cfg.latent_mode_prob else "pixel"
    T = C.latent_frame_count(frames)

    def pick(values):
        return values[int(torch.randint(len(values), (1,), generator=generator))]

    if mode == "latent":
        motion = min(pick(cfg.motion_latents), T - 2)
        ref_pad = -1
    else:
        motion = min(pick(cfg.motion_frames), frames - 1)
        ref_pad = pick(cfg.ref_pad)
    if u[1] < cfg.no_motion_prob:
        motion = 0
    ref_index = int(torch.randint(frames, (1,), generator=generator))
    far = False
    if cfg.anchor_far_prob > 0:  # drawn only when asked for, so other configs keep their random streams
        far = bool(torch.rand((), generator=generator) < cfg.anchor_far_prob) and motion > 0
    if cfg.anchor_from != "clip" and motion > 0:  # every anchor from the source, at or before the motion
        far = True
    end = False
    if cfg.end_frame_prob > 0:  # drawn only when asked for, as above
        end = bool(torch.rand((), generator=generator) < cfg.end_frame_prob)
    context_noise, noise_seed = 0, 0
    if cfg.route == "df" and cfg.context_noise_max > 0:  # drawn only when asked for, as above
        context_noise = int(torch.randint(cfg.context_noise_max + 1, (1,), generator=generator))
        noise_seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    return Choice(mode, max(motion, 0), ref_pad, ref_index, far, end, context_noise, noise_seed,
                  anchor_error=cfg.y_error_on_anchor)


@dataclass
class TrainSample:
    latents: torch.Tensor  # [1, C, T, h, w] the clip's normalised latents (the target's clean end)
    cond: ClipCondition
    prompt: str
    choice: Choice
    error_start: int | None  # first latent frame of y holding motion memory (None: no motion)
    loss_mask: torch.Tensor | None  # [1, 1, T, 1, 1], 0 on frames the condition fixes (TI2V), else None
    motion_map: torch.Tensor | None = None  # [1, 1, T, h, w] in [0, 1]: where the clip moves (motion_weight)


def temporal_spread(x: torch.Tensor, time: int) -> torch.Tensor:
    """Each element's distance from its median over dimension ``time``, averaged over the channels
    (the dimension before it, kept): how far each place strays from its static state."""
    return (x - x.median(dim=time, keepdim=True).values).abs().mean(time - 1, keepdim=True)


def movement_map(video: torch.Tensor, T: int, scale: int) -> torch.Tensor:
    """Where a clip moves, per latent cell: each pixel's distance from the clip's temporal median
    (its static background), averaged over channels, over each latent frame's pixel frames (frame 0
    alone, then groups of ``(F - 1) / (T - 1)``) and over each ``scale x scale`` cell, scaled so that
    the clip's largest is 1 (all zero for a still clip). ``video``: ``[1, 3, F, H, W]`` in [-1, 1]."""
    d = temporal_spread(video[0].float(), 1)[0]  # [F, H, W]
    step = (d.shape[0] - 1) // max(T - 1, 1)
    frames = [d[:1]] + [d[1 + k * step : 1 + (k + 1) * step] for k in range(T - 1)]
    m = torch.nn.functional.avg_pool2d(torch.stack([f.mean(0) for f in frames])[None], scale)[0]  # [T, h, w]
    top = float(m.max())
    return (m / top if top > 0 else m)[None, None]


def invented_movement(x0_hat: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Where a predicted clip moves more than the clip itself, per latent cell: each cell's distance
    from its temporal median, averaged over channels, for the prediction ``x0_hat`` less that of the
    target ``x0`` (latents ``[B, C, T, h, w]``), floored at 0 and scaled by the target's largest, capped
    at 1: ``[B, 1, T, h, w]``. Measured in latents against the target's own, so what the VAE does to a
    still clip cancels; a subject the model carries on where the clip stops it scores 1."""
    target = temporal_spread(x0.float(), 2)
    extra = (temporal_spread(x0_hat.float(), 2) - target).clamp(min=0)
    scale = target.flatten(1).amax(1).clamp(min=1e-6).view(-1, 1, 1, 1, 1)
    return (extra / scale).clamp(max=1)


def _pil(frame: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` in [-1, 1] -> PIL (for CLIP image features)."""
    arr = ((frame.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


@torch.no_grad()
def build_sample(model: Components, clip: DataClip, choice: Choice, route: str = "svi",
                 movement: bool = False) -> TrainSample:
    """Encode ``clip`` and condition it per ``choice`` with the engine's conditioning functions
    (with ``movement``, its :func:`movement_map` too, for ``motion_weight``)."""
    video = frames_to_tensor(clip.frames).to(model.device)  # [1, 3, F, H, W]
    F = video.shape[2]
    T = C.latent_frame_count(F, model.scale_temporal)
    latents = model.encode_video(video)
    expand, patch = model.settings.expand_timesteps, model.patch
    error_start = None
    end_pixels = video[:, :, F - 1]
    keyframes = ((F - 1, end_pixels, model.encode_video(end_pixels[:, :, None])),) if choice.end_frame else ()
    if choice.mode == "latent":
        if choice.motion == 0:
            motion = None
            anchor = latents[:, :, :1]  # the Wan VAE encodes frame 0 on its own: this is VAE(frame 0)
        else:
            motion = latents[:, :, 1 : 1 + choice.motion]
            if clip.motion is not None:  # closed loop: what the LoRA's own last clip handed on
                motion = clip.motion.to(latents)
            elif clip.history is not None and len(clip.history):  # as inference: the previous clip's last K
                past = np.concatenate([clip.history, clip.frames[: choice.motion_pixels]])
                motion = model.encode_video(frames_to_tensor(past).to(model.device))[:, :, -choice.motion :]
            anchor_image = _anchor_image(video, clip, choice)
            anchor = model.encode_video(anchor_image[:, :, None])
            error_start = 0 if choice.anchor_error else 1  # the anchor latent too, or the motion latents on
        keys = tuple((n, lat) for n, _, lat in keyframes)
        if route == "df":  # the anchor and motion as context frames of x (conditioning.context_condition)
            noise = None
            if choice.context_noise:
                noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(choice.noise_seed)).to(latents)
            cond = C.context_condition(anchor, motion, T, expand, patch, keys, choice.context_noise, noise)
        else:
            cond = C.latent_condition(anchor, motion, T, expand, patch, keyframes=keys)
        cond.image_embeds = _image_features(model, video[0, :, 0] if choice.motion == 0 else anchor_image[0])
    else:
        if choice.motion == 0:
            reference, motion_frames, first = video[:, :, 0], None, video[0, :, 0]
        else:
            reference = _anchor_image(video, clip, choice)
            motion_frames = video[:, :, : choice.motion]
            first = video[0, :, 0]
            error_start = 0
        cond_video = C.pixel_motion_video(reference, motion_frames, F, choice.ref_pad,
                                          keyframes=tuple((n, px) for n, px, _ in keyframes))
        cond = C.pixel_condition(
            model.encode_video(cond_video), F, choice.motion if motion_frames is not None else 1, expand, patch,
            keyframes=tuple((n, lat) for n, _, lat in keyframes),
        )
        cond.image_embeds = _image_features(model, first)
    loss_mask = None
    if cond.known is not None:  # TI2V, diffusion-forcing context: known frames are given, not predicted
        loss_mask = (1 - cond.known[:, :, :, :1, :1]).to(latents)
    return TrainSample(latents, cond, clip.prompt, choice, error_start, loss_mask,
                       movement_map(video, T, model.scale_spatial).to(latents) if movement else None)


def _anchor_image(video: torch.Tensor, clip: DataClip, choice: Choice) -> torch.Tensor:
    """The anchor / reference image ``[1, 3, H, W]``: a frame of the clip, or the far frame."""
    if choice.far_anchor and clip.anchor is not None:
        return frames_to_tensor(clip.anchor).to(video)[:, :, 0]
    return video[:, :, choice.ref_index]


def _image_features(model: Components, frame: torch.Tensor):
    if not model.has_image_encoder:
        return None
    return model.encode_image_features(_pil(frame))
