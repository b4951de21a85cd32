"""The clip loop: a long video as a chain of short clips stitched by SVI conditioning.

Read :func:`weave` top-down: it is the whole recipe. Conditioning lives in ``conditioning``,
sampling in ``sampling``, the model in ``models``; this file only puts them in order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import conditioning as C
from .colour import ColourTarget, match_colour
from .errors import CliploomError
from .models.components import Components, frames_to_tensor
from .models.memory import check_story_fits
from .models.skyreels import set_frame_rate
from .sampling import Expert, contrast, frame_schedule, make_denoiser, sampler, schedule
from .story import Story
from .video_io import load_image


@dataclass
class Clip:
    """One finished clip: the frames that go into the video, and how they were made."""

    index: int
    prompt: str
    seed: int
    frames: torch.Tensor  # uint8 [n, H, W, 3]: only the frames kept in the video
    latents: torch.Tensor  # [1, C, T, h, w]: the clip's denoised latents (normalised)
    keep: tuple[int, int]  # which of the clip's generated frames these are
    seconds_denoise: float
    seconds_decode: float
    peak_memory_mb: float
    # What the next clip continues from: the last K latents [1, C, K, h, w] (latent mode), or the
    # last N generated frames in [-1, 1], [1, 3, N, H, W] (pixel modes; not among ``frames``
    # unless this is the story's last clip, because the next clip regenerates them).
    memory: torch.Tensor | None = None
    tail: torch.Tensor | None = None  # pixel modes: uint8 [N, H, W, 3], the frames ``memory`` holds
    seconds_compile: float = 0.0  # compiled engines: the compilation this clip's start paid for (not in seconds_denoise)
    anchor_next: torch.Tensor | None = None  # `anchor: last_frame`: uint8 [H, W, 3], the frame the next clip is anchored on


@dataclass
class Start:
    """Where the loop starts: clip ``index``, continuing from ``memory`` (the ``Clip.memory`` of
    clip ``index - 1``; ``None`` for clip 0). Resume, re-run from clip N and extension use it."""

    index: int = 0
    memory: torch.Tensor | None = None
    anchor_frame: torch.Tensor | None = None  # `anchor: last_frame`: the ``Clip.anchor_next`` of clip ``index - 1``


def weave(
    model: Components,
    story: Story,
    *,
    progress: bool = True,
    overlap_decode: bool | None = None,
    on_clip_start: Callable[[int], None] | None = None,
    on_step: Callable[[int, int, int], None] | None = None,
    start: Start | None = None,
) -> Iterator[Clip]:
    """Generate ``story`` clip by clip, yielding each clip as soon as it is decoded.

    Memory is constant in the number of clips: only the motion memory (K latents or N frames)
    and at most two decoded clips exist at any time. In latent mode the next clip starts
    denoising while the previous one is decoded (``overlap_decode``; default: on CUDA).
    ``start`` begins at a later clip from a saved motion memory: the clips it makes equal those
    of an uninterrupted run. ``on_step(clip, step, steps)`` runs after every denoising step; an
    exception raised there (a cancel) stops the loop at once.
    """
    start = start or Start()
    # 1. Settle every number: the story's own, else the model's defaults.
    story = story.resolve(model.settings, model.size_multiple, model.scale_temporal)
    check_story_fits(model, story)  # refuse what cannot fit before anything is allocated
    if story.motion_amplitude != 1 and model.settings.expand_timesteps:
        raise CliploomError(f"motion_amplitude {story.motion_amplitude} needs a model with y channels; "
                            "a TI2V model takes its known frames as clean latents and has no padding to amplify",
                            "leave motion_amplitude at 1 with this model")
    if story.anchor != "reference" and start.index > 0 and start.anchor_frame is None:
        raise CliploomError(f"anchor: {story.anchor} cannot continue at clip {start.index}: its anchor is the frame clip "
                            f"{start.index - 1} ended on, which this run folder does not keep (written before it did, "
                            "or an uploaded video)", "generate the story from clip 0, or use anchor: reference")
    if story.memory_guidance not in (None, 1) and (model.settings.expand_timesteps or story.route == "df"):
        raise CliploomError(f"memory_guidance {story.memory_guidance} needs the motion memory in y; here it is given "
                            "as clean frames of the latents, which a restart without it would still see",
                            "leave memory_guidance at 1 with this model or route")
    F, T = story.frames, C.latent_frame_count(story.frames, model.scale_temporal)
    h, w = story.height // model.scale_spatial, story.width // model.scale_spatial
    cfg = max(story.guidance, story.guidance_low) > 1

    # 2. Encode each distinct prompt once (and the negative prompt when guidance is on).
    prompts, text, negative = encode_prompts(model, story, cfg)

    # 3. The reference image: pixels for pixel modes, the anchor latent (encoded once).
    image = load_image(story.reference, story.width, story.height)
    reference = frames_to_tensor([image]).to(model.device)[:, :, 0]  # [1, 3, H, W]
    anchor = model.encode_video(reference[:, :, None]) if story.latent_motion else None
    anchor_features = model.encode_image_features(image)

    # 4. The noise schedule and the expert(s) that denoise it.
    sigmas = schedule(story.steps, story.shift, story.timesteps)
    experts = experts_for(model, story)
    set_frame_rate(model.transformer, story.fps)  # DiTs that embed it (SkyReels-V2)

    decoder = ClipDecoder(model, overlap_decode if overlap_decode is not None else model.device.type == "cuda",
                       story.color_match, image, story.color_match_method)
    clip_bar = tqdm(total=len(prompts), initial=start.index, desc="clips", unit="clip", disable=not progress)
    keyframes = _Keyframes(model, story)

    def condition(i: int, keys, memory, noise) -> C.ClipCondition:
        """Clip ``i``'s condition: the anchor, the motion memory and ``keys`` (its keyframes)."""
        if story.route == "df" and not (memory is None and story.first_clip == "i2v"):
            cond = C.context_condition(anchor, memory, T, model.settings.expand_timesteps, model.patch,
                                       keyframes=tuple((n, latent) for n, _, latent in keys),
                                       context_noise=story.route_option("addnoise"), noise=noise)
            cond.image_embeds = anchor_features
        elif story.latent_motion and not (memory is None and story.first_clip == "i2v"):
            cond = C.latent_condition(anchor, memory, T, model.settings.expand_timesteps, model.patch,
                                      keyframes=tuple((n, latent) for n, _, latent in keys))
            cond.image_embeds = anchor_features if not (model.first_last_frame and keys) else \
                model.encode_image_features(image, keyframes.end_image(i))
        elif memory is None and not keys and story.latent_motion:  # first_clip: i2v (pro or df)
            cond = i2v_condition(model, story, image)
        else:  # pixel modes, and pro mode's (or df's) keyed clip 0 as the model's own image-to-video (first_clip: i2v)
            video = C.pixel_motion_video(reference, memory, F, story.ref_pad if not story.latent_motion else 0,
                                         keyframes=tuple((n, pixels) for n, pixels, _ in keys))
            first = image if memory is None else _to_pil(memory[0, :, 0])
            cond = C.pixel_condition(
                model.encode_video(video), F, story.motion_frames if memory is not None else 1,
                model.settings.expand_timesteps, model.patch, keyframes=tuple((n, latent) for n, _, latent in keys),
            )
            cond.image_embeds = model.encode_image_features(first, keyframes.end_image(i) if keys else None)
        return cond

    memory = start.memory  # motion memory: the previous clip's last K latents, or its last N frames
    if memory is not None:
        memory = memory.to(model.device)
    if start.anchor_frame is not None and story.anchor == "last_frame":  # continuing a re-anchored run
        image, anchor, anchor_features = reanchor(model, start.anchor_frame)
    blend = story.seam_blend if story.latent_motion else 0
    hold = int(decoder.overlapped) + int(blend > 0)  # clips that wait in the queue before they are handed over
    queue: list[Future] = []
    first_out = False  # whether the story's first clip has been handed over
    try:
        for i in range(start.index, len(prompts)):
            prompt = prompts[i]
            started = time.perf_counter()
            _reset_peak_memory(model.device)
            if on_clip_start is not None:
                on_clip_start(i)

            # 5. This clip's own seeded noise (the generator goes on to renoise's fresh noise).
            seed = story.clip_seed(i)
            generator = torch.Generator("cpu").manual_seed(seed)
            noise = torch.randn((1, model.z_dim, T, h, w), generator=generator).to(model.device)

            # 6. Condition the clip on the anchor, the motion memory and its keyframes (if any): SVI
            #    puts the motion latents in y; diffusion forcing gives them as context frames of x.
            keys = keyframes.of(i)
            cond = condition(i, keys, memory, noise)
            C.amplify_motion(cond, story.motion_amplitude, _known_latent_frames(story, memory))
            # Keyframe guidance: the step from the clip without its keyframes to the clip with them, amplified.
            free = None
            if keys and story.keyframe_guidance not in (None, 1):
                free = condition(i, (), memory, noise)
                C.amplify_motion(free, story.motion_amplitude, _known_latent_frames(story, memory))
            # Memory guidance: the step from the clip restarted at the anchor (no motion memory) to the
            # clip as it continues, amplified -- against the pull back to the anchor's layout.
            restart = None
            if memory is not None and story.memory_guidance not in (None, 1):
                restart = condition(i, keys, None, noise)

            # 7. Denoise (diffusion forcing with ar_step: each latent frame on its own staggered schedule).
            clip_sigmas = sigmas
            if story.route == "df" and story.route_option("ar_step") and not (memory is None and story.first_clip == "i2v"):
                clip_sigmas = frame_schedule(sigmas, T, story.route_option("ar_step"), cond.known_prefix())
            split = getattr(model, "_cliploom_cfg_split", None)
            denoise = make_denoiser(experts, cond, text[prompt], negative, cfg_split=split)
            if free is not None:
                denoise = contrast(denoise, make_denoiser(experts, free, text[prompt], negative, cfg_split=split),
                                   story.keyframe_guidance)
            if restart is not None:
                denoise = contrast(denoise, make_denoiser(experts, restart, text[prompt], negative, cfg_split=split),
                                   story.memory_guidance)
            seconds_compile = 0.0
            if getattr(model, "_cliploom_compiled", False) and i == start.index:
                seconds_compile = _compile_now(denoise, noise, sigmas)  # once, and not counted as the clip's time
                started += seconds_compile
            steps = len(clip_sigmas) - 1
            with tqdm(total=steps, desc=f"clip {i + 1}", leave=False, disable=not progress) as bar:
                def step_done(k: int, i: int = i) -> None:
                    bar.update()
                    if on_step is not None:
                        on_step(i, k + 1, steps)

                latents = sampler(story.sampler, generator)(denoise, noise, clip_sigmas, cond.finish, step_done)
            seconds_denoise = time.perf_counter() - started
            if not bool(torch.isfinite(latents).all()):  # never decode garbage into a video
                raise CliploomError(
                    f"clip {i}: the latents hold NaN or Inf after denoising",
                    "lower the LoRA weights or the guidance, or run in float32/bfloat16; a damaged checkpoint does this too")

            if cond.known_timesteps is not None and memory is not None:  # the context as it was, not noised
                latents[:, :, 1 : 1 + memory.shape[2]] = memory

            # 8. Keep the motion memory; decode beside the loop (latent mode) or now (pixel mode).
            keep = story.frames_kept(i)
            if story.latent_motion:
                memory = latents[:, :, -story.motion_latents :]
                job = decoder.submit(latents, keep, (i, prompt, seed, seconds_denoise, seconds_compile), memory)
                if story.memory_from == "frames":  # the memory as the clip looks: decoded, colour matched, encoded
                    decoded = job.result()  # waits for the decode
                    memory = decoded.clip.memory = encode_memory(model, decoded.frames_all, story.motion_latents)
                if story.anchor == "last_frame":  # re-anchoring: the next clip is anchored where this one ended
                    decoded = job.result()  # waits for the decode
                    decoded.clip.anchor_next = decoded.frames_all[-1].cpu()
                    image, anchor, anchor_features = reanchor(model, decoded.clip.anchor_next)
            else:
                job = decoder.submit(latents, keep, (i, prompt, seed, seconds_denoise, seconds_compile), None)
                decoded = job.result()
                decoded.clip.tail = decoded.frames_all[-story.motion_frames :]
                memory = decoded.clip.memory = frames_to_tensor(decoded.clip.tail).to(model.device)

            # 9. Hand over finished clips in order. A clip waits for its decode (done beside the next
            #    clip's denoising when overlapped) and, with seam blending, for the next clip's
            #    frames: its last frames fade into the next clip's re-creation of them.
            #    Until the first clip is out, one fewer waits: what a viewer waits for is the first
            #    clip, and overlap would hold it back by a whole clip's denoising (measured on an H200:
            #    32 s to the first clip against 15 s + 3 s of its own denoise and decode); the cost is
            #    one decode per story not hidden behind denoising.
            queue.append(job)
            wait = hold - int(decoder.overlapped and not first_out)
            for clip in hand_over(queue, wait, blend, 1 + 4 * story.motion_latents):
                first_out = True
                yield clip
                clip_bar.update()
        for clip in hand_over(queue, 0, blend, 1 + 4 * story.motion_latents):
            yield clip
            clip_bar.update()
    finally:
        clip_bar.close()
        decoder.close()


