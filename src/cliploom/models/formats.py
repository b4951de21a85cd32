"""Key layouts of Wan checkpoints and LoRA files: reading, detection, normalisation.

Everything a user may bring is turned into diffusers names here, once, at load time:

* base DiT checkpoints: diffusers (``blocks.0.attn1.to_q.weight``), original Wan
  (``blocks.0.self_attn.q.weight``, ``head.modulation``, ``img_emb.proj.1.weight``) and ComfyUI
  (the same under ``model.diffusion_model.``), single or sharded, fp32/fp16/bf16/fp8-e4m3
  (ComfyUI's per-tensor ``scale_weight``/``weight_scale`` included), upcast on load;
* original Wan VAE files (Wan 2.1 ``Wan2.1_VAE`` and Wan 2.2 ``Wan2.2_VAE`` key names);
* LoRA files in the layouts listed in :data:`LORA_LAYOUTS` (see ``docs/formats.md``).

Renaming of original DiT keys is diffusers' own (``convert_wan_transformer_to_diffusers``), for
base checkpoints and LoRAs alike, so the two can never disagree on a name. VAE keys are renamed
from the stage sizes the keys show (any ``num_res_blocks``); for the real Wan 2.1 VAE this agrees
key for key with diffusers' ``convert_wan_vae_to_diffusers`` (tests/test_formats.py).
Only safetensors files are read; pickles (``.pth``, ``.ckpt``, ``.bin``) are refused, never
unpickled.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CliploomError

# -- reading files -------------------------------------------------------------------------------

CONVERT_HINT = (
    "convert it to safetensors on a trusted machine, e.g. `python -c \"import torch, safetensors.torch as s; "
    "s.save_file({k: v.contiguous() for k, v in torch.load('IN', weights_only=True).items()}, 'OUT.safetensors')\"`"
)

FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))

_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool",
}


def sniff(path: Path) -> str:
    """What kind of file this is from its first bytes: safetensors, pickle, zip (torch), gguf or unknown."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 2 <= n < (1 << 32):
            return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "zip"  # torch.save's default format: a zip of pickles
    if head[:1] == b"\x80":
        return "pickle"
    if head[:4] == b"GGUF":
        return "gguf"
    return "unknown"


def check_safetensors(path: str | Path, what: str = "weight file") -> Path:
    """Return ``path`` if it is a regular file in safetensors format, else raise a one-line error."""
    from ..inputs import check_regular

    path = check_regular(Path(path).expanduser(), what, "pass a .safetensors file")
    try:
        kind = sniff(path)
    except OSError as e:
        raise CliploomError(f"cannot read {what} {path}: {e.strerror or e}", "check the file") from None
    if kind == "safetensors":
        return path
    if kind in ("zip", "pickle"):
        raise CliploomError(
            f"{what} {path} is a PyTorch pickle, which cliploom never loads (unpickling can run code)",
            CONVERT_HINT,
        )
    if kind == "gguf":
        raise CliploomError(f"{what} {path} is a GGUF file: cliploom reads GGUF only as a DiT",
                            "pass it (or its folder) as --model with --family; other parts need .safetensors")
    raise CliploomError(f"{what} {path} is not a safetensors file", "pass a .safetensors file")


@dataclass
class Header:
    """A safetensors file's table of contents, read without loading any tensor."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    metadata: dict[str, str]
    size: int

    @property
    def keys(self) -> list[str]:
        return list(self.shapes)


def read_header(path: str | Path, what: str = "weight file") -> Header:
    """The table of contents, through safetensors' own reader: it checks the header against the
    file (JSON, dtypes, shapes, offsets, sizes) before anything is trusted."""
    from safetensors import safe_open

    path = check_safetensors(path, what)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            shapes, dtypes = {}, {}
            for key in f.keys():
                part = f.get_slice(key)
                shapes[key] = tuple(part.get_shape())
                dtypes[key] = _ST_DTYPES.get(part.get_dtype(), part.get_dtype())
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CliploomError(f"{what} {path} is damaged: {first}", "download or convert it again") from None
    return Header(path, shapes, dtypes, metadata, path.stat().st_size)


def estimate_dit_params(config: dict) -> int:
    """A lower bound on the parameters of a WanTransformer3DModel ``config`` describes (the
    attention and feed-forward matrices of its blocks), without building it."""
    d = int(config.get("num_attention_heads", 0) or 0) * int(config.get("attention_head_dim", 0) or 0)
    ffn = int(config.get("ffn_dim", 0) or 0)
    return int(config.get("num_layers", 0) or 0) * (8 * d * d + 2 * d * ffn)


def stored_elements(paths) -> int:
    """Elements stored in safetensors files, from their headers."""
    total = 0
    for path in paths:
        for shape in read_header(path).shapes.values():
            n = 1
            for dim in shape:
                n *= dim
            total += n
    return total


FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")
MAX_BLOCKS = 1000  # a Wan DiT has 30 or 40; names beyond this are not a Wan model's


def load_tensors(path: str | Path, what: str = "weight file", keys=None) -> dict[str, torch.Tensor]:
    """All (or the named) tensors of one safetensors file, on the CPU, in their stored dtype."""
    from safetensors import safe_open

    path = check_safetensors(path, what)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = list(f.keys()) if keys is None else list(keys)
            return {k: f.get_tensor(k) for k in names}
    except Exception as e:  # noqa: BLE001 - a damaged file becomes one clear line
        raise CliploomError(f"cannot read {what} {path}: {str(e).splitlines()[0]}", "download or convert it again") from None


_FINITE_CHUNK = 1 << 22  # elements per step of the NaN/Inf scan


def _nonfinite(t: torch.Tensor) -> int:
    """How many NaN/Inf values ``t`` holds (0 stops early). Scanned in 4M-element chunks, so a 14B
    checkpoint is checked with a few MB of scratch that malloc reuses: whole-tensor temporaries
    (a float copy of every fp8 weight) leave glibc's heap gigabytes larger after the load."""
    flat, bad = t.reshape(-1), 0
    # fp8 by its bits, with two max-reductions (no float copy, no elementwise pass): the NaN (and,
    # for e5m2, Inf) bytes are the top of the positive range as int8 and of the negative range as uint8
    special = {torch.float8_e4m3fn: (0x7F, 0xFF), torch.float8_e5m2: (0x7C, 0xFC)}.get(t.dtype)
    for i in range(0, flat.numel(), _FINITE_CHUNK):
        c = flat[i:i + _FINITE_CHUNK]
        if special is not None:
            if int(c.view(torch.int8).max()) >= special[0] or int(c.view(torch.uint8).max()) >= special[1]:
                bad += int((~torch.isfinite(c.float())).sum())
        elif c.dtype in FP8_DTYPES:
            bad += int((~torch.isfinite(c.float())).sum())
        elif not bool(torch.isfinite(c).all()):
            bad += int((~torch.isfinite(c)).sum())
    return bad


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """NaN or Inf in any floating tensor is an error naming the first bad key."""
    for key, t in tensors.items():
        if t.is_floating_point() and t.numel():
            n = _nonfinite(t)
            if n:
                raise CliploomError(
                    f"{where}: {key} holds {n} NaN/Inf value{'s' if n > 1 else ''}",
                    "the file is corrupt or was saved from a diverged run: use another file",
                )


