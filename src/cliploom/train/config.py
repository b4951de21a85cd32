"""The SVI LoRA trainer's settings: one dataclass, every knob, the official values as defaults.

A config file is YAML with any subset of the fields of :class:`TrainConfig`; whatever it leaves
out keeps the default below. Defaults are the official SVI training values (``train_svi.py`` and
its launch scripts in the public SVI release, see ``../shared/reference/svi.md`` section 4) where
such a value exists. Relative paths are relative to the directory the trainer is started from.

    model: builtin                 # or a diffusers-layout Wan I2V folder
    out_dir: runs/svi
    steps: 2000
    data: shapesworld              # or `videos` with `videos: path/to/folder`
    p_clean: 0.5

Bad values are reported as one :class:`~cliploom.errors.CliploomError` line naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CliploomError
from ..story import MAX_FRAMES, MAX_SIZE, typed_value

# LoRA target names as SVI writes them (original Wan module names) -> diffusers module names.
WAN_TARGETS = {
    "q": "to_q",
    "k": "to_k",
    "v": "to_v",
    "o": "to_out.0",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "k_img": "add_k_proj",
    "v_img": "add_v_proj",
}
MODES = ("latent", "pixel")


@dataclass
class TrainConfig:
    # -- what to train, where to write -------------------------------------------------------------
    model: str = "builtin"  # diffusers-layout Wan I2V folder, or "builtin"
    out_dir: str = "runs/svi"
    expert: str | None = None  # two-expert models (Wan 2.2 A14B): "high" or "low"; they are trained apart

    # -- data ----------------------------------------------------------------------------------------
    data: str = "shapesworld"  # "shapesworld" (generated on the fly) or "videos" (a folder of video files)
    videos: str | None = None  # folder of .mp4/.mov/.mkv/.webm files, each with an optional same-name .txt caption
    default_caption: str = ""  # caption of a video without a .txt file
    frame_stride: int = 1  # take every n-th frame of a video file
    frames: int | None = None  # pixel frames per training clip (4k + 1); default: the model's clip length
    width: int | None = None  # default: the model's width
    height: int | None = None  # default: the model's height
    segments: int = 3  # ShapesWorld: motion segments per generated sequence (the prompt changes between them)
    segment_frames: int | None = None  # ShapesWorld: frames per segment; default: `frames`
    boundary_prob: float = 0.5  # ShapesWorld: chance a clip starts so that its motion memory ends at a prompt change

    # -- conditioning (the engine's own functions build it; see docs/training.md) ---------------------
    latent_mode_prob: float = 1.0  # chance a sample is conditioned in latent mode (SVI 2.0 Pro); else pixel mode
    motion_latents: list[int] = field(default_factory=lambda: [1])  # latent mode: K, drawn from this list
    motion_frames: list[int] = field(default_factory=lambda: [5])  # pixel mode: N, drawn from this list
    ref_pad: list[int] = field(default_factory=lambda: [-1])  # pixel mode: padding rule, drawn from this list
    no_motion_prob: float = 0.1  # chance of a first-clip sample: no motion memory (official p_motion_threshold 0.9)
    # Chance that a sample with motion memory takes its anchor / reference image from anywhere in
    # the clip's source (the whole ShapesWorld sequence or video file) instead of from the clip:
    # at inference the anchor is the story's first frame, however far the subject has moved since.
    anchor_far_prob: float = 0.0
    # Chance that a sample carries its clip's true last frame as a keyframe (end-frame control, as
    # `end_frame:` in a story): a LoRA trained with it learns to end clips where users say.
    end_frame_prob: float = 0.0
    # Latent mode: where the motion latents come from. "previous_clip": the last K latents of the
    # F-frame clip that ends where the motion ends, encoded as a whole (what inference hands on:
    # the previous clip's last latents, deep in a causal VAE's context); "clip": the clip's own
    # latents 1..K (encoded right after its first frame; a causal VAE makes them differ).
    motion_source: str = "clip"
    # The route the LoRA is for (cliploom.routes): "svi" (motion latents in y) or "df" (diffusion
    # forcing: the anchor and motion latents as context frames of x with their own timesteps).
    route: str = "svi"
    # causal (stage 1): ShapesWorld streams of this many clips per sample, trained under a
    # block-causal mask with a noise level per latent frame (cliploom.train.causal)
    clips_per_sample: int = 3
    # df: the context latents are noised to a timestep drawn uniformly from 0..context_noise_max
    # (SkyReels' addnoise_condition; 0: always clean).
    context_noise_max: int = 0

    # -- LoRA ------------------------------------------------------------------------------------------
    rank: int = 128
    alpha: float = 128.0
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "ffn.0", "ffn.2"])
    init: str = "kaiming"  # LoRA A initialisation: "kaiming" or "gaussian" (B starts at zero either way)
    # Start from this LoRA file instead (any layout cliploom loads: an official SVI LoRA, an
    # earlier export, ...); its rank must equal `rank` and it must touch exactly `targets`.
    init_lora: str | None = None

    # -- optimisation ---------------------------------------------------------------------------------
    steps: int = 2000  # optimizer steps
    batch_size: int = 1  # clips per process per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1e-4
    warmup_steps: int = 0  # linear learning-rate warm-up, then `lr_schedule`
    lr_schedule: str = "constant"  # after warm-up: "constant" (official) or "cosine" (decays to lr_min at `steps`)
    lr_min: float = 0.0  # the cosine schedule's final learning rate
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    shift: float | None = None  # timestep shift; default: the model's (5 for Wan I2V)
    train_timesteps: int = 1000  # size of the shifted grid training timesteps are drawn from
    timestep_weighting: str = "gaussian"  # "gaussian" (DiffSynth's Wan loss weight) or "none"
    mixed_precision: str = "auto"  # "auto" (bf16 on CUDA, none on CPU), "no", "bf16", "fp16"
    gradient_checkpointing: str = "auto"  # "auto" (on for CUDA), "on", "off"

    # -- error recycling (svi.md section 4) --------------------------------------------------------------
    error_recycling: bool = True  # off: no errors are computed, banked or injected (plain LoRA fine-tuning)
    p_latent_error: float = 0.9  # inject a banked clean-end error into the clean latents
    p_y_error: float = 0.9  # inject a banked clean-end error into the motion latents of y
    p_noise_error: float = 0.01  # inject a banked noise-end error into the noise
    p_clean: float = 0.2  # a clean step: inject nothing (official runs: 0.2 Shot, 0.5 Film)
    y_error_frames: int = 3  # latent frames of y that receive an error, taken from a random start of the error
    y_error_from_all_bins: bool = True  # y errors come from any bin (official runs), not only the current one
    velocity_target: str = "clean"  # "clean": (noise + E_noise) - latents (official code); "injected": minus (latents + E_latent)
    replay_bins: int = 50  # timestep bins: the shifted 50-step inference grid
    replay_capacity: int = 500  # errors per bin and per memory
    replay_replace: str = "nearest"  # when a bin is full: "nearest" (L2, official l2_batch) or "random"
    clean_update_prob: float = 0.1  # on clean steps the memories are updated only with this probability
    replay_warmup_steps: int = 50  # multi-GPU: for this many steps every process banks every process's errors
    error_modulate: float = 0.0  # banked errors are scaled by U(1 - m, 1 + m) when injected
    replay_dtype: str = "bfloat16"  # storage dtype of the replay memories: "bfloat16", "float16" or "float32"

    # -- running -----------------------------------------------------------------------------------------
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
    device: str | None = None  # default: accelerate's choice (CUDA when available)
    checkpoint_every: int = 250  # optimizer steps between checkpoints (the last step is always saved)
    keep_checkpoints: int = 2
    log_every: int = 1  # optimizer steps between rows of train.csv
    text_cache: int = 512  # prompt embeddings kept in memory
    export: list[str] = field(default_factory=lambda: ["svi", "diffusers"])  # layouts written when training ends

    # -- derived -------------------------------------------------------------------------------------------
    @property
    def diffusers_targets(self) -> list[str]:
        return [WAN_TARGETS.get(t, t) for t in self.targets]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


LAYOUTS = ("svi", "diffusers")
_CHOICES = {
    "data": ("shapesworld", "videos"),
    "expert": (None, "high", "low"),
    "init": ("kaiming", "gaussian"),
    "timestep_weighting": ("gaussian", "none"),
    "mixed_precision": ("auto", "no", "bf16", "fp16"),
    "gradient_checkpointing": ("auto", "on", "off"),
    "velocity_target": ("clean", "injected"),
    "lr_schedule": ("constant", "cosine"),
    "motion_source": ("clip", "previous_clip"),
    "route": ("svi", "df", "causal"),
    "replay_replace": ("nearest", "random"),
    "replay_dtype": ("bfloat16", "float16", "float32"),
}
_PROBABILITIES = (
    "boundary_prob", "latent_mode_prob", "no_motion_prob", "anchor_far_prob", "end_frame_prob", "p_latent_error", "p_y_error", "p_noise_error",
    "p_clean", "clean_update_prob",
)
_POSITIVE = (
    "frame_stride", "segments", "clips_per_sample", "rank", "steps", "batch_size", "grad_accum", "train_timesteps", "replay_bins",
    "replay_capacity", "checkpoint_every", "keep_checkpoints", "log_every", "text_cache",
)


# Upper bounds: far beyond real use, small enough that nothing they allow exhausts a machine.
_UPPER = {"rank": 4096, "batch_size": 1024, "grad_accum": 100_000, "steps": 10**9, "segments": 1000,
          "segment_frames": 100_000, "frame_stride": 1000, "train_timesteps": 100_000, "replay_bins": 10_000,
          "replay_capacity": 1_000_000, "text_cache": 1_000_000, "y_error_frames": 1000, "seed": 2**63 - 1,
          "threads": 4096, "checkpoint_every": 10**9, "keep_checkpoints": 10_000, "log_every": 10**9,
          "warmup_steps": 10**9, "replay_warmup_steps": 10**9}


def _fail(where: str, problem: str, fix: str):
    raise CliploomError(f"{where}: {problem}", fix)


def _check_type(where: str, key: str, value: Any, kind) -> Any:
    """``value`` converted to the field's annotated type, or a one-line error."""
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        kind = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is list:
        if not isinstance(value, list):
            value = [value]  # a single value stands for a one-element list
        return [_check_type(where, key, v, args[0]) for v in value]
    return typed_value(where, key, value, kind)


