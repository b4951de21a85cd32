"""Story files: what to generate, validated up front. Nothing else in cliploom reads YAML.

A story names a reference image, the clips (a prompt each), the motion mode and the sampling
settings. Anything it leaves out comes from the model's own defaults (``cliploom.json`` in the
model folder). See ``docs/story.md`` for the schema.

    reference: ref.png            # relative to the story file
    model: builtin                # or a model folder
    mode: pro                     # pro (latent motion) | film | shot | svi2 | tom | chain
    motion_latents: 1             # K, pro mode
    frames: 33                    # per clip, 4k + 1
    steps: 8                      # or timesteps: [1000, 750, 500, 250]
    guidance: 4.0
    seed: 7
    loras:
      - {path: svi.safetensors, weight: 1.0, expert: both}
    clips:
      - a red circle moves left on a blue background
      - {prompt: a red circle bounces on a blue background, repeat: 2}
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .colour import METHODS as COLOUR_METHODS
from .errors import CliploomError

# Motion modes. "pro" is latent motion (SVI 2.0 Pro); the rest are pixel motion presets with
# N motion frames and a ref_pad padding rule (svi.md section 1b).
PIXEL_PRESETS: dict[str, tuple[int, int]] = {
    "shot": (1, -1),  # SVI 1.0 Shot: one prompt, reference as padding
    "film": (5, 0),  # SVI 1.0 Film: a prompt per clip, zero padding
    "svi2": (5, -1),  # SVI 2.0 on Wan 2.1
    "tom": (1, 0),  # SVI 1.0 Tom
    "chain": (1, 0),  # plain I2V chaining: the last frame as the next clip's image (no SVI)
}
MODES = ("pro", *PIXEL_PRESETS)
EXPERTS = ("both", "high", "low")


@dataclass
class LoraSpec:
    path: Path
    weight: float = 1.0
    expert: str = "both"  # both | high | low (Wan 2.2 A14B experts)
    name: str | None = None  # how clips refer to it in per-clip `loras:`; default: the file's stem

    def __post_init__(self):
        self.name = self.name or Path(self.path).stem


@dataclass
class ClipSpec:
    prompt: str
    seed: int | None = None  # explicit seed; otherwise derived from the story seed and index
    lora_weights: dict[str, float] | None = None  # per-clip LoRA weights by name (unfused stacks)
    keyframes: tuple["Keyframe", ...] = ()  # images the clip must pass through (end_frame: the last frame)


@dataclass(frozen=True)
class Keyframe:
    """An image the clip shows at pixel frame ``frame`` of its generated frames (-1: the last)."""

    frame: int
    image: Path


@dataclass
class Story:
    """A validated story. Optional fields are filled from the model's defaults by :meth:`resolve`."""

    clips: list[ClipSpec]
    reference: Path | None = None
    model: str | None = None
    mode: str = "pro"
    motion_latents: int = 1
    motion_frames: int | None = None
    ref_pad: int | None = None
    width: int | None = None
    height: int | None = None
    fps: int | None = None
    frames: int | None = None
    steps: int | None = None
    timesteps: list[float] | None = None
    guidance: float | None = None
    guidance_low: float | None = None
    shift: float | None = None
    boundary: float | None = None
    seed: int = 0
    negative_prompt: str | None = None
    style: str = ""
    loras: list[LoraSpec] = field(default_factory=list)
    fuse_loras: bool = True  # fused: fastest; unfused: per-clip LoRA weights possible
    offload: str | None = None  # memory: none | model | group | sequential
    vae_tiling: bool = False
    release_text_encoder: bool = False  # free the text encoder once the prompts are encoded
    # apply the model's own SVI LoRA (cliploom.json `svi_lora`) or, on another route, its route LoRA
    # (`route_loras`) when it has one; a story LoRA trained for the route replaces it either way
    svi_lora: bool = True
    color_match: str | None = None  # none | anchor | previous: each clip's colour statistics (cliploom.colour)
    color_match_method: str | None = None  # mean_std | histogram | histogram_lab: how color_match matches (cliploom.colour)
    seam_blend: int | None = None  # pro mode: a clip's last N frames fade into the next clip's re-creation of them
    route: str = "svi"  # how the past enters a clip: svi | df | causal (cliploom.routes)
    route_options: dict = field(default_factory=dict)  # the route's knobs (cliploom.routes.ROUTES)
    motion_amplitude: float | None = None  # > 1: y's frames to generate pushed from the last known one (conditioning.amplify_motion)
    keyframe_guidance: float | None = None  # > 1: clips with keyframes guided away from themselves without them (sampling.contrast)
    memory_guidance: float | None = None  # > 1: clips with a motion memory guided away from themselves without it (sampling.contrast)
    # pro: reference (SVI) | last_frame (re-anchoring: each clip anchored on the previous clip's last
    # frame); default: the model's `anchor`, else reference
    anchor: str | None = None
    # pro: latents (SVI: the previous clip's last K denoised latents) | frames (those frames decoded, colour
    # matched and encoded again, as the trainer's `motion_source: previous_clip` encodes them); default:
    # the model's `memory_from`, else latents
    memory_from: str | None = None
    # pro: clip 0 conditioned as SVI's (anchor latent, zero latents; on route df: the anchor as context)
    # | i2v: as the model's own image-to-video, without the SVI LoRA (route df: without the df LoRA)
    # (default: the model's `first_clip` on routes svi, df and helios (not a Helios folder's own), else pro)
    first_clip: str | None = None
    sampler: str | None = None  # euler (the flow ODE) | renoise (x0 + fresh noise per step: DMD students); default: the model's
    attention: str = "auto"  # attention backend (models.acceleration): auto, sdpa, flash, flash3, sage, ...
    compile: bool = False  # torch.compile the transformer blocks (regional; once per engine)
    fp8_matmul: bool = False  # torchao fp8 matmuls (CUDA sm 8.9+)
    weights: str | None = None  # how the transformer weights are stored: bf16 | fp16 | fp32 | fp8 (set at load)
    source: Path | None = None  # the YAML file, for messages

    # -- derived ---------------------------------------------------------------------------------
    @property
    def latent_motion(self) -> bool:
        return self.mode == "pro"

    def route_option(self, key: str):
        """A route option's value: the story's, else the route's default."""
        from .routes import ROUTES

        return self.route_options.get(key, ROUTES[self.route][key].default)

    def prompt(self, i: int) -> str:
        p = self.clips[i].prompt
        return f"{self.style.strip()} {p}".strip() if self.style else p

    def clip_seed(self, i: int) -> int:
        """Seed of clip ``i``: explicit, or derived deterministically from (story seed, index)."""
        explicit = self.clips[i].seed
        if explicit is not None:
            return explicit
        return int(np.random.SeedSequence([self.seed, i]).generate_state(1, dtype=np.uint32)[0])

    def frames_kept(self, i: int) -> tuple[int, int]:
        """``(start, stop)`` of the frames of clip ``i`` that go into the video.

        Latent mode: clip i > 0 drops its first ``1 + 4K`` frames (the anchor and the frames
        that re-create the previous clip's tail). Pixel mode: every clip but the last drops its
        last ``N`` frames, which the next clip regenerates.
        """
        F, n = self.frames, len(self.clips)
        if self.latent_motion:
            return (0 if i == 0 else 1 + 4 * self.motion_latents, F)
        return (0, F if i == n - 1 else F - self.motion_frames)

    def total_frames(self) -> int:
        return sum(b - a for a, b in (self.frames_kept(i) for i in range(len(self.clips))))

    # -- resolution against a model -----------------------------------------------------------
    def resolve(self, settings, size_multiple: int = 16, temporal: int = 4) -> "Story":
        """Fill unset fields from the model's settings and check what needs the model to check."""
        from .routes import SAMPLING

        s = dataclasses.replace(self)
        route = SAMPLING.get(s.route, {})  # what the route's weights are made for (self-forcing: few steps)
        # a step list (the story's, or a model's own: a Self-Forcing DiT) wins over the route's step count
        has_list = s.timesteps is not None or getattr(settings, "timesteps", None) is not None
        for name, value in route.items():
            if getattr(s, name) is None and not (name == "steps" and has_list):
                setattr(s, name, value)
        for name in ("width", "height", "fps", "frames", "shift", "guidance", "negative_prompt", "color_match",
                     "color_match_method", "seam_blend", "motion_amplitude", "keyframe_guidance", "memory_guidance", "sampler"):
            if getattr(s, name) is None:
                setattr(s, name, getattr(settings, name))
        # The model's first_clip and anchor apply where there is SVI's pro conditioning to change (first_clip:
        # diffusion forcing's and Helios' clip 0 too, measured in docs/routes.md; not a Helios folder's own
        # route, whose transformer is the only one it has), and not to keyed stories (their keyframe LoRA was
        # measured with SVI's first clip and the reference anchor)
        model_options = (getattr(settings, "route_options", None) or {}).get(s.route)
        if model_options:  # the model's defaults for its route weights; the story's own options win
            s.route_options = {**model_options, **s.route_options}
        unkeyed_pro = s.latent_motion and not any(c.keyframes for c in s.clips)
        model_choice = unkeyed_pro and s.route == "svi"
        if s.first_clip is None:
            own_clip0 = s.route in ("svi", "df") or (s.route == "helios" and "helios" not in settings.native_routes)
            s.first_clip = settings.first_clip if unkeyed_pro and own_clip0 else "pro"
        if s.anchor is None:
            s.anchor = getattr(settings, "anchor", "reference") if model_choice else "reference"
        if s.memory_from is None:
            s.memory_from = getattr(settings, "memory_from", "latents") if model_choice else "latents"
        if self.seam_blend is None and not s.latent_motion:
            s.seam_blend = 0  # the model's default is for pro mode; pixel modes have nothing to blend
        if s.steps is None and s.timesteps is None:
            s.steps, s.timesteps = settings.steps, settings.timesteps
        if s.guidance_low is None:
            s.guidance_low = settings.guidance_low if settings.guidance_low is not None else s.guidance
        if s.boundary is None:
            s.boundary = settings.boundary_ratio if settings.boundary_ratio is not None else getattr(
                settings, "guidance_boundary", None)
        check_numbers(s, size_multiple, temporal)
        return s


