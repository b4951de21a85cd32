"""The Helios route (``helios``): each clip's new latents made with the past given as multi-term
history (Helios' compressed memory), by the Helios transformer built from the model's DiT
(:mod:`cliploom.models.helios`).

Read :func:`weave` top-down. The stream is the ``pro`` timeline's latents: the anchor (given), then
each clip's new latent frames (clip 0: ``T - 1``, later clips: ``T - 1 - K``). A clip is denoised as
one chunk, its own prompt in cross-attention, with the past as extra tokens that have timestep 0
and skip cross-attention (:class:`History`): the anchor always (Helios' ``keep_first_frame``), the
``short`` latest latents at full resolution, the ``mid`` latents before them compressed 2x4x4, the
``long`` ones before those 4x8x8. Positions are fixed (Helios'): the anchor at 0, then the long,
mid and short slots, the chunk after them, whatever the clip's index; a slot with nothing to hold
yet (the first clips) is left out. Only ``short + mid + long`` past latents are kept, so memory is
flat in the number of clips. Each clip is decoded as ``pro`` decodes it (``[anchor, previous
clip's last K latents, new]``, the first ``1 + 4K`` frames dropped), so every route yields the same
``Clip`` stream over the same frames. With ``first_clip: i2v`` clip 0 is the DiT's own
image-to-video, as on the svi route, and the history starts from its latents (the built-in model's
default through its ``first_clip``; never a Helios folder's, which has no other transformer; docs/routes.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass

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
    i2v_condition,
    queue_pro_decode,
)
from ..models.components import Components, frames_to_tensor
from ..models.helios import helios_of
from ..models.memory import check_story_fits
from ..sampling import (
    NUM_TRAIN_TIMESTEPS,
    Expert,
    compute_dtype,
    guide,
    make_denoiser,
    pick_expert,
    pyramid_stage_steps,
    sample_pyramid,
    sampler,
    schedule,
)
from ..story import Story
from ..video_io import load_image


@dataclass(frozen=True)
class Sizes:
    """History sizes in latent frames, newest first (the route options)."""

    short: int
    mid: int
    long: int

    @property
    def total(self) -> int:
        return self.short + self.mid + self.long

    @classmethod
    def of(cls, story: Story) -> "Sizes":
        return cls(story.route_option("short"), story.route_option("mid"), story.route_option("long"))


@dataclass
class History:
    """The past of one chunk as the Helios transformer takes it: latents ``[B, C, n, h, w]`` (mid and
    long ``None`` while empty) and their RoPE frame indices, with the chunk's own."""

    short: torch.Tensor  # the anchor, then the latest latents
    mid: torch.Tensor | None
    long: torch.Tensor | None
    index_short: list[int]
    index_mid: list[int]
    index_long: list[int]
    first: int  # the chunk's first position

    def inputs(self, frames: int, dtype: torch.dtype) -> dict:
        """The transformer's history arguments for a chunk of ``frames`` latent frames."""
        b, device = self.short.shape[0], self.short.device

        def idx(values):
            return torch.tensor(values, device=device).unsqueeze(0).expand(b, -1)

        out = dict(indices_hidden_states=idx(range(self.first, self.first + frames)),
                   latents_history_short=self.short.to(dtype), indices_latents_history_short=idx(self.index_short))
        for name, latents, index in (("mid", self.mid, self.index_mid), ("long", self.long, self.index_long)):
            if latents is not None:
                out[f"latents_history_{name}"], out[f"indices_latents_history_{name}"] = latents.to(dtype), idx(index)
        return out

    def repeat(self, n: int) -> "History":
        def rep(t):
            return None if t is None else t.repeat(n, 1, 1, 1, 1)

        return History(rep(self.short), rep(self.mid), rep(self.long), self.index_short, self.index_mid,
                       self.index_long, self.first)