# -- Wan module names: original <-> diffusers ----------------------------------------------------

# Parameters of one original Wan DiT block and of the model's top level (Wan 2.1 / 2.2 code).
_BLOCK_PARAMS = [
    *(f"self_attn.{m}.{p}" for m in "qkvo" for p in ("weight", "bias")),
    "self_attn.norm_q.weight", "self_attn.norm_k.weight",
    *(f"cross_attn.{m}.{p}" for m in ("q", "k", "v", "o", "k_img", "v_img") for p in ("weight", "bias")),
    "cross_attn.norm_q.weight", "cross_attn.norm_k.weight", "cross_attn.norm_k_img.weight",
    "norm3.weight", "norm3.bias",
    "ffn.0.weight", "ffn.0.bias", "ffn.2.weight", "ffn.2.bias",
    "modulation",
]
_TOP_PARAMS = [
    "patch_embedding.weight", "patch_embedding.bias",
    *(f"{m}.{i}.{p}" for m in ("text_embedding", "time_embedding") for i in (0, 2) for p in ("weight", "bias")),
    "time_projection.1.weight", "time_projection.1.bias",
    "head.head.weight", "head.head.bias", "head.modulation",
    *(f"img_emb.proj.{i}.{p}" for i in (0, 1, 3, 4) for p in ("weight", "bias")),
    "img_emb.emb_pos",  # FLF2V: position embedding of the two images' CLIP tokens
]
# Original names diffusers' single-file converter leaves as they are (FLF2V's is not in it).
_EXTRA_RENAMES = {"img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed"}


def _module_of(param: str) -> str:
    return param.rsplit(".", 1)[0] if param.endswith((".weight", ".bias")) else param


# Original module names (for kohya's underscore names and for reports).
_BLOCK_MODULES = sorted({_module_of(p) for p in _BLOCK_PARAMS})
_TOP_MODULES = sorted({_module_of(p) for p in _TOP_PARAMS})


def original_param_names(num_blocks: int) -> list[str]:
    return [f"blocks.{i}.{p}" for i in range(num_blocks) for p in _BLOCK_PARAMS] + list(_TOP_PARAMS)


