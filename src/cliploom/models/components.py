"""The one object the rest of cliploom sees: a loaded Wan image-to-video model.

``Components`` holds the diffusers/transformers modules and the model's settings, and offers
the few encode/decode operations the clip loop needs. It borrows diffusers'
``WanImageToVideoPipeline`` for prompt and image encoding and for LoRA loading, but never calls
the pipeline itself: cliploom builds its own ``y`` and runs its own loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SETTINGS_FILE = "cliploom.json"

# Wan's standard negative prompt (the official repositories ship it in Chinese).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


@dataclass
class ModelSettings:
    """A model's defaults and structure, read from ``cliploom.json`` and the diffusers configs.

    Everything a story leaves out comes from here.
    """

    family: str = "wan"
    max_sequence_length: int = 512
    width: int = 832
    height: int = 480
    fps: int = 16
    frames: int = 81
    steps: int = 50
    timesteps: list[float] | None = None
    guidance: float = 5.0
    guidance_low: float | None = None
    shift: float = 5.0
    boundary_ratio: float | None = None  # two experts: transformer for t >= boundary * 1000
    expand_timesteps: bool = False  # TI2V: known frames as clean leading latents, no y channels
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    svi_lora: str | None = None  # a LoRA file in the model folder applied by default (the built-in model's)
    # a keyframe-trained SVI LoRA in the model folder, applied instead of `svi_lora` to stories whose
    # clips carry keyframes (end frames); without it those stories take `svi_lora` too
    keyframe_lora: str | None = None
    color_match: str = "none"  # the default of stories' color_match (cliploom.colour)
    color_match_method: str = "mean_std"  # the default of stories' color_match_method (cliploom.colour)
    first_clip: str = "pro"  # the default of pro-mode stories' first_clip (pro | i2v), on routes svi, df and helios
    anchor: str = "reference"  # the default of pro-mode stories' anchor (reference | last_frame)
    memory_from: str = "latents"  # the default of pro-mode stories' memory_from (latents | frames)
    guidance_boundary: float | None = None  # one-transformer models: guidance above it, guidance_low below
    seam_blend: int = 0  # the default of stories' seam_blend (pro mode)
    motion_amplitude: float = 1.0  # the default of stories' motion_amplitude (1: off)
    keyframe_guidance: float = 1.0  # the default of stories' keyframe_guidance (1: off; wants a keyframe-trained LoRA)
    memory_guidance: float = 1.0  # the default of stories' memory_guidance (1: off)
    route_loras: dict | None = None  # route -> LoRA file in the model folder with that route's weights (cliploom.routes)
    # route -> {option: value}: the defaults of stories' route_options on that route for this model's weights
    # (e.g. the history sizes its Helios weights run best with); a story's own route_options win
    route_options: dict | None = None
    sampler: str | None = None  # the default of stories' sampler: euler | unipc | renoise (DMD / Self-Forcing students); None: euler
    native_routes: tuple = ()  # routes the model's own DiT is made for (SkyReels-V2 DF: df; a causal DiT: causal routes)
    # a Helios folder's scheduler config (HeliosScheduler / HeliosDMDScheduler, with its _class_name): its
    # pyramid stages, and CFG-Zero* as its pipeline's is_cfg_zero_star asks (the helios route's `stages`)
    helios_scheduler: dict | None = None
    cfg_zero_star: bool = False

    def svi_lora_for(self, story) -> str | None:
        """The file name of this model's SVI LoRA that ``story`` runs with (``None``: none): the
        keyframe-trained one (``keyframe_lora``) when a clip carries keyframes and the model ships
        it, else ``svi_lora``; none when the story turns the model's SVI LoRA off or runs another
        route (which has its own weights, ``route_loras``)."""
        if not story.svi_lora or story.route != "svi":
            return None
        if self.keyframe_lora and any(c.keyframes for c in story.clips):
            return self.keyframe_lora
        return self.svi_lora or None

    @classmethod
    def from_folder(cls, path: Path, model_index: dict, scheduler_config: dict) -> "ModelSettings":
        values: dict = {}
        if model_index.get("boundary_ratio") is not None:
            values["boundary_ratio"] = model_index["boundary_ratio"]
        values["expand_timesteps"] = model_index.get("expand_timesteps", False)
        shift = scheduler_config.get("flow_shift", scheduler_config.get("shift"))
        if shift is not None:
            values["shift"] = shift
        own = path / SETTINGS_FILE
        if own.is_file():
            known = {f.name for f in fields(cls)} - {"native_routes", "helios_scheduler", "cfg_zero_star"}  # the folder's own
            values.update({k: v for k, v in read_settings(own).items() if k in known})
        return cls.checked(values, str(path))

    @classmethod
    def checked(cls, values: dict, where: str) -> "ModelSettings":
        """Settings whose every value has its type and a sane range (they become a story's defaults)."""
        from ..errors import CliploomError
        from ..colour import METHODS as COLOUR_METHODS
        from ..story import ANCHORS, FIRST_CLIPS, MEMORY_FROM, SAMPLERS, ClipSpec, Story, check_numbers, typed_value

        kinds = {"family": str, "max_sequence_length": int, "width": int, "height": int, "fps": int, "frames": int,
                 "steps": int, "guidance": float, "guidance_low": float, "shift": float, "boundary_ratio": float,
                 "expand_timesteps": bool, "negative_prompt": str, "svi_lora": str, "keyframe_lora": str, "color_match": str,
                 "color_match_method": str, "first_clip": str, "anchor": str, "memory_from": str,
                 "seam_blend": int,
                 "guidance_boundary": float, "motion_amplitude": float, "keyframe_guidance": float,
                 "memory_guidance": float, "sampler": str}
        out = {}
        for key, value in values.items():
            if key == "route_loras":
                if value is not None and (not isinstance(value, dict) or not all(
                        isinstance(k, str) and isinstance(v, str) for k, v in value.items())):
                    raise CliploomError(f"{where}: route_loras must map route names to LoRA files",
                                        'write "route_loras": {"df": "df_lora.safetensors"}')
            elif key == "route_options":
                value = _checked_route_options(value, where)
            elif key == "timesteps":
                if value is not None:
                    if not isinstance(value, list):
                        raise CliploomError(f"{where}: timesteps must be a list", "write timesteps: [1000, 750, 500, 250]")
                    value = [typed_value(where, "timesteps", t, float) for t in value]
            elif value is not None:
                value = typed_value(where, key, value, kinds[key])
            out[key] = value
        settings = cls(**out)
        if not 1 <= settings.max_sequence_length <= 4096:
            raise CliploomError(f"{where}: max_sequence_length {settings.max_sequence_length} is out of range",
                                "use 512 (Wan)")
        if settings.sampler not in (None, *SAMPLERS):
            raise CliploomError(f"{where}: unknown sampler {settings.sampler!r}", f"use {' or '.join(SAMPLERS)}")
        if settings.first_clip not in FIRST_CLIPS:
            raise CliploomError(f"{where}: unknown first_clip {settings.first_clip!r}", f"use {' or '.join(FIRST_CLIPS)}")
        if settings.anchor not in ANCHORS:
            raise CliploomError(f"{where}: unknown anchor {settings.anchor!r}", f"use {' or '.join(ANCHORS)}")
        if settings.memory_from not in MEMORY_FROM:
            raise CliploomError(f"{where}: unknown memory_from {settings.memory_from!r}",
                                f"use {' or '.join(MEMORY_FROM)}")
        if settings.color_match_method not in COLOUR_METHODS:
            raise CliploomError(f"{where}: unknown color_match_method {settings.color_match_method!r}",
                                f"use {' or '.join(COLOUR_METHODS)}")
        for name in [settings.svi_lora, settings.keyframe_lora, *(settings.route_loras or {}).values()]:
            if name is not None and (Path(name).is_absolute() or ".." in Path(name).parts):
                raise CliploomError(f"{where}: LoRA {name!r} must be a file inside the model folder",
                                    "give a file name relative to the folder")
        probe = Story(clips=[ClipSpec("x")], width=settings.width, height=settings.height, fps=settings.fps,
                      frames=settings.frames, steps=settings.steps, timesteps=settings.timesteps,
                      guidance=settings.guidance, guidance_low=settings.guidance_low, shift=settings.shift,
                      boundary=settings.boundary_ratio or settings.guidance_boundary,
                      motion_amplitude=settings.motion_amplitude, keyframe_guidance=settings.keyframe_guidance,
                      memory_guidance=settings.memory_guidance,
                      source=Path(where))
        check_numbers(probe, size_multiple=1, temporal=1)
        return settings


def read_settings(path: Path) -> dict:
    from ..errors import CliploomError
    from ..inputs import read_json

    data = read_json(path, "model settings")
    if not isinstance(data, dict):
        raise CliploomError(f"model settings {path} is not a JSON object", "see docs/formats.md")
    return data


@dataclass
class Components:
    """A loaded model: modules, settings, device and dtype."""

    pipe: "object"  # diffusers.WanImageToVideoPipeline, used for its encoders and LoRA loading
    settings: ModelSettings
    path: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    # -- the modules ---------------------------------------------------------------------------
    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def transformer_2(self):
        return self.pipe.transformer_2

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def has_image_encoder(self) -> bool:
        return self.pipe.image_encoder is not None

    # -- geometry ------------------------------------------------------------------------------
    @property
    def z_dim(self) -> int:
        return self.vae.config.z_dim

    @property
    def scale_spatial(self) -> int:
        return self.pipe.vae_scale_factor_spatial

    @property
    def scale_temporal(self) -> int:
        return self.pipe.vae_scale_factor_temporal

    @property
    def patch(self) -> tuple[int, int]:
        return tuple(self.transformer.config.patch_size[1:])

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this (VAE stride times DiT patch)."""
        return self.scale_spatial * max(self.patch)

    # -- encoders ------------------------------------------------------------------------------
    def release_text_encoder(self) -> None:
        """Free the text encoder (the largest part of a real model after the DiT); reloaded on demand."""
        self.pipe.text_encoder = None
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _ensure_text_encoder(self) -> None:
        if self.pipe.text_encoder is None:
            from transformers import UMT5EncoderModel

            from .quiet import quiet_hf

            with quiet_hf():
                encoder = UMT5EncoderModel.from_pretrained(self.path / "text_encoder", local_files_only=True)
            self.pipe.text_encoder = encoder.to(self.device, self.dtype).eval().requires_grad_(False)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """UMT5 embeddings, ``[len(prompts), max_sequence_length, dim]``, zero beyond each prompt."""
        self._ensure_text_encoder()
        embeds, _ = self.pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            max_sequence_length=self.settings.max_sequence_length,
            device=self.device,
        )
        return embeds

    @property
    def first_last_frame(self) -> bool:
        """A Wan2.1-FLF2V-style model: its image embedder takes the CLIP features of two images (the
        first and the last frame) with a learnt position embedding."""
        return getattr(self.transformer.config, "pos_embed_seq_len", None) is not None and self.has_image_encoder

    @torch.no_grad()
    def encode_image_features(self, image: Image.Image, last: Image.Image | None = None) -> torch.Tensor | None:
        """CLIP image features for Wan 2.1 I2V, or ``None`` when the model has no image encoder.
        First-last-frame models get the features of ``image`` and ``last`` (``image`` again when the
        clip has no end frame), as diffusers' pipeline gives them with ``last_image``."""
        if not self.has_image_encoder:
            return None
        if self.first_last_frame:
            return self.pipe.encode_image([image, last if last is not None else image], self.device)
        return self.pipe.encode_image(image, self.device)

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.z_dim, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
        std = torch.tensor(self.vae.config.latents_std, device=like.device, dtype=like.dtype).view(shape)
        return mean, std

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, F, H, W]`` in [-1, 1] -> normalised latents ``[B, C, T, h, w]`` (float32).

        Uses the posterior mode (no sampling), as Wan's image-to-video conditioning does.
        """
        vae = self.vae
        video = video.to(self.device, vae.dtype)
        z = vae.encode(video).latent_dist.mode().float()
        mean, std = self._latent_stats(z)
        return (z - mean) / std

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> the VAE's own latent scale, on its device and in its dtype."""
        z = latents.to(self.device, torch.float32)
        mean, std = self._latent_stats(z)
        return (z * std + mean).to(self.vae.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``[1, C, T, h, w]`` -> ``uint8`` frames ``[F, H, W, 3]`` on the CPU."""
        video = self.vae.decode(self.denormalise(latents), return_dict=False)[0]
        return to_uint8_frames(video[0])


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """``[3, F, H, W]`` in [-1, 1] -> ``[F, H, W, 3]`` uint8 on the CPU."""
    video = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return video.permute(1, 2, 3, 0).contiguous().cpu()


def frames_to_tensor(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``uint8 [F, H, W, 3]`` -> ``[1, 3, F, H, W]`` in [-1, 1] (float32)."""
    t = torch.as_tensor(np.asarray(frames)).float()
    return (t / 127.5 - 1).permute(3, 0, 1, 2).unsqueeze(0)


def _checked_route_options(value, where: str) -> dict | None:
    """A model's ``route_options``: known routes, each option known and in its range."""
    from ..errors import CliploomError
    from ..routes import ROUTES, option_error

    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise CliploomError(f"{where}: route_options must map route names to options",
                            'write "route_options": {"helios": {"mid": 0}}')
    for route, options in value.items():
        if route not in ROUTES:
            raise CliploomError(f"{where}: route_options names an unknown route {route!r}",
                                f"use one of {', '.join(ROUTES)}")
        for key, v in options.items():
            if (err := option_error(route, key, v)) is not None:
                raise CliploomError(f"{where}: route_options of {route}: {err[0]}", err[1])
    return {route: dict(options) for route, options in value.items()}