def make_history(anchor: torch.Tensor, past: torch.Tensor | None, sizes: Sizes) -> History:
    """The history of the next chunk: ``anchor`` ``[B, C, 1, h, w]`` and ``past`` (the latents made
    since it, oldest first, or ``None``) cut into short / mid / long, each group's frames in the
    last slots of its range (nearest the chunk); slots: anchor 0, long ``1..L``, mid, short, then
    the chunk."""
    p = 0 if past is None else past.shape[2]
    s = min(sizes.short, p)
    m = min(sizes.mid, p - s)
    lo = min(sizes.long, p - s - m)

    def take(start: int, n: int) -> torch.Tensor | None:
        return None if n == 0 else past[:, :, p - start - n : p - start]

    end_long, end_mid, end_short = 1 + sizes.long, 1 + sizes.long + sizes.mid, 1 + sizes.total
    recent = take(0, s)
    short = anchor if recent is None else torch.cat([anchor, recent], dim=2)
    return History(short, take(s, m), take(s + m, lo), [0, *range(end_short - s, end_short)],
                   list(range(end_mid - m, end_mid)), list(range(end_long - lo, end_long)), end_short)


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
    """Generate ``story`` on the Helios route, yielding each clip as soon as it is decoded."""
    # 1. Settle every number; refuse what this route cannot do.
    story = story.resolve(model.settings, model.size_multiple, model.scale_temporal)
    check_story_fits(model, story)
    _check(model, story, start)
    T, K = C.latent_frame_count(story.frames, model.scale_temporal), story.motion_latents
    h, w = story.height // model.scale_spatial, story.width // model.scale_spatial
    sizes = Sizes.of(story)
    cfg = max(story.guidance, story.guidance_low) > 1
    pyramid = pyramid_of(model, story)  # (scheduler, steps per stage), or None: one resolution

    # 2. Prompts, the anchor latent, the Helios transformer (built from the DiT on first use).
    prompts, text, negative = encode_prompts(model, story, cfg)
    image = load_image(story.reference, story.width, story.height)
    anchor = model.encode_video(frames_to_tensor([image]).to(model.device))  # [1, C, 1, h, w]
    sigmas = schedule(story.steps, story.shift, story.timesteps)
    helios = helios_of(model).transformer
    experts = [Expert(helios, e.guidance, e.min_timestep) for e in experts_for(model, story)]  # guidance in an interval

    decoder = ClipDecoder(model, False, story.color_match, image, story.color_match_method)
    blend = story.seam_blend
    queue: list[Future] = []
    clip_bar = tqdm(total=len(prompts), desc="clips", unit="clip", disable=not progress)
    past = memory = None
    try:
        for i, prompt in enumerate(prompts):
            started = time.perf_counter()
            if on_clip_start is not None:
                on_clip_start(i)
            # 3. This clip's history: the anchor and the kept past, cut into short / mid / long.
            history = make_history(anchor, past, sizes)
            seed = story.clip_seed(i)
            generator = torch.Generator("cpu").manual_seed(seed)  # then renoise's fresh noise
            first = anchor  # the latent the clip is decoded after
            if i == 0 and story.first_clip == "i2v":
                # 4a. first_clip: i2v -- clip 0 is the DiT's own image-to-video (the svi route's clip 0:
                #     the same condition, noise and sampler); its first latent, the reference frame as
                #     made, heads its decode, and its new latents start the history.
                cond = i2v_condition(model, story, image)
                noise = torch.randn((1, model.z_dim, T, h, w), generator=generator)
                step_done = (lambda k, n=len(sigmas) - 1: on_step(0, k + 1, n)) if on_step else None
                x = sampler(story.sampler, generator)(make_denoiser(experts_for(model, story), cond, text[prompt], negative),
                                                      noise.to(model.device), sigmas, cond.finish, step_done)
                first, latents = x[:, :, :1], x[:, :, 1:]
            else:
                # 4. Its new latent frames from its own seeded noise, one chunk, its own prompt.
                new = T - 1 if i == 0 else T - 1 - K
                noise = torch.randn((1, model.z_dim, new, h, w), generator=generator)
                zero_star = pyramid is not None and model.settings.cfg_zero_star
                denoise = denoiser(experts, history, text[prompt], negative, zero_star)
                zero = zero_init(experts, negative) if zero_star else None
                amplify = pyramid is not None and i == 0 and story.route_option("amplify_first")
                steps = len(sigmas) - 1 if pyramid is None else sum(pyramid[1]) * (2 if amplify else 1)
                step_done = (lambda k, i=i, n=steps: on_step(i, k + 1, n)) if on_step else None
                if pyramid is None:
                    latents = sampler(story.sampler, generator)(denoise, noise.to(model.device), sigmas, callback=step_done)
                else:  # Helios' stages: from a quarter of the resolution up (CFG-Zero*: the first steps' velocity zero)
                    latents = sample_pyramid(denoise, noise.to(model.device), pyramid[0], pyramid[1],
                                             tuple(helios.config.patch_size), generator, step_done, zero, amplify)
            # 5. Decode as pro does: [anchor, previous clip's last K latents, new].
            info = (i, prompt, seed, time.perf_counter() - started, 0.0)
            memory = queue_pro_decode(decoder, queue, story, i, first, memory, latents, info)
            # 6. The past grows by them, cut to the history's size (memory stays flat).
            past = (latents if past is None else torch.cat([past, latents], dim=2))[:, :, -max(sizes.total, 1):]
            for clip in hand_over(queue, int(blend > 0), blend, 1 + 4 * K):
                yield clip
                clip_bar.update()
        for clip in hand_over(queue, 0, blend, 1 + 4 * K):
            yield clip
            clip_bar.update()
    finally:
        clip_bar.close()
        decoder.close()