def rename_original(keys) -> dict[str, str]:
    """``{original key: diffusers key}`` by diffusers' own Wan checkpoint converter."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    keys = list(keys)
    renamed = convert_wan_transformer_to_diffusers({k: i for i, k in enumerate(keys)})
    out = {keys[i]: _EXTRA_RENAMES.get(keys[i], new) for new, i in renamed.items()}
    if len(out) != len(keys):  # two originals onto one name would silently lose weights
        raise CliploomError("original Wan keys collide after renaming", "report this file to the cliploom developers")
    return out


_TABLES: dict[int, tuple[dict[str, str], dict[str, str]]] = {}


def name_tables(num_blocks: int) -> tuple[dict[str, str], dict[str, str]]:
    """(original -> diffusers, diffusers -> original) parameter names for a ``num_blocks`` DiT."""
    if num_blocks not in _TABLES:
        forward = rename_original(original_param_names(num_blocks))
        _TABLES[num_blocks] = (forward, {v: k for k, v in forward.items()})
    return _TABLES[num_blocks]


def _num_blocks(names) -> int:
    found = [int(m.group(1)) for n in names if (m := re.match(r"blocks\.(\d+)\.", n))]
    return max(found) + 1 if found else 0


def original_module_to_diffusers(module: str, num_blocks: int) -> tuple[str, str] | None:
    """Original module (``blocks.3.self_attn.q``) -> (diffusers module, kind) where kind is
    ``module`` (has .weight) or ``param`` (a bare parameter such as ``blocks.3.modulation``)."""
    forward, _ = name_tables(num_blocks)
    if f"{module}.weight" in forward:
        return forward[f"{module}.weight"][: -len(".weight")], "module"
    if module in forward:
        return forward[module], "param"
    return None


def diffusers_module_to_original(module: str, num_blocks: int) -> str:
    _, backward = name_tables(num_blocks)
    if f"{module}.weight" in backward:
        return backward[f"{module}.weight"][: -len(".weight")]
    return backward.get(module, module)


# -- what a file is ------------------------------------------------------------------------------

LORA_SUFFIXES = (
    ".lora_A.default.weight", ".lora_B.default.weight", ".lora_A.weight", ".lora_B.weight", ".lora_B.bias",
    ".lora_down.weight", ".lora_up.weight", ".alpha", ".diff", ".diff_b", ".diff_m",
)
_UNSUPPORTED_ADAPTERS = {
    "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "lora_mid": "LoCon (LyCORIS)", "hada_w1": "LoHa (LyCORIS)",
    "lokr_w1": "LoKr (LyCORIS)", "oft_": "OFT", "boft_": "BOFT",
}

LORA_LAYOUTS = {
    "svi1": "SVI 1.0 (DiffSynth: pipe.dit.<wan name>.lora_A.default.weight)",
    "svi2": "SVI 2.0 / 2.0 Pro (bare <wan name>.lora_A[.default].weight)",
    "diffusers": "diffusers / peft (transformer.<diffusers name>.lora_A.weight)",
    "comfy": "ComfyUI / LightX2V / Kijai (diffusion_model.<wan name>.lora_down.weight, .alpha, .diff, .diff_b)",
    "kohya": "kohya / musubi (lora_unet_<wan_name>.lora_down.weight, .alpha)",
}


def is_lora_keys(keys) -> bool:
    return any(k.endswith(LORA_SUFFIXES) for k in keys)


def detect_lora_layout(keys) -> str:
    keys = list(keys)
    if any(k.startswith("pipe.dit.") for k in keys):
        return "svi1"
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(k.startswith(("diffusion_model.", "model.diffusion_model.")) for k in keys):
        return "comfy"
    bare = [k.removeprefix("transformer.").removeprefix("base_model.model.") for k in keys]
    if any(re.match(r"blocks\.\d+\.(attn1|attn2|ffn\.net)\.", k) or k.startswith(("condition_embedder.", "proj_out."))
           for k in bare):
        return "diffusers"
    if any(k.startswith(("transformer.", "base_model.model.")) for k in keys):
        return "diffusers"
    return "svi2"


_DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_VAE_PREFIXES = ("first_stage_model.", "vae.")


def _strip_keys(keys, prefixes) -> tuple[str | None, set[str]]:
    keys = list(keys)
    for p in prefixes:
        if any(k.startswith(p) for k in keys):
            return p, {k[len(p):] for k in keys if k.startswith(p)}
    return None, set(keys)


def detect_dit_layout(keys) -> str | None:
    """Layout of a base DiT checkpoint (or of the union of its shards' keys): ``diffusers``,
    ``wan`` (original), ``comfy`` (original names under ``model.diffusion_model.``) or None."""
    prefix, bare = _strip_keys(keys, _DIT_PREFIXES)
    wan = "head.modulation" in bare or any(re.match(r"blocks\.\d+\.(self_attn|cross_attn|ffn)\.", k) for k in bare)
    if wan:
        return "comfy" if prefix else "wan"
    if prefix is None and any(re.match(r"blocks\.\d+\.(attn1|attn2|ffn\.net)\.", k) for k in bare):
        return "diffusers"
    return None


def detect_vae_layout(keys) -> str | None:
    _, keys = _strip_keys(keys, _VAE_PREFIXES)
    if "decoder.middle.0.residual.0.gamma" in keys:
        nested = any(re.match(r"decoder\.upsamples\.\d+\.upsamples\.", k) for k in keys)
        return "wan22" if nested else "wan21"
    if "decoder.mid_block.resnets.0.norm1.gamma" in keys:
        return "diffusers"
    return None


def classify(header: Header) -> dict:
    """What one safetensors file holds: ``{kind, layout}`` with kind in lora, dit, vae,
    text_encoder, image_encoder, empty, unknown."""
    keys = header.keys
    if not keys:
        return {"kind": "empty", "layout": None}
    if is_lora_keys(keys):
        return {"kind": "lora", "layout": detect_lora_layout(keys)}
    dit = detect_dit_layout(keys)
    if dit:
        return {"kind": "dit", "layout": dit}
    vae = detect_vae_layout(keys)
    if vae:
        return {"kind": "vae", "layout": vae}
    if any(k.startswith("encoder.block.0.layer.0.SelfAttention.") for k in keys) or "shared.weight" in keys:
        return {"kind": "text_encoder", "layout": "transformers"}
    if any(k.startswith(("blocks.0.attn.q.", "token_embedding.")) for k in keys):
        return {"kind": "text_encoder", "layout": "wan"}
    if any(k.startswith("vision_model.embeddings.") for k in keys):
        return {"kind": "image_encoder", "layout": "transformers"}
    if any(k.startswith("visual.") for k in keys):
        return {"kind": "image_encoder", "layout": "open_clip"}
    return {"kind": "unknown", "layout": None}


def expert_from_name(path: str | Path) -> str | None:
    """``high`` / ``low`` when a file or folder name says which Wan 2.2 A14B expert it is for
    (``high_noise_model/``, ``..._HIGH_lora...``, ``wan2.2_i2v_low_noise_14B...``), else None."""
    found = set()
    for part in Path(path).parts[-2:]:
        name = part.lower()
        for expert in ("high", "low"):
            if re.search(rf"(^|[^a-z]){expert}([^a-z]|$)", name) or f"{expert}noise" in name.replace("_", "").replace("-", ""):
                found.add(expert)
    return found.pop() if len(found) == 1 else None


def dit_signature(shapes: dict[str, tuple[int, ...]]) -> dict:
    """The architecture numbers a DiT's weight shapes pin down (diffusers names in ``shapes``)."""
    def dim(key, axis):
        shape = shapes.get(key)
        return int(shape[axis]) if shape is not None and len(shape) > axis else None

    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    return {
        "num_layers": max(blocks) + 1 if blocks else None,
        "dim": dim("patch_embedding.weight", 0) or dim("blocks.0.attn1.to_q.weight", 0),
        "in_channels": dim("patch_embedding.weight", 1),
        "ffn_dim": dim("blocks.0.ffn.net.0.proj.weight", 0),
        "text_dim": dim("condition_embedder.text_embedder.linear_1.weight", 1),
        "freq_dim": dim("condition_embedder.time_embedder.linear_1.weight", 1),
        "image_dim": dim("condition_embedder.image_embedder.norm1.weight", 0),
        "has_image": any(k.startswith("condition_embedder.image_embedder.") for k in shapes)
        or any(".attn2.add_k_proj." in k for k in shapes),
        "first_last_frame": "condition_embedder.image_embedder.pos_embed" in shapes,
    }


def config_signature(config: dict) -> dict:
    """The same numbers from a ``WanTransformer3DModel`` config."""
    return {
        "num_layers": config["num_layers"],
        "dim": config["num_attention_heads"] * config["attention_head_dim"],
        "in_channels": config["in_channels"],
        "ffn_dim": config["ffn_dim"],
        "text_dim": config["text_dim"],
        "freq_dim": config["freq_dim"],
        "image_dim": config.get("image_dim"),
        "has_image": config.get("image_dim") is not None,
        "first_last_frame": config.get("pos_embed_seq_len") is not None,
    }


def signature_mismatches(found: dict, expected: dict) -> list[str]:
    """``["num_layers 30 (expected 40)", ...]``; numbers a shard does not show are skipped."""
    out = []
    for key, want in expected.items():
        have = found.get(key)
        if key == "has_image":
            if found.get("num_layers") is not None and have != want:
                out.append("image cross-attention " + ("present" if have else "absent")
                           + f" (expected {'present' if want else 'absent'})")
        elif key == "first_last_frame":  # judged where the image embedder is (its shard)
            if found.get("image_dim") is not None and have != want:
                out.append("first-last-frame image position embedding " + ("present" if have else "absent")
                           + f" (expected {'present' if want else 'absent'})")
        elif have is not None and want is not None and have != want:
            out.append(f"{key} {have} (expected {want})")
    return out


# -- base checkpoints ----------------------------------------------------------------------------

_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_DROP_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
_DROP_KEYS = ("scaled_fp8",)


def _scale_key(key: str) -> str | None:
    """``a.weight`` for ``a.scale_weight`` / ``a.weight_scale``, else None."""
    for suffix in _SCALE_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)] + ".weight"
    return None


