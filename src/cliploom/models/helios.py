"""The Helios transformer of a loaded Wan DiT (route ``helios``, :mod:`cliploom.routes.helios`).

diffusers' ``HeliosTransformer3DModel`` is Wan's DiT plus three patch layers for the past: history
latents enter as extra tokens, patchified at 1x2x2 (``patch_short``), 2x4x4 (``patch_mid``) or 4x8x8
(``patch_long``), at RoPE positions the caller gives, with timestep 0 and no cross-attention (so a
clip's own prompt reaches only its own tokens). It is built from the DiT by a rename and a slice:

* ``scale_shift_table`` -> ``norm_out.scale_shift_table``;
* ``patch_embedding`` and ``patch_short``: the DiT's kernel, input channels ``0 .. z_dim - 1`` only
  (the noisy latents; Wan's other channels read the mask and ``y``, which Helios does not have);
* ``patch_mid`` / ``patch_long``: that kernel spread over 2x2x2 / 4x4x4 cells and divided by 8 / 64,
  bias copied, so that on a cell of equal latents each gives the short patch of the cell's average.

With no history its output is the DiT's with ``y = 0`` and mask 0 (tested). Every other tensor is the
DiT's own, shared rather than copied (the route costs only the new patch layers), so nothing may
change the Helios module's weights in place: its LoRAs stay unfused (peft adapters) and full deltas
may touch only its own patch layers (:func:`apply_loras`).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from ..errors import CliploomError

OWN = ("patch_embedding", "patch_short", "patch_mid", "patch_long")  # the Helios module's own layers
SPREAD = {"patch_mid": 2, "patch_long": 4}  # the cell each history patch averages (in short patches)


def helios_config(wan_config, z_dim: int) -> dict:
    """The ``HeliosTransformer3DModel`` config of a Wan DiT: the same sizes, ``z_dim`` input channels,
    Wan's RoPE split of the head (time gets what the two spatial axes leave)."""
    d = wan_config.attention_head_dim
    spatial = 2 * (d // 6)
    return dict(patch_size=tuple(wan_config.patch_size), num_attention_heads=wan_config.num_attention_heads,
                attention_head_dim=d, in_channels=z_dim, out_channels=wan_config.out_channels or z_dim,
                text_dim=wan_config.text_dim, freq_dim=wan_config.freq_dim, ffn_dim=wan_config.ffn_dim,
                num_layers=wan_config.num_layers, cross_attn_norm=wan_config.cross_attn_norm,
                qk_norm=wan_config.qk_norm, eps=wan_config.eps, added_kv_proj_dim=wan_config.added_kv_proj_dim,
                rope_dim=(d - 2 * spatial, spatial, spatial), guidance_cross_attn=True, zero_history_timestep=True,
                has_multi_term_memory_patch=True, is_amplify_history=False)


def _spread(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """A 3-D conv kernel over cells ``k`` times larger on every axis, each value repeated over its
    cell and divided by the cell's size."""
    for dim in (2, 3, 4):
        kernel = kernel.repeat_interleave(k, dim=dim)
    return kernel / k**3


def helios_state(wan, z_dim: int) -> dict[str, torch.Tensor]:
    """The Helios state dict of ``wan``: its own tensors (shared) renamed, the patch layers made."""
    state = {}
    for name, tensor in wan.state_dict().items():
        if name == "scale_shift_table":
            name = "norm_out.scale_shift_table"
        if not name.startswith("patch_embedding."):
            state[name] = tensor
    weight, bias = wan.patch_embedding.weight.detach(), wan.patch_embedding.bias.detach()
    short = weight[:, :z_dim].clone()  # a copy: the patch layers are the Helios module's own
    for layer in ("patch_embedding", "patch_short"):
        state[f"{layer}.weight"], state[f"{layer}.bias"] = short.clone(), bias.clone()
    for layer, k in SPREAD.items():
        state[f"{layer}.weight"], state[f"{layer}.bias"] = _spread(short, k), bias.clone()
    return state


def build_helios(wan, z_dim: int):
    """``HeliosTransformer3DModel`` made from the Wan DiT ``wan`` (see the module's docstring)."""
    from diffusers import HeliosTransformer3DModel
    from diffusers.models.transformers.transformer_helios import HeliosRotaryPosEmbed

    cfg = wan.config
    if getattr(wan.condition_embedder, "image_embedder", None) is not None:
        raise CliploomError("route helios: this DiT reads CLIP image features, which the Helios transformer has no "
                            "input for", "use a DiT without an image encoder (the built-in model, Wan 2.1 T2V-style)")
    if cfg.in_channels not in (z_dim, 2 * z_dim + 4):
        raise CliploomError(f"route helios: the DiT takes {cfg.in_channels} input channels, neither {z_dim} "
                            f"(text-to-video) nor {2 * z_dim + 4} (image-to-video)", "use a Wan 2.1-style DiT")
    with torch.device("meta"):
        helios = HeliosTransformer3DModel(**helios_config(cfg, z_dim))
    helios.load_state_dict(helios_state(wan, z_dim), strict=True, assign=True)
    device = wan.patch_embedding.weight.device
    helios.rope = HeliosRotaryPosEmbed(helios.config.rope_dim, helios.config.rope_theta).to(device)
    helios.requires_grad_(False)
    helios.eval()
    return helios


@dataclass
class HeliosWeights:
    """A model's Helios transformer and the LoRA stack on it (cached on the ``Components``)."""

    transformer: object
    loras: object  # models.lora.LoraStack over the Helios transformer
    source: int  # id of the DiT it was built from


def helios_of(model):
    """The model's :class:`HeliosWeights`, built on first use from ``model.transformer`` (seconds for
    the built-in model: no weight is copied) and kept on the model."""
    from .lora import LoraStack

    from diffusers import HeliosTransformer3DModel

    held = getattr(model, "_cliploom_helios", None)
    if held is not None and held.source == id(model.transformer):
        return held
    if isinstance(model.transformer, HeliosTransformer3DModel):  # a Helios folder: its DiT is the route's own
        helios = model.transformer
    else:
        helios = build_helios(model.transformer, model.z_dim)
    proxy = SimpleNamespace(pipe=SimpleNamespace(transformer=helios, transformer_2=None), path=model.path)
    held = HeliosWeights(helios, LoraStack(proxy, fuse=False), id(model.transformer))
    model._cliploom_helios = held
    return held


def apply_loras(model, specs) -> object:
    """Put ``specs`` (``LoraSpec`` list: the route's LoRA and the story's) on the model's Helios
    transformer as unfused peft adapters; returns its stack. A full delta of a tensor shared with the
    DiT is refused (it would change the DiT's weights for every other route)."""
    held = helios_of(model)
    held.loras.apply(specs, fuse=False)
    own = {id(p) for name, p in held.transformer.named_parameters() if name.split(".")[0] in OWN}
    for applied in held.loras.applied:
        if any(id(d.param) not in own for d in applied.deltas):
            held.loras.clear()
            raise CliploomError(f"LoRA {applied.spec.path} changes weights the Helios transformer shares with the DiT "
                                "(full deltas beside its patch layers)", "use a LoRA of lora_A/lora_B pairs "
                                "(deltas only on patch_short / patch_mid / patch_long)")
    return held.loras


def drop_loras(model) -> None:
    """Take the Helios stack off (before another route runs on the DiT it shares weights with)."""
    held = getattr(model, "_cliploom_helios", None)
    if held is not None and held.loras.applied:
        held.loras.clear()
