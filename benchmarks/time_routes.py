"""Seconds per clip and seconds to the first frames of every route, timed in one run against `svi`
(issue 17's speed targets: every route ≤ 2x `svi`'s s / clip; the causal routes' first frames ≤ ⅓ of
`svi`'s first clip). Dev story 0, 20 clips, each run the median of ROUNDS interleaved timings, a fresh
engine for each (loaded outside the timing), the story as `make bench-routes` makes it; every run
is first run once, untimed, on a one-clip story. *Cold*: the story on a freshly loaded engine (the
route's LoRA applied within the timing, as for a CLI run); *warm*: the same story again on that
engine, its LoRA stack already in place (a service's next job). LoRAs fused, as a CLI run has them
(`fuse_loras`' default; the image-to-video first clip of `svi` and `df` keeps their stack unfused and
merges it from clip 1, as it does for a user).

    python benchmarks/time_routes.py [--runs svi,chain,df,causal,self-forcing,helios] [--rounds 3]

First frames: the first streamed block on the causal routes (`on_block`), the first clip elsewhere;
both include applying the route's LoRA, as a user's first frames do.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402
import bench_routes as br  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="svi,chain,df,causal,self-forcing,helios")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clips", type=int, default=20)
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--json", help="also write the timings to this file")
    args = ap.parse_args(argv)
    import torch

    from cliploom.engine import Engine

    br.setup_torch()
    runs = [br.parse_run(t) for t in args.runs.split(",") if t]
    if runs[0].route != "svi":
        raise SystemExit("error: --runs must start with svi: every ratio is against it")
    timings: dict[str, list[tuple[float, float]]] = {run.name: [] for run in runs}
    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "reference.png"
        for run in runs:  # untimed: the process's first calls of each route (lazy imports, allocator) are not its speed
            engine = Engine.load(args.model)
            dev = bq.dev_set(1, 1, engine.model.settings.frames)[0]
            dev.reference(engine.model.settings.width).save(ref)
            br.generate(engine, dev, run, {}, ref, 0, fuse=True)
        for _ in range(args.rounds):  # interleaved: a slow spell of the machine touches every run alike
            for run in runs:
                engine = Engine.load(args.model)  # fresh: no LoRA stack or compiled state from the run before
                dev = bq.dev_set(1, args.clips, engine.model.settings.frames)[0]
                dev.reference(engine.model.settings.width).save(ref)
                started = time.perf_counter()
                _, _, lengths, first = br.generate(engine, dev, run, {}, ref, 0, fuse=True)
                cold = (first, (time.perf_counter() - started) / len(lengths))
                started = time.perf_counter()  # the same story again on the same engine: a service's next job
                _, _, lengths, first = br.generate(engine, dev, run, {}, ref, 0, fuse=True)
                timings[run.name].append(cold + (first, (time.perf_counter() - started) / len(lengths)))
    def median(name: str, k: int) -> float:
        values = sorted(t[k] for t in timings[name])
        return values[len(values) // 2]

    base = runs[0].name
    out = {"rounds": args.rounds, "clips": args.clips, "threads": torch.get_num_threads(), "runs": {}}
    for name in timings:
        row = {}
        for k, case in ((0, "cold"), (2, "warm")):
            first, per_clip = median(name, k), median(name, k + 1)
            spread = sorted(t[k + 1] for t in timings[name])
            row[case] = {"first_frames_s": round(first, 3), "s_per_clip": round(per_clip, 4),
                         "s_per_clip_range": [round(spread[0], 4), round(spread[-1], 4)],
                         "clip_ratio_to_svi": round(per_clip / median(base, k + 1), 3),
                         "first_ratio_to_svi_first_clip": round(first / median(base, k), 3)}
            print(f"{name} ({case}): first frames {first:.3f} s ({row[case]['first_ratio_to_svi_first_clip']:.2f} of "
                  f"svi's first clip), {per_clip:.3f} s / clip (range {spread[0]:.3f}-{spread[-1]:.3f}; "
                  f"{row[case]['clip_ratio_to_svi']:.2f}x svi)", flush=True)
        out["runs"][name] = row
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