def _is_marker(key: str) -> bool:
    return key in _DROP_KEYS or key.endswith(_DROP_SUFFIXES)


def dequantize_one(key: str, t: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype, where: str) -> torch.Tensor:
    """One stored tensor -> ``dtype``: fp8 times its per-tensor (or per-row) scale, computed in float32."""
    if scale is not None:
        s = scale.float()
        if s.numel() != 1 and s.shape not in ((t.shape[0], 1), (t.shape[0],)):
            raise CliploomError(
                f"{where}: {key} uses a block-wise quantisation scale {tuple(s.shape)}",
                "use an fp8 file with per-tensor scales, or a bf16/fp16 file",
            )
        s = s.reshape(-1, *([1] * (t.dim() - 1))) if s.numel() > 1 else s.reshape(())
        return (t.float() * s).to(dtype)
    return t.to(dtype) if t.is_floating_point() else t


def dequantize(
    tensors: dict[str, torch.Tensor], dtype: torch.dtype, where: str, keep_fp32=None
) -> dict[str, torch.Tensor]:
    """Upcast/downcast every floating tensor to ``dtype`` (``float32`` where ``keep_fp32(key)``);
    fp8 weights with a ComfyUI per-tensor scale (``<m>.scale_weight`` or ``<m>.weight_scale``) are
    multiplied by it in float32 first. Quantisation markers (``scaled_fp8``) are dropped."""
    scales = {w: t for k, t in tensors.items() if (w := _scale_key(k))}
    out = {}
    for k, t in tensors.items():
        if _is_marker(k) or _scale_key(k):
            continue
        out[k] = dequantize_one(k, t, scales.pop(k, None), torch.float32 if keep_fp32 and keep_fp32(k) else dtype, where)
    if scales:
        raise CliploomError(f"{where}: scales without weights: {sorted(scales)[:3]}", "the file is incomplete")
    return out


def stream_dit_raw(path: str | Path, layout: str):
    """Yield ``(diffusers name, tensor as stored, its ComfyUI scale or None, key in the file)`` for every weight of
    one DiT file, one tensor at a time. Keys outside the DiT prefix of a ComfyUI file (a bundled VAE
    or encoders, markers) are skipped."""
    from safetensors import safe_open

    header = read_header(path, "DiT checkpoint")
    where = f"DiT checkpoint {header.path}"
    keys = [k for k in header.keys if not _is_marker(k)]
    prefix = ""
    if layout != "diffusers":
        prefix = next((p for p in _DIT_PREFIXES if any(k.startswith(p) for k in keys)), "")
        keys = [k for k in keys if k.startswith(prefix)]
    scale_of = {w: k for k in keys if (w := _scale_key(k))}
    weights = [k for k in keys if not _scale_key(k)]
    missing = sorted(set(scale_of) - set(weights))
    if missing:
        raise CliploomError(f"{where}: scales without weights: {missing[:3]}", "the file is incomplete")
    bare = {k: k[len(prefix):] for k in weights}
    names = rename_original(bare.values()) if layout != "diffusers" else {b: b for b in bare.values()}
    try:
        handle = safe_open(str(header.path), framework="pt", device="cpu")
    except Exception as e:  # noqa: BLE001
        raise CliploomError(f"cannot read {where}: {str(e).splitlines()[0]}", "download or convert it again") from None
    with handle as f:
        for k in weights:
            yield names[bare[k]], f.get_tensor(k), f.get_tensor(scale_of[k]) if k in scale_of else None, k


