"""Colour matching variants that were measured and not adopted, on dev stories in `pro` mode with the
built-in model's defaults: how docs/benchmarks.md's "opening frames" rows were made.

    python benchmarks/colour_variants.py opening --sample-seed 0        # all 14 stories
    python benchmarks/colour_variants.py frame_lab --stories 12 --sample-seed 1

Variants (each replaces the decoder's matching of every clip to the anchor):
  default    the engine's own (RGB histogram matching of each clip as a whole)
  opening    as default, then the first clip's frames 0-1 (the reference's VAE round trip) matched
             each on its own to the reference in Lab
  frame_lab  every frame matched on its own to the reference in Lab

One line per story (colour ΔE at clip 2 and the last clip, failed clips), then clips passing, stories
clean and the mean ΔE at the last clip.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402

VARIANTS = ("default", "opening", "frame_lab")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variant", choices=VARIANTS)
    ap.add_argument("--stories", default="all", help="dev story indices, comma-separated (default: all 14)")
    ap.add_argument("--sample-seed", type=int, default=0)
    ap.add_argument("--clips", type=int, default=20, help="clips per story (default 20)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("CLIPLOOM_THREADS", "2")))
    from cliploom import colour, loom
    from cliploom.cli import _quiet_libraries
    from cliploom.engine import Engine

    _quiet_libraries()

    class Decoder(loom.ClipDecoder):
        def __init__(self, model, overlap, color_match=None, anchor=None, method=None):
            super().__init__(model, overlap, color_match, anchor, method)
            if anchor is None or self.color_match is None:
                raise SystemExit("error: the variants change colour matching; run them with the model's color_match on")
            self.lab = colour.ColourTarget.of(torch.as_tensor(np.array(anchor)), "histogram_lab")
            self.first = True

        def alone(self, frames):  # each frame matched on its own to the reference, in Lab
            return torch.stack([colour.match_colour(f[None], self.lab, method="histogram_lab")[0] for f in frames])

        def match(self, frames):
            if args.variant == "frame_lab":
                return self.alone(frames)
            out = super().match(frames)
            if args.variant == "opening" and self.first:
                out[:2] = self.alone(frames[:2])
            self.first = False
            return out

    engine_decoder, loom.ClipDecoder = loom.ClipDecoder, Decoder
    try:
        engine = Engine.load("builtin")
        settings = engine.model.settings
        devs = bq.dev_set(14, args.clips, settings.frames)
        which = range(14) if args.stories == "all" else [int(i) for i in args.stories.split(",")]
        last, passed, clean = {}, 0, 0
        with tempfile.TemporaryDirectory() as tmp:
            for i in which:
                d = devs[i]
                ref = Path(tmp) / f"ref_{i:02d}.png"
                d.reference(settings.width).save(ref)
                s = bq.score(*bq.generate_story(engine, d, bq.mode_run("pro"), ref, {}, args.sample_seed))
                de = [c["color_delta_e"] or 0.0 for c in s["clips"]]
                last[i] = de[-1]
                failed = [(c["index"], c["failed"]) for c in s["clips"] if c["failed"]]
                passed += len(de) - len(failed)
                clean += not failed
                print(f"story {i:2d} {args.variant}: colour ΔE clip 2 {de[min(1, len(de) - 1)]:.2f}, "
                      f"clip {len(de)} {de[-1]:.2f}, failed {failed}",
                      flush=True)
    finally:
        loom.ClipDecoder = engine_decoder
    clips = args.clips * len(last)
    print(f"{args.variant}, sampling seed {args.sample_seed}: {100 * passed / clips:.1f} % of clips pass, "
          f"{clean}/{len(last)} stories clean, mean colour ΔE at the last clip {float(np.mean(list(last.values()))):.2f}")
    return last


if __name__ == "__main__":
    main()
