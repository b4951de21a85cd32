"""One dev story clip by clip: where the subject ends each clip against where the world would have it,
each clip's verdict, and the gray block's colour (how story 3 drifted under the top edge and story 13's
block turned blue; docs/benchmarks.md).

    python benchmarks/story_track.py 3 ['{"mode": "chain", "svi_lora": false}'] [--sample-seed S]

The world's path is the story's own (``DevStory.ground_truth``) on the clip lengths the run kept, from
the same start: the two part where the generated subject drifts from where the motions would take it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402


def block_colour(frame: np.ndarray, centre: np.ndarray) -> list[int]:
    """Mean RGB of the 2 x 2 pixels at the gray block's centre (px)."""
    x, y = np.round(centre).astype(int)
    return frame[y - 1 : y + 1, x - 1 : x + 1].reshape(-1, 3).mean(0).round().astype(int).tolist()


def track(engine, dev: "bq.DevStory", overrides: dict, sample_seed: int, reference: Path, clips: int | None = None):
    """Per-clip records: motion, verdict, failed checks, subject end (measured, world), block RGB."""
    from cliploom.story import ClipSpec, make_story

    prompts = dev.prompts[:clips] if clips else dev.prompts
    story = make_story(clips=[ClipSpec(p) for p in prompts], reference=reference,
                       seed=dev.story_seed(sample_seed), **overrides)
    out = list(engine.generate(story, progress=False))
    frames = np.concatenate([c.frames.numpy() for c in out])
    lengths = [int(c.frames.shape[0]) for c in out]
    scored = bq.score(frames, prompts, lengths)
    size = frames.shape[2]
    measured = np.array([[np.nan if v is None else v for v in xy] for xy in scored["result"]["per_frame"]["centroid"]])
    world = dev.ground_truth(lengths, size=size).ground_truth()
    records, end = [], -1
    for clip, n, motion in zip(scored["clips"], lengths, dev.motions):
        end += n
        records.append({
            "index": clip["index"], "motion": motion, "passed": clip["passed"], "failed": clip["failed"],
            "measured_end": measured[end].round(1).tolist(), "world_end": world["center"][end].round(1).tolist(),
            "block_rgb": None if dev.distractor is None else block_colour(frames[end], world["distractor"][end]),
        })
    return records


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("story", type=int, help="dev story index (0..13)")
    ap.add_argument("overrides", nargs="?", default="{}", help="story keys as JSON (as quality_sweep takes them)")
    ap.add_argument("--sample-seed", type=int, default=0)
    ap.add_argument("--clips", type=int, default=None, help="only the story's first N clips")
    ap.add_argument("--model", default="builtin")
    args = ap.parse_args(argv)
    engine = bq.load_engine(args.model)
    settings = engine.model.settings
    devs = bq.dev_set(14, 20, settings.frames)
    with tempfile.TemporaryDirectory() as tmp:
        reference = bq.write_references(devs, settings.width, Path(tmp))[args.story]
        records = track(engine, devs[args.story], json.loads(args.overrides), args.sample_seed, reference, args.clips)
    print(f"story {args.story} ({devs[args.story].prompts[0]}), sample seed {args.sample_seed}, {args.overrides}")
    for r in records:
        (mx, my), (wx, wy) = r["measured_end"], r["world_end"]
        block = "" if r["block_rgb"] is None else f"  block RGB {' '.join(map(str, r['block_rgb']))}"
        verdict = "pass" if r["passed"] else "FAIL " + ",".join(r["failed"] or ["area"])
        print(f"clip {r['index']:2d} {r['motion']:6s} {verdict:18s} end ({mx:5.1f}, {my:5.1f})  world ({wx:5.1f}, {wy:5.1f}){block}")
    return records


if __name__ == "__main__":
    main()