def stream_dit(path: str | Path, layout: str, dtype: torch.dtype, keep_fp32=None, device="cpu"):
    """Yield ``(diffusers name, tensor)`` for every weight of one DiT file, one tensor at a time:
    renamed, dequantised to ``dtype`` (float32 where ``keep_fp32(name)``), moved to ``device`` and
    checked for NaN/Inf there. Host memory holds one tensor, not the file."""
    where = f"DiT checkpoint {path}"
    for name, raw, scale, key in stream_dit_raw(path, layout):
        target = torch.float32 if keep_fp32 and keep_fp32(name) else dtype
        t = dequantize_one(key, raw, scale, target, where).to(device)
        check_finite({key: t}, where)
        yield name, t


def strip_prefix(tensors: dict, prefixes=_DIT_PREFIXES) -> dict:
    """Keys under the first of ``prefixes`` that any key carries, without it; keys outside it
    (other models bundled in the same file, quantisation markers) are left out."""
    for p in prefixes:
        if any(k.startswith(p) for k in tensors):
            return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}
    return tensors


# Original Wan VAE -> diffusers. Both generations share the middle, head and quant convs; they
# differ in how the stages are stored:
# * Wan 2.1 (``vae2_1``): flat lists ``encoder.downsamples.{k}`` / ``decoder.upsamples.{k}``
#   (per decoder stage: num_res_blocks + 1 residual blocks, then a resample);
# * Wan 2.2 (``vae2_2``): nested ``encoder.downsamples.{stage}.downsamples.{j}`` and
#   ``decoder.upsamples.{stage}.upsamples.{j}`` (residual blocks, then a resample).
# The stage sizes are read from the keys themselves, so tiny test VAEs and real ones (and any
# num_res_blocks) take the same path. For the real Wan 2.1 VAE this agrees with diffusers'
# ``convert_wan_vae_to_diffusers`` (tests/test_formats.py checks it key by key).
_RESIDUAL = {"residual.0.gamma": "norm1.gamma", "residual.2.weight": "conv1.weight", "residual.2.bias": "conv1.bias",
             "residual.3.gamma": "norm2.gamma", "residual.6.weight": "conv2.weight", "residual.6.bias": "conv2.bias",
             "shortcut.weight": "conv_shortcut.weight", "shortcut.bias": "conv_shortcut.bias"}
_VAE_FIXED = {"encoder.conv1.weight": "encoder.conv_in.weight", "encoder.conv1.bias": "encoder.conv_in.bias",
              "decoder.conv1.weight": "decoder.conv_in.weight", "decoder.conv1.bias": "decoder.conv_in.bias",
              "encoder.head.0.gamma": "encoder.norm_out.gamma", "encoder.head.2.weight": "encoder.conv_out.weight",
              "encoder.head.2.bias": "encoder.conv_out.bias", "decoder.head.0.gamma": "decoder.norm_out.gamma",
              "decoder.head.2.weight": "decoder.conv_out.weight", "decoder.head.2.bias": "decoder.conv_out.bias",
              "conv1.weight": "quant_conv.weight", "conv1.bias": "quant_conv.bias",
              "conv2.weight": "post_quant_conv.weight", "conv2.bias": "post_quant_conv.bias"}
_SAMPLER = ("resample.", "time_conv.")


def _residual(rest: str) -> str:
    return _RESIDUAL.get(rest, rest)


def _vae_common_key(key: str) -> str | None:
    if key in _VAE_FIXED:
        return _VAE_FIXED[key]
    m = re.match(r"(encoder|decoder)\.middle\.(\d)\.(.+)$", key)
    if m:
        side, i, rest = m.groups()
        if i == "1":
            return f"{side}.mid_block.attentions.0.{rest}"
        return f"{side}.mid_block.resnets.{int(i) // 2}.{_residual(rest)}"
    return None


def vae21_to_diffusers_names(keys) -> dict[str, str]:
    """``{original Wan 2.1 VAE key: AutoencoderKLWan key}``."""
    keys = list(keys)
    # decoder.upsamples: stages of (num_res_blocks + 1) residual blocks and one resample; the
    # first resample's index is therefore the number of residual blocks per stage.
    samplers = sorted({int(m.group(1)) for k in keys
                       if (m := re.match(r"decoder\.upsamples\.(\d+)\.(resample|time_conv)\.", k))})
    per_stage = (samplers[0] + 1) if samplers else None
    out = {}
    for key in keys:
        new = _vae_common_key(key)
        if new is None and (m := re.match(r"encoder\.downsamples\.(\d+)\.(.+)$", key)):
            new = f"encoder.down_blocks.{m.group(1)}.{_residual(m.group(2))}"
        elif new is None and (m := re.match(r"decoder\.upsamples\.(\d+)\.(.+)$", key)):
            k, rest = int(m.group(1)), m.group(2)
            if per_stage is None:  # a single stage without upsampling
                new = f"decoder.up_blocks.0.resnets.{k}.{_residual(rest)}"
            else:
                stage, j = divmod(k, per_stage)
                if rest.startswith(_SAMPLER):
                    new = f"decoder.up_blocks.{stage}.upsamplers.0.{rest}"
                else:
                    new = f"decoder.up_blocks.{stage}.resnets.{j}.{_residual(rest)}"
        out[key] = new if new is not None else key
    return out