def config_from_dict(data: Any, where: str = "config") -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from parsed YAML (or any mapping)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        _fail(where, "a training config must be a mapping of settings", "see docs/training.md for an example")
    hints = typing.get_type_hints(TrainConfig)
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        _fail(where, f"unknown keys {unknown}", f"valid keys are {', '.join(names)}")
    values = {k: _check_type(where, k, v, hints[k]) for k, v in data.items()}
    cfg = TrainConfig(**values)
    validate(cfg, where)
    return cfg


def validate(cfg: TrainConfig, where: str = "config") -> None:
    for key, options in _CHOICES.items():
        value = getattr(cfg, key)
        if value not in options:
            shown = ", ".join("null" if o is None else str(o) for o in options)
            _fail(where, f"{key} {value!r} is not one of {shown}", f"use one of {shown}")
    for key in _PROBABILITIES:
        value = getattr(cfg, key)
        if not 0.0 <= value <= 1.0:
            _fail(where, f"{key} {value} is not a probability", f"use a value between 0 and 1 for {key}")
    for key in _POSITIVE:
        if getattr(cfg, key) < 1:
            _fail(where, f"{key} {getattr(cfg, key)} must be at least 1", f"use e.g. `{key}: 1`")
    if cfg.frames is not None and (cfg.frames < 5 or (cfg.frames - 1) % 4 or cfg.frames > MAX_FRAMES):
        _fail(where, f"frames {cfg.frames} is not of the form 4k+1 between 5 and {MAX_FRAMES}", "use e.g. 33 or 81")
    for key in ("width", "height"):
        value = getattr(cfg, key)
        if value is not None and not 8 <= value <= MAX_SIZE:
            _fail(where, f"{key} {value} must be between 8 and {MAX_SIZE}", f"use a multiple of 16, e.g. `{key}: 32`")
    for key, high in _UPPER.items():
        value = getattr(cfg, key)
        if value is not None and value > high:
            _fail(where, f"{key} {value} is more than {high}", f"use a smaller {key}")
    if cfg.data == "videos" and not cfg.videos:
        _fail(where, "data: videos needs a folder", "add `videos: path/to/folder` (mp4 files, optional .txt captions)")
    if cfg.alpha <= 0:
        _fail(where, f"alpha {cfg.alpha} must be positive", "use e.g. the rank (scale 1)")
    if not cfg.targets:
        _fail(where, "targets is empty", "use e.g. [q, k, v, o, ffn.0, ffn.2]")
    if not cfg.lr > 0:
        _fail(where, f"lr {cfg.lr} must be positive", "use e.g. 1e-4")
    if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
        _fail(where, f"betas {cfg.betas} must be two numbers in [0, 1)", "use e.g. [0.9, 0.999]")
    for key in ("warmup_steps", "seed", "threads", "y_error_frames", "replay_warmup_steps"):
        if getattr(cfg, key) < 0:
            _fail(where, f"{key} {getattr(cfg, key)} must not be negative", f"use e.g. `{key}: 0`")
    if cfg.lr_min < 0 or cfg.lr_min > cfg.lr:
        _fail(where, f"lr_min {cfg.lr_min} must lie between 0 and lr ({cfg.lr})", "use e.g. `lr_min: 0`")
    if cfg.grad_clip < 0 or cfg.weight_decay < 0 or cfg.error_modulate < 0:
        _fail(where, "grad_clip, weight_decay and error_modulate must not be negative", "use 0 to turn them off")
    if cfg.shift is not None and cfg.shift <= 0:
        _fail(where, f"shift {cfg.shift} must be positive", "use e.g. 5 (Wan I2V), or leave it out for the model's")
    for key, low in (("motion_latents", 1), ("motion_frames", 1)):
        values = getattr(cfg, key)
        if not values or any(v < low for v in values):
            _fail(where, f"{key} {values} must list whole numbers >= {low}", f"use e.g. `{key}: [1]`")
    if not cfg.ref_pad or any(v < -1 for v in cfg.ref_pad):
        _fail(where, f"ref_pad {cfg.ref_pad} must list values >= -1", "use -1 (reference), 0 (zeros) or k > 0")
    if not 0 <= cfg.context_noise_max <= 999:
        _fail(where, f"context_noise_max {cfg.context_noise_max} is not a timestep", "use 0..999, e.g. 50")
    if cfg.route == "df" and cfg.latent_mode_prob < 1:
        _fail(where, "route df trains the pro timeline (latent context) only", "set latent_mode_prob: 1")
    if cfg.route == "causal":
        if cfg.data != "shapesworld":
            _fail(where, "route causal trains on ShapesWorld streams only in this version", "set data: shapesworld")
        if cfg.error_recycling:
            _fail(where, "route causal's stage 1 has no error recycling (its own rollouts are the next stage)",
                  "set error_recycling: false")
        if cfg.end_frame_prob or cfg.anchor_far_prob:
            _fail(where, "route causal trains without keyframes or far anchors", "drop end_frame_prob and anchor_far_prob")
    if cfg.clips_per_sample > 16:
        _fail(where, f"clips_per_sample {cfg.clips_per_sample} is more than 16", "use 2..4")
    if cfg.route != "df" and cfg.context_noise_max:
        _fail(where, "context_noise_max is a diffusion-forcing setting", "set route: df, or drop context_noise_max")
    bad = [x for x in cfg.export if x not in LAYOUTS]
    if bad:
        _fail(where, f"export lists unknown layouts {bad}", f"use some of {', '.join(LAYOUTS)}")


def load_config(path: str | Path, **overrides) -> TrainConfig:
    """Read a YAML training config; ``overrides`` (non-None values) replace its keys."""
    from ..inputs import load_yaml, read_text

    path = Path(path)
    data = load_yaml(read_text(path, "training config", "pass a YAML training config (see docs/training.md)"), str(path))
    if data is not None and not isinstance(data, dict):
        _fail(str(path), "a training config must be a mapping of settings", "see docs/training.md for an example")
    data = dict(data or {})
    data.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_dict(data, str(path))
