"""Assemble the built-in ShapesWorld model folder from the training runs.

    python -m cliploom.shapesworld.build_model [--vae runs/vae/final] [--dit runs/dit/final]
        [--out src/cliploom/shapesworld/model] [--steps N] [--guidance G]

Writes a diffusers-layout Wan image-to-video folder (``model_index.json``, ``transformer/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) plus ``cliploom.json`` with the
model's defaults (32x32, 17 frames at 16 fps, its sampling steps, guidance and shift). The
folder is written beside the target and renamed into place, so a failed build never leaves a
half model behind. The result loads with ``cliploom.load_model`` like any Wan I2V folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from .world import FPS

MODEL_DIR = Path(__file__).parent / "model"

DEFAULTS = {
    "family": "shapesworld",
    "max_sequence_length": 24,
    "width": 32,
    "height": 32,
    "fps": FPS,
    "frames": 17,  # 5 latent frames: the clip length the VAE was trained on end to end
    "steps": 8,
    "guidance": 2.0,
    "shift": 5.0,
    "negative_prompt": "",
    # Chosen on the dev set (docs/benchmarks.md, issue 12): guidance only above the boundary, the
    # anchor's colour distribution matched at decode (histogram), one blended frame at each seam,
    # clip 0 as the base model's own image-to-video (no SVI LoRA there), every later clip anchored on
    # the frame the clip before ended on (re-anchoring: stories clean 6.3 -> 9.7 of 14), and its
    # motion memory the clip before's frames encoded again (memory_from: frames: more clips pass,
    # and no subject is carried into the frame edge it stops at).
    "guidance_low": 1.0,
    "guidance_boundary": 0.7,
    "color_match": "anchor",
    "color_match_method": "histogram",
    "first_clip": "i2v",
    "anchor": "last_frame",
    "memory_from": "frames",
    "seam_blend": 1,
    # Chosen on the keyframe set (docs/benchmarks.md, issue 15) for the keyframe-trained SVI LoRA:
    # clips with keyframes guided 4x along their keyframes' pull.
    "keyframe_guidance": 4.0,
}
# Chosen on the dev set for the shipped route weights (docs/routes.md, issue 17): the Helios weights run
# best without the mid-term history (2x4x4 compression leaves one token per latent pair at 4x4 latents)
ROUTE_OPTIONS = {"helios": {"mid": 0}}


def export_vae_checkpoint(checkpoint: Path, frozen_dir: Path, out: Path) -> Path:
    """Save the decoder trained so far (``train_vae``'s checkpoint, taken during its decoder-only
    stage) as a VAE folder, with the frozen encoder's latent statistics. Lets the model be built
    while the decoder keeps training."""
    import torch

    from .train_vae import VAEConfig, build_vae
    from .trainutil import from_dict, load_checkpoint

    state = load_checkpoint(checkpoint)
    frozen = json.loads((frozen_dir / "config.json").read_text())
    vae = build_vae(from_dict(VAEConfig, state["config"]))
    vae.load_state_dict(state["model"])
    vae.register_to_config(latents_mean=frozen["latents_mean"], latents_std=frozen["latents_std"])
    with torch.no_grad():
        from safetensors.torch import load_file

        enc = load_file(frozen_dir / "diffusion_pytorch_model.safetensors")
        own = vae.state_dict()
        changed = [k for k in enc if (k.startswith("encoder.") or k.startswith("quant_conv.")) and not torch.equal(enc[k], own[k])]
        if changed:
            raise SystemExit(f"error: {checkpoint} has an encoder that differs from {frozen_dir} ({changed[0]}...)")
    vae.save_pretrained(out, safe_serialization=True)
    seconds = state.get("stage_seconds", {})
    report = {"from_checkpoint_step": state["step"], "stage_seconds": seconds, "total_hours": sum(seconds.values()) / 3600,
              "stages": state.get("config", {}).get("stages"), "params": sum(p.numel() for p in vae.parameters())}
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return out


def build(vae_dir: Path, dit_dir: Path, out: Path, settings: dict, svi_lora: Path | None = None,
          route_loras: dict[str, Path] | None = None, keyframe_lora: Path | None = None) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    from ..models.tiny import write_model_index

    for path, what in [(vae_dir / "config.json", "VAE"), (dit_dir / "transformer" / "config.json", "DiT")]:
        if not path.is_file():
            raise SystemExit(f"error: no {what} at {path.parent}; train it first (see docs/shapesworld.md)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        # Re-saved in shards of at most 10 MB (same tensors): no single file in the repository is large.
        WanTransformer3DModel.from_pretrained(dit_dir / "transformer").save_pretrained(
            tmp / "transformer", safe_serialization=True, max_shard_size="10MB"
        )
        shutil.copytree(dit_dir / "text_encoder", tmp / "text_encoder")
        shutil.copytree(dit_dir / "tokenizer", tmp / "tokenizer")
        (tmp / "vae").mkdir()
        for name in ("config.json", "diffusion_pytorch_model.safetensors"):
            shutil.copy2(vae_dir / name, tmp / "vae" / name)
        FlowMatchEulerDiscreteScheduler(shift=settings["shift"]).save_pretrained(tmp / "scheduler")
        write_model_index(tmp)  # a plain Wan I2V folder: no image encoder, one expert
        if svi_lora is not None:
            shutil.copy2(svi_lora, tmp / "svi_lora.safetensors")
            settings = {**settings, "svi_lora": "svi_lora.safetensors"}
        if keyframe_lora is not None:  # the keyframe-trained SVI LoRA, for stories with end frames
            shutil.copy2(keyframe_lora, tmp / "keyframe_lora.safetensors")
            settings = {**settings, "keyframe_lora": "keyframe_lora.safetensors"}
        for route, path in (route_loras or {}).items():  # the weights of the other routes (docs/routes.md)
            shutil.copy2(path, tmp / f"{route}_lora.safetensors")
            settings = {**settings, "route_loras": {**settings.get("route_loras", {}), route: f"{route}_lora.safetensors"}}
            if route in ROUTE_OPTIONS:  # the option defaults measured for those weights
                settings = {**settings, "route_options": {**settings.get("route_options", {}), route: ROUTE_OPTIONS[route]}}
        (tmp / "cliploom.json").write_text(json.dumps(settings, indent=2) + "\n")
        for report, name in [(vae_dir / "training_report.json", "vae"), (dit_dir / "training_report.json", "dit")]:
            if report.is_file():
                shutil.copy2(report, tmp / f"training_report_{name}.json")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB)")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m cliploom.shapesworld.build_model", description=__doc__.split("\n")[0])
    p.add_argument("--vae", type=Path, default=Path("runs/vae/final"))
    p.add_argument("--vae-checkpoint", type=Path, default=None,
                   help="take the decoder from this train_vae checkpoint (decoder-only stage) instead of --vae")
    p.add_argument("--frozen", type=Path, default=Path("runs/vae/frozen"))
    p.add_argument("--dit", type=Path, default=Path("runs/dit/final"))
    p.add_argument("--dit-checkpoint", type=Path, default=None,
                   help="take the DiT (EMA) from this train_dit run folder's latest checkpoint instead of --dit")
    p.add_argument("--svi-lora", type=Path, default=None, help="the SVI LoRA applied by default (safetensors)")
    p.add_argument("--keyframe-lora", type=Path, default=None,
                   help="a keyframe-trained SVI LoRA, applied instead of --svi-lora to stories with keyframes")
    p.add_argument("--route-lora", action="append", default=[], metavar="ROUTE=FILE",
                   help="a route's LoRA (cliploom.routes), e.g. df=runs/df-shapesworld/lora_svi.safetensors; repeatable")
    p.add_argument("--out", type=Path, default=MODEL_DIR)
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--guidance", type=float, default=DEFAULTS["guidance"])
    args = p.parse_args(argv)
    if args.vae_checkpoint is not None:
        args.vae = export_vae_checkpoint(args.vae_checkpoint, args.frozen, Path(tempfile.mkdtemp(prefix="cliploom-vae-")))
    if args.dit_checkpoint is not None:
        from .train_dit import export_checkpoint

        args.dit = export_checkpoint(args.dit_checkpoint, Path(tempfile.mkdtemp(prefix="cliploom-dit-")))
    route_loras = {}
    for item in args.route_lora:
        route, _, path = item.partition("=")
        if not path or not Path(path).is_file():
            raise SystemExit(f"error: --route-lora {item}: not ROUTE=FILE with an existing LoRA file")
        route_loras[route] = Path(path)
    build(args.vae, args.dit, args.out, {**DEFAULTS, "steps": args.steps, "guidance": args.guidance}, args.svi_lora,
          route_loras, args.keyframe_lora)


if __name__ == "__main__":
    main()
