"""SVI conditioning: what a Wan model is told it already knows about a clip.

Pure functions of tensors, shared by the clip loop (``loom``) and the trainer, so the two
cannot disagree. Conventions (the same as Wan and diffusers):

* latents are ``[B, C, T, h, w]`` in *normalised* latent space (``(z - mean) / std``);
* pixel videos are ``[B, 3, F, H, W]`` in ``[-1, 1]``;
* ``T = (F - 1) // 4 + 1``: latent frame 0 holds pixel frame 0 alone, every later latent frame
  holds 4 pixel frames.

Two families of models take the conditioning differently:

* **I2V with ``y`` channels** (Wan 2.1 I2V, Wan 2.2 A14B): the model input per latent frame is
  ``cat(noisy[C], mask[4], y[C])``. The mask packs the pixel-frame mask into 4 channels.
* **TI2V** (Wan 2.2 5B, ``expand_timesteps``): no ``y`` channels. Known latent frames are written
  into the noisy latents as clean frames, and their tokens get timestep 0.

Motion modes (``../shared/reference/svi.md`` section 1):

* **latent** (SVI 2.0 Pro): ``y = [anchor, last K latents of the previous clip, zeros]``; the mask
  marks only pixel frame 0 (the anchor).
* **pixel** (SVI 1.0 / 2.0): ``y = VAE(previous clip's last N frames + padding)``; the mask marks
  only pixel frame 0. The padding is chosen by ``ref_pad``.

Keyframes (end-frame control, Wan FLF2V's way): a known image at pixel frame ``n`` of a clip. In
latent mode its single-frame latent goes into ``y`` at latent frame ``(n - 1) // 4 + 1`` and the
mask marks pixel frame ``n`` (``y = [anchor, motion..., zeros..., end]`` for an end frame); pixel
modes write the image into the conditioning video at frame ``n`` (and mark it); TI2V writes the
latent as a clean latent frame. Without keyframes every function gives exactly what it gave before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TEMPORAL = 4  # pixel frames per latent frame after the first (every Wan VAE so far)


def latent_frame_count(num_frames: int, temporal: int = TEMPORAL) -> int:
    """Latent frames of a clip of ``num_frames`` pixel frames (``4k + 1`` -> ``k + 1``)."""
    return (num_frames - 1) // temporal + 1


def keyframe_latent_index(pixel_frame: int, temporal: int = TEMPORAL) -> int:
    """The latent frame holding pixel frame ``pixel_frame`` (0 -> 0; 1..4 -> 1; 5..8 -> 2 ...)."""
    return 0 if pixel_frame == 0 else (pixel_frame - 1) // temporal + 1


def pixel_frame_mask(
    num_frames: int,
    height: int,
    width: int,
    known_pixel_frames: int = 1,
    *,
    temporal: int = TEMPORAL,
    batch: int = 1,
    device=None,
    dtype=torch.float32,
    also_known: tuple[int, ...] = (),
) -> torch.Tensor:
    """Wan's 4-channel mask, ``[B, 4, T, h, w]``, marking the first ``known_pixel_frames`` (and the
    pixel frames ``also_known``: keyframes) as known.

    Wan repeats pixel frame 0 ``temporal`` times so that every latent frame has ``temporal``
    mask entries, then folds those entries into the channel axis.
    """
    mask = torch.zeros(batch, 1, num_frames, height, width, device=device, dtype=dtype)
    mask[:, :, :known_pixel_frames] = 1
    for n in also_known:
        mask[:, :, n] = 1
    first = mask[:, :, :1].repeat_interleave(temporal, dim=2)
    mask = torch.cat([first, mask[:, :, 1:]], dim=2)  # [B, 1, temporal * T, h, w]
    num_latent = mask.shape[2] // temporal
    return mask.view(batch, num_latent, temporal, height, width).transpose(1, 2)


def latent_motion_y(anchor: torch.Tensor, motion: torch.Tensor | None, num_latent_frames: int,
                    keyframes: tuple = ()) -> torch.Tensor:
    """SVI 2.0 Pro ``y``: ``[anchor, motion..., zeros...]``, ``[B, C, T, h, w]``.

    ``anchor`` is one latent frame ``[B, C, 1, h, w]`` (the reference image, encoded once);
    ``motion`` is the previous clip's last ``K`` denoised latents ``[B, C, K, h, w]`` or ``None``
    for the first clip. Padding is zero in normalised latent space. ``keyframes``: ``(pixel frame,
    single-frame latent [B, C, 1, h, w])`` pairs written at their latent frames (after the motion).
    """
    known = anchor if motion is None else torch.cat([anchor, motion.to(anchor)], dim=2)
    if known.shape[2] > num_latent_frames:
        raise ValueError(f"{known.shape[2]} known latent frames do not fit a clip of {num_latent_frames}")
    pad = known.new_zeros(*known.shape[:2], num_latent_frames - known.shape[2], *known.shape[3:])
    y = torch.cat([known, pad], dim=2)
    for n, latent in keyframes:
        index = keyframe_latent_index(n)
        if not known.shape[2] <= index < num_latent_frames:
            raise ValueError(f"keyframe at pixel frame {n} (latent {index}) is outside the clip or in its motion prefix")
        y[:, :, index] = latent.to(y)[:, :, 0]
    return y


def pixel_motion_video(
    reference: torch.Tensor, motion_frames: torch.Tensor | None, num_frames: int, ref_pad: int, keyframes: tuple = ()
) -> torch.Tensor:
    """SVI 1.0 / 2.0 conditioning video, ``[B, 3, F, H, W]`` in ``[-1, 1]``.

    The video starts with ``motion_frames`` (the previous clip's last N decoded frames, ``[B, 3,
    N, H, W]``) or, for the first clip, with the ``reference`` image (``[B, 3, H, W]`` or
    ``[B, 3, 1, H, W]``). The rest is padding:

    * ``ref_pad = -1``: the reference image repeated;
    * ``ref_pad = 0``: zeros (mid grey), which is Wan's own image-to-video conditioning;
    * ``ref_pad = k > 0``: ``k`` reference frames, then zeros.
    """
    if reference.ndim == 4:
        reference = reference.unsqueeze(2)
    head = reference if motion_frames is None else motion_frames.to(reference)
    remaining = num_frames - head.shape[2]
    if remaining < 0:
        raise ValueError(f"{head.shape[2]} motion frames do not fit a clip of {num_frames} frames")
    n_ref = remaining if ref_pad < 0 else min(ref_pad, remaining)
    parts = [head, reference.expand(-1, -1, n_ref, -1, -1)]
    parts.append(reference.new_zeros(*reference.shape[:2], remaining - n_ref, *reference.shape[3:]))
    video = torch.cat(parts, dim=2)
    for n, image in keyframes:  # (pixel frame, [B, 3, H, W] in [-1, 1]): the keyframe replaces the padding there
        if not head.shape[2] <= n < num_frames:
            raise ValueError(f"keyframe at pixel frame {n} is outside the clip or in its motion prefix")
        video[:, :, n] = image.to(video)
    return video


def pixel_known_latent_frames(motion_frames: int, temporal: int = TEMPORAL) -> int:
    """Latent frames wholly determined by ``motion_frames`` leading pixel frames (for TI2V)."""
    return 1 + (motion_frames - 1) // temporal


@dataclass
class ClipCondition:
    """Everything a clip's denoiser needs besides the noisy latents, text and timestep.

    Built by :func:`i2v_condition` or :func:`clean_frames_condition`; consumed by the sampler
    through :meth:`model_input`, :meth:`timestep` and :meth:`finish`, and by the trainer the
    same way.
    """

    y: torch.Tensor | None = None  # [B, 4 + C, T, h, w]: mask and y, channel-concatenated (I2V)
    clean: torch.Tensor | None = None  # [B, C, T, h, w]: latents whose leading frames are known (TI2V, context)
    known: torch.Tensor | None = None  # [1, 1, T, h, w]: 1 on the known latent frames (TI2V, context)
    image_embeds: torch.Tensor | None = None  # CLIP features (Wan 2.1), [B, tokens, dim]
    patch: tuple[int, int] = (2, 2)  # the transformer's spatial patch, to lay timesteps on tokens
    known_timesteps: torch.Tensor | None = None  # [1, 1, T, 1, 1]: the known frames' timesteps (default 0)

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.known is not None:
            x = self.finish(x)
        if self.y is not None:
            return torch.cat([x, self.y.to(x)], dim=1)
        return x

    def timestep(self, t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        """``[B]`` timesteps, or ``[B, tokens]`` with the known frames' own timesteps (0, or a context
        noise level) on their tokens (TI2V, diffusion-forcing context)."""
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        if self.known is None and t.ndim == 0:
            return t.expand(x.shape[0])
        ph, pw = self.patch
        grid = (x.shape[2], x.shape[3] // ph, x.shape[4] // pw)
        # one timestep for the clip, or one per latent frame (diffusion forcing's ar_step schedule)
        if t.ndim and t.shape != (grid[0],):
            raise ValueError(f"timesteps of shape {tuple(t.shape)}: give one, or one per latent frame ({grid[0]})")
        per_token = t.reshape(-1, 1, 1).expand(grid) if t.ndim else t.expand(grid)
        if self.known is not None:
            known = self.known[0, 0, :, ::ph, ::pw].to(x.device)
            per_token = (1 - known) * per_token
            if self.known_timesteps is not None:
                per_token = per_token + known * self.known_timesteps[0, 0].to(x.device)
        return per_token.flatten().unsqueeze(0).expand(x.shape[0], -1)

    def known_prefix(self) -> int:
        """Leading latent frames of ``x`` that are given (clean context), 0 for ``y``-channel clips."""
        if self.known is None:
            return 0
        return int(self.known[0, 0, :, 0, 0].cumprod(0).sum())

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """Write the known frames back into ``x`` (TI2V); identity for ``y``-channel models."""
        if self.known is None:
            return x
        known = self.known.to(x)
        return known * self.clean.to(x) + (1 - known) * x

    def repeat(self, n: int) -> "ClipCondition":
        """The same condition for a batch ``n`` times larger (classifier-free guidance)."""

        def rep(t):
            return None if t is None else t.repeat(n, *([1] * (t.ndim - 1)))

        return ClipCondition(rep(self.y), rep(self.clean), self.known, rep(self.image_embeds), self.patch,
                             self.known_timesteps)


def i2v_condition(
    y: torch.Tensor, num_frames: int, known_pixel_frames: int = 1, image_embeds: torch.Tensor | None = None,
    also_known: tuple[int, ...] = (),
) -> ClipCondition:
    """Condition for a model with ``y`` channels: the mask marks the first pixel frame(s) and the
    keyframes' pixel frames ``also_known``."""
    batch, _, _, h, w = y.shape
    mask = pixel_frame_mask(num_frames, h, w, known_pixel_frames, batch=batch, device=y.device, dtype=y.dtype,
                            also_known=also_known)
    if mask.shape[2] != y.shape[2]:
        raise ValueError(f"y has {y.shape[2]} latent frames but {num_frames} pixel frames need {mask.shape[2]}")
    return ClipCondition(y=torch.cat([mask, y], dim=1), image_embeds=image_embeds)