def _known_latent_frames(story: Story, memory: torch.Tensor | None) -> int:
    """Leading latent frames of ``y`` the clip continues from (anchor and motion latents, or the
    latent frames the motion frames cover)."""
    if memory is None:
        return 1
    return 1 + memory.shape[2] if story.latent_motion else C.pixel_known_latent_frames(memory.shape[2])


def encode_prompts(model: Components, story: Story, cfg: bool):
    """Every clip's prompt, each distinct prompt's embedding (all of the story's, even when starting
    later: the same batch gives the same embeddings) and the negative prompt's when guidance is on."""
    prompts = [story.prompt(i) for i in range(len(story.clips))]
    distinct = list(dict.fromkeys(prompts))
    text = {p: e[None] for p, e in zip(distinct, model.encode_text(distinct))}
    negative = model.encode_text([story.negative_prompt])[0:1] if cfg else None
    if story.release_text_encoder:
        model.release_text_encoder()
    return prompts, text, negative


def _compile_now(denoise, noise: torch.Tensor, sigmas: torch.Tensor) -> float:
    """Run the compiled transformer once at the schedule's highest and lowest noise levels (every
    expert and guidance batch size the story uses) so that compilation happens here, timed apart;
    the clips' shapes never change, so nothing recompiles later."""
    started = time.perf_counter()
    with torch.no_grad():
        for sigma in sorted({float(sigmas[0]), float(sigmas[-2])}):
            denoise(noise, sigma)
    return time.perf_counter() - started


