"""``cliploom convert IN.pt -o OUT.safetensors``: a causal model's original-layout state dict to safetensors.

Self-Forcing, LongLive and CausVid publish their causal Wan DiTs as PyTorch pickles (``.pt``) of a
training checkpoint: ``{"generator": state_dict, "generator_ema": state_dict, ...}`` with keys of
the original Wan layout under a ``model.`` prefix (their ``WanDiffusionWrapper``). cliploom never
unpickles at load time; this explicit command reads the file with
``torch.load(weights_only=True)`` (tensors and plain containers only: no code runs), takes the EMA
weights when present, strips the wrapper's prefix, checks that what is left is a Wan DiT with
finite weights, and writes it as safetensors, tagged with its route (``cliploom_route`` in the
header, which ``cliploom inspect`` reports). Safetensors files (Krea realtime) need no conversion.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CliploomError

STATE_KEYS = ("generator_ema", "generator", "model_ema", "ema", "state_dict", "model", "module")
PREFIXES = ("model.", "module.", "_orig_mod.", "generator.")


def find_state_dict(data, key: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The tensor state dict inside a loaded checkpoint and where it was (``key`` forces one)."""
    if _is_state(data) and key is None:
        return data, "(top level)"
    if not isinstance(data, dict):
        raise CliploomError(f"the checkpoint holds a {type(data).__name__}, not a state dict",
                            "pass a training checkpoint or a state dict saved with torch.save")
    keys = [key] if key else [k for k in STATE_KEYS if k in data]
    for k in keys:
        if k in data and _is_state(data[k]):
            return data[k], k
    shown = ", ".join(sorted(str(k) for k in data)[:8])
    if key:
        raise CliploomError(f"the checkpoint has no state dict under {key!r} (it has {shown})", "pass --key with one of them")
    raise CliploomError(f"no state dict found in the checkpoint (top-level keys: {shown})",
                        "pass --key NAME naming the one to convert")


def _is_state(d) -> bool:
    return isinstance(d, dict) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes every key shares (``model.``, ``module.``, ``_orig_mod.``)."""
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if all(k.startswith(p) for k in state):
                state = {k[len(p):]: v for k, v in state.items()}
                changed = True
    return state


def convert_checkpoint(src: str | Path, out: str | Path, route: str = "causal", key: str | None = None) -> dict:
    """Convert ``src`` (a ``.pt``/``.pth`` checkpoint) to the safetensors file ``out``; returns a summary."""
    from safetensors.torch import save_file

    from ..video_io import publish
    from . import formats

    src, out = Path(src).expanduser(), Path(out).expanduser()
    if not src.is_file():
        raise CliploomError(f"{src} does not exist", "check the path")
    try:
        data = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # not a pickle, a truncated file, or objects weights_only refuses
        raise CliploomError(f"{src} cannot be read as a weights-only PyTorch checkpoint: {str(e).splitlines()[0][:160]}",
                            "pass a .pt/.pth file of tensors (cliploom never runs code from a pickle)") from None
    state, where = find_state_dict(data, key)
    state = strip_prefix(state)
    layout = formats.detect_dit_layout(list(state))
    if layout not in ("wan", "comfy", "diffusers"):
        raise CliploomError(f"the state dict under {where} is not a Wan DiT (keys like {next(iter(state))!r})",
                            "convert the generator's weights of a causal Wan checkpoint")
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CliploomError(f"{src}: tensor {name} holds NaN or Inf", "use an intact checkpoint")
    meta = {"cliploom_route": route, "cliploom_converted_from": src.name, "cliploom_state": where}
    tmp = out.with_name(out.name + ".partial")  # never a half-written file under the final name
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
        publish(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    params = sum(t.numel() for t in state.values())
    return {"path": str(out), "tensors": len(state), "parameters": params, "state": where, "layout": layout,
            "route": route}


def add_command(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert a causal model's .pt checkpoint (Self-Forcing, LongLive) to safetensors",
        description="Read a PyTorch checkpoint with torch.load(weights_only=True) -- no code from the file runs -- "
        "take its generator (EMA first), strip wrapper prefixes and write safetensors tagged with its route.")
    p.add_argument("checkpoint", help="the .pt / .pth file")
    p.add_argument("-o", "--out", required=True, help="output .safetensors file")
    p.add_argument("--key", help="the state dict to take (default: generator_ema, then generator, model, ...)")
    p.add_argument("--route", default="causal", choices=("causal", "df", "svi"), help="route tag written in the header")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    from ..inputs import check_output_file

    check_output_file(args.out, "converted weights", (".safetensors",))
    r = convert_checkpoint(args.checkpoint, args.out, args.route, args.key)
    print(f"wrote {r['path']}: {r['tensors']} tensors, {r['parameters']:,} parameters from {r['state']} "
          f"({r['layout']} layout), route {r['route']}")
    return 0
