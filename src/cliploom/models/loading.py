"""Opening a Wan image-to-video model from a diffusers-layout folder, offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import CliploomError
from .components import Components, ModelSettings

# Nothing is ever fetched: every file must be on disk.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REQUIRED = ("transformer", "vae", "text_encoder", "tokenizer")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CliploomError(f"cannot read {what} {path}: {e}", "check that the model folder is complete") from None


def _load(loader, folder: Path, name: str, **kwargs):
    try:
        return loader.from_pretrained(folder / name, local_files_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CliploomError(
            f"cannot load {name}/ of model {folder}: {first}",
            "check that the folder is a complete diffusers-layout Wan model",
        ) from None


def check_model_folder(path: Path) -> dict:
    """Validate that ``path`` looks like a diffusers Wan image-to-video folder; return model_index."""
    if not path.exists():
        raise CliploomError(f"model folder {path} does not exist", "pass --model DIR of a diffusers-layout Wan model")
    if not path.is_dir():
        raise CliploomError(
            f"model {path} is a file, not a folder",
            "pass the diffusers folder (single-file checkpoints need --family, see docs/formats.md)",
        )
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise CliploomError(
            f"{path} is not a diffusers model folder (no model_index.json)",
            "pass a folder such as Wan2.1-I2V-14B-480P-Diffusers or one made by `cliploom make-tiny`",
        )
    index = read_json(index_path, "model index")
    cls = str(index.get("_class_name", ""))
    if not cls.startswith("Wan"):
        raise CliploomError(f"{path} holds a {cls or 'unknown'} model, not a Wan model", "pass a Wan I2V model folder")
    missing = [name for name in REQUIRED if not (path / name).is_dir()]
    if missing:
        raise CliploomError(f"model folder {path} lacks {', '.join(missing)}/", "copy the complete model folder")
    return index


def load_model(
    path: str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    family: str | None = None,
) -> Components:
    """Load a Wan image-to-video model (Wan 2.1 I2V, Wan 2.2 A14B, Wan 2.2 TI2V) from a folder.

    ``path=None`` or ``"builtin"`` loads the built-in model. The transformer(s) take ``dtype``
    (bfloat16 on CUDA, float32 on CPU by default); the VAE stays in float32.
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
    from diffusers import WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    from .builtin import resolve_model_path

    path = resolve_model_path(path)
    if family is not None:
        raise CliploomError("--family (original-format checkpoints) is not supported yet", "use a diffusers folder")
    index = check_model_folder(path)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)

    scheduler_config = {}
    if (path / "scheduler" / "scheduler_config.json").is_file():
        scheduler_config = read_json(path / "scheduler" / "scheduler_config.json", "scheduler config")
    settings = ModelSettings.from_folder(path, index, scheduler_config)

    transformer = _load(WanTransformer3DModel, path, "transformer", torch_dtype=dtype)
    transformer_2 = None
    if index.get("transformer_2", [None])[0] is not None and (path / "transformer_2").is_dir():
        transformer_2 = _load(WanTransformer3DModel, path, "transformer_2", torch_dtype=dtype)
    vae = _load(AutoencoderKLWan, path, "vae", torch_dtype=torch.float32)
    text_encoder = _load(UMT5EncoderModel, path, "text_encoder", torch_dtype=dtype)
    tokenizer = _load(AutoTokenizer, path, "tokenizer")
    image_encoder = image_processor = None
    if index.get("image_encoder", [None])[0] is not None and (path / "image_encoder").is_dir():
        from transformers import CLIPImageProcessor, CLIPVisionModel

        image_encoder = _load(CLIPVisionModel, path, "image_encoder", torch_dtype=torch.float32)
        image_processor = _load(CLIPImageProcessor, path, "image_processor")

    check_image_to_video(path, transformer, vae, settings)
    if settings.boundary_ratio is not None and transformer_2 is None:
        raise CliploomError(
            f"{path} sets boundary_ratio but has no transformer_2/", "copy the low-noise expert into transformer_2/"
        )
    if image_encoder is not None and settings.max_sequence_length != 512:
        raise CliploomError(
            f"{path} has an image encoder but max_sequence_length {settings.max_sequence_length}",
            "Wan's attention splits image and text tokens assuming 512 text tokens: set it to 512 in cliploom.json",
        )

    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=settings.shift),
        image_processor=image_processor,
        image_encoder=image_encoder,
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=settings.boundary_ratio,
        expand_timesteps=settings.expand_timesteps,
    )
    pipe.to(device)
    for module in (transformer, transformer_2, vae, text_encoder, image_encoder):
        if module is not None:
            module.eval().requires_grad_(False)
    return Components(pipe=pipe, settings=settings, path=path, device=device, dtype=dtype)


def check_image_to_video(path: Path, transformer, vae, settings: ModelSettings) -> None:
    """Refuse text-to-video and mismatched models with a clear message."""
    z = vae.config.z_dim
    cin = transformer.config.in_channels
    if settings.expand_timesteps:
        if cin != z:
            raise CliploomError(
                f"{path}: TI2V transformer takes {cin} channels but the VAE makes {z}", "pair it with its own VAE"
            )
        return
    if cin == z:
        raise CliploomError(
            f"{path} is a text-to-video Wan model ({cin} input channels)",
            "cliploom needs an image-to-video model (Wan2.1-I2V, Wan2.2-I2V-A14B or Wan2.2-TI2V-5B)",
        )
    if cin != 2 * z + 4:
        raise CliploomError(
            f"{path}: transformer takes {cin} channels, an I2V model with a z{z} VAE needs {2 * z + 4}",
            "pair the transformer with its own VAE",
        )