def encode_memory(model: Components, frames: torch.Tensor, k: int) -> torch.Tensor:
    """``memory_from: frames``: the last ``k`` latents of a decoded clip (uint8 ``[F, H, W, 3]``)
    encoded again. The first ``scale_temporal`` frames are left out: frame 0 is the anchor's decode,
    not a frame of the motion, and leaving out a whole latent's worth keeps the rest ``4k + 1`` frames
    long and aligned with the clip's latents, so the last latent still holds the clip's last frames.
    What is encoded is a run of the clip's own frames, as the trainer encodes the frames that end
    where the motion ends (``motion_source: previous_clip``)."""
    t = model.scale_temporal
    return model.encode_video(frames_to_tensor(frames[t:].cpu()).to(model.device))[:, :, -k:]


def reanchor(model: Components, frame: torch.Tensor):
    """Re-anchoring on a decoded frame (uint8 ``[H, W, 3]``): the image, its anchor latent and its
    image features."""
    image = Image.fromarray(frame.cpu().numpy())
    return image, model.encode_video(frames_to_tensor([image]).to(model.device)), model.encode_image_features(image)


def i2v_condition(model: Components, story: Story, image: Image.Image) -> C.ClipCondition:
    """Clip 0 as the model's own image-to-video (``first_clip: i2v``): the reference then zero
    pixels, VAE-encoded, its first pixel frame known, the reference's image features. The svi and
    df routes' clip 0 without keyframes, and the helios route's."""
    reference = frames_to_tensor([image]).to(model.device)
    video = C.pixel_motion_video(reference[:, :, 0], None, story.frames, 0)
    cond = C.pixel_condition(model.encode_video(video), story.frames, 1, model.settings.expand_timesteps, model.patch)
    cond.image_embeds = model.encode_image_features(image)
    return cond


