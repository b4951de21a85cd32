"""Where the subject is on each side of every clip boundary, frames the loop drops included.

    python benchmarks/trace_boundaries.py [STORY.yaml] [--lora FILE|none|default] [--model DIR]

Generates a ShapesWorld story (default: examples/demo.yaml), decodes each clip's *full* latents
(the loop keeps only the frames after the re-created tail) and prints the subject's centre
(x, y in pixels, found like the evaluator does) at the previous clip's last frame, at the new
clip's frames 0 and 4 (the anchor slot and the end of the re-created tail in latent mode, K = 1)
and at its first kept frame. A clip that re-creates the tail starts where the last one ended;
one that snaps back to the anchor starts where clip 0 did.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def centres(frames: np.ndarray, prompt: str) -> np.ndarray:
    from cliploom.evaluate import _measure_frames
    from cliploom.shapesworld import parse_prompt

    return np.array([m.centroid for m in _measure_frames(frames, parse_prompt(prompt))])


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("story", nargs="?", default=str(ROOT / "examples" / "demo.yaml"))
    ap.add_argument("--model", default=None, help="model folder (default: the story's)")
    ap.add_argument("--lora", default="default",
                    help="the SVI LoRA: a file, `none`, or `default` (the model's own)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(int(os.environ.get("CLIPLOOM_THREADS", "2")))
    from cliploom.cli import _quiet_libraries
    from cliploom.engine import Engine
    import dataclasses

    from cliploom.story import LoraSpec, load_story

    _quiet_libraries()
    story = load_story(args.story)
    if args.lora == "none":
        story = dataclasses.replace(story, svi_lora=False)
    elif args.lora != "default":
        story = dataclasses.replace(story, svi_lora=False, loras=[*story.loras, LoraSpec(Path(args.lora))])
    engine = Engine.load(args.model or story.model, device="cpu")
    frames = story.resolve(engine.model.settings, engine.model.size_multiple, engine.model.scale_temporal).frames
    rows, prev_end, first = [], None, None
    for clip in engine.generate(story, progress=False):
        full = np.asarray(engine.model.decode_latents(clip.latents))[:frames]
        c = centres(full, clip.prompt)
        kept = clip.keep[0]
        row = {"clip": clip.index, "frame0": c[0], "frame4": c[min(4, len(c) - 1)], "first_kept": c[kept],
               "last": c[-1], "previous_last": prev_end}
        rows.append(row)
        first = c[0] if first is None else first
        fmt = lambda v: "   –   " if v is None else f"({v[0]:5.1f}, {v[1]:5.1f})"  # noqa: E731
        print(f"clip {clip.index:2d}  previous end {fmt(prev_end)}  frame 0 {fmt(c[0])}  frame 4 {fmt(row['frame4'])}"
              f"  first kept {fmt(c[kept])}  end {fmt(c[-1])}", flush=True)
        prev_end = c[-1]
    back = [np.linalg.norm(r["frame4"] - first) < np.linalg.norm(r["frame4"] - r["previous_last"])
            for r in rows[1:] if r["previous_last"] is not None]
    if back:
        print(f"{sum(back)}/{len(back)} clips re-create their tail nearer the anchor's start than the previous end")
    return rows


if __name__ == "__main__":
    main()
