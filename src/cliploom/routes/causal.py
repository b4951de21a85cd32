"""The causal routes (``causal``, ``self-forcing``): latent frames made block by block under a
rolling KV cache.

Read :func:`weave` top-down. The stream is the ``pro`` timeline's latents, made in order: the
anchor (latent frame 0, given), then each clip's new latent frames (clip 0: ``T - 1``, later clips:
``T - 1 - K``) in blocks of ``block`` frames. A block is denoised attending to the cached keys and
values of the sink (the first ``sink`` clips) and the window (the last ``window`` clips), then run
once more clean (timestep 0) to write its own keys and values to the cache -- Self-Forcing's
rollout. Each clip is decoded as ``pro`` decodes it (``[anchor, previous clip's last K latents,
new]``, the first ``1 + 4K`` frames dropped), so every route yields the same ``Clip`` stream over
the same frames; a streamed clip is its streamed blocks put together (decoded once, not twice).
With ``recache``, a prompt switch recomputes the cached keys and values under the new prompt
before the clip's first block (LongLive); ``rope_jitter`` spreads the heads' temporal
RoPE frequencies (LoL, against snap-backs to the sink). ``positions: rebased`` re-lays the cache
from position 0 at each clip (the sink where it was, the window right after it, rewritten at those
positions), so no latent frame is ever placed further than ``sink + window + a clip`` -- the range
a model trained on a few clips has seen -- where ``absolute`` positions grow with the video.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import torch
from tqdm.auto import tqdm

from .. import conditioning as C
from ..errors import CliploomError
from ..loom import (
    Clip,
    ClipDecoder,
    Start,
    encode_prompts,
    experts_for,
    hand_over,
    queue_pro_decode,
)
from ..models.causal import causal_attention, set_offset, set_rope_jitter
from ..models.components import Components, frames_to_tensor
from ..models.memory import check_story_fits
from ..models.stream_decode import BlockDecoder
from ..sampling import compute_dtype, make_denoiser, sampler, schedule
from ..story import Story
from ..video_io import load_image


def weave(
    model: Components,
    story: Story,
    *,
    progress: bool = True,
    overlap_decode: bool | None = None,
    on_clip_start: Callable[[int], None] | None = None,
    on_step: Callable[[int, int, int], None] | None = None,
    start: Start | None = None,
    on_block: Callable[[int, torch.Tensor], None] | None = None,
) -> Iterator[Clip]:
    """Generate ``story`` on the causal route, yielding each clip as soon as it is decoded.

    ``on_block(clip, frames)`` streams: it gets each block's frames (uint8 ``[n, H, W, 3]``) as soon
    as the block is denoised, decoded with the VAE's causal cache in the clip's own context, so
    that a clip's blocks put together are its frames before the seam blend (colour-matched per
    block, where the clip is matched as a whole)."""
    # 1. Settle every number; refuse what this route cannot do.
    story = story.resolve(model.settings, model.size_multiple, model.scale_temporal)
    check_story_fits(model, story)
    _check(model, story, start)
    T, K = C.latent_frame_count(story.frames, model.scale_temporal), story.motion_latents
    h, w = story.height // model.scale_spatial, story.width // model.scale_spatial
    block, recache = story.route_option("block"), story.route_option("recache")
    rebased = story.route_option("positions") == "rebased"
    sink, window = cache_frames(story.route_option("sink"), story.route_option("window"), T, K)
    cfg = max(story.guidance, story.guidance_low) > 1

    # 2. Prompts, the anchor latent and its image features (as the SVI loop).
    prompts, text, negative = encode_prompts(model, story, cfg)
    image = load_image(story.reference, story.width, story.height)
    anchor = model.encode_video(frames_to_tensor([image]).to(model.device))  # [1, C, 1, h, w]
    features = model.encode_image_features(image)
    sigmas = schedule(story.steps, story.shift, story.timesteps)
    tr = model.transformer
    experts = experts_for(model, story)  # guidance in an interval, as the SVI loop

    decoder = ClipDecoder(model, False, story.color_match, image, story.color_match_method)
    blend = story.seam_blend
    queue: list[Future] = []
    clip_bar = tqdm(total=len(prompts), desc="clips", unit="clip", disable=not progress)
    memory = None
    with causal_attention(tr, sink=sink, window=window) as session:
        session.reset()
        set_rope_jitter(tr, story.route_option("rope_jitter"))
        # 3. The anchor is latent frame 0 of the stream, given clean (y and mask mark it, as I2V's
        #    first frame), and the first block of the cache.
        write_block(model, session, anchor, stream_y(model, anchor, known=True), text[prompts[0]], features, 0)
        position = 1
        try:
            for i, prompt in enumerate(prompts):
                started = time.perf_counter()
                if on_clip_start is not None:
                    on_clip_start(i)
                # 4. A prompt switch with recache: the cached frames' keys and values under the new
                #    prompt; rebased positions: the cache re-laid from 0, the clip right after it.
                switched = recache and i > 0 and prompt != prompts[i - 1]
                if switched or (rebased and i > 0):
                    end = rewrite_cache(model, session, features, text[prompt] if switched else None, rebased)
                    position = end if rebased else position
                # 5. This clip's new latent frames, block by block, from its own seeded noise.
                new = T - 1 if i == 0 else T - 1 - K
                seed = story.clip_seed(i)
                generator = torch.Generator("cpu").manual_seed(seed)  # then renoise's fresh noise, block after block
                noise = torch.randn((1, model.z_dim, new, h, w), generator=generator)
                sample = sampler(story.sampler, generator)
                made, streamed, steps = [], [], len(sigmas) - 1
                stream = None
                if on_block is not None:  # decoded in the clip's own context, as the clip is
                    stream = BlockDecoder(model, anchor if memory is None else torch.cat([anchor, memory], dim=2))
                total = steps * -(-new // block)  # steps over the clip's blocks, for on_step
                for b0 in range(0, new, block):
                    n = min(block, new - b0)
                    cond = C.ClipCondition(y=stream_y(model, noise[:, :, :n].to(model.device), known=False),
                                           image_embeds=features, patch=model.patch)
                    denoise = make_denoiser(experts, cond, text[prompt], negative)
                    set_offset(tr, position)
                    done = steps * (b0 // block)
                    x = sample(denoise, noise[:, :, b0:b0 + n].to(model.device), sigmas, cond.finish,
                               (lambda k, i=i, d=done: on_step(i, d + k + 1, total)) if on_step else None)
                    # 6. The block, clean, becomes cache (and its frames part of the clip).
                    write_block(model, session, x, cond.y, text[prompt], features, position, start=session.written)
                    made.append(x)
                    position += n
                    if stream is not None:
                        frames = stream.push(x)
                        streamed.append(frames)
                        if b0 == 0 and i == 0:  # clip 0 keeps its anchor frame
                            frames = torch.cat([stream.context, frames])
                        on_block(i, decoder.match(frames) if decoder.color_match else frames)
                if stream is not None:
                    stream.close()
                # 7. Decode as pro does: [anchor, previous clip's last K latents, new] -- a streamed
                #    clip from the frames its blocks streamed, not decoded twice.
                info = (i, prompt, seed, time.perf_counter() - started, 0.0)
                whole = None if stream is None else torch.cat([stream.context, *streamed])
                memory = queue_pro_decode(decoder, queue, story, i, anchor, memory, torch.cat(made, dim=2), info, whole)
                for clip in hand_over(queue, int(blend > 0), blend, 1 + 4 * K):
                    yield clip
                    clip_bar.update()
            for clip in hand_over(queue, 0, blend, 1 + 4 * K):
                yield clip
                clip_bar.update()
        finally:
            set_offset(tr, 0)
            clip_bar.close()
            decoder.close()


def _check(model: Components, story: Story, start: Start | None) -> None:
    r = story.route
    if start is not None and start.index > 0:
        raise CliploomError(f"route {r} cannot resume or extend a run: its KV cache is not saved with the clips",
                            "generate the story from clip 0 (or use route: svi)")
    if model.transformer_2 is not None:
        raise CliploomError(f"route {r} runs on one transformer; this model has two experts",
                            "use a single-transformer model (Wan 2.1, TI2V 5B, the built-in model)")
    if any(c.keyframes for c in story.clips):
        raise CliploomError(f"route {r} does not take keyframes in this version", "drop end_frame/keyframes, or use route: svi")
    if story.motion_amplitude not in (None, 1):
        raise CliploomError(f"route {r} has no padding frames for motion_amplitude to act on",
                            "leave motion_amplitude at 1 on this route")
    if story.memory_guidance not in (None, 1):
        raise CliploomError(f"route {r} has no motion memory in y for memory_guidance to contrast",
                            "leave memory_guidance at 1 on this route")


def cache_frames(sink_clips: int, window_clips: int, T: int, K: int) -> tuple[int, int]:
    """The cache's sink and window in latent frames, from clips: clip 0 has ``T`` latents (the
    anchor included), every later clip ``T - 1 - K`` new ones."""
    sink = 0 if sink_clips == 0 else T + (sink_clips - 1) * (T - 1 - K)
    return sink, window_clips * (T - 1 - K)


def stream_y(model: Components, latents: torch.Tensor, known: bool) -> torch.Tensor | None:
    """Mask and ``y`` for latent frames of the stream: the anchor's (mask 1, ``y`` = the anchor) or
    a generated block's (both zero). ``None`` for a DiT without ``y`` channels (a text-to-video causal
    DiT, TI2V): there the anchor is simply the first block of the stream, clean at timestep 0."""
    if model.settings.expand_timesteps:
        return None
    b, _, n, h, w = latents.shape
    if known:
        return torch.cat([torch.ones(b, 4, n, h, w, device=latents.device, dtype=latents.dtype), latents], dim=1)
    return torch.zeros(b, 4 + latents.shape[1], n, h, w, device=latents.device, dtype=latents.dtype)


@torch.no_grad()
def write_block(model: Components, session, x: torch.Tensor, y: torch.Tensor, text, features, position: int,
                start: int | None = None) -> None:
    """Run the clean block once at timestep 0 and RoPE ``position``, keeping its keys and values as
    the cache block that starts at ``start`` in the stream (default: ``position``)."""
    tr = model.transformer
    dtype = compute_dtype(tr)
    set_offset(tr, position)
    with session.writing(x.shape[2], start=position if start is None else start, inputs=(x, y, text), position=position):
        tr(hidden_states=(x if y is None else torch.cat([x, y.to(x)], dim=1)).to(dtype), timestep=torch.zeros(1, device=x.device),
           encoder_hidden_states=text.to(dtype),
           encoder_hidden_states_image=None if features is None else features.to(dtype), return_dict=False)


def rewrite_cache(model: Components, session, features, text=None, compact: bool = False) -> int:
    """Rewrite cached blocks from their own inputs, in order: under ``text`` (LongLive's re-cache at a
    prompt switch; ``None``: each block's own prompt) and, with ``compact``, at positions laid from 0
    without gaps (rebased: the sink stays where it is, the window follows it). Only blocks whose
    prompt or position changes are recomputed. Returns the position after the last block."""
    old = list(session.blocks)
    session.blocks = []
    end = 0
    for b in old:
        position = end if compact else b.position
        x, y, own = b.inputs
        if text is None and position == b.position:
            session.blocks.append(b)  # unchanged: kept as it is
        else:
            write_block(model, session, x, y, own if text is None else text, features, position, start=b.start)
        end = position + b.frames
    return end