def denoiser(experts: list[Expert], history: History, text: torch.Tensor, negative: torch.Tensor | None,
             zero_star: bool = False):
    """``v = denoise(x, sigma)`` for one chunk: the Helios transformer with ``history``, guided (the
    conditional and unconditional passes as one batch of two, the history in both; with ``zero_star``
    CFG-Zero*'s rescaled guidance, as HeliosPyramidPipeline does for ``is_cfg_zero_star`` folders)."""
    guided = history.repeat(2)
    if zero_star:
        from diffusers.pipelines.helios.pipeline_helios_pyramid import optimized_scale

    def forward(tr, x: torch.Tensor, t: float, past: History, emb: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(tr)
        return tr(hidden_states=x.to(dtype), timestep=torch.full((x.shape[0],), t, device=x.device),
                  encoder_hidden_states=emb.to(dtype), return_dict=False, **past.inputs(x.shape[2], dtype))[0].float()

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        t = sigma * NUM_TRAIN_TIMESTEPS
        expert = pick_expert(experts, t)
        if expert.guidance == 1.0 or negative is None:
            return forward(expert.model, x, t, history, text)
        cond, uncond = forward(expert.model, torch.cat([x, x]), t, guided, torch.cat([text, negative])).chunk(2)
        if zero_star:  # the unconditional velocity scaled by its projection onto the conditional one
            scale = optimized_scale(cond.flatten(1), uncond.flatten(1)).view(-1, *[1] * (cond.ndim - 1))
            return uncond * scale + expert.guidance * (cond - uncond * scale)
        return guide(cond, uncond, expert.guidance)

    return denoise


def pyramid_of(model: Components, story: Story):
    """``(scheduler, steps per stage)`` for Helios' pyramid sampling, or ``None`` for cliploom's own
    samplers at one resolution. A Helios folder always samples with its scheduler
    (``HeliosScheduler`` with the story's solver, or ``HeliosDMDScheduler`` for a distilled folder) on
    its own stages (3 for the public checkpoints) unless the route option ``stages`` sets them; a
    model without one (the built-in DiT) does so only when ``stages`` is 2 or 3, on a
    ``HeliosScheduler`` whose stage windows are cut from the story's shifted timesteps."""
    from diffusers import HeliosDMDScheduler, HeliosScheduler

    own = model.settings.helios_scheduler
    asked = story.route_option("stages")
    if story.route_option("amplify_first") and (own or {}).get("_class_name") != "HeliosDMDScheduler":
        raise CliploomError("route option amplify_first doubles a distilled Helios folder's DMD steps; this model "
                            "has none (no HeliosDMDScheduler)", "drop amplify_first (or load a Helios-Distilled folder)")
    if own is None and asked in (0, 1):
        return None
    if own is not None:
        cls = HeliosDMDScheduler if own.get("_class_name") == "HeliosDMDScheduler" else HeliosScheduler
        config = {k: v for k, v in own.items() if not k.startswith("_")}
        if cls is HeliosScheduler:
            config["scheduler_type"] = story.sampler or config.get("scheduler_type", "unipc")
        scheduler = cls.from_config(config)
        stages = asked or int(scheduler.config.stages)
        if stages != scheduler.config.stages:  # the windows re-cut evenly for the stages asked
            scheduler = cls.from_config({**config, "stages": stages, "stage_range": [k / stages for k in range(stages + 1)]})
    else:
        stages = asked
        scheduler = HeliosScheduler(stages=stages, stage_range=[k / stages for k in range(stages + 1)],
                                    shift=story.shift, scheduler_type=story.sampler or "euler")
    where = f"route helios with {stages} pyramid stage{'s' if stages > 1 else ''} (Helios' scheduler)"
    if story.timesteps is not None:
        raise CliploomError(f"{where} takes its timesteps from the stages' windows, not a timesteps list",
                            "drop timesteps (steps are spread over the stages)")
    if story.sampler == "renoise":
        raise CliploomError(f"{where} samples with Euler, UniPC or a distilled folder's DMD steps, not renoise",
                            "use sampler: euler or unipc")
    if story.steps < stages:
        raise CliploomError(f"{where} needs at least {stages} steps, got {story.steps}", f"use steps: {3 * stages}")
    patch = model.patch[1] * 2 ** (stages - 1)
    h, w = story.height // model.scale_spatial, story.width // model.scale_spatial
    if h % patch or w % patch:
        raise CliploomError(f"{where}: latents of {h}x{w} do not halve {stages - 1} times into whole patches",
                            f"use a size whose latents divide by {patch} ({patch * model.scale_spatial} px), "
                            "or fewer stages")
    return scheduler, pyramid_stage_steps(story.steps, stages)


def zero_init(experts: list[Expert], negative: torch.Tensor | None, steps: int = 1):
    """CFG-Zero*'s zero-init as HeliosPyramidPipeline applies it (``use_zero_init``, ``zero_steps``
    1): a zero velocity on the first stage's steps ``0..steps``, where that step is guided."""

    def zero(stage: int, step: int, t: float) -> bool:
        return stage == 0 and step <= steps and negative is not None and pick_expert(experts, t).guidance != 1.0

    return zero


def _check(model: Components, story: Story, start: Start | None) -> None:
    fix = "or use route: svi"
    if start is not None and start.index > 0:
        raise CliploomError("route helios cannot resume or extend a run: its history is not saved with the clips",
                            "generate the story from clip 0 (or use route: svi)")
    if model.transformer_2 is not None:
        raise CliploomError("route helios runs on one transformer; this model has two experts",
                            "use a single-transformer model (Wan 2.1, the built-in model)")
    if model.settings.expand_timesteps and "helios" not in model.settings.native_routes:
        raise CliploomError("route helios needs a Wan 2.1-style DiT; TI2V models are not supported yet",
                            f"use a Wan 2.1 / built-in model, {fix}")
    if model.has_image_encoder:
        raise CliploomError("route helios: this model reads CLIP image features, which the Helios transformer has "
                            "no input for", f"use a model without an image encoder (the built-in model), {fix}")
    if any(c.keyframes for c in story.clips):
        raise CliploomError("route helios does not take keyframes in this version", f"drop end_frame/keyframes, {fix}")
    z = model.z_dim
    if story.first_clip == "i2v" and ("helios" in model.settings.native_routes
                                      or model.transformer.config.in_channels != 2 * z + 4):
        raise CliploomError("first_clip: i2v (the story's, or the model's default) on route helios makes clip 0 with the DiT's own image-to-video, and this "
                            f"model's DiT has no image channels (in_channels {model.transformer.config.in_channels}, "
                            f"not {2 * z + 4})", "use first_clip: pro on this model")
    if story.motion_amplitude not in (None, 1):
        raise CliploomError("route helios has no padding frames for motion_amplitude to act on",
                            "leave motion_amplitude at 1 on this route")
    if story.memory_guidance not in (None, 1):
        raise CliploomError("route helios has no motion memory in y for memory_guidance to contrast",
                            "leave memory_guidance at 1 on this route")
    if any(c.lora_weights for c in story.clips):
        raise CliploomError("route helios keeps one LoRA stack for the whole story",
                            "drop the clips' LoRA weights on this route")
    if story.offload not in (None, "none") or story.compile or story.fp8_matmul \
            or getattr(model, "_cliploom_parallel", None) is not None:
        raise CliploomError("route helios runs its own transformer unoffloaded, uncompiled, on one device",
                            "drop offload, compile, fp8_matmul and parallel ranks on this route")
    if getattr(model.transformer, "_cliploom_weights", None) in ("fp8", "gguf"):
        raise CliploomError(f"route helios needs the DiT in bf16/fp32, not {model.transformer._cliploom_weights}",
                            "load the model with weights: bf16")
