"""A contact sheet of one dev story as the engine generates it: one row per clip, every second frame,
to look at how a story fails (docs/benchmarks.md: story 11).

    python benchmarks/story_sheet.py 11 out.png ['{"mode": "chain", "svi_lora": false}'] [--sample-seed S] [--clips 14]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("story", type=int, help="dev story index (0..13)")
    ap.add_argument("out", help="PNG to write")
    ap.add_argument("overrides", nargs="?", default="{}", help="story keys as JSON (as quality_sweep takes them)")
    ap.add_argument("--sample-seed", type=int, default=0)
    ap.add_argument("--clips", type=int, default=14, help="clips shown (of the story's 20)")
    ap.add_argument("--scale", type=int, default=3, help="pixels per pixel")
    args = ap.parse_args(argv)
    import torch
    from PIL import Image

    torch.set_num_threads(int(os.environ.get("CLIPLOOM_THREADS", "2")))
    from cliploom.cli import _quiet_libraries
    from cliploom.engine import Engine
    from cliploom.story import ClipSpec, make_story

    _quiet_libraries()
    engine = Engine.load("builtin")
    settings = engine.model.settings
    dev = bq.dev_set(14, 20, settings.frames)[args.story]
    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "reference.png"
        dev.reference(settings.width).save(ref)
        story = make_story(clips=[ClipSpec(p) for p in dev.prompts], reference=ref,
                           seed=dev.story_seed(args.sample_seed), fuse_loras=False, **json.loads(args.overrides))
        rows = []
        for i, clip in enumerate(engine.generate(story, progress=False)):
            if i == args.clips:
                break
            frames = clip.frames.numpy()
            rows.append(np.concatenate(list(frames[::2]), axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0))) for r in rows]  # a black line between clips
    sheet = np.concatenate(rows, axis=0)
    out = Path(args.out)
    Image.fromarray(sheet).resize((sheet.shape[1] * args.scale, sheet.shape[0] * args.scale), Image.NEAREST).save(out)
    print(f"{out}: story {args.story} ({dev.prompts[0]}), {len(rows)} clips, one row each")
    return out


if __name__ == "__main__":
    main()
