"""SkyReels-V2 diffusers folders as the ``df`` route's own model.

SkyReels-V2's diffusion-forcing DiTs (``Skywork/SkyReels-V2-DF-*-Diffusers``) are Wan 2.1 DiTs
trained with a noise level per latent frame. diffusers holds them as ``SkyReelsV2Transformer3DModel``,
whose forward differs from ``WanTransformer3DModel``'s in three ways the engine must not see:

* timesteps come per *frame* (``[B, F]`` with ``enable_diffusion_forcing=True``), where the engine
  gives them per *token* (``[B, tokens]``, Wan 2.2 TI2V's way) or one per sample (``[B]``);
* the DF checkpoints carry an fps embedding (``inject_sample_info``) read from ``fps`` on every call:
  SkyReels' pipelines pass 0 for 16 fps and 1 for anything else;
* the text-to-video DF models have no ``y`` channels (``in_channels == z_dim``): the image and the
  motion latents enter as clean prefix frames with their own timesteps -- the engine's
  ``expand_timesteps`` path (:func:`cliploom.conditioning.clean_frames_condition`), which is how
  SkyReels extends a video (``prefix_video`` with ``addnoise_condition``).

:class:`DiffusionForcingTransformer` is diffusers' class with a Wan-shaped forward; everything else
(weights, config, LoRA adapters, attention processors) is diffusers' own.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import SkyReelsV2Transformer3DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput

TRANSFORMER_CLASS = "SkyReelsV2Transformer3DModel"


class DiffusionForcingTransformer(SkyReelsV2Transformer3DModel):
    """``SkyReelsV2Transformer3DModel`` called the way the engine calls ``WanTransformer3DModel``."""

    fps_label = 0  # SkyReels' fps input: 0 for 16 fps, 1 otherwise (set from the story's fps)

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None,
                return_dict: bool = True, attention_kwargs=None, **kwargs):
        b, frames = hidden_states.shape[0], hidden_states.shape[2] // self.config.patch_size[0]
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(b)
        if timestep.ndim == 1:  # one timestep per sample: the same on every frame
            per_frame = timestep[:, None].expand(b, frames)
        else:  # per token (a frame's tokens share their timestep): the first token of each frame
            per_frame = timestep.reshape(timestep.shape[0], frames, -1)[:, :, 0].expand(b, frames)
        if b > 1 and self.config.inject_sample_info:
            # diffusers' fps term broadcasts only over a batch of one under diffusion forcing (its
            # SkyReels pipelines run guidance's two passes one after the other): so do we
            image = encoder_hidden_states_image
            sample = torch.cat([self._one(hidden_states[i : i + 1], per_frame[i : i + 1], encoder_hidden_states[i : i + 1],
                                          None if image is None else image[i : i + 1], attention_kwargs) for i in range(b)])
        else:
            sample = self._one(hidden_states, per_frame, encoder_hidden_states, encoder_hidden_states_image,
                               attention_kwargs)
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)

    def _one(self, hidden_states, per_frame, encoder_hidden_states, encoder_hidden_states_image, attention_kwargs):
        fps = [self.fps_label] * hidden_states.shape[0] if self.config.inject_sample_info else None
        return super().forward(hidden_states=hidden_states, timestep=per_frame.contiguous(),
                               encoder_hidden_states=encoder_hidden_states,
                               encoder_hidden_states_image=encoder_hidden_states_image,
                               enable_diffusion_forcing=True, fps=fps, return_dict=False,
                               attention_kwargs=attention_kwargs)[0]


def set_frame_rate(transformer, fps: int) -> None:
    """Tell a SkyReels-V2 DiT the video's frame rate as its pipelines do (``0 if fps == 16 else 1``);
    nothing for other DiTs."""
    if isinstance(transformer, DiffusionForcingTransformer):
        transformer.fps_label = 0 if int(fps) == 16 else 1


def transformer_class_of(folder: Path) -> str | None:
    """The ``_class_name`` of ``folder/config.json`` (a transformer folder), if it has one."""
    import json

    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError):
        return None