def clean_frames_condition(
    latents: torch.Tensor, known_latent_frames: int, patch: tuple[int, int] = (2, 2), keyframes: tuple = ()
) -> ClipCondition:
    """Condition for a TI2V model: the first ``known_latent_frames`` of ``latents`` are clean, and
    so is each keyframe's latent frame (``(pixel frame, single-frame latent)`` pairs)."""
    known = torch.zeros(1, 1, *latents.shape[2:], device=latents.device, dtype=latents.dtype)
    known[:, :, :known_latent_frames] = 1
    if keyframes:
        latents = latents.clone()
        for n, latent in keyframes:
            index = keyframe_latent_index(n)
            latents[:, :, index] = latent.to(latents)[:, :, 0]
            known[:, :, index] = 1
    return ClipCondition(clean=latents, known=known, patch=patch)


def amplify_motion(cond: ClipCondition, amplitude: float, known_latent_frames: int) -> ClipCondition:
    """Motion amplitude (the remedy ComfyUI users apply to the slow motion of 4-step distill LoRAs,
    e.g. PainterI2V's ``motion_amplitude``): push ``y``'s frames that are to be generated further
    from the frame the clip continues from, keeping each frame's mean.

    ``base`` is ``y``'s latent frame ``known_latent_frames - 1`` (the anchor of a first clip, the
    last motion latent of a continuation); every later frame not marked known (keyframes are)
    becomes ``base + (d - mean(d)) * amplitude + mean(d)`` with ``d = frame - base`` and the mean
    over channels and space. ``amplitude = 1`` returns ``cond`` unchanged; TI2V conditions (no
    ``y``) are returned unchanged. Changes ``cond.y`` in place and returns ``cond``.
    """
    if amplitude == 1 or cond.y is None:
        return cond
    mask, y = cond.y[:, :4], cond.y[:, 4:]
    base = y[:, :, known_latent_frames - 1 : known_latent_frames]
    free = mask[:, :, known_latent_frames:].amax(dim=(1, 3, 4), keepdim=True) == 0  # [B, 1, T', 1, 1]
    d = y[:, :, known_latent_frames:] - base
    mean = d.mean(dim=(1, 3, 4), keepdim=True)
    scaled = base + (d - mean) * amplitude + mean
    y[:, :, known_latent_frames:] = torch.where(free, scaled, y[:, :, known_latent_frames:])
    return cond


