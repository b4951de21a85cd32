"""The base model's quality bars (issue 4): single clips and VAE reconstruction.

    python benchmarks/check_base.py [--model DIR] [--clips 96] [--vae-clips 16] [--modes chain,pro]

(a) Single clips: N one-clip videos from varied grammar prompts (random subject and
    background, the six motions in turn, the start drawn by ``render_reference(prompt, seed)``),
    each generated from its reference frame by the base model (without the model's own SVI
    LoRA unless ``--with-svi-lora``) and scored by ``cliploom.evaluate``. A clip meets
    the bar when the subject is *kept* (area check) and it *moves as prompted* (motion check);
    bar: >= 90 % of clips. The share passing every evaluator check is reported too.
    The bar is taken in the first of ``--modes``: ``chain``, whose single clip is the base model's
    own image-to-video conditioning (``y`` = VAE(reference + grey frames), as Wan and the DiT's
    training build it). The other modes are reported beside it: ``pro`` conditions a first
    clip with SVI 2.0 Pro's ``y`` (anchor latent + zero latents), which a base model never saw in
    training and which its SVI LoRA exists to teach.
(b) VAE: held-out ShapesWorld clips (``sample_clip``) encoded and decoded by the model's VAE;
    bar: mean PSNR >= 30 dB.

Writes ``benchmarks/results/base_quality.json`` and the section between
``<!-- quality-base:start -->`` and ``<!-- quality-base:end -->`` in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import ROOT, model_kind, score  # noqa: E402

BASE_SEED = 40400  # single-clip prompts and placements; VAE clips use BASE_SEED + 100000 + j
SINGLE_BAR = 0.90
PSNR_BAR = 30.0


def single_prompts(n: int) -> list[tuple[str, int]]:
    """(prompt, placement seed) for ``n`` single clips: random looks, the six motions in turn."""
    from cliploom.shapesworld.vocab import MOTIONS
    from cliploom.shapesworld.world import random_appearance

    motions = list(MOTIONS)
    out = []
    for j in range(n):
        spec = random_appearance(np.random.default_rng([BASE_SEED, j]), motion=motions[j % len(motions)])
        out.append((spec.prompt, BASE_SEED + j))
    return out


def single_clip_check(engine, n: int, mode: str, overrides: dict, size: int, svi_lora: bool = False) -> dict:
    from cliploom.shapesworld import parse_prompt, render_reference
    from cliploom.story import ClipSpec, make_story

    records, seconds = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for j, (prompt, seed) in enumerate(single_prompts(n)):
            ref = Path(tmp) / f"ref_{j:03d}.png"
            render_reference(prompt, size=size, seed=seed).save(ref)
            story = make_story(clips=[ClipSpec(prompt)], reference=ref, mode=mode, seed=seed, svi_lora=svi_lora,
                               **overrides)
            started = time.perf_counter()
            (clip,) = list(engine.generate(story, progress=False))
            seconds += time.perf_counter() - started
            frames = clip.frames.numpy()
            c = score(frames, [prompt], [len(frames)])["clips"][0]
            kept, moved = c["area_status"] == "kept", c["checks"]["motion"] is True
            records.append({"prompt": prompt, "seed": seed, "motion": parse_prompt(prompt).motion, "subject_kept": kept, "motion_ok": moved,
                            "ok": kept and moved, "all_checks": c["passed"], "failed": c["failed"],
                            "area_status": c["area_status"], "displacement": c["displacement"],
                            "expected_displacement": c["expected_displacement"], "color_delta_e": c["color_delta_e"]})
    per_motion = defaultdict(list)
    for r in records:
        per_motion[r["motion"]].append(r["ok"])
    rate = float(np.mean([r["ok"] for r in records]))
    return {
        "clips": n,
        "mode": mode,
        "svi_lora": bool(svi_lora and engine.model.settings.svi_lora),
        "rate": round(rate, 4),
        "subject_kept_rate": round(float(np.mean([r["subject_kept"] for r in records])), 4),
        "motion_ok_rate": round(float(np.mean([r["motion_ok"] for r in records])), 4),
        "all_checks_rate": round(float(np.mean([r["all_checks"] for r in records])), 4),
        "per_motion": {m: round(float(np.mean(v)), 4) for m, v in per_motion.items()},
        "bar": SINGLE_BAR,
        "meets_bar": rate >= SINGLE_BAR,
        "seconds_per_clip": round(seconds / n, 4),
        "records": records,
    }


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)


def vae_check(model, n: int, frames: int, size: int) -> dict:
    """VAE round trips of held-out ShapesWorld clips (seeds outside the trainer's usual range).

    Reports the mean PSNR (the bar) and how many round trips still pass every evaluator check:
    the evaluator's ceiling for any video this VAE decodes (a clip the VAE alone makes fail
    would fail whatever the DiT does).
    """
    from cliploom.models.components import frames_to_tensor
    from cliploom.shapesworld import sample_clip

    values, passed = [], []
    for j in range(n):
        seq = sample_clip(BASE_SEED + 100000 + j, frames=frames, size=size)
        clip = seq.frames()
        back = model.decode_latents(model.encode_video(frames_to_tensor(clip))).numpy()[: len(clip)]
        values.append(psnr(clip, back))
        passed.append(bool(score(back, seq.prompts, [len(back)])["passed"]))
    mean = float(np.mean(values))
    return {"clips": n, "frames": frames, "psnr_mean": round(mean, 3), "psnr_min": round(float(np.min(values)), 3),
            "bar": PSNR_BAR, "meets_bar": mean >= PSNR_BAR, "evaluator_pass_rate": round(float(np.mean(passed)), 4)}


def write_markdown(r: dict, command: str, docs: Path) -> None:
    s, v = r["single"], r["vae"]
    kind = r["model"]["kind"]
    lines = [
        "## Quality: base model bars (single clips, VAE)",
        "",
        f"Command: `{command}` (part of `make bench-quality`). Model: `{r['model']['path']}` ({kind}), "
        f"{r['settings']['width']}x{r['settings']['height']}, {r['settings']['frames']} frames per clip, "
        f"{r['settings']['steps']} steps, {s['mode']} mode, "
        f"{'with the model' + chr(39) + 's own SVI LoRA' if s['svi_lora'] else 'no SVI LoRA (the base model)'}. "
        "The bar is taken in the first mode; `chain` mode's single clip is the base model's own image-to-video "
        "conditioning, while `pro` pads with zero latents, which only an SVI LoRA teaches (docs/shapesworld.md).",
        "",
    ]
    per_motion = ", ".join(f"{m} {100 * x:.0f} %" for m, x in sorted(s["per_motion"].items()))
    lines += [
        "| bar | measured | target | met |",
        "|---|---|---|---|",
        f"| single clips: subject kept and moving as prompted | {100 * s['rate']:.1f} % of {s['clips']} | >= 90 % | "
        f"{'yes' if s['meets_bar'] else 'no'} |",
        *[f"| single clips in {m} mode (reported beside the bar) | {100 * o['rate']:.1f} % of {o['clips']} | – | – |"
          for m, o in r.get("single_other_modes", {}).items()],
        f"| VAE reconstruction PSNR ({v['clips']} held-out clips of {v['frames']} frames) | {v['psnr_mean']:.2f} dB "
        f"(worst {v['psnr_min']:.2f}) | >= 30 dB | {'yes' if v['meets_bar'] else 'no'} |",
        "",
        f"Single clips ({s['mode']} mode): subject kept {100 * s['subject_kept_rate']:.1f} %, motion as prompted "
        f"{100 * s['motion_ok_rate']:.1f} %, every evaluator check {100 * s['all_checks_rate']:.1f} %; by motion: "
        f"{per_motion}. VAE round trips passing every evaluator check: {100 * v['evaluator_pass_rate']:.0f} % "
        "(the evaluator's ceiling for this VAE). Per-clip records: `benchmarks/results/base_quality.json`.",
        "",
    ]
    from bench_engine import update_section

    update_section(docs, "quality-base", "\n".join(lines))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the built-in model)")
    ap.add_argument("--clips", type=int, default=96, help="single clips (default 96: 16 per motion)")
    ap.add_argument("--vae-clips", type=int, default=16, help="VAE round-trip clips (default 16)")
    ap.add_argument("--modes", default="chain,pro",
                    help="motion modes of the single clips, comma-separated; the bar is taken in the first "
                         "(default chain,pro: the base model's own I2V conditioning, then SVI 2.0 Pro's)")
    ap.add_argument("--with-svi-lora", action="store_true",
                    help="apply the model's own SVI LoRA (default: the base model alone, as issue 4 asks)")
    ap.add_argument("--frames", type=int, help="frames per clip (default: the model's)")
    ap.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out-root", default=str(ROOT), help="where benchmarks/results/ and docs/ are written")
    args = ap.parse_args(argv)
    if args.clips < 1 or args.vae_clips < 1:
        ap.error("--clips and --vae-clips must be at least 1")

    import torch

    torch.set_num_threads(int(os.environ.get("CLIPLOOM_THREADS", "2")))
    from cliploom.cli import _quiet_libraries
    from cliploom.engine import Engine

    _quiet_libraries()
    engine = Engine.load(args.model, device=args.device)
    settings = engine.model.settings
    frames = args.frames or settings.frames
    overrides = {k: v for k, v in (("frames", args.frames), ("steps", args.steps)) if v is not None}
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes:
        ap.error("--modes needs at least one mode")
    singles = {}
    for mode in modes:
        singles[mode] = single_clip_check(engine, args.clips, mode, overrides, settings.width, args.with_svi_lora)
        print(f"single clips, {mode} mode: {100 * singles[mode]['rate']:.1f} % subject kept and moving as prompted"
              + (f" ({'meets' if singles[mode]['meets_bar'] else 'misses'} the 90 % bar)" if mode == modes[0] else
                 " (reported beside the bar)"), flush=True)
    single = singles[modes[0]]
    vae = vae_check(engine.model, args.vae_clips, frames, settings.width)
    print(f"VAE: {vae['psnr_mean']:.2f} dB mean PSNR ({'meets' if vae['meets_bar'] else 'misses'} the 30 dB bar)")
    result = {
        "model": {"path": str(engine.model.path), "kind": model_kind(engine.model.path)},
        "settings": {"frames": frames, "steps": args.steps or settings.steps, "width": settings.width,
                     "height": settings.height, "device": args.device},
        "single": single,
        "single_other_modes": {m: {k: v for k, v in r.items() if k != "records"} for m, r in singles.items()
                               if m != modes[0]},
        "vae": vae,
    }
    out_root = Path(args.out_root)
    out = out_root / "benchmarks" / "results" / "base_quality.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    command = " ".join(["python", "benchmarks/check_base.py", *(argv if argv is not None else sys.argv[1:])])
    write_markdown(result, command, out_root / "docs" / "benchmarks.md")
    return result


if __name__ == "__main__":
    main()