def queue_pro_decode(decoder: "ClipDecoder", queue: list[Future], story: Story, i: int, anchor: torch.Tensor,
                     memory: torch.Tensor | None, latents: torch.Tensor, info: tuple,
                     frames: torch.Tensor | None = None) -> torch.Tensor:
    """For the routes that make only a clip's new latents (causal, helios): refuse NaN, then queue
    clip ``i`` for decoding as ``pro`` decodes it (``[anchor, previous clip's last K latents, new]``,
    its first ``1 + 4K`` frames dropped); returns the next clip's motion memory. ``frames``: that
    chunk already decoded (a streamed clip's blocks), used instead of decoding it again."""
    if not bool(torch.isfinite(latents).all()):
        raise CliploomError(f"clip {i}: the latents hold NaN or Inf after denoising",
                            "lower the LoRA weights or the guidance; a damaged checkpoint does this too")
    chunk = torch.cat([anchor, latents] if memory is None else [anchor, memory, latents], dim=2)
    memory = chunk[:, :, -story.motion_latents:]
    queue.append(decoder.submit(chunk, story.frames_kept(i), info, memory, frames))
    return memory


def hand_over(queue: list[Future], hold: int, blend: int, skip: int) -> Iterator[Clip]:
    """Yield the queue's clips while more than ``hold`` wait; with ``blend`` frames of seam
    blending, a clip's last frames first fade into the next clip's frames of the same instants
    (frames ``skip - blend .. skip - 1`` of the next clip re-create its last ``blend`` frames)."""
    while len(queue) > hold:
        head = queue.pop(0).result()
        if blend and queue:
            following = queue[0].result().frames_all[skip - blend : skip].float()
            frames = head.clip.frames
            w = (torch.arange(1, blend + 1, dtype=torch.float32) / (blend + 1)).view(-1, 1, 1, 1)
            tail = (1 - w) * frames[-blend:].float() + w * following
            head.clip.frames = torch.cat([frames[:-blend], tail.round().clamp(0, 255).to(torch.uint8)])
        yield head.clip


