"""Writing a trained LoRA in the layouts users load (safetensors only).

* ``svi``: the SVI 2.0 / 2.0 Pro release layout: bare original Wan module names with peft's
  ``default`` adapter name, ``blocks.0.self_attn.q.lora_A.default.weight``; no alpha (scale 1).
* ``diffusers``: diffusers / peft layout, ``transformer.blocks.0.attn1.to_q.lora_A.weight``.

Neither layout carries an alpha that every loader honours, so the scale ``alpha / rank`` is folded
into ``lora_B``: every loader then applies ``W += B @ A`` and gets the trained update.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import CliploomError

LAYOUTS = ("svi", "diffusers")
_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def _split(key: str) -> tuple[str, str]:
    for suffix in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    raise ValueError(f"{key} is not a LoRA tensor name")


def _num_blocks(state: dict[str, torch.Tensor]) -> int:
    import re

    found = [int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))]
    return max(found) + 1 if found else 0


def convert(state: dict[str, torch.Tensor], layout: str, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Trainer state (diffusers module names, unscaled) -> tensors of ``layout`` with ``scale`` folded into B."""
    if layout not in LAYOUTS:
        raise CliploomError(f"unknown LoRA layout {layout!r}", f"use one of {', '.join(LAYOUTS)}")
    from ..models.formats import diffusers_module_to_original

    blocks = _num_blocks(state)
    out = {}
    for key, value in state.items():
        module, suffix = _split(key)
        if suffix == ".lora_B.weight":
            value = value * scale
        if layout == "svi":
            name = diffusers_module_to_original(module, blocks)
            out[f"{name}{suffix.replace('.weight', '.default.weight')}"] = value
        else:
            out[f"transformer.{module}{suffix}"] = value
    return {k: v.contiguous() for k, v in out.items()}


def export_lora(
    state: dict[str, torch.Tensor],
    path: str | Path,
    layout: str,
    *,
    rank: int,
    alpha: float,
    dtype: torch.dtype = torch.float32,
    info: dict | None = None,
    route: str = "svi",
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``state`` (from :func:`~cliploom.train.adapter.lora_state`) to ``path`` in ``layout``;
    ``extra``: full deltas by diffusers name (``patch_mid.diff``, ``.diff_b``), diffusers layout only."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype) for k, v in convert(state, layout, alpha / rank).items()}
    if extra:
        if layout != "diffusers":
            raise CliploomError(f"the {layout} layout has no names for {sorted(extra)[0]} and the other deltas",
                                "export the diffusers layout")
        tensors.update({f"transformer.{k}": v.to(dtype).contiguous() for k, v in extra.items()})
    metadata = {
        "format": "pt",
        "cliploom_layout": layout,
        "rank": str(rank),
        "alpha": str(alpha),
        "scale_folded_into_lora_B": "true",
        "cliploom_info": json.dumps(info or {}, sort_keys=True),
        "cliploom_route": route,  # the route whose loop it was trained for (cliploom.routes)
    }
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata=metadata)
    _readable(tmp)
    tmp.replace(path)
    return path


def _readable(path: Path) -> None:
    """Give a written file the usual permissions (0666 less the umask): safetensors creates its
    files 0600, which leaves an exported LoRA unreadable to the other users of a shared machine."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def export_checkpoint(checkpoint: str | Path, out: str | Path, layout: str, dtype: str = "float32") -> Path:
    """``cliploom export-lora``: a checkpoint folder (or a run folder: its latest checkpoint) -> one file."""
    from .checkpoint import find_checkpoint, read_checkpoint_lora

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise CliploomError(f"unknown dtype {dtype!r}", f"use one of {', '.join(dtypes)}")
    from .config import config_from_dict

    folder = find_checkpoint(Path(checkpoint))
    state, meta = read_checkpoint_lora(folder)
    extra = None
    if (folder / "helios_patches.safetensors").is_file():  # route helios: its patch layers' deltas
        from .checkpoint import _load

        saved = _load(folder / "helios_patches.safetensors")
        extra = {k: v for k, v in saved.items() if k.endswith((".diff", ".diff_b"))}
    cfg = config_from_dict(meta["config"], f"{folder / 'state.json'} config").to_dict()
    info = {"step": meta["step"], "model": cfg["model"], "targets": cfg["targets"], "expert": cfg["expert"],
            "error_recycling": cfg["error_recycling"], "route": cfg["route"]}
    return export_lora(state, out, layout, rank=cfg["rank"], alpha=cfg["alpha"], dtype=dtypes[dtype], info=info,
                       route=cfg["route"], extra=extra)
