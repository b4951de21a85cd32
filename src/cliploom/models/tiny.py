"""Random-weight tiny Wan models in diffusers folder layout, built fully offline.

Each variant has the structure of a real family, shrunk:

* ``wan21``: Wan 2.1 I2V: one transformer with CLIP image cross-attention, z16 VAE.
* ``wan22``: Wan 2.2 I2V A14B: two experts (``transformer`` high noise, ``transformer_2`` low
  noise) switched at ``boundary_ratio`` 0.875, no image encoder.
* ``ti2v``: Wan 2.2 TI2V 5B: ``expand_timesteps`` (per-token timesteps), z48 residual VAE with
  patch 2 (16x spatial), no ``y`` channels.
* ``skyreels-df`` (extra): a SkyReels-V2 diffusion-forcing folder as diffusers'
  ``SkyReelsV2DiffusionForcingPipeline`` saves it: ``SkyReelsV2Transformer3DModel`` with the fps
  embedding, no ``y`` channels, UniPC flow scheduler, no cliploom.json (the ``df`` route's own
  model, :mod:`cliploom.models.skyreels`).
* ``causal-fastvideo`` (extra): a Self-Forcing causal Wan in FastVideo's diffusers layout (as
  ``wlsaidhi/SFWan2.1-T2V-1.3B-Diffusers``): a text-to-video DiT with Wan's keys whose config names
  ``CausalWanTransformer3DModel``, FastVideo's ``SelfForcingFlowMatchScheduler`` config, no
  cliploom.json (the causal routes' own model).
* ``helios`` (extra): a Helios folder as diffusers' ``HeliosPipeline`` saves it:
  ``HeliosTransformer3DModel`` (made from a tiny text-to-video Wan DiT the way the route makes its
  own, :func:`cliploom.models.helios.build_helios`), ``HeliosScheduler``, no cliploom.json.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import CliploomError
from .components import SETTINGS_FILE
from .quiet import quiet_hf

VARIANTS = ("wan21", "wan22", "ti2v")
EXTRA_VARIANTS = ("flf2v", "skyreels-df", "causal-fastvideo", "helios")  # Wan2.1-FLF2V-style: first and last frame, CLIP features of both


def build_byte_tokenizer(max_length: int = 512):
    """A byte-level tokenizer (every byte a token, ``</s>`` appended) made with ``tokenizers``.

    Every prompt tokenizes, distinct prompts give distinct ids, and nothing is downloaded.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def tiny_text_encoder(vocab_size: int, d_model: int = 32, seed: int = 0):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
    )
    return UMT5EncoderModel(config)


def tiny_transformer(in_channels: int, out_channels: int, text_dim: int, image_dim: int | None, seed: int,
                     heads: int = 2, head_dim: int = 12, ffn_dim: int = 48, pos_embed_seq_len: int | None = None):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=in_channels,
        out_channels=out_channels,
        text_dim=text_dim,
        freq_dim=32,
        ffn_dim=ffn_dim,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        image_dim=image_dim,
        added_kv_proj_dim=heads * head_dim if image_dim else None,
        rope_max_seq_len=64,
        pos_embed_seq_len=pos_embed_seq_len,
    )


def tiny_vae(variant: str, seed: int):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    if variant == "ti2v":
        z = 48
        return AutoencoderKLWan(
            base_dim=8,
            decoder_base_dim=8,
            z_dim=z,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            is_residual=True,
            patch_size=2,
            in_channels=12,  # 3 colours x patch 2 x 2, as in Wan 2.2's VAE
            out_channels=12,
            scale_factor_spatial=16,
            scale_factor_temporal=4,
            latents_mean=[0.0] * z,
            latents_std=[1.0] * z,
        )
    return AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )


def tiny_image_encoder(seed: int):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=8,
        intermediate_size=16,
        projection_dim=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
    )
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True
    )
    return CLIPVisionModel(config), processor


