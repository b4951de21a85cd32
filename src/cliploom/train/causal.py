"""Causal stage 1 (``route: causal``): the flow-matching loss under a block-causal mask over
multi-clip streams, with an independent noise level per latent frame (diffusion forcing, the way
CausVid and Self-Forcing start from a bidirectional model).

A sample is a ShapesWorld sequence of ``clips_per_sample`` clips on the ``pro`` timeline, encoded
the way the causal route decodes it: clip 0 is its ``F`` frames (``T`` latents, latent 0 the
anchor); clip ``k`` adds the new latents of ``[anchor frame, the 4K frames before, the new frames]``
encoded as one clip. The stream's latent 0 (the anchor) is given clean (timestep 0, marked in
``y``); every other latent frame gets its own noise level. Each clip's tokens read their own
clip's prompt (:class:`cliploom.models.causal.ClipTextProcessor`) and attend only to frames not
after their own (:class:`cliploom.models.causal.BlockCausalProcessor`, blocks of one latent frame,
as the route's default ``block: 1``). The loss leaves the anchor out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import conditioning as C
from ..models.causal import causal_attention
from ..models.components import frames_to_tensor
from .loop import SVITrainer


@dataclass
class StreamChoice:
    clips: int

    def describe(self) -> str:
        return f"causal stream of {self.clips} clips"


@dataclass
class StreamSample:
    latents: torch.Tensor  # [1, C, S, h, w]: the stream's latents (normalised)
    prompts: list[str]  # one per clip
    clip_of_frame: list[int]  # the clip each latent frame belongs to
    choice: StreamChoice


@torch.no_grad()
def stream_sample(model, generator: torch.Generator, clips: int, frames: int, size: int, K: int = 1) -> StreamSample:
    """A ShapesWorld sequence of ``clips`` clips encoded as the causal route's stream."""
    from ..shapesworld import sample_sequence

    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    new = frames - 1 - C.TEMPORAL * K  # new pixel frames of every clip after the first
    seq = sample_sequence(seed, clips, [frames] + [new] * (clips - 1), size=size)
    video = seq.frames()
    encode = lambda f: model.encode_video(frames_to_tensor(f).to(model.device))  # noqa: E731
    parts = [encode(video[:frames])]
    for k in range(1, clips):
        start = frames + new * (k - 1)
        window = np.concatenate([video[:1], video[start - C.TEMPORAL * K : start + new]])
        parts.append(encode(window)[:, :, 1 + K :])
    T = C.latent_frame_count(frames)
    owner = [0] * T + [k for k in range(1, clips) for _ in range(T - 1 - K)]
    return StreamSample(torch.cat(parts, dim=2), seq.prompts, owner, StreamChoice(clips))


class CausalTrainer(SVITrainer):
    """The SVI trainer's model, LoRA, optimizer, checkpoints and exports; samples and loss of the
    causal stage."""

    def make_samples(self, generator: torch.Generator) -> list[StreamSample]:
        cfg = self.cfg
        return [stream_sample(self.model, generator, cfg.clips_per_sample, cfg.frames, cfg.width)
                for _ in range(cfg.batch_size)]

    def micro_step(self, samples: list[StreamSample], generator: torch.Generator) -> dict:
        acc, device = self.accelerator, self.accelerator.device
        x0 = torch.cat([s.latents for s in samples]).float().to(device)  # [B, C, S, h, w]
        B, _, S, h, w = x0.shape
        pick = self.allowed[torch.randint(len(self.allowed), (B, S), generator=generator)]
        sigmas = self.train_sigmas[pick].to(device)  # [B, S]: a noise level per latent frame
        sigmas[:, 0] = 0  # the anchor is given
        weights = self.train_weights[pick].to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        sig = sigmas.view(B, 1, S, 1, 1)
        x_t = (1 - sig) * x0 + sig * noise
        v = noise - x0
        y = torch.zeros(B, 4 + x0.shape[1], S, h, w, device=device)
        y[:, :4, 0], y[:, 4:, 0] = 1, x0[:, :, 0]  # the anchor in y, marked, as I2V's first frame
        ph, pw = self.model.patch
        tokens = (h // ph) * (w // pw)
        timestep = (sigmas * 1000).repeat_interleave(tokens, dim=1)  # [B, S * tokens]
        text = torch.cat([torch.cat([self.text(p) for p in s.prompts], dim=1) for s in samples])
        dtype = self.model.dtype
        with causal_attention(self.transformer, clip_texts=True) as session:
            session.set_blocks([1] * S, tokens, device)
            session.set_clip_texts(samples[0].clip_of_frame, tokens, self.text(samples[0].prompts[0]).shape[1], device)
            with acc.autocast():
                out = self.net(hidden_states=torch.cat([x_t, y], dim=1).to(dtype), timestep=timestep,
                               encoder_hidden_states=text.to(dtype), return_dict=False)[0]
        sq = ((out.float() - v) ** 2).mean(dim=(1, 3, 4))  # [B, S]
        loss = (sq[:, 1:] * weights[:, 1:]).mean()  # the anchor is not predicted
        acc.backward(loss)
        return dict(loss=float(loss.detach()), ts=(sigmas[:, 1:] * 1000).mean(1).tolist(),
                    weights=weights[:, 1:].mean(1).tolist(), injections=[], samples=samples, noise=noise,
                    sigmas=sigmas, banked=0)