def experts_for(model: Components, story: Story) -> list[Expert]:
    """High-noise expert first; Wan 2.2 A14B hands over to ``transformer_2`` below the boundary.
    A one-transformer model with a ``boundary`` uses ``guidance_low`` below it (guidance in an
    interval: the high-noise steps decide motion and layout, the low-noise ones colour and detail)."""
    if story.boundary is None or (model.transformer_2 is None and story.guidance_low == story.guidance):
        return [Expert(model.transformer, story.guidance)]
    boundary = story.boundary * 1000
    low = model.transformer_2 if model.transformer_2 is not None else model.transformer
    return [Expert(model.transformer, story.guidance, boundary), Expert(low, story.guidance_low)]


@dataclass
class DecodedClip:
    clip: Clip
    frames_all: torch.Tensor


class ClipDecoder:
    """Decodes clips, on a worker thread (and CUDA stream) when overlapping is on."""

    def __init__(self, model: Components, overlap: bool, color_match: str | None = None,
                 anchor=None, method: str | None = None):
        self.model = model
        self.color_match = color_match if color_match not in (None, "none") else None
        self.method = method or "mean_std"
        # the colours the next clip is matched to: the anchor image's (PIL or uint8 [H, W, 3]) to begin with
        self.target = (ColourTarget.of(torch.as_tensor(np.array(anchor)), self.method)
                       if self.color_match is not None and anchor is not None else None)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="cliploom-decode") if overlap else None
        self.overlapped = overlap
        self.stream = torch.cuda.Stream() if overlap and model.device.type == "cuda" else None

    def submit(self, latents: torch.Tensor, keep: tuple[int, int], info: tuple, memory,
               frames: torch.Tensor | None = None) -> Future:
        """Queue a clip: ``latents`` decoded (or ``frames``, the latents already decoded), colour
        matched, cut to ``keep``."""
        if self.pool is None:
            future: Future = Future()
            future.set_result(self._decode(latents, keep, info, memory, None, frames))
            return future
        ready = None
        if self.stream is not None:
            ready = torch.cuda.Event()
            ready.record()
        return self.pool.submit(self._decode, latents, keep, info, memory, ready, frames)

    def _decode(self, latents, keep, info, memory, ready, frames=None) -> DecodedClip:
        started = time.perf_counter()
        if frames is None and self.stream is not None:  # frames given: decoded already (a streamed clip)
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(ready)
                latents.record_stream(self.stream)
                frames = self.model.decode_latents(latents)
        elif frames is None:
            frames = self.model.decode_latents(latents)
        if self.color_match is not None:  # clips are decoded in order, so "previous" is the clip before
            frames = self.match(frames)
            if self.color_match == "previous":
                self.target = ColourTarget.of(frames[-max(1, len(frames) // 4):], self.method)
        index, prompt, seed, seconds_denoise, seconds_compile = info
        clip = Clip(
            index=index,
            prompt=prompt,
            seed=seed,
            frames=frames[keep[0] : keep[1]],
            latents=latents,
            keep=keep,
            seconds_denoise=seconds_denoise,
            seconds_decode=time.perf_counter() - started,
            peak_memory_mb=_peak_memory_mb(self.model.device),
            memory=memory,
            seconds_compile=seconds_compile,
        )
        return DecodedClip(clip, frames)

    def match(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames matched to the current target (``color_match`` on)."""
        return match_colour(frames, self.target, method=self.method)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class _Keyframes:
    """Each clip's keyframes as ``(pixel frame, pixels [1, 3, H, W], single-frame latent)``; every
    image is read, cover-cropped to the story's size and encoded once."""

    def __init__(self, model, story):
        self.model, self.story, self.cache = model, story, {}

    def of(self, i: int) -> list:
        from .story import keyframe_pixel

        out = []
        for k in self.story.clips[i].keyframes:
            if k.image not in self.cache:
                image = load_image(k.image, self.story.width, self.story.height, what=f"clip {i} keyframe image")
                pixels = frames_to_tensor([image]).to(self.model.device)
                self.cache[k.image] = (pixels[:, :, 0], self.model.encode_video(pixels))
            pixels, latent = self.cache[k.image]
            out.append((keyframe_pixel(self.story, k), pixels, latent))
        return out

    def end_image(self, i: int):
        """Clip ``i``'s end frame (PIL, at the story's size) for first-last-frame models' image features."""
        for k in self.story.clips[i].keyframes:
            if k.frame == -1 or k.frame == self.story.frames - 1:
                return load_image(k.image, self.story.width, self.story.height, what=f"clip {i} keyframe image")
        return None


def _to_pil(frame: torch.Tensor):
    """``[3, H, W]`` in [-1, 1] -> PIL image (for CLIP features)."""
    arr = ((frame.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated during the clip, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
