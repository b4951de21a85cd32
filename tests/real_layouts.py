"""Writing tiny models and LoRAs in the layouts real files use (test helper).

The name tables here are written by hand from the original Wan code's module names, independently
of ``cliploom.models.formats`` (which renames the other way, through diffusers' converters), so a
wrong rename on either side makes the round trip fail.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

# -- DiT: diffusers name -> original Wan name ------------------------------------------------------

_ATTN = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o", "norm_q": "norm_q", "norm_k": "norm_k",
         "add_k_proj": "k_img", "add_v_proj": "v_img", "norm_added_k": "norm_k_img"}
_BLOCK = {"norm2": "norm3", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}
_TOP = {
    "patch_embedding": "patch_embedding",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "proj_out": "head.head",
    "condition_embedder.image_embedder.pos_embed": "img_emb.emb_pos",  # FLF2V
}


def dit_module_to_original(module: str) -> str:
    """``blocks.0.attn1.to_q`` -> ``blocks.0.self_attn.q``; ``scale_shift_table`` -> ``head.modulation``."""
    if module == "scale_shift_table":
        return "head.modulation"
    m = re.match(r"blocks\.(\d+)\.(.+)$", module)
    if m:
        i, rest = m.groups()
        if rest == "scale_shift_table":
            return f"blocks.{i}.modulation"
        a = re.match(r"attn([12])\.(.+)$", rest)
        if a:
            return f"blocks.{i}.{'self_attn' if a.group(1) == '1' else 'cross_attn'}.{_ATTN[a.group(2)]}"
        return f"blocks.{i}.{_BLOCK[rest]}"
    return _TOP[module]


def dit_key_to_original(key: str) -> str:
    if key.endswith((".weight", ".bias")):
        module, _, param = key.rpartition(".")
        return f"{dit_module_to_original(module)}.{param}"
    return dit_module_to_original(key)


# -- VAE: diffusers name -> original Wan 2.1 / 2.2 name --------------------------------------------

_RES = {"norm1.gamma": "residual.0.gamma", "conv1.weight": "residual.2.weight", "conv1.bias": "residual.2.bias",
        "norm2.gamma": "residual.3.gamma", "conv2.weight": "residual.6.weight", "conv2.bias": "residual.6.bias",
        "conv_shortcut.weight": "shortcut.weight", "conv_shortcut.bias": "shortcut.bias"}
_VAE_TOP = {"encoder.conv_in": "encoder.conv1", "decoder.conv_in": "decoder.conv1", "encoder.norm_out": "encoder.head.0",
            "decoder.norm_out": "decoder.head.0", "encoder.conv_out": "encoder.head.2",
            "decoder.conv_out": "decoder.head.2", "quant_conv": "conv1", "post_quant_conv": "conv2"}


def vae_keys_to_original(keys, nested: bool) -> dict[str, str]:
    """``{diffusers key: original key}`` for a Wan 2.1 (flat) or Wan 2.2 (``nested``) VAE."""
    keys = list(keys)
    resnets: dict[tuple[str, int], int] = {}
    for k in keys:
        m = re.match(r"(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.resnets\.(\d+)\.", k)
        if m:
            slot = (m.group(1), int(m.group(2)))
            resnets[slot] = max(resnets.get(slot, 0), int(m.group(3)) + 1)
    per_stage = resnets.get(("decoder.up_blocks", 0), 0)  # Wan 2.1 decoder: residual blocks per stage
    out = {}
    for k in keys:
        module, _, param = k.rpartition(".")
        if module in _VAE_TOP:
            out[k] = f"{_VAE_TOP[module]}.{param}"
            continue
        m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d)\.(.+)$", k)
        if m:
            side, kind, i, rest = m.groups()
            out[k] = f"{side}.middle.1.{rest}" if kind == "attentions" else f"{side}.middle.{2 * int(i)}.{_RES[rest]}"
            continue
        m = re.match(r"encoder\.down_blocks\.(\d+)\.(.+)$", k)
        if m and not nested:
            out[k] = f"encoder.downsamples.{m.group(1)}.{_RES.get(m.group(2), m.group(2))}"
            continue
        m = re.match(r"(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.(resnets\.(\d+)\.|downsampler\.|upsampler\.|upsamplers\.0\.)(.+)$", k)
        side, stage, _, j, rest = m.groups()
        stage = int(stage)
        rest = _RES.get(rest, rest) if j is not None else rest
        if nested:
            outer = "encoder.downsamples" if side.startswith("encoder") else "decoder.upsamples"
            index = int(j) if j is not None else resnets[(side, stage)]
            out[k] = f"{outer}.{stage}.{outer.split('.')[1]}.{index}.{rest}"
        else:
            index = stage * (per_stage + 1) + (int(j) if j is not None else per_stage)
            out[k] = f"decoder.upsamples.{index}.{rest}"
    return out


# -- tiny models in original layouts ---------------------------------------------------------------


def family_of(diffusers_dir: Path, name: str) -> dict:
    """A family config (the shipped schema) describing a tiny diffusers model."""
    d = Path(diffusers_dir)
    index = json.loads((d / "model_index.json").read_text())
    settings = json.loads((d / "cliploom.json").read_text())
    return {
        "name": name,
        "transformer": json.loads((d / "transformer" / "config.json").read_text()),
        "vae": json.loads((d / "vae" / "config.json").read_text()),
        "experts": 2 if index.get("transformer_2", [None])[0] else 1,
        "image_encoder": bool(index.get("image_encoder", [None])[0]),
        "boundary_ratio": index.get("boundary_ratio"),
        "expand_timesteps": bool(index.get("expand_timesteps")),
        "settings": {k: v for k, v in settings.items() if k not in ("family", "negative_prompt")},
    }


def diffusers_state(diffusers_dir: Path, part: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(diffusers_dir) / part / "diffusion_pytorch_model.safetensors"))


def to_original_dit(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {dit_key_to_original(k): v.contiguous() for k, v in state.items()}


def cast_state(state, dtype=None, fp8: str | None = None):
    """Store floats as ``dtype``; ``fp8="plain"`` casts 2-D weights to e4m3, ``"scaled"`` stores
    them as e4m3 with a ComfyUI per-tensor ``scale_weight`` (plus the ``scaled_fp8`` marker)."""
    out = {}
    for k, v in state.items():
        if fp8 and k.endswith(".weight") and v.dim() == 2:
            if fp8 == "scaled":
                scale = v.abs().max().float() / 448.0
                out[k] = (v.float() / scale).to(torch.float8_e4m3fn)
                out[k[: -len("weight")] + "scale_weight"] = scale.reshape(1)
            else:
                out[k] = v.to(torch.float8_e4m3fn)
        elif dtype is not None and v.is_floating_point():
            out[k] = v.to(dtype)
        else:
            out[k] = v
    if fp8 == "scaled":
        out["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    return out


def save_sharded(state: dict, folder: Path, shards: int, stem="diffusion_pytorch_model") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        path = folder / f"{stem}.safetensors"
        save_file(state, str(path))
        return [path]
    keys = list(state)
    n = -(-len(keys) // shards)
    weight_map, files = {}, []
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i * n:(i + 1) * n]}
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
        files.append(folder / name)
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files


def write_original(
    diffusers_dir: Path,
    out: Path,
    *,
    layout: str = "wan",  # wan (original names) | comfy (model.diffusion_model. prefix)
    shards: int = 1,
    experts_in_folders: bool = True,
    dtype=None,
    fp8: str | None = None,
    vae_prefix: str = "",
    encoders: bool = True,
) -> Path:
    """Write a tiny diffusers model as original-format files: DiT(s), VAE file, encoder folders
    (copied), and ``family.json`` beside ``out``. Returns ``out``."""
    src = Path(diffusers_dir)
    out.mkdir(parents=True, exist_ok=True)
    family = family_of(src, out.name)
    experts = ["transformer", "transformer_2"] if family["experts"] == 2 else ["transformer"]
    for part, expert in zip(experts, ("high", "low")):
        state = cast_state(to_original_dit(diffusers_state(src, part)), dtype, fp8)
        if layout == "comfy":
            state = {(k if k == "scaled_fp8" else f"model.diffusion_model.{k}"): v for k, v in state.items()}
        if family["experts"] == 2 and experts_in_folders:
            save_sharded(state, out / f"{expert}_noise_model", shards)
        elif family["experts"] == 2:
            save_sharded(state, out, shards, stem=f"wan2.2_i2v_{expert}_noise_14B_tiny")
        else:
            save_sharded(state, out, shards, stem="wan_dit" if layout == "comfy" else "diffusion_pytorch_model")
    vae = diffusers_state(src, "vae")
    names = vae_keys_to_original(vae, nested=bool(family["vae"].get("is_residual")))
    vae_name = "Wan2.2_VAE.safetensors" if family["vae"].get("is_residual") else "Wan2.1_VAE.safetensors"
    save_file({vae_prefix + names[k]: v.contiguous() for k, v in vae.items()}, str(out / vae_name))
    if encoders:
        for name in ("text_encoder", "tokenizer", "image_encoder", "image_processor"):
            if (src / name).is_dir():
                shutil.copytree(src / name, out / name, dirs_exist_ok=True)
    (out.parent / f"{out.name}.family.json").write_text(json.dumps(family, indent=1))
    return out


def family_path(out: Path) -> Path:
    return out.parent / f"{out.name}.family.json"


# -- LoRA files in every layout --------------------------------------------------------------------


def lora_keys(layout: str, module: str, kind: str) -> str:
    """The key a LoRA file of ``layout`` uses for ``kind`` (down, up, alpha, diff, diff_b) of the
    diffusers ``module``."""
    if layout == "diffusers":
        suffix = {"down": "lora_A.weight", "up": "lora_B.weight", "alpha": "alpha"}[kind]
        return f"transformer.{module}.{suffix}"
    original = dit_module_to_original(module)
    if layout in ("svi1", "svi2"):
        suffix = {"down": "lora_A.default.weight", "up": "lora_B.default.weight"}[kind]
        return f"{'pipe.dit.' if layout == 'svi1' else ''}{original}.{suffix}"
    if layout == "comfy":
        if kind == "diff_m":  # Kijai / LightX2V: the modulation delta sits beside the block's modules
            return f"diffusion_model.{original.removesuffix('.modulation')}.diff_m"
        suffix = {"down": "lora_down.weight", "up": "lora_up.weight", "alpha": "alpha", "diff": "diff",
                  "diff_b": "diff_b"}[kind]
        return f"diffusion_model.{original}.{suffix}"
    if layout == "kohya":
        suffix = {"down": "lora_down.weight", "up": "lora_up.weight", "alpha": "alpha"}[kind]
        return f"lora_unet_{original.replace('.', '_')}.{suffix}"
    raise ValueError(layout)