def keyframe_pixel(story: "Story", k: Keyframe) -> int:
    """A keyframe's pixel frame in its clip (``-1``, the end frame: the clip's last)."""
    return story.frames - 1 if k.frame == -1 else k.frame


def check_keyframe_images(s: "Story") -> None:
    """Every keyframe image readable and of the video's shape (a resolved story; before anything
    runs): an image of another aspect ratio would be cropped, moving what it shows."""
    from .video_io import load_image

    for i, clip in enumerate(s.clips):
        for k in clip.keyframes:
            what = f"clip {i} keyframe image"
            w, h = load_image(k.image, what=what).size  # its one-line errors for a missing or broken file
            if abs(w / h - s.width / s.height) > 0.02 * s.width / s.height:
                _fail(str(s.source or "story"), f"{what} {k.image} is {w}x{h}, not the shape of the {s.width}x{s.height} "
                      "video: cropping it would move what it shows", f"crop or pad it to {s.width}:{s.height}")
            if w < s.width // 2 or h < s.height // 2:
                _fail(str(s.source or "story"), f"{what} {k.image} is {w}x{h}, less than half the video's {s.width}x"
                      f"{s.height}: positions in it are too coarse to aim at", f"use an image of {s.width}x{s.height}")


def _check_keyframe(s: "Story", where: str, i: int, k: Keyframe, temporal: int = 4) -> None:
    n = keyframe_pixel(s, k)
    name = f"clip {i} keyframe at frame {k.frame}" if k.frame != -1 else f"clip {i} end_frame"
    if not 1 <= n <= s.frames - 1:
        _fail(where, f"{name} is outside the clip's frames 1..{s.frames - 1} (frame 0 is the clip's start)",
              f"use a frame in 1..{s.frames - 1}, or end_frame for the last")
    if s.latent_motion:
        if n % temporal:
            _fail(where, f"{name}: pixel frame {n} is inside a latent frame (pro mode keys whole latent frames)",
                  f"use a multiple of {temporal} (frame {temporal * max(1, round(n / temporal))}), or end_frame")
        if i > 0 and (n - 1) // temporal + 1 <= s.motion_latents:
            _fail(where, f"{name} falls in the motion prefix (the first {temporal * s.motion_latents} frames after the "
                  "start re-create the previous clip)", f"use a frame after {temporal * s.motion_latents}")
    elif i > 0 and n < s.motion_frames:
        _fail(where, f"{name} falls in the motion prefix (the first {s.motion_frames} frames come from the previous "
              "clip)", f"use a frame from {s.motion_frames} on")


