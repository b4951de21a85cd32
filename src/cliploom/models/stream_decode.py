"""Decoding a clip block by block with the Wan VAE's causal cache (the causal route's streaming).

The Wan VAE decodes latent frame by latent frame, each step reading a cache of the frames before
it (diffusers' ``AutoencoderKLWan._decode`` loops over frames with ``feat_cache``); it clears that
cache at the start and end of every ``decode`` call. :class:`BlockDecoder` runs the same loop but
keeps the cache between calls, so a clip's latents pushed in blocks give, block by block, the
frames one ``decode`` of the whole clip gives (the same operations in the same order). Context
latents (the anchor, the previous clip's last latents) are pushed first and their frames dropped,
as the clip loop drops them.
"""

from __future__ import annotations

import torch

from .components import Components, to_uint8_frames


class BlockDecoder:
    """One clip's decoder: :meth:`push` normalised latents ``[1, C, n, h, w]``, get their frames.

    ``context`` (the latents the clip is decoded after, e.g. ``[anchor, memory]``) is pushed first;
    its frames are kept as :attr:`context`."""

    def __init__(self, model: Components, context: torch.Tensor | None = None):
        vae = model.vae
        if not hasattr(vae, "clear_cache") or not hasattr(vae, "decoder"):
            raise TypeError(f"{type(vae).__name__} has no causal frame cache to stream with")
        if getattr(vae, "use_tiling", False):
            raise ValueError("tiled decoding cannot stream: its tiles are decoded one after another")
        self.model, self.vae = model, vae
        vae.clear_cache()
        self.first = True
        self.context = self.push(context) if context is not None else None

    @torch.no_grad()
    def push(self, latents: torch.Tensor) -> torch.Tensor:
        """The uint8 frames ``[F, H, W, 3]`` of these latent frames (1 for the clip's first latent
        frame, then 4 per latent frame)."""
        vae = self.vae
        x = vae.post_quant_conv(self.model.denormalise(latents))
        out = []
        for i in range(x.shape[2]):
            vae._conv_idx = [0]
            out.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                   first_chunk=self.first))
            self.first = False
        video = torch.cat(out, dim=2)
        if vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            video = unpatchify(video, patch_size=vae.config.patch_size)
        return to_uint8_frames(video.clamp(-1, 1)[0])

    def close(self) -> None:
        self.vae.clear_cache()