# -- one clip's condition, per motion mode ------------------------------------------------------


def latent_condition(
    anchor: torch.Tensor,
    motion: torch.Tensor | None,
    num_latent_frames: int,
    expand_timesteps: bool = False,
    patch: tuple[int, int] = (2, 2),
    keyframes: tuple = (),
) -> ClipCondition:
    """Latent motion (SVI 2.0 Pro): the anchor plus the previous clip's last K latents.

    ``y``-channel models get them in ``y`` with only the anchor's pixel frame marked known; TI2V
    models get them as clean leading frames (anchor and motion latents all known). ``keyframes``
    (``(pixel frame, single-frame latent)``) are written at their latent frames and marked known.
    """
    if expand_timesteps:
        known = latent_motion_y(anchor, motion, num_latent_frames)
        return clean_frames_condition(known, 1 + (0 if motion is None else motion.shape[2]), patch, keyframes)
    known = latent_motion_y(anchor, motion, num_latent_frames, keyframes)
    num_frames = (num_latent_frames - 1) * TEMPORAL + 1
    return i2v_condition(known, num_frames, also_known=tuple(n for n, _ in keyframes))


def context_condition(
    anchor: torch.Tensor,
    motion: torch.Tensor | None,
    num_latent_frames: int,
    expand_timesteps: bool = False,
    patch: tuple[int, int] = (2, 2),
    keyframes: tuple = (),
    context_noise: float = 0.0,
    noise: torch.Tensor | None = None,
) -> ClipCondition:
    """Diffusion forcing (SkyReels-V2 DF's way, on the ``pro`` timeline): the anchor and the
    previous clip's last K latents are given as *context frames* of the noisy latents -- clean
    tokens with their own timestep -- instead of in ``y``.

    Latent frames ``0..K`` of ``x`` hold ``[anchor, motion...]``; the motion frames are noised to
    ``context_noise`` (a timestep, SkyReels' ``addnoise_condition``: ``(1 - s) m + s noise`` with
    ``s = context_noise / 1000`` and ``noise`` the clip's own noise at those frames) and their
    tokens get that timestep; the anchor's get 0. A ``y``-channel model also gets ``y = [anchor,
    zeros..., keyframes]`` with the anchor's pixel frame marked, as for a first clip, so that the
    route runs on an I2V checkpoint; keyframes are context frames too. The first clip (no motion)
    is exactly :func:`latent_condition`'s.
    """
    if motion is None:
        return latent_condition(anchor, None, num_latent_frames, expand_timesteps, patch, keyframes)
    K = motion.shape[2]
    if context_noise:
        if noise is None:
            raise ValueError("context noise needs the clip's noise")
        s = float(context_noise) / 1000
        motion = (1 - s) * motion + s * noise[:, :, 1 : 1 + K].to(motion)
    cond = clean_frames_condition(latent_motion_y(anchor, motion, num_latent_frames), 1 + K, patch, keyframes)
    timesteps = torch.zeros(1, 1, num_latent_frames, 1, 1, device=anchor.device)
    timesteps[:, :, 1 : 1 + K] = float(context_noise)
    cond.known_timesteps = timesteps
    if not expand_timesteps:
        y = latent_motion_y(anchor, None, num_latent_frames, keyframes)
        num_frames = (num_latent_frames - 1) * TEMPORAL + 1
        cond.y = i2v_condition(y, num_frames, also_known=tuple(n for n, _ in keyframes)).y
    return cond


def pixel_condition(
    video_latents: torch.Tensor,
    num_frames: int,
    motion_frames: int = 1,
    expand_timesteps: bool = False,
    patch: tuple[int, int] = (2, 2),
    keyframes: tuple = (),
) -> ClipCondition:
    """Pixel motion (SVI 1.0 / 2.0): the VAE-encoded conditioning video of :func:`pixel_motion_video`.

    ``y``-channel models get it as ``y`` with pixel frame 0 marked known (and the keyframes' pixel
    frames, whose images the video holds); TI2V models get the latent frames wholly covered by the
    ``motion_frames`` leading pixel frames as clean frames, and the keyframes' single-frame latents
    (``keyframes``: ``(pixel frame, latent)``) as clean frames too.
    """
    if expand_timesteps:
        return clean_frames_condition(video_latents, pixel_known_latent_frames(motion_frames), patch, keyframes)
    return i2v_condition(video_latents, num_frames, also_known=tuple(n for n, _ in keyframes))