def write_model_index(
    folder: Path, *, image_encoder: bool = False, boundary_ratio: float | None = None, expand_timesteps: bool = False
) -> None:
    """``model_index.json`` of a diffusers ``WanImageToVideoPipeline`` folder: CLIP image encoder
    (Wan 2.1), a second expert ``transformer_2`` below ``boundary_ratio`` (Wan 2.2 A14B), or
    ``expand_timesteps`` (TI2V)."""

    def entry(library, cls, present=True):
        return [library, cls] if present else [None, None]

    index = {
        "_class_name": "WanImageToVideoPipeline",
        "_diffusers_version": "0.42.1",
        "boundary_ratio": boundary_ratio,
        "expand_timesteps": expand_timesteps,
        "image_encoder": entry("transformers", "CLIPVisionModel", image_encoder),
        "image_processor": entry("transformers", "CLIPImageProcessor", image_encoder),
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": entry("diffusers", "WanTransformer3DModel", boundary_ratio is not None),
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    (Path(folder) / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def make_tiny(out: str | Path, variant: str = "wan21", seed: int = 0, overwrite: bool = False) -> Path:
    """Write a random-weight tiny model of ``variant`` to ``out`` (atomically) and return its path."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if variant not in VARIANTS + EXTRA_VARIANTS:
        raise CliploomError(f"unknown tiny variant {variant!r}", f"choose one of {', '.join(VARIANTS + EXTRA_VARIANTS)}")
    out = Path(out)
    occupied = out.is_file() or (out.is_dir() and any(out.iterdir()))
    if occupied and not overwrite:
        raise CliploomError(f"{out} already exists and is not empty", "choose another folder or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        if variant in ("skyreels-df", "causal-fastvideo", "helios"):
            {"skyreels-df": _skyreels_df, "causal-fastvideo": _causal_fastvideo, "helios": _helios}[variant](tmp, seed)
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
            return out
        two_experts = variant == "wan22"
        has_image = variant in ("wan21", "flf2v")
        max_len = 512 if has_image else 64
        with quiet_hf():  # no loading bars or notes from the libraries
            tokenizer = build_byte_tokenizer(max_len)
            text_encoder = tiny_text_encoder(len(tokenizer), seed=seed)
            vae = tiny_vae(variant, seed)
            z = vae.config.z_dim
            cin = z if variant == "ti2v" else 2 * z + 4
            image_encoder = processor = None
            if has_image:
                image_encoder, processor = tiny_image_encoder(seed)
            # FLF2V: the CLIP features of the first and last frames, 5 tokens each (32 px, patch 16, + CLS)
            transformer = tiny_transformer(cin, z, text_encoder.config.d_model, 8 if has_image else None, seed + 1,
                                           pos_embed_seq_len=10 if variant == "flf2v" else None)
            transformer_2 = tiny_transformer(cin, z, text_encoder.config.d_model, None, seed + 2) if two_experts else None

            kwargs = dict(safe_serialization=True)
            transformer.save_pretrained(tmp / "transformer", **kwargs)
            vae.save_pretrained(tmp / "vae", **kwargs)
            text_encoder.save_pretrained(tmp / "text_encoder", **kwargs)
            tokenizer.save_pretrained(tmp / "tokenizer")
            FlowMatchEulerDiscreteScheduler(shift=5.0).save_pretrained(tmp / "scheduler")
            if transformer_2 is not None:
                transformer_2.save_pretrained(tmp / "transformer_2", **kwargs)
            if image_encoder is not None:
                image_encoder.save_pretrained(tmp / "image_encoder", **kwargs)
                processor.save_pretrained(tmp / "image_processor")

        write_model_index(tmp, image_encoder=has_image, boundary_ratio=0.875 if two_experts else None,
                          expand_timesteps=variant == "ti2v")
        size = 64 if variant == "ti2v" else 32
        settings = {
            "family": f"tiny-{variant}",
            "max_sequence_length": max_len,
            "width": size,
            "height": size,
            "fps": 16,
            "frames": 17,
            "steps": 4,
            "guidance": 5.0,
            "shift": 5.0,
            "negative_prompt": "blurry, static",
        }
        (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _text_and_vae(seed: int):
    """The tiny byte tokenizer, UMT5 text encoder and Wan 2.1 VAE the route folders share."""
    tokenizer = build_byte_tokenizer(64)
    return tokenizer, tiny_text_encoder(len(tokenizer), seed=seed), tiny_vae("wan21", seed)


def _skyreels_df(folder: Path, seed: int) -> None:
    """A tiny SkyReels-V2-DF folder, written by diffusers' own pipeline class."""
    from diffusers import SkyReelsV2DiffusionForcingPipeline, SkyReelsV2Transformer3DModel, UniPCMultistepScheduler

    with quiet_hf():
        tokenizer, text_encoder, vae = _text_and_vae(seed)
        torch.manual_seed(seed + 1)
        transformer = SkyReelsV2Transformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=text_encoder.config.d_model, freq_dim=32, ffn_dim=48, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=64, inject_sample_info=True)
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)
        pipe = SkyReelsV2DiffusionForcingPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer,
                                                  vae=vae, scheduler=scheduler)
        pipe.save_pretrained(folder, safe_serialization=True)


def _causal_fastvideo(folder: Path, seed: int) -> None:
    """A tiny Self-Forcing causal Wan folder in FastVideo's layout (Wan T2V keys, causal class name)."""
    with quiet_hf():
        tokenizer, text_encoder, vae = _text_and_vae(seed)
        transformer = tiny_transformer(16, 16, text_encoder.config.d_model, None, seed + 1)
        kwargs = dict(safe_serialization=True)
        transformer.save_pretrained(folder / "transformer", **kwargs)
        vae.save_pretrained(folder / "vae", **kwargs)
        text_encoder.save_pretrained(folder / "text_encoder", **kwargs)
        tokenizer.save_pretrained(folder / "tokenizer")
    config_path = folder / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "_class_name": "CausalWanTransformer3DModel"}, indent=2) + "\n")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "SelfForcingFlowMatchScheduler", "num_inference_steps": 1000, "shift": 5.0, "sigma_min": 0.0,
        "extra_one_step": True, "training": True}, indent=2) + "\n")
    index = {"_class_name": "WanPipeline", "_diffusers_version": "0.33.0.dev0",
             "scheduler": ["diffusers", "SelfForcingFlowMatchScheduler"],
             "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
             "transformer": ["diffusers", "CausalWanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _helios(folder: Path, seed: int) -> None:
    """A tiny Helios folder, written by diffusers' own pipeline class."""
    from diffusers import HeliosPipeline, HeliosScheduler

    from .helios import build_helios

    with quiet_hf():
        tokenizer, text_encoder, vae = _text_and_vae(seed)
        wan = tiny_transformer(16, 16, text_encoder.config.d_model, None, seed + 1)
        transformer = build_helios(wan, 16)
        HeliosPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=HeliosScheduler(),
                       transformer=transformer).save_pretrained(folder, safe_serialization=True)