def vae22_to_diffusers_names(keys) -> dict[str, str]:
    """``{original Wan 2.2 VAE key: AutoencoderKLWan (is_residual) key}``."""
    out = {}
    for key in keys:
        new = _vae_common_key(key)
        m = re.match(r"(encoder|decoder)\.(downsamples|upsamples)\.(\d+)\.(downsamples|upsamples)\.(\d+)\.(.+)$", key)
        if new is None and m:
            side, _, stage, _, j, rest = m.groups()
            blocks = "down_blocks" if side == "encoder" else "up_blocks"
            if rest.startswith(_SAMPLER):
                sampler = "downsampler" if side == "encoder" else "upsampler"
                new = f"{side}.{blocks}.{stage}.{sampler}.{rest}"
            else:
                new = f"{side}.{blocks}.{stage}.resnets.{j}.{_residual(rest)}"
        out[key] = new if new is not None else key
    return out


def vae_to_diffusers(tensors: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    tensors = strip_prefix(tensors, _VAE_PREFIXES)
    if layout == "diffusers":
        return dict(tensors)
    if layout == "wan21":
        names = vae21_to_diffusers_names(tensors)
    elif layout == "wan22":
        names = vae22_to_diffusers_names(tensors)
    else:
        raise CliploomError(f"unknown VAE layout {layout!r}", "pass a Wan 2.1 or Wan 2.2 VAE file")
    if len(set(names.values())) != len(names):
        raise CliploomError("VAE keys collide after renaming", "report this file to the cliploom developers")
    return {names[k]: v for k, v in tensors.items()}


# -- LoRA files ----------------------------------------------------------------------------------


@dataclass
class LoraModule:
    """What a LoRA file does to one module (or bare parameter) of the DiT, in diffusers names."""

    target: str  # diffusers module (``blocks.0.attn1.to_q``) or bare parameter (``scale_shift_table``)
    source: str  # the name as written in the file, for messages
    down: torch.Tensor | None = None  # A: [rank, in] (or a conv kernel)
    up: torch.Tensor | None = None  # B: [out, rank]
    alpha: float | None = None
    diff: torch.Tensor | None = None  # full weight delta (or the parameter's delta)
    diff_b: torch.Tensor | None = None  # bias delta (ComfyUI ``.diff_b``: not scaled by alpha)
    bias: torch.Tensor | None = None  # peft ``lora_B.bias`` (lora_bias=True): scaled like B @ A
    is_param: bool = False
    rslora: bool = False  # peft use_rslora: scale alpha / sqrt(rank)
    keys: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int | None:
        return None if self.down is None else int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """alpha / rank where the file stores alpha, else 1 (W += scale * B @ A)."""
        if self.alpha is None or self.rank is None:
            return 1.0
        return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)

    def bias_delta(self) -> torch.Tensor | None:
        """What this module adds to the bias at weight 1: ``diff_b + scale * lora_B.bias``."""
        parts = [t.float() for t in (self.diff_b,) if t is not None]
        if self.bias is not None:
            parts.append(self.bias.float() * self.scale)
        return sum(parts[1:], parts[0]) if parts else None


@dataclass
class LoraFile:
    """A LoRA file normalised to diffusers names; nothing applied yet."""

    path: Path
    layout: str
    modules: dict[str, LoraModule]
    ignored: dict[str, str]  # key in the file -> why it is not applied
    metadata: dict[str, str]
    num_blocks: int
    dtypes: list[str]

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values() if m.rank is not None})

    @property
    def alphas(self) -> list[float]:
        return sorted({m.alpha for m in self.modules.values() if m.alpha is not None})

    def pairs(self) -> dict[str, LoraModule]:
        return {k: m for k, m in self.modules.items() if m.down is not None}

    def deltas(self) -> dict[str, LoraModule]:
        return {k: m for k, m in self.modules.items() if m.diff is not None or m.bias_delta() is not None}

    def peft_state_dict(self, names=None) -> dict[str, torch.Tensor]:
        """Pairs (all, or those in ``names``) as a peft state dict, float32, with the alpha/rank scale
        folded into A so that peft's own scale is 1 (diffusers sets lora_alpha = r without alphas)."""
        sd = {}
        for name, m in self.pairs().items():
            if names is not None and name not in names:
                continue
            sd[f"{name}.lora_A.weight"] = m.down.float() * m.scale
            sd[f"{name}.lora_B.weight"] = m.up.float()
        return sd


_KOHYA_MODULES = {m.replace(".", "_"): m for m in _TOP_MODULES}
_KOHYA_BLOCK = {m.replace(".", "_"): m for m in _BLOCK_MODULES}


def _kohya_module(name: str) -> str | None:
    m = re.match(r"blocks_(\d+)_(.+)$", name)
    if m:
        inner = _KOHYA_BLOCK.get(m.group(2))
        return f"blocks.{m.group(1)}.{inner}" if inner else None
    return _KOHYA_MODULES.get(name)


