"""One quick run of the dev set (`bench_quality`'s 14 stories x 20 clips) with story overrides: how
the inference options of docs/benchmarks.md were compared, one line per run.

    python benchmarks/quality_sweep.py '{"color_match": "none", "seam_blend": 0, "guidance": 1}'
    python benchmarks/quality_sweep.py '{"svi_lora": false}' --lora src/cliploom/shapesworld/model/svi_lora.safetensors:0.75
    python benchmarks/quality_sweep.py '{"mode": "chain", "svi_lora": false}' --sample-seed 1

Keys are story keys (docs/story.md) plus ``svi_lora`` and ``mode``; the rest come from the model.
With ``"svi_lora": false`` the ``--lora`` file takes the SVI LoRA's place (it is named ``svi``, so
``first_clip: i2v`` leaves it off on clip 0 as it does the model's own).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="?", default="{}", help="story keys as JSON")
    ap.add_argument("--lora", help="one more LoRA, FILE[:WEIGHT]")
    ap.add_argument("--first-clip-weight", type=float, default=None,
                    help="that LoRA's weight on each story's clip 0 (per-clip weights: with fuse_loras false)")
    ap.add_argument("--json", help="also write every story's per-clip results to this file")
    ap.add_argument("--stories", type=int, default=14)
    ap.add_argument("--clips", type=int, default=20, help="clips per story (the dev set's plan goes on past 20)")
    ap.add_argument("--sample-seed", type=int, default=0)
    ap.add_argument("--model", default="builtin")
    args = ap.parse_args(argv)
    from cliploom.story import ClipSpec, LoraSpec, make_story

    over = json.loads(args.overrides)
    if args.first_clip_weight is not None and not args.lora:
        raise SystemExit("error: --first-clip-weight sets the weight of --lora on clip 0; give --lora FILE")
    fuse = over.pop("fuse_loras", False)  # unfused by default: per-clip weights need switchable adapters
    engine = bq.load_engine(args.model)
    settings = engine.model.settings
    devs = bq.dev_set(args.stories, args.clips, over.get("frames", settings.frames))
    loras = []
    if args.lora:
        path, _, weight = args.lora.partition(":")
        # with the model's SVI LoRA off, --lora stands in for it: named svi, so the engine treats it as
        # the SVI LoRA (first_clip: i2v turns it off on clip 0, as it does the model's own)
        name = "svi" if over.get("svi_lora") is False else None
        loras = [LoraSpec(Path(path), float(weight or 1.0), name=name)]
    stories, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for d, ref in zip(devs, bq.write_references(devs, settings.width, Path(tmp))):
            first = {loras[0].name: args.first_clip_weight} if loras and args.first_clip_weight is not None else None
            clip_specs = [ClipSpec(p, lora_weights=first if k == 0 else None) for k, p in enumerate(d.prompts)]
            story = make_story(clips=clip_specs, reference=ref, seed=d.story_seed(args.sample_seed),
                               loras=loras, fuse_loras=fuse, **over)
            clips = list(engine.generate(story, progress=False))
            frames = np.concatenate([c.frames.numpy() for c in clips])
            scored = bq.score(frames, [c.prompt for c in clips], [int(c.frames.shape[0]) for c in clips])
            scored.pop("result")
            stories.append({"story": d.index, **scored})
    agg = bq.aggregate(stories, args.clips)
    fails = collections.Counter(f for s in stories for c in s["clips"] for f in c["failed"])
    first = sum(1 for s in stories if s["clips"][0]["passed"])
    first_weight = f" (clip 0 weight {args.first_clip_weight:g})" if args.first_clip_weight is not None else ""
    line = (f"{args.overrides} {args.lora or ''}{first_weight}: {agg['clip_pass_rate'] * 100:.1f} % of clips pass, "
            f"{agg['stories_clean']}/{agg['stories']} stories clean, first clip {first}/{len(stories)}, "
            f"failures {dict(fails)}, moves into an edge failed {agg['edge_moves']['failed']}/"
            f"{agg['edge_moves']['measured']}, colour ΔE clip {args.clips} {agg['last_clip']['color_delta_e']:.2f}, "
            f"jump clip {args.clips} {agg['last_clip']['boundary_jump']:.2f} ({time.perf_counter() - started:.0f} s)")
    print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"line": line, "aggregate": agg, "stories": stories}, indent=1, default=str) + "\n")
    return {"aggregate": agg, "failures": dict(fails), "first_clip_pass": first}


if __name__ == "__main__":
    main()