def _fail(where: str, problem: str, fix: str):
    raise CliploomError(f"{where}: {problem}", fix)


# Sanity bounds: far beyond any real use, small enough that nothing they allow exhausts a machine
# before the memory estimate (models/memory.py) has looked at the whole story.
MAX_FRAMES = 1025  # pixel frames per clip (Wan models are trained on 81 or 121)
MAX_SIZE = 4096  # width and height
MAX_STEPS = 1000
MAX_FPS = 240
MAX_GUIDANCE = 100.0
MAX_SHIFT = 100.0
MAX_CLIPS = 10_000
MAX_PROMPT_CHARS = 10_000
MAX_LORA_WEIGHT = 100.0
SEED_LIMIT = 2**63


def check_numbers(s: Story, size_multiple: int = 16, temporal: int = 4) -> None:
    """Checks that need the final numbers (after model defaults are filled in)."""
    where = str(s.source or "story")
    if s.sampler in ("renoise", "unipc") and s.route == "df" and s.route_options.get("ar_step"):  # the model's default too
        _fail(where, f"sampler {s.sampler} takes one noise level per step; df's ar_step gives each frame its own",
              "use sampler: euler with ar_step, or drop ar_step")
    if s.frames is not None:
        if not 1 + temporal <= s.frames <= MAX_FRAMES or (s.frames - 1) % temporal:
            if s.frames > MAX_FRAMES:
                _fail(where, f"frames {s.frames} is more than {MAX_FRAMES} per clip", "use e.g. 81 and more clips")
            k = max(1, round((s.frames - 1) / temporal))
            _fail(where, f"frames {s.frames} is not of the form 4k+1", f"use e.g. {temporal * k + 1} or 81")
        latent = (s.frames - 1) // temporal + 1
        if s.latent_motion and not 1 <= s.motion_latents <= min(3, latent - 2):
            _fail(
                where,
                f"motion_latents {s.motion_latents} does not fit {s.frames}-frame clips ({latent} latent frames)",
                f"use 1..{min(3, latent - 2)}" if latent > 2 else "use longer clips",
            )
        if not s.latent_motion and not 1 <= s.motion_frames <= s.frames - 1:
            _fail(where, f"motion_frames {s.motion_frames} does not fit {s.frames}-frame clips", f"use 1..{s.frames - 1}")
        top = 4 * s.motion_latents if s.latent_motion else 0
        if s.seam_blend is not None and not 0 <= s.seam_blend <= top:
            _fail(where, f"seam_blend {s.seam_blend} does not fit {s.mode} mode (0..{top}: pro mode re-creates the "
                  f"previous clip's last 4K frames, pixel modes none)", f"use 0..{top}")
        for i, clip in enumerate(s.clips):
            for k in clip.keyframes:
                _check_keyframe(s, where, i, k)
        if not s.latent_motion and s.ref_pad is not None and s.ref_pad > s.frames:
            _fail(where, f"ref_pad {s.ref_pad} is more than the clip's {s.frames} frames", "use -1, 0 or 1..frames")
    for name in ("width", "height"):
        v = getattr(s, name)
        if v is not None and (v <= 0 or v % size_multiple or v > MAX_SIZE):
            if v > MAX_SIZE:
                _fail(where, f"{name} {v} is more than {MAX_SIZE}", "use e.g. 832 x 480")
            _fail(where, f"{name} {v} is not a positive multiple of {size_multiple}", f"use e.g. {max(1, round(v / size_multiple)) * size_multiple}")
    if s.motion_amplitude is not None and not MOTION_AMPLITUDE[0] <= s.motion_amplitude <= MOTION_AMPLITUDE[1]:
        _fail(where, f"motion_amplitude {s.motion_amplitude} is outside {MOTION_AMPLITUDE[0]}..{MOTION_AMPLITUDE[1]}",
              "use 1 (off) or e.g. 1.15 against slow motion")
    if s.keyframe_guidance is not None and not KEYFRAME_GUIDANCE[0] <= s.keyframe_guidance <= KEYFRAME_GUIDANCE[1]:
        _fail(where, f"keyframe_guidance {s.keyframe_guidance} is outside {KEYFRAME_GUIDANCE[0]}..{KEYFRAME_GUIDANCE[1]}",
              "use 1 (off) or e.g. 2 to pull clips harder towards their keyframes")
    if s.memory_guidance is not None and not MEMORY_GUIDANCE[0] <= s.memory_guidance <= MEMORY_GUIDANCE[1]:
        _fail(where, f"memory_guidance {s.memory_guidance} is outside {MEMORY_GUIDANCE[0]}..{MEMORY_GUIDANCE[1]}",
              "use 1 (off) or e.g. 1.5 to pull clips harder away from a restart at the anchor")
    if s.fps is not None and not 0 < s.fps <= MAX_FPS:
        _fail(where, f"fps {s.fps} must be between 1 and {MAX_FPS}", "use e.g. 16")
    if s.steps is not None and not 1 <= s.steps <= MAX_STEPS:
        _fail(where, f"steps {s.steps} must be between 1 and {MAX_STEPS}", "use e.g. 4 with a distill LoRA or 50 without")
    if s.timesteps is not None:
        ts = list(s.timesteps)
        if not ts or len(ts) > MAX_STEPS or any(not 0 < t <= 1000 for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
            _fail(where, f"timesteps {_short(ts)} must decrease strictly within (0, 1000]", "use e.g. [1000, 750, 500, 250]")
    for name in ("guidance", "guidance_low"):
        v = getattr(s, name)
        if v is not None and not 1 <= v <= MAX_GUIDANCE:
            _fail(where, f"{name} {v} must be between 1 and {MAX_GUIDANCE:g}", "use 1 for no guidance, or e.g. 5")
    if s.shift is not None and not 0 < s.shift <= MAX_SHIFT:
        _fail(where, f"shift {s.shift} must be in (0, {MAX_SHIFT:g}]", "use e.g. 5")
    if s.boundary is not None and not 0 < s.boundary < 1:
        _fail(where, f"boundary {s.boundary} must be between 0 and 1", "use e.g. 0.875 (Wan 2.2 I2V)")
    if not 0 <= s.seed < SEED_LIMIT:
        _fail(where, f"seed {s.seed} must be in 0..2**63-1", "use e.g. seed: 7")
    if len(s.clips) > MAX_CLIPS:
        _fail(where, f"{len(s.clips)} clips is more than {MAX_CLIPS}", "split the story into several videos")
    for i, clip in enumerate(s.clips):
        if clip.seed is not None and not 0 <= clip.seed < SEED_LIMIT:
            _fail(where, f"clip {i + 1} seed {clip.seed} must be in 0..2**63-1", "use e.g. seed: 7")
    for name, text in (("negative_prompt", s.negative_prompt), ("style", s.style)):
        if text is not None and len(text) > MAX_PROMPT_CHARS:
            _fail(where, f"{name} has {len(text)} characters, more than {MAX_PROMPT_CHARS}", "shorten it")
    for spec in s.loras:
        if not abs(spec.weight) <= MAX_LORA_WEIGHT:
            _fail(where, f"LoRA {spec.name} weight {spec.weight} is beyond +-{MAX_LORA_WEIGHT:g}", "use e.g. weight: 1.0")


# -- parsing ---------------------------------------------------------------------------------------

_SCALARS: dict[str, type] = {
    "model": str,
    "mode": str,
    "motion_latents": int,
    "motion_frames": int,
    "ref_pad": int,
    "width": int,
    "height": int,
    "fps": int,
    "frames": int,
    "steps": int,
    "guidance": float,
    "guidance_low": float,
    "shift": float,
    "boundary": float,
    "seed": int,
    "negative_prompt": str,
    "style": str,
    "offload": str,
    "vae_tiling": bool,
    "release_text_encoder": bool,
    "fuse_loras": bool,
    "svi_lora": bool,
    "color_match": str,
    "color_match_method": str,
    "seam_blend": int,
    "motion_amplitude": float,
    "keyframe_guidance": float,
    "memory_guidance": float,
    "anchor": str,
    "memory_from": str,
    "first_clip": str,
    "sampler": str,
    "route": str,
    "attention": str,
    "compile": bool,
    "fp8_matmul": bool,
    "weights": str,
}
OFFLOAD = ("none", "model", "group", "sequential")
ANCHORS = ("reference", "last_frame")  # story anchor: what each clip after the first is anchored on
MEMORY_FROM = ("latents", "frames")  # story memory_from: where pro mode's motion memory is taken from
FIRST_CLIPS = ("pro", "i2v")  # story first_clip: how pro mode conditions clip 0
FIRST_CLIP_ROUTES = ("svi", "df", "helios")  # the routes whose clip 0 first_clip: i2v makes the model's own image-to-video
SAMPLERS = ("euler", "unipc", "renoise")  # story sampler (cliploom.sampling)
MEMORY_GUIDANCE = (1.0, 4.0)  # story memory_guidance: 1 is off; past 4 the clip ignores its anchor
KEYFRAME_GUIDANCE = (1.0, 8.0)  # story keyframe_guidance: 1 is off; past 8 the clip is all keyframe pull
MOTION_AMPLITUDE = (0.5, 2.0)  # story motion_amplitude: beyond these the padding is no longer an image the model reads
WEIGHTS = ("bf16", "fp16", "fp32", "fp8")
ATTENTION_NAMES = ("sdpa", "flash", "flash3", "sage", "xformers", "flex", "cudnn", "efficient", "math")  # models.acceleration


INT_LIMIT = 2**63 - 1


def typed_value(where: str, key: str, value: Any, kind: type):
    """``value`` as ``kind`` (bool, str, int or float), or a one-line error naming ``key`` (stories,
    training configs). Numbers must be finite; whole numbers must fit in 64 bits."""
    if kind is bool:
        if not isinstance(value, bool):
            _fail(where, f"{key} must be true or false, got {value!r}", f"write {key}: true")
        return value
    if kind is str:
        if not isinstance(value, str):
            _fail(where, f"{key} must be text, got {_short(value)}", f"quote it: {key}: \"...\"")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(where, f"{key} must be a number, got {_short(value)}", f"write e.g. {key}: 1")
    if isinstance(value, float) and not math.isfinite(value):
        _fail(where, f"{key} must be a finite number, got {value}", f"write e.g. {key}: 1")
    if kind is int:
        if float(value) != int(value):
            _fail(where, f"{key} must be a whole number, got {value!r}", f"write e.g. {key}: {int(value)}")
        value = int(value)
        if abs(value) > INT_LIMIT:
            _fail(where, f"{key} {value} is out of range", "use a number of magnitude below 2**63")
    return kind(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _parse_clips(where: str, raw: Any) -> list[ClipSpec]:
    """Clips as the story file gives them (prompts, or mappings with prompt/repeat/seed/loras), or
    :class:`ClipSpec` objects from Python; every one checked the same way."""
    if isinstance(raw, (list, tuple)) and len(raw) > MAX_CLIPS:
        _fail(where, f"{len(raw)} clips is more than {MAX_CLIPS}", "split the story into several videos")
    if isinstance(raw, (str, dict)) or not isinstance(raw, (list, tuple)) or not raw:
        _fail(where, "no clips" if not raw else f"clips must be a list of prompts, got {type(raw).__name__}",
              "add `clips:` with at least one prompt, e.g. `clips: [\"a cat walks\"]`")
    clips: list[ClipSpec] = []
    for i, item in enumerate(raw):
        if isinstance(item, ClipSpec):
            item = {"prompt": item.prompt, "seed": item.seed, "loras": item.lora_weights,
                    "keyframes": [{"frame": k.frame, "image": k.image} for k in item.keyframes]}
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict):
            _fail(where, f"clip {i + 1} must be a prompt or a mapping, got {item!r}", "write `- prompt: ...`")
        unknown = set(item) - {"prompt", "repeat", "seed", "loras", "end_frame", "keyframes"}
        if unknown:
            _fail(where, f"clip {i + 1} has unknown keys {sorted(unknown)}",
                  "use prompt, repeat, seed, loras, end_frame, keyframes")
        prompt = item.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            _fail(where, f"clip {i + 1} has no prompt", "give every clip a non-empty `prompt:`")
        if len(prompt) > MAX_PROMPT_CHARS:
            _fail(where, f"clip {i + 1} prompt has {len(prompt)} characters, more than {MAX_PROMPT_CHARS}", "shorten it")
        repeat = typed_value(where, f"clip {i + 1} repeat", item.get("repeat", 1), int)
        if not 1 <= repeat <= MAX_CLIPS or len(clips) + repeat > MAX_CLIPS:
            if repeat < 1:
                _fail(where, f"clip {i + 1} repeat {repeat} must be at least 1", "use repeat: 1 or more")
            _fail(where, f"clip {i + 1} repeat {repeat} makes more than {MAX_CLIPS} clips", "split the story into several videos")
        seed = item.get("seed")
        if seed is not None:
            seed = typed_value(where, f"clip {i + 1} seed", seed, int)
        weights = item.get("loras")
        if weights is not None:
            if not isinstance(weights, dict):
                _fail(where, f"clip {i + 1} loras must map LoRA names to weights", "write `loras: {svi: 1.0}`")
            weights = {str(k): typed_value(where, f"clip {i + 1} lora {k}", v, float) for k, v in weights.items()}
        keys = _parse_keyframes(where, i, item)
        clips.extend(ClipSpec(prompt.strip(), seed, weights, keys) for _ in range(repeat))
    return clips


def _parse_keyframes(where: str, i: int, item: dict) -> tuple[Keyframe, ...]:
    """``end_frame: img.png`` and ``keyframes: [{frame: N, image: img.png}]`` of clip ``i``."""
    keys = []
    if item.get("end_frame") is not None:
        keys.append({"frame": -1, "image": item["end_frame"]})
    raw = item.get("keyframes") or []
    if not isinstance(raw, (list, tuple)):
        _fail(where, f"clip {i + 1} keyframes must be a list", "write `keyframes: [{frame: 40, image: mid.png}]`")
    for k in raw:
        if not isinstance(k, dict) or set(k) != {"frame", "image"}:
            _fail(where, f"clip {i + 1} keyframe {k!r} must have frame and image", "write `{frame: 40, image: mid.png}`")
        keys.append(k)
    out = []
    for k in keys:
        frame = typed_value(where, f"clip {i + 1} keyframe frame", k["frame"], int)
        if not isinstance(k["image"], (str, os.PathLike)):
            _fail(where, f"clip {i + 1} keyframe image must be a path, got {k['image']!r}", "write image: end.png")
        out.append(Keyframe(frame, Path(k["image"]).expanduser()))
    frames = [k.frame for k in out]
    if len(set(frames)) != len(frames):
        _fail(where, f"clip {i + 1} has two keyframes at one frame", "give each keyframe its own frame")
    return tuple(out)


def _parse_loras(where: str, raw: Any, base: Path) -> list[LoraSpec]:
    """LoRAs as the story file gives them (paths, or mappings with path/weight/expert/name), or
    :class:`LoraSpec` objects from Python; relative paths are relative to ``base``."""
    if raw is None:
        return []
    if not isinstance(raw, (list, tuple)):
        _fail(where, "loras must be a list", "write `loras: [{path: file.safetensors, weight: 1.0}]`")
    out = []
    for i, item in enumerate(raw):
        if isinstance(item, LoraSpec):
            item = {"path": item.path, "weight": item.weight, "expert": item.expert, "name": item.name}
        if isinstance(item, (str, os.PathLike)):
            item = {"path": item}
        if isinstance(item, dict) and isinstance(item.get("path"), os.PathLike):
            item = {**item, "path": os.fspath(item["path"])}
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            _fail(where, f"lora {i + 1} has no path", "write `- path: file.safetensors`")
        unknown = set(item) - {"path", "weight", "expert", "name"}
        if unknown:
            _fail(where, f"lora {i + 1} has unknown keys {sorted(unknown)}", "use path, weight, expert, name")
        expert = item.get("expert", "both")
        if expert not in EXPERTS:
            _fail(where, f"lora {i + 1} expert {expert!r} is unknown", f"use one of {', '.join(EXPERTS)}")
        weight = typed_value(where, f"lora {i + 1} weight", item.get("weight", 1.0), float)
        path = Path(item["path"]).expanduser()
        name = typed_value(where, f"lora {i + 1} name", item["name"], str) if item.get("name") is not None else None
        out.append(LoraSpec(path if path.is_absolute() else base / path, weight, expert, name))
    names = [spec.name for spec in out]
    if len(set(names)) != len(names):
        _fail(where, f"two LoRAs share a name in {names}", "give each a distinct `name:`")
    return out


_FIELDS = tuple(f.name for f in dataclasses.fields(Story) if f.name != "source")


def story_from_dict(data: Any, base: Path = Path("."), source: Path | None = None) -> Story:
    """Build and validate a story from parsed YAML (or any dict of the same shape); paths in it
    (reference, LoRAs) are relative to ``base``."""
    where = str(source or "story")
    if not isinstance(data, dict):
        _fail(where, "a story must be a mapping of settings", "see docs/story.md for an example")
    values = {key: value for key, value in data.items() if value is not None}
    values["loras"] = _parse_loras(where, data.get("loras"), base)
    if isinstance(values.get("clips"), list):  # keyframe images are relative to the story file, as the reference
        def rebase(p):
            return p if not isinstance(p, (str, os.PathLike)) or Path(p).expanduser().is_absolute() else base / p

        values["clips"] = [
            {**c, **({"end_frame": rebase(c["end_frame"])} if c.get("end_frame") is not None else {}),
             **({"keyframes": [{**k, "image": rebase(k.get("image"))} if isinstance(k, dict) else k for k in c["keyframes"]]}
                if isinstance(c.get("keyframes"), list) else {})} if isinstance(c, dict) else c
            for c in values["clips"]]
    if "reference" in values:
        ref = Path(typed_value(where, "reference", values["reference"], str)).expanduser()
        values["reference"] = ref if ref.is_absolute() else base / ref
    return make_story(source=source, **values)


def make_story(**values) -> Story:
    """Build a story from Python values, checked exactly as a story file is; apply the mode's preset.

    ``clips`` (or ``prompts``) is a list of prompts, of mappings as in the story file
    (``{"prompt": ..., "repeat": 2, "seed": 7, "loras": {"svi": 0.5}}``) or of :class:`ClipSpec`;
    ``loras`` a list of paths, mappings (``{"path": ..., "weight": 0.8}``) or :class:`LoraSpec`.
    The other keywords are the story keys of docs/story.md.
    """
    source = values.pop("source", None)
    where = str(source or "story")
    unknown = sorted(set(values) - set(_FIELDS) - {"prompts"})
    if unknown:
        _fail(where, f"unknown keys {unknown}", f"valid keys are {', '.join(sorted({*_FIELDS, 'prompts'}))}")
    if "prompts" in values:
        if "clips" in values:
            _fail(where, "both prompts and clips are given", "use one of them")
        values["clips"] = values.pop("prompts")
    values["clips"] = _parse_clips(where, values.get("clips"))
    values["loras"] = _parse_loras(where, values.get("loras"), Path("."))
    for key, kind in _SCALARS.items():
        if values.get(key) is not None:
            value = os.fspath(values[key]) if key == "model" and isinstance(values[key], os.PathLike) else values[key]
            values[key] = typed_value(where, key, value, kind)
    if values.get("timesteps") is not None:
        ts = values["timesteps"]
        if not isinstance(ts, (list, tuple)):
            _fail(where, "timesteps must be a list", "write timesteps: [1000, 750, 500, 250]")
        values["timesteps"] = [typed_value(where, "timesteps", t, float) for t in ts]
        if values.get("steps") is not None:
            _fail(where, "both steps and timesteps are given", "use one of them")
    if values.get("reference") is not None:
        if not isinstance(values["reference"], (str, os.PathLike)):
            _fail(where, f"reference must be a path, got {values['reference']!r}", "write reference: ref.png")
        values["reference"] = Path(values["reference"]).expanduser()
    story = Story(source=source, **values)
    if story.mode not in MODES:
        _fail(where, f"unknown mode {story.mode!r}", f"use one of {', '.join(MODES)}")
    if story.mode in PIXEL_PRESETS:
        n, pad = PIXEL_PRESETS[story.mode]
        story.motion_frames = n if story.motion_frames is None else story.motion_frames
        story.ref_pad = pad if story.ref_pad is None else story.ref_pad
    if story.ref_pad is not None and story.ref_pad < -1:
        _fail(where, f"ref_pad {story.ref_pad} is invalid", "use -1 (repeat reference), 0 (zeros) or k > 0")
    if story.attention != "auto" and story.attention not in ATTENTION_NAMES:
        _fail(where, f"unknown attention backend {story.attention!r}", f"use auto or one of {', '.join(ATTENTION_NAMES)}")
    if story.weights is not None and story.weights not in WEIGHTS:
        _fail(where, f"unknown weights {story.weights!r}", f"use one of {', '.join(WEIGHTS)}")
    if story.color_match is not None and story.color_match not in ("none", "anchor", "previous"):
        _fail(where, f"unknown color_match {story.color_match!r}", "use none, anchor or previous")
    if story.color_match_method is not None and story.color_match_method not in COLOUR_METHODS:
        _fail(where, f"unknown color_match_method {story.color_match_method!r}", f"use {' or '.join(COLOUR_METHODS)}")
    if story.anchor is not None and story.anchor not in ANCHORS:
        _fail(where, f"unknown anchor {story.anchor!r}", f"use {' or '.join(ANCHORS)}")
    if story.sampler is not None and story.sampler not in SAMPLERS:
        _fail(where, f"unknown sampler {story.sampler!r}", f"use {' or '.join(SAMPLERS)}")
    if story.first_clip is not None and story.first_clip not in FIRST_CLIPS:
        _fail(where, f"unknown first_clip {story.first_clip!r}", f"use {' or '.join(FIRST_CLIPS)}")
    if story.first_clip not in (None, "pro") and (not story.latent_motion or story.route not in FIRST_CLIP_ROUTES):
        _fail(where, f"first_clip: {story.first_clip} changes pro mode's first clip on the "
              f"{' and '.join(FIRST_CLIP_ROUTES)} routes (the other modes' first clip is already image-to-video; "
              "the causal routes start their cache from the anchor)",
              f"use mode: pro (and route: {' or '.join(FIRST_CLIP_ROUTES)}), or first_clip: pro")
    if story.anchor not in (None, "reference") and (not story.latent_motion or story.route != "svi"):
        _fail(where, f"anchor: {story.anchor} re-anchors pro mode's latent conditioning on the svi route",
              "use mode: pro (and route: svi), or anchor: reference")
    if story.memory_from is not None and story.memory_from not in MEMORY_FROM:
        _fail(where, f"unknown memory_from {story.memory_from!r}", f"use {' or '.join(MEMORY_FROM)}")
    if story.memory_from not in (None, "latents") and (not story.latent_motion or story.route != "svi"):
        _fail(where, f"memory_from: {story.memory_from} changes pro mode's motion latents on the svi route",
              "use mode: pro (and route: svi), or memory_from: latents")
    _check_route(where, story)
    if story.offload is not None and story.offload not in OFFLOAD:
        _fail(where, f"unknown offload {story.offload!r}", f"use one of {', '.join(OFFLOAD)}")
    names = {spec.name for spec in story.loras}
    for i, clip in enumerate(story.clips):
        if clip.lora_weights:
            unknown = sorted(set(clip.lora_weights) - names)
            if unknown:
                _fail(where, f"clip {i + 1} sets weights of unknown LoRAs {unknown}", f"use names among {sorted(names)}")
            if story.fuse_loras:
                _fail(where, f"clip {i + 1} changes LoRA weights but LoRAs are fused", "set fuse_loras: false")
    check_numbers(story)
    return story


def _check_route(where: str, story: Story) -> None:
    from .routes import option_error, route_error

    if (bad := route_error(story.route)) is not None:
        _fail(where, *bad)
    if not isinstance(story.route_options, dict):
        _fail(where, f"route_options must map option names to values, got {_short(story.route_options)}",
              "write route_options: {addnoise: 20}")
    for key, value in story.route_options.items():
        if (bad := option_error(story.route, str(key), value)) is not None:
            _fail(where, *bad)
    if story.route != "svi" and story.mode != "pro":
        _fail(where, f"route {story.route} runs on the pro timeline (latent context), not in {story.mode} mode",
              "use mode: pro")


def load_story(path: str | Path) -> Story:
    from .inputs import load_yaml, read_text

    path = Path(path)
    text = read_text(path, "story", "pass a story YAML file (see docs/story.md)")
    return story_from_dict(load_yaml(text, str(path)), base=path.parent, source=path)


def cycle_prompts(prompts: list[str], clips: int | None) -> list[ClipSpec]:
    """CLI form: with more clips than prompts, the prompts cycle."""
    if not prompts:
        raise CliploomError("no prompts", "pass at least one --prompt TEXT")
    n = len(prompts) if clips is None else clips
    if not 1 <= n <= MAX_CLIPS:
        raise CliploomError(f"--clips {n} must be between 1 and {MAX_CLIPS}", "pass --clips 1 or more")
    return [ClipSpec(prompts[i % len(prompts)]) for i in range(n)]
