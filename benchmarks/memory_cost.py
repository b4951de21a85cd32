"""What `memory_from: frames` costs: seconds per clip against `memory_from: latents`, same stories,
same process, the two runs alternated so that both see the same machine (docs/benchmarks.md).

    python benchmarks/memory_cost.py [--stories 3] [--repeats 2]

Each round generates the first ``--stories`` dev stories (20 clips each) once per setting, in turn;
the line printed is each setting's median over rounds and their ratio. Nothing is scored.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402

SETTINGS = ("latents", "frames")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stories", type=int, default=3)
    ap.add_argument("--clips", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", default="builtin")
    args = ap.parse_args(argv)
    import torch

    from cliploom.story import ClipSpec, make_story

    engine = bq.load_engine(args.model)
    settings = engine.model.settings
    devs = bq.dev_set(args.stories, args.clips, settings.frames)
    times: dict[str, list[float]] = {k: [] for k in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        refs = bq.write_references(devs, settings.width, Path(tmp))
        list(engine.generate(make_story(clips=[ClipSpec(p) for p in devs[0].prompts[:2]], reference=refs[0]),
                             progress=False))  # warm-up: first-call costs belong to neither setting
        for _ in range(args.repeats):
            for key in SETTINGS:
                started = time.perf_counter()
                for d, ref in zip(devs, refs):
                    story = make_story(clips=[ClipSpec(p) for p in d.prompts], reference=ref, seed=d.seed,
                                       memory_from=key)
                    for _clip in engine.generate(story, progress=False):
                        pass
                times[key].append((time.perf_counter() - started) / (len(devs) * args.clips))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"s / clip over {len(devs)} stories x {args.clips} clips, median of {args.repeats} alternated rounds: "
          f"latents {med['latents']:.3f}, frames {med['frames']:.3f}, ratio {med['frames'] / med['latents']:.2f} "
          f"({torch.get_num_threads()} CPU threads)", flush=True)
    return med


if __name__ == "__main__":
    main()