def _split_lora_key(key: str) -> tuple[str, str] | None:
    """``blocks.0.self_attn.q.lora_down.weight`` -> (``blocks.0.self_attn.q``, ``down``).

    ``blocks.0.diff_m`` (Kijai / LightX2V) is the delta of the block's ``modulation`` parameter."""
    if key.endswith(".diff_m"):
        return key[: -len(".diff_m")] + ".modulation", "diff"
    for suffix, kind in (
        (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"), (".lora_A.weight", "down"),
        (".lora_B.weight", "up"), (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_B.bias", "bias"),
        (".alpha", "alpha"), (".diff_b", "diff_b"), (".diff", "diff"),
    ):
        if key.endswith(suffix):
            return key[: -len(suffix)], kind
    return None


def _peft_config(path: Path, metadata: dict) -> dict:
    """The LoraConfig of a diffusers/peft file: diffusers' ``lora_adapter_metadata`` in the
    safetensors metadata, or peft's ``adapter_config.json`` beside ``adapter_model.safetensors``."""
    raw = metadata.get("lora_adapter_metadata")
    sibling = path.with_name("adapter_config.json")
    if not raw and sibling.is_file():
        raw = sibling.read_text()
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        raise CliploomError(f"LoRA {path}: its adapter config is not valid JSON", "the file is damaged") from None
    if not isinstance(meta, dict):
        return {}
    if "transformer.lora_alpha" in meta or "transformer.r" in meta:
        meta = {k.removeprefix("transformer."): v for k, v in meta.items() if k.startswith("transformer.")}
    return meta


def _pattern_value(name: str, patterns: dict, default):
    """peft's pattern rule: a key matches a module whose name is the key or ends with ``.key``
    (a leading ``^`` anchors the key at the start)."""
    for pattern, value in (patterns or {}).items():
        try:
            if pattern.startswith("^"):
                if re.fullmatch(pattern[1:], name):
                    return value
            elif re.fullmatch(rf"(.*\.)?{re.escape(pattern)}", name) or re.fullmatch(rf"(.*\.)?{pattern}", name):
                return value
        except re.error:  # not a regular expression: only the literal reading counts
            continue
    return default


def read_lora(path: str | Path) -> LoraFile:
    """Read a LoRA file in any supported layout and normalise it to diffusers names.

    Raises on pickles, DoRA/LyCORIS files, half pairs, NaN/Inf. Keys that are not LoRA weights of
    the DiT (e.g. SVI-Dance's ``dwpose_embedding.*``) are listed in ``ignored``.
    """
    header = read_header(path, "LoRA")
    path = header.path
    if not header.keys:
        raise CliploomError(f"LoRA {path} is empty", "use another file")
    for key in header.keys:
        for marker, what in _UNSUPPORTED_ADAPTERS.items():
            if marker in key:
                raise CliploomError(f"LoRA {path} is a {what} adapter ({key})", "use a plain LoRA file")
    if not is_lora_keys(header.keys):
        kind = classify(header)["kind"]
        raise CliploomError(
            f"{path} is not a LoRA (it holds {kind} weights, e.g. {header.keys[0]})",
            "pass a LoRA file to --lora; base checkpoints go to --model",
        )
    bad = next((k for k in header.keys if header.dtypes[k] not in FLOAT_DTYPES), None)
    if bad is not None:
        raise CliploomError(f"LoRA {path}: {bad} is {header.dtypes[bad]}; LoRA weights are floating point",
                            "the file is not a LoRA, or is damaged")
    blocks = [int(m.group(1)) for k in header.keys if (m := re.search(r"(?:^|[._])blocks[._](\d+)[._]", k))]
    if blocks and max(blocks) >= MAX_BLOCKS:
        raise CliploomError(f"LoRA {path} names block {max(blocks)}; a Wan DiT has at most {MAX_BLOCKS} blocks",
                            "the file is not a Wan LoRA, or is damaged")
    tensors = load_tensors(path, "LoRA")
    check_finite(tensors, f"LoRA {path}")
    layout = detect_lora_layout(tensors)
    ignored: dict[str, str] = {}

    # 1. Strip the layout's prefix; each key becomes (module name as written, kind).
    parsed: dict[str, tuple[str, str]] = {}
    for key in tensors:
        k = key
        if layout == "svi1":
            if not k.startswith("pipe.dit."):
                ignored[key] = "not a DiT weight (no pipe.dit. prefix)"
                continue
            k = k[len("pipe.dit."):]
        elif layout == "comfy":
            k = k.removeprefix("model.").removeprefix("diffusion_model.") if k.startswith(
                ("diffusion_model.", "model.diffusion_model.")) else None
            if k is None:
                ignored[key] = "not a DiT weight (no diffusion_model. prefix)"
                continue
        elif layout == "kohya":
            if not k.startswith("lora_unet_"):
                ignored[key] = "not a DiT weight (no lora_unet_ prefix)"
                continue
            name, _, rest = k[len("lora_unet_"):].partition(".")
            module = _kohya_module(name)
            if module is None:
                ignored[key] = "unknown module name"
                continue
            k = f"{module}.{rest}"
        elif layout == "diffusers":
            k = k.removeprefix("transformer.").removeprefix("base_model.model.")
        split = _split_lora_key(k)
        if split is None:
            ignored[key] = "full weights, not a LoRA: of a module the Wan DiT lacks"
            continue
        parsed[key] = split

    # 2. Map module names to diffusers names.
    num_blocks = _num_blocks(m for m, _ in parsed.values())
    modules: dict[str, LoraModule] = {}
    for key, (module, kind) in parsed.items():
        if layout == "diffusers":
            target, is_param = module, False
        else:
            mapped = original_module_to_diffusers(module, max(num_blocks, 1))
            if mapped is None:
                ignored[key] = f"unknown Wan module {module}"
                continue
            target, how = mapped
            is_param = how == "param"
        entry = modules.setdefault(target, LoraModule(target=target, source=module, is_param=is_param))
        entry.keys.append(key)
        t = tensors[key]
        if kind == "alpha":
            if t.numel() != 1:
                raise CliploomError(f"LoRA {path}: alpha {key} holds {t.numel()} values, not one", "the file is malformed")
            entry.alpha = float(t.float().reshape(-1)[0])
        elif kind in ("down", "up"):
            if getattr(entry, kind) is not None:
                raise CliploomError(f"LoRA {path}: two {kind} weights for {module}", "the file is malformed")
            setattr(entry, kind, t)
        elif kind == "bias":
            entry.bias = t
        elif kind == "diff_b":
            entry.diff_b = t
        else:
            entry.diff = t

    # 3. diffusers/peft files: alpha from the adapter config, where there is one (else scale 1).
    if layout == "diffusers":
        config = _peft_config(path, header.metadata)
        alpha, patterns = config.get("lora_alpha"), config.get("alpha_pattern") or {}
        if not isinstance(patterns, dict):
            raise CliploomError(f"LoRA {path}: alpha_pattern in its adapter config is not a mapping", "the file is damaged")
        for name, m in modules.items():
            if m.down is not None and m.alpha is None and alpha is not None:
                value = _pattern_value(name, patterns, alpha)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise CliploomError(f"LoRA {path}: lora_alpha {value!r} in its adapter config is not a finite number",
                                        "the file is damaged")
                m.alpha = float(value)
                m.rslora = bool(config.get("use_rslora", False))

    # 4. Every pair whole, alpha only beside a pair.
    for name, m in list(modules.items()):
        if (m.down is None) != (m.up is None):
            have = "down (A)" if m.down is not None else "up (B)"
            raise CliploomError(
                f"LoRA {path}: {m.source} has a {have} weight but not its partner", "the file is incomplete"
            )
        if m.down is not None:
            if min(m.down.shape, default=0) < 1 or min(m.up.shape, default=0) < 1:
                raise CliploomError(f"LoRA {path}: {m.source} has an empty weight (down {tuple(m.down.shape)}, "
                                    f"up {tuple(m.up.shape)})", "the file is malformed")
            if m.down.dim() < 2 or m.up.dim() < 2 or m.down.shape[0] != m.up.shape[1]:
                raise CliploomError(
                    f"LoRA {path}: {m.source} has down {tuple(m.down.shape)} and up {tuple(m.up.shape)}, whose ranks differ",
                    "the file is malformed",
                )
        elif m.bias is not None:
            raise CliploomError(f"LoRA {path}: {m.source} has lora_B.bias without a LoRA pair", "the file is malformed")
        elif m.alpha is not None and m.diff is None and m.diff_b is None:
            for k in m.keys:
                ignored[k] = "alpha without a LoRA pair"
            del modules[name]
    if not modules:
        raise CliploomError(
            f"LoRA {path} has no LoRA weights for a Wan DiT (layout {layout}; e.g. {header.keys[0]})",
            "check that it is a Wan LoRA",
        )
    dtypes = sorted({header.dtypes[k] for k in header.keys})
    return LoraFile(path, layout, modules, ignored, header.metadata, num_blocks, dtypes)


# -- reading names for people ---------------------------------------------------------------------


def summarise_modules(names) -> list[str]:
    """``blocks.{0..39}.self_attn.q`` style lines: which kinds of module, over which blocks."""
    per_kind: dict[str, set[int]] = {}
    top: list[str] = []
    for n in names:
        m = re.match(r"blocks\.(\d+)\.(.+)$", n)
        if m:
            per_kind.setdefault(m.group(2), set()).add(int(m.group(1)))
        else:
            top.append(n)
    lines = []
    for kind, blocks in sorted(per_kind.items()):
        b = sorted(blocks)
        span = f"{b[0]}..{b[-1]}" if b == list(range(b[0], b[-1] + 1)) and len(b) > 1 else ",".join(map(str, b))
        lines.append(f"blocks.{{{span}}}.{kind}")
    return lines + sorted(top)


def summarise_keys(keys) -> list[str]:
    """File keys as module names with block indices collapsed, for messages:
    ``pipe.dit.blocks.{0..39}.cross_attn.k_img``, ``dwpose_embedding.0``."""
    groups: dict[tuple[str, str], set[int]] = {}
    plain: list[str] = []
    for key in keys:
        split = _split_lora_key(key)
        name = split[0] if split else (key.rsplit(".", 1)[0] if key.endswith((".weight", ".bias")) else key)
        m = re.match(r"(.*?blocks[._])(\d+)([._].+)$", name)
        if m:
            groups.setdefault((m.group(1), m.group(3)), set()).add(int(m.group(2)))
        elif name not in plain:
            plain.append(name)
    out = []
    for (head, tail), blocks in sorted(groups.items(), key=lambda g: (g[0][1], g[0][0])):
        b = sorted(blocks)
        span = f"{b[0]}..{b[-1]}" if len(b) > 1 and b == list(range(b[0], b[-1] + 1)) else ",".join(map(str, b))
        out.append(f"{head}{{{span}}}{tail}" if len(b) > 1 else f"{head}{b[0]}{tail}")
    return out + plain


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return f"warning: {message}" if record.levelno >= logging.WARNING else message


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record arrives (not the one at set-up)."""

    @property
    def stream(self):
        import sys

        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def console_logging(level: int = logging.INFO) -> None:
    """Show the model loaders' reports (LoRAs applied, keys not applied, fp8 upcasts) on stderr,
    one plain line each; the CLI calls this once."""
    logger = logging.getLogger("cliploom")
    if not any(getattr(h, "_cliploom_console", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_ConsoleFormatter())
        handler._cliploom_console = True
        logger.addHandler(handler)
    logger.setLevel(level)
